"""Bundle transfer across interruptions, with real processes: control plane, agent, Mosquitto.

A ~8 MiB ONNX model is deployed to an agent whose download is capped (so that it is surely in
progress when it is interrupted). Mid-transfer the broker is restarted, then the agent is killed
with SIGKILL and started again. A paho subscriber on the broker records every chunk request the
agent publishes, so the test sees what was asked for, not only that the bundle arrived: chunks
already stored are never asked for again, and what is asked for twice stays within one in-flight
window per interruption. Then the HTTP path: an agent that prefers its control plane's bundle
route installs the same model without a single chunk request, and one whose HTTP source is dead
falls back to MQTT chunks.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from edgefleet.control_plane.broker.embedded import MosquittoBroker, free_port
from edgefleet.control_plane.client import EdgefleetClient
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, make_mlp_weights
from edgefleet.control_plane.devtools.local_fleet import AgentProcess, LocalFleet
from edgefleet.shared.wire.chunks import ChunkRequest, chunk_count
from edgefleet.shared.wire.topics import Leaf, device_topic

CHUNK = 64 * 1024
WINDOW = 8  # small, so that "at most one window again" is far below "all again from zero"
MODEL = "wide-mlp"


class RequestWatcher:
    """Records every chunk request a device publishes; its persistent session outlives broker restarts."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self.requests: list[ChunkRequest] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        topic = device_topic(device_id, Leaf.CHUNK_REQUEST)
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{device_id}-{time.time_ns()}", clean_session=False
        )
        self._client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=1)
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        assert self._subscribed.wait(10), "the request watcher could not subscribe"

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.requests.append(ChunkRequest.decode(message.payload))

    def indices(self, since: int = 0) -> list[int]:
        with self._lock:
            return [i for r in self.requests[since:] for i in r.indices]

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def stop(self) -> None:
        self._client.disconnect()  # before loop_stop: the loop closes the socket
        self._client.loop_stop()


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX MLP of about 8 MiB (2.1 M fp32 weights): a bundle of ~130 chunks of 64 KiB."""
    path = tmp_path_factory.mktemp("models") / "wide.onnx"
    path.write_bytes(build_onnx_mlp(make_mlp_weights(n_inputs=512, hidden=(2048, 512), seed=5)))
    return path


def _have(agent: AgentProcess, digest: str) -> set[int]:
    path = agent.data_dir / "downloads" / f"{digest.removeprefix('sha256:')}.have"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return set()
    return {int.from_bytes(raw[i : i + 4], "big") for i in range(4, len(raw) - len(raw) % 4, 4)}


def _wait_for_chunks(agent: AgentProcess, digest: str, at_least: int, timeout_s: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while len(have := _have(agent, digest)) < at_least:
        assert agent.process.alive, agent.process.log_tail()
        assert time.monotonic() < deadline, (
            f"only {len(have)} of {at_least} chunks arrived:\n{agent.process.log_tail()}"
        )
        time.sleep(0.01)
    return have


def _serving_version(agent: AgentProcess) -> list[str]:
    return httpx.get(f"{agent.api_url}/v2/models/{MODEL}", timeout=10).json()["versions"]


def _publish(fleet: LocalFleet, client: EdgefleetClient, model: Path) -> tuple[str, int]:
    client.push_model(model, name=MODEL, version="1.0.0")
    published = next(m for m in client.models() if m["name"] == MODEL)
    return published["bundle_digest"], published["bundle_size"]


@pytest.fixture
def fleet(tmp_path: Path, fresh_mosquitto: MosquittoBroker) -> Iterator[tuple[LocalFleet, EdgefleetClient]]:
    fleet = LocalFleet(tmp_path / "fleet", broker_host=fresh_mosquitto.host, broker_port=fresh_mosquitto.port)
    client: EdgefleetClient | None = None
    try:
        client = fleet.start_control_plane()
        yield fleet, client
    finally:
        if client is not None:
            client.close()
        fleet.stop()


def test_a_transfer_survives_a_broker_restart_and_an_agent_sigkill_without_starting_over(
    fleet: tuple[LocalFleet, EdgefleetClient], fresh_mosquitto: MosquittoBroker, wide_model: Path
) -> None:
    fleet_, client = fleet
    device = "resume-dev"
    digest, size = _publish(fleet_, client, wide_model)
    total = chunk_count(size, CHUNK)
    assert total >= 120, f"the bundle is only {size} bytes"
    # ~4 s for the whole bundle; chunk_timeout_s is long so that no re-request comes from a timeout.
    transfer = {
        "chunk_size_bytes": CHUNK,
        "window_chunks": WINDOW,
        "chunk_timeout_s": 20.0,
        "bandwidth_limit_bytes_per_s": 2 * 1024**2,
    }
    agent = fleet_.start_agent(device, config={"transfer": transfer})
    fleet_.wait_for_devices(client, [device])
    watcher = RequestWatcher(fresh_mosquitto, device)
    try:
        [deployment] = client.deploy(MODEL, "1.0.0", devices=[device])

        # Interruption 1: the broker restarts (mosquitto saves its sessions on SIGTERM).
        stored_before_restart = _wait_for_chunks(agent, digest, total // 4)
        fresh_mosquitto.restart()

        # Interruption 2: the agent dies without a chance to save anything, and starts again.
        _wait_for_chunks(agent, digest, len(stored_before_restart) + total // 4)
        agent.process.signal(signal.SIGKILL)
        agent.process.popen.wait(timeout=10)
        stored_before_kill = _have(agent, digest)
        quiet_since, seen = time.monotonic(), watcher.count()
        while time.monotonic() - quiet_since < 0.5:  # requests of the dead agent still on their way
            if watcher.count() != seen:
                quiet_since, seen = time.monotonic(), watcher.count()
            time.sleep(0.05)
        requests_before_restart_of_agent = watcher.count()
        agent = fleet_.start_agent(device)

        [result] = client.wait_for_deployments([deployment["id"]], timeout_s=60)
        assert result["status"] == "succeeded", result
        assert _serving_version(agent) == ["1.0.0"]
    finally:
        watcher.stop()

    counts = Counter(watcher.indices())
    assert set(counts) == set(range(total)), "some chunk was never asked for, yet the bundle verified?"
    # Stored chunks are never asked for again: not after the broker came back ...
    assert all(counts[i] == 1 for i in stored_before_restart), {i: counts[i] for i in stored_before_restart}
    # ... and not by the restarted agent, which read its progress from disk.
    after_kill = watcher.indices(since=requests_before_restart_of_agent)
    assert after_kill, "the restarted agent asked for nothing"
    assert not set(after_kill) & stored_before_kill
    assert min(after_kill) >= min(set(range(total)) - stored_before_kill)
    # What was asked for twice: at most the window in flight at each of the two interruptions.
    asked_again = sum(n - 1 for n in counts.values())
    assert asked_again <= 2 * WINDOW, counts


def test_an_agent_that_prefers_http_fetches_from_the_control_plane_without_chunk_requests(
    fleet: tuple[LocalFleet, EdgefleetClient], fresh_mosquitto: MosquittoBroker, wide_model: Path
) -> None:
    fleet_, client = fleet
    _publish(fleet_, client, wide_model)
    over_http = {"http_base_url": fleet_.api_url, "prefer_http": True}
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: HTTP fails, MQTT chunks must take over
    falls_back = {"http_base_url": dead, "prefer_http": True, "http_max_retries": 0}
    devices = {"http-dev": over_http, "fallback-dev": falls_back}
    agents = {device: fleet_.start_agent(device, config={"transfer": config}) for device, config in devices.items()}
    fleet_.wait_for_devices(client, list(devices))
    watchers = {device: RequestWatcher(fresh_mosquitto, device) for device in devices}
    try:
        ids = [d["id"] for d in client.deploy(MODEL, "1.0.0", devices=list(devices))]
        results = client.wait_for_deployments(ids, timeout_s=60)
        assert [r["status"] for r in results] == ["succeeded", "succeeded"], results
        for agent in agents.values():
            assert _serving_version(agent) == ["1.0.0"]
    finally:
        for watcher in watchers.values():
            watcher.stop()

    assert watchers["http-dev"].requests == []
    assert watchers["fallback-dev"].count() > 0
    assert "falling back to MQTT chunks" in agents["fallback-dev"].process.log_path.read_text()
