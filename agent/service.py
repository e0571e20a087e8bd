"""One agent: wires the state store, models, MQTT link, reconciler and local API.

An agent owns no thread of its own: its MQTT link runs on a shared network thread, its
heartbeat on a shared timer, and its reconciler's steps on a shared pool (see
:mod:`edgefleet.agent.fleet_resources`), so one process can run many agents
(:class:`~edgefleet.agent.fleet_host.AgentHost`); an agent started alone builds that machinery
for itself.

Start order matters: active models are loaded from disk and the local API comes up *before* the
broker is reached, so a device keeps serving through a control-plane or network outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import uvicorn

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.deployment.reconciler import Reconciler
from edgefleet.agent.deployment.state_store import StateStore
from edgefleet.agent.fleet_resources import FleetResources
from edgefleet.agent.link import MqttLink
from edgefleet.agent.scheduling import SerialStepper, TimerHandle
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.serving.v2_api import create_inference_app
from edgefleet.agent.transfer.bandwidth import BandwidthLimiter
from edgefleet.agent.transfer.http import HttpFetcher
from edgefleet.agent.transfer.mqtt_chunks import ChunkFetcher
from edgefleet.shared.errors import ConfigError, NotFoundError
from edgefleet.shared.link.base import LinkFactory
from edgefleet.shared.wire.chunks import ChunkRequest
from edgefleet.shared.wire.topics import Leaf

log = logging.getLogger(__name__)


class Agent:
    """One edge agent. Use :meth:`start` / :meth:`stop`, or :meth:`run_until` from the CLI."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        resources: FleetResources | None = None,
        link_factory: LinkFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create the agent (nothing runs until :meth:`start`).

        Args:
            config: The agent's configuration.
            resources: Network thread, timer and step pool shared with other agents; None: the
                agent builds its own and stops them with itself.
            link_factory: Builds the MQTT link; None: the resources' paho driver.
            clock: Unix seconds now (status messages, reconciler).

        Raises:
            ConfigError: TLS files that cannot be read or do not belong together.
        """
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self._own_resources = resources is None
        self.resources = resources if resources is not None else FleetResources(step_workers=1)
        self.store = StateStore(config.data_dir)
        self.host = ModelHost(retire_grace_s=config.retire_grace_s)
        self.link = MqttLink(
            config.device_id,
            config.broker,
            self._on_message,
            on_connected=self._on_connected,
            on_keyring=self._on_keyring,
            link_factory=link_factory if link_factory is not None else self.resources.driver,
            clock=clock,
        )
        downloads = config.data_dir / "downloads"
        # One cap for the device, whichever way a bundle comes in.
        limiter = BandwidthLimiter.for_transfer(config.transfer)
        self.fetcher = ChunkFetcher(
            downloads, config.transfer, self._request_chunks, limiter=limiter, link_up=self.link.connected
        )
        broker = config.broker
        # The control plane's bundle route takes the device's own broker credentials.
        credentials = (broker.username, broker.password) if broker.username and broker.password else None
        self.http_fetcher = HttpFetcher(downloads, config.transfer, limiter=limiter, credentials=credentials)
        self._stepper = SerialStepper(self._step, self.resources.pool.submit, self.resources.timer.call_later)
        self.reconciler = Reconciler(
            config,
            self.store,
            self.host,
            self.fetcher,
            self._publish,
            clock=clock,
            http_fetcher=self.http_fetcher,
            on_work=self._stepper.poke,
        )
        self._heartbeat_timer: TimerHandle | None = None
        self._api_server: uvicorn.Server | None = None
        self._api_thread: threading.Thread | None = None

    # -- in-process API for applications that embed the agent ---------------------------------

    def predict(
        self, model: str, inputs: Mapping[str, np.ndarray], version: str | None = None
    ) -> dict[str, np.ndarray]:
        """Run a serving model in-process (no HTTP); raises NotFoundError or InferenceError."""
        loaded = self.host.get(model, version)
        if loaded is None:
            raise NotFoundError(
                f"model {model!r} is not being served" + (f" at version {version!r}" if version else "")
            )
        return loaded.predict(inputs)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover, load active models, open the local API, then connect and reconcile."""
        self.reconciler.recover()
        self.reconciler.load_active()
        if self.config.api.enabled:
            self._start_api()
        if self._own_resources:
            self.resources.start()
        self.link.start()
        self._heartbeat_timer = self.resources.timer.call_every(self.config.heartbeat_interval_s, self._heartbeat)
        self.reconciler.wake()  # the first pass: the stored desired state may already need work

    def stop(self) -> None:
        """Stop stepping, say goodbye to the broker, close the API and unload models."""
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        if not self._stepper.close(timeout_s=10):
            log.warning("%s: a reconciler step is still running", self.config.device_id)
        if self._api_server is not None:
            self._api_server.should_exit = True
        if self._api_thread is not None:
            self._api_thread.join(timeout=10)
        self.link.stop()
        if self._own_resources:
            self.resources.stop()
        self.host.close_all()

    def run_until(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT)."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    def _start_api(self) -> None:
        app = create_inference_app(
            self.host, max_request_bytes=self.config.api.max_request_bytes, batching=self.config.batching
        )
        config = uvicorn.Config(
            app,
            host=self.config.api.host,
            port=self.config.api.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._api_server = uvicorn.Server(config)
        self._api_thread = threading.Thread(target=self._api_server.run, name="agent-api", daemon=True)
        self._api_thread.start()
        deadline = time.monotonic() + 10
        while not self._api_server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._api_server.started:
            api = f"{self.config.api.host}:{self.config.api.port}"
            raise ConfigError(f"local API did not start on {api} (port in use?)")
        log.info("local inference API on http://%s:%d/v2", self.config.api.host, self.config.api.port)

    # -- MQTT plumbing -------------------------------------------------------------------------

    def _on_message(self, leaf: Leaf, payload: bytes) -> None:
        if leaf is Leaf.DESIRED:
            self.reconciler.offer_desired(payload)
        elif leaf is Leaf.CHUNK_DATA:
            self.fetcher.on_message(payload)

    def _on_keyring(self, topic: str, payload: bytes) -> None:
        self.reconciler.offer_keyring(payload, topic=topic)

    def _on_connected(self) -> None:
        self.reconciler.publish_reported()

    def _publish(self, leaf: Leaf, payload: bytes, retain: bool) -> object:
        return self.link.publish(leaf, payload, retain=retain)

    def _request_chunks(self, request: ChunkRequest) -> None:
        self.link.publish(Leaf.CHUNK_REQUEST, request.encode())

    def _step(self) -> float | None:
        return self.reconciler.step()

    def _heartbeat(self) -> None:
        if self.link.connected.is_set():
            self.reconciler.publish_reported()
