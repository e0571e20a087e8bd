"""The control plane's MQTT connection: persistent session in, QoS 1 out, nothing lost between.

- Client id ``edgefleet-control-plane`` (plus a per-replica suffix) with ``clean_session=False``:
  while the control plane is down or restarting, the broker queues what devices publish. The
  connection itself is a shared :class:`~edgefleet.shared.link.base.Link` (TCP_NODELAY,
  keepalive, backoff live there).
- Messages are acknowledged by hand, *after* ingest has handled them (``manual_ack``): a crash
  between receipt and commit leaves the message unacknowledged, and the broker delivers it
  again on the next connection. Ingest is idempotent, so twice is fine.
- The network thread only routes by topic (:data:`ROUTES`): chunk requests to the *chunk*
  worker, the hot path of a transfer, which never waits behind database writes; everything else
  to the *ingest* worker, in arrival order (the order of a device's status and reported messages
  matters). The ingest worker takes whatever has queued up, up to ``BridgeLimits.batch_max_count`` messages,
  and hands it to the batch handler as one unit (one database transaction per batch).
- Every connection after the first is announced to the :meth:`MqttBridge.on_reconnected`
  listeners, off the network thread: a broker that was restarted may have lost retained
  messages (Mosquitto saves them every few seconds; a SIGKILL loses the rest), so the control
  plane publishes its retained state again.
- Both queues are bounded: when one is full, the network thread waits, the broker's in-flight
  window fills, and the broker holds further messages (backpressure, not loss).
- Garbage on a subscribed topic is logged and dropped (acknowledged, or it would come back
  forever); it never stops a worker and never reaches the database.
- A handler that fails for a server fault (:func:`~edgefleet.control_plane.messaging.faults.is_server_fault`:
  database busy or down, disk) is tried again, up to ``handler_attempts_count`` times with a pause.
  Any other failure is the message's own (a *poison* message): a batch it spoiled is handled again
  one message at a time, and the poison message is dropped and counted (``messages_poisoned``) at
  its first failure, never retried: retrying it only made every message behind it wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial

from edgefleet.control_plane.messaging.faults import is_server_fault
from edgefleet.shared.errors import MessageError
from edgefleet.shared.link.base import Link, LinkFactory, LinkHandlers, LinkOptions, Received
from edgefleet.shared.link.driver import PahoDriver
from edgefleet.shared.wire.topics import Leaf, control_plane_subscriptions, parse_device_topic

log = logging.getLogger(__name__)

CLIENT_ID = "edgefleet-control-plane"


@dataclass(frozen=True, kw_only=True)
class BridgeLimits:
    """The bridge's tuning, from ``ServerSettings`` (``broker_*``, ``ingest_*``, ``handler_attempts_count``)."""

    keepalive_s: int = 30  # seconds
    reconnect_min_s: float = 1.0  # seconds, the backoff doubles from here
    reconnect_max_s: float = 30.0  # seconds
    max_inflight_count: int = 20  # messages; paho is slower with larger windows
    queue_max_count: int = 10_000  # messages waiting for a worker (each queue)
    batch_max_count: int = 200  # messages handed to the batch handler at most at once
    handler_attempts_count: int = 3  # tries for a message whose handler fails for a reason other than its content
_RETRY_DELAYS_S = (0.2, 1.0)  # seconds between those tries

Handler = Callable[[str, bytes], None]
BatchHandler = Callable[[Sequence[tuple[str, bytes]]], Sequence[MessageError | None]]
"""Handles messages as one unit; returns, per message, the MessageError that rejected it or None."""


class Worker(Enum):
    """The threads a received message can go to."""

    INGEST = "ingest"  # database writes, in arrival order, batched
    CHUNKS = "chunks"  # chunk serving, never behind database writes


ROUTES: dict[Leaf, Worker] = {
    Leaf.REPORTED: Worker.INGEST,
    Leaf.EVENTS: Worker.INGEST,
    Leaf.STATUS: Worker.INGEST,
    Leaf.CHUNK_REQUEST: Worker.CHUNKS,
}
"""Which worker handles each device-published leaf (anything else goes to ingest, which rejects it)."""


def route(topic: str) -> Worker:
    """The worker for a message on ``topic``."""
    try:
        _, leaf = parse_device_topic(topic)
    except MessageError:
        return Worker.INGEST  # the handler rejects it there, logged and acknowledged
    return ROUTES.get(leaf, Worker.INGEST)


@dataclass(frozen=True, kw_only=True)
class BrokerConnection:
    """Where and as whom the bridge connects."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None  # TLS when any tls_* is set (see shared.link.paho.configure_tls)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    client_id_suffix: str = ""
    share_group: str | None = None


_STOP = object()


class MqttBridge:
    """Owns the control plane's link: publishes for the services, hands received messages to handlers."""

    def __init__(
        self,
        connection: BrokerConnection,
        handler: Handler,
        *,
        batch_handler: BatchHandler | None = None,
        link_factory: LinkFactory | None = None,
        limits: BridgeLimits | None = None,
    ) -> None:
        """Create the bridge (nothing connects until :meth:`start`).

        Args:
            connection: Broker address, credentials, client-id suffix, share group.
            handler: Called on a worker thread with (topic, payload) of each message; raises
                :class:`~edgefleet.shared.errors.MessageError` for garbage.
            batch_handler: If given, the ingest worker hands it whole batches instead
                (one transaction per batch); chunk requests still go to ``handler``.
            link_factory: Builds the link; None: a paho driver of the bridge's own.
            limits: Keepalive, backoff, window, queue and batch sizes (defaults: :class:`BridgeLimits`).

        Raises:
            ConfigError: TLS files that cannot be read or do not belong together.
        """
        self._connection = connection
        self._limits = limits = limits or BridgeLimits()
        self._handler = handler
        self._batch_handler = batch_handler
        self.client_id = CLIENT_ID + (f"-{connection.client_id_suffix}" if connection.client_id_suffix else "")
        self._subscriptions = tuple(control_plane_subscriptions(connection.share_group))
        self._own_driver = PahoDriver(name="edgefleet-mqtt") if link_factory is None else None
        factory: LinkFactory = self._own_driver if self._own_driver is not None else link_factory  # type: ignore[assignment]
        self._link: Link = factory(
            LinkOptions(
                client_id=self.client_id,
                host=connection.host,
                port=connection.port,
                username=connection.username,
                password=connection.password,
                tls_ca_file=connection.tls_ca_file,
                tls_cert_file=connection.tls_cert_file,
                tls_key_file=connection.tls_key_file,
                clean_session=False,
                keepalive_s=limits.keepalive_s,
                reconnect_min_s=limits.reconnect_min_s,
                reconnect_max_s=limits.reconnect_max_s,
                max_inflight=limits.max_inflight_count,
                manual_ack=True,
                subscriptions=self._subscriptions,
            ),
            LinkHandlers(
                on_message=self._on_message,
                on_connected=self._on_connected,
                on_disconnected=self._on_disconnected,
                on_subscribed=self._on_subscribed,
            ),
        )
        self._queues: dict[Worker, queue.Queue[Received | object]] = {
            worker: queue.Queue(maxsize=limits.queue_max_count) for worker in Worker
        }
        self._ready = threading.Event()
        self._was_ready = False  # a ready connection after this one is a reconnect
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._stopping = threading.Event()
        self._workers: list[threading.Thread] = []
        self._count_lock = threading.Lock()
        self.messages_handled = 0
        self.messages_rejected = 0  # refused by their decoder (MessageError)
        self.messages_poisoned = 0  # broke their handler for a reason not the server's

    @property
    def connected(self) -> bool:
        """Whether the client is connected and subscribed."""
        return self._ready.is_set()

    def start(self) -> None:
        """Start the workers and connect in the background (the link reconnects forever)."""
        self._workers = [
            threading.Thread(target=self._work_ingest, name="edgefleet-ingest", daemon=True),
            threading.Thread(target=self._work_chunks, name="edgefleet-chunks", daemon=True),
        ]
        for worker in self._workers:
            worker.start()
        if self._own_driver is not None:
            self._own_driver.start()
        self._link.start()

    def on_reconnected(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on a thread of its own) each time the bridge is ready again after a lost connection."""
        self._reconnect_listeners.append(listener)

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until connected with every subscription acknowledged; False on timeout."""
        return self._ready.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Queue a QoS 1 message; it leaves now, or after reconnecting.

        Raises:
            BrokerError: The link refused to queue it (an invalid topic).
        """
        self._link.publish(topic, payload, retain=retain)

    def stop(self) -> None:
        """Disconnect and stop the workers.

        Messages received but not yet handled are dropped unacknowledged: the broker keeps
        them in this client's persistent session and delivers them on the next start.
        """
        self._stopping.set()
        self._ready.clear()
        self._link.stop()
        if self._own_driver is not None:
            self._own_driver.stop()
        for q in self._queues.values():
            _drain(q)
            q.put(_STOP)
        for worker in self._workers:
            worker.join(timeout=10)
        self._workers = []

    # -- the network thread -----------------------------------------------------------------------

    def _on_connected(self, session_present: bool) -> None:
        log.info(
            "connected to MQTT broker %s:%d as %s (session %s)",
            self._connection.host,
            self._connection.port,
            self.client_id,
            "resumed" if session_present else "new",
        )

    def _on_subscribed(self, refused: Sequence[str]) -> None:
        if refused:
            # Nothing will arrive on these: say so loudly rather than look healthy.
            log.error("MQTT broker refused the subscriptions %s (check its ACLs)", list(refused))
            return
        self._ready.set()
        if self._was_ready and self._reconnect_listeners and not self._stopping.is_set():
            threading.Thread(target=self._announce_reconnect, name="edgefleet-reconnected", daemon=True).start()
        self._was_ready = True

    def _announce_reconnect(self) -> None:
        for listener in self._reconnect_listeners:
            try:
                listener()
            except Exception:  # one listener's failure must not keep the others from running
                log.exception("a reconnect listener of the MQTT bridge failed")

    def _on_disconnected(self) -> None:
        self._ready.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from the MQTT broker; reconnecting")

    def _on_message(self, message: Received) -> None:
        target = self._queues[route(message.topic)]
        while not self._stopping.is_set():
            try:
                target.put(message, timeout=0.5)
                return
            except queue.Full:
                continue  # backpressure: the broker holds the rest meanwhile

    # -- the workers ------------------------------------------------------------------------------

    def _work_chunks(self) -> None:
        q = self._queues[Worker.CHUNKS]
        while (item := q.get()) is not _STOP:
            assert isinstance(item, Received)
            self._handle_alone(item, self._handle_one)
            self._ack([item])

    def _work_ingest(self) -> None:
        q = self._queues[Worker.INGEST]
        while (first := q.get()) is not _STOP:
            batch = [first]
            stop_after = False
            while len(batch) < self._limits.batch_max_count:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                batch.append(item)
            received = [item for item in batch if isinstance(item, Received)]
            if self._batch_handler is None:
                for item in received:
                    self._handle_alone(item, self._handle_one)
            elif not self._attempt(partial(self._handle_batch, received), f"a batch of {len(received)} messages"):
                # One message's content spoiled the batch: find it by handling each alone.
                for item in received:
                    self._handle_alone(item, lambda one: self._handle_batch([one]))
            self._ack(received)
            if stop_after:
                return

    def _handle_alone(self, item: Received, handle: Callable[[Received], None]) -> None:
        if not self._attempt(partial(handle, item), item.topic):
            log.error("dropped a poison message on %.200s (%d bytes); not retried", item.topic, len(item.payload))
            self._count(poisoned=1)

    def _handle_one(self, item: Received) -> None:
        try:
            self._handler(item.topic, item.payload)
        except MessageError as exc:
            self._count(rejected=1)
            log.warning("dropped a message on %.200s: %s", item.topic, exc)
            return
        self._count(handled=1)

    def _handle_batch(self, items: list[Received]) -> None:
        assert self._batch_handler is not None
        results = self._batch_handler([(item.topic, item.payload) for item in items])
        for item, error in zip(items, results, strict=True):
            if error is not None:
                log.warning("dropped a message on %.200s: %s", item.topic, error)
        rejected = sum(1 for error in results if error is not None)
        self._count(handled=len(items) - rejected, rejected=rejected)

    def _attempt(self, attempt_fn: Callable[[], None], what: str) -> bool:
        """Run ``attempt_fn``, again after a server fault; False when it failed for the message's content."""
        for attempt in range(self._limits.handler_attempts_count):
            try:
                attempt_fn()
                return True
            except Exception as exc:
                if not is_server_fault(exc):
                    log.error("handling %.200s failed, not for a server fault", what, exc_info=True)
                    return False
                # Not the message's fault (database busy or down, disk error): try again a few
                # times, then give up on it rather than block every other device.
                if attempt + 1 == self._limits.handler_attempts_count or self._stopping.is_set():
                    log.exception("giving up on %.200s", what)
                    return True
                log.warning("handling %.200s failed; retrying", what, exc_info=True)
                time.sleep(_RETRY_DELAYS_S[min(attempt, len(_RETRY_DELAYS_S) - 1)])
        return True

    def _ack(self, items: Sequence[Received]) -> None:
        if self._stopping.is_set():
            return  # unacknowledged: the broker delivers them again on the next start
        for item in items:
            self._link.ack(item)

    def _count(self, *, handled: int = 0, rejected: int = 0, poisoned: int = 0) -> None:
        with self._count_lock:
            self.messages_handled += handled
            self.messages_rejected += rejected
            self.messages_poisoned += poisoned


def _drain(q: queue.Queue[Received | object]) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return

