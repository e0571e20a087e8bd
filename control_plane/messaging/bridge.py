"""The control plane's MQTT connection: persistent session in, QoS 1 out, nothing lost between.

- Client id ``edgefleet-control-plane`` (plus a per-replica suffix) with ``clean_session=False``:
  while the control plane is down or restarting, the broker queues what devices publish.
- Messages are acknowledged by hand, *after* ingest has handled them (``manual_ack``): a crash
  between receipt and commit leaves the message unacknowledged, and the broker delivers it
  again on the next connection. Ingest is idempotent, so twice is fine.
- paho's network thread only enqueues; one worker thread runs ingest in arrival order (the
  order of a device's status and reported messages matters), so a slow database never stalls
  keepalives. The queue is bounded: when it is full, paho's thread waits, the broker's in-flight
  window fills, and the broker holds further messages (backpressure, not loss).
- Subscriptions are made again on every connect (a broker that lost its state has none).
- TCP_NODELAY on the socket: a QoS 1 request/response otherwise stalls 40-90 ms on Nagle plus
  delayed ACK (a chunk request and its chunks are exactly that).
- Garbage on a subscribed topic is logged and dropped (acknowledged, or it would come back
  forever); it never stops the worker and never reaches the database.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.shared.errors import BrokerError, MessageError
from edgefleet.shared.link.paho import configure_tls
from edgefleet.shared.wire.topics import control_plane_subscriptions

log = logging.getLogger(__name__)

CLIENT_ID = "edgefleet-control-plane"
QOS = 1
KEEPALIVE_S = 30  # seconds
RECONNECT_MIN_DELAY_S = 1  # seconds, paho's backoff doubles from here
RECONNECT_MAX_DELAY_S = 30  # seconds
MAX_INFLIGHT = 20  # messages; paho is slower with larger windows
INGEST_QUEUE_SIZE = 10_000  # messages waiting for the ingest worker
HANDLER_ATTEMPTS = 3  # tries for a message whose handler fails for a reason other than its content
_RETRY_DELAYS_S = (0.2, 1.0)  # seconds between those tries


@dataclass(frozen=True, kw_only=True)
class BrokerConnection:
    """Where and as whom the bridge connects."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None  # TLS when any tls_* is set (see shared.mqtt.configure_tls)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    client_id_suffix: str = ""
    share_group: str | None = None


@dataclass(frozen=True, slots=True)
class _Received:
    topic: str
    payload: bytes
    mid: int
    qos: int


_STOP = object()


class MqttBridge:
    """Owns the paho client: publishes for the services, hands received messages to a handler."""

    def __init__(self, connection: BrokerConnection, handler: Callable[[str, bytes], None]) -> None:
        """Create the bridge (nothing connects until :meth:`start`).

        Args:
            connection: Broker address, credentials, client-id suffix, share group.
            handler: Called on the worker thread with (topic, payload) of each message; raises
                :class:`~shared.errors.MessageError` for garbage.

        Raises:
            ConfigError: TLS files that cannot be read or do not belong together.
        """
        self._connection = connection
        self._handler = handler
        self.client_id = CLIENT_ID + (f"-{connection.client_id_suffix}" if connection.client_id_suffix else "")
        self._subscriptions = control_plane_subscriptions(connection.share_group)
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if connection.username is not None:
            self._client.username_pw_set(connection.username, connection.password)
        configure_tls(
            self._client,
            tls_ca_file=connection.tls_ca_file,
            tls_cert_file=connection.tls_cert_file,
            tls_key_file=connection.tls_key_file,
        )
        self._client.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)
        self._client.max_inflight_messages_set(MAX_INFLIGHT)
        self._client.on_socket_open = _set_tcp_nodelay
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._queue: queue.Queue[_Received | object] = queue.Queue(maxsize=INGEST_QUEUE_SIZE)
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._subscribe_mid: int | None = None
        self._worker: threading.Thread | None = None
        self.messages_handled = 0
        self.messages_rejected = 0

    @property
    def connected(self) -> bool:
        """Whether the client is connected and subscribed."""
        return self._ready.is_set()

    def start(self) -> None:
        """Start the ingest worker and connect in the background (paho reconnects forever)."""
        self._worker = threading.Thread(target=self._work, name="edgefleet-ingest", daemon=True)
        self._worker.start()
        try:
            self._client.connect_async(self._connection.host, self._connection.port, keepalive=KEEPALIVE_S)
        except (OSError, ValueError) as exc:
            raise BrokerError(
                f"cannot connect to the MQTT broker at {self._connection.host}:{self._connection.port}: {exc}"
            ) from exc
        self._client.loop_start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until connected with every subscription acknowledged; False on timeout."""
        return self._ready.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Queue a QoS 1 message; paho sends it now, or after reconnecting.

        Raises:
            BrokerError: paho refused to queue it (invalid topic, or its queue is full).
        """
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")

    def stop(self) -> None:
        """Disconnect and stop both threads.

        Messages received but not yet handled are dropped unacknowledged: the broker keeps
        them in this client's persistent session and delivers them on the next start.
        """
        self._stopping.set()
        self._ready.clear()
        self._client.disconnect()
        self._client.loop_stop()
        self._drain()
        self._queue.put(_STOP)
        if self._worker is not None:
            self._worker.join(timeout=10)
            self._worker = None

    # -- paho's network thread -----------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the connection: %s", reason)
            return
        log.info(
            "connected to MQTT broker %s:%d as %s (session %s)",
            self._connection.host,
            self._connection.port,
            self.client_id,
            "resumed" if flags.session_present else "new",
        )
        result, mid = client.subscribe([(topic, QOS) for topic in self._subscriptions])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("cannot subscribe: %s", mqtt.error_string(result))
            return
        self._subscribe_mid = mid

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reasons: list[ReasonCode], _props: Properties | None
    ) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [topic for topic, reason in zip(self._subscriptions, reasons, strict=False) if reason.is_failure]
        if refused:
            # Nothing will arrive on these: say so loudly rather than look healthy.
            log.error("MQTT broker refused the subscriptions %s (check its ACLs)", refused)
            return
        self._ready.set()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._ready.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from the MQTT broker (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        item = _Received(topic=message.topic, payload=bytes(message.payload), mid=message.mid, qos=message.qos)
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue  # backpressure: the broker holds the rest meanwhile

    # -- the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, _Received)
            self._handle(item)
            if item.qos > 0 and not self._stopping.is_set():
                self._client.ack(item.mid, item.qos)

    def _handle(self, item: _Received) -> None:
        for attempt in range(HANDLER_ATTEMPTS):
            try:
                self._handler(item.topic, item.payload)
                self.messages_handled += 1
                return
            except MessageError as exc:
                self.messages_rejected += 1
                log.warning("dropped a message on %.200s: %s", item.topic, exc)
                return
            except Exception:
                # Not the message's fault (database busy or down, disk error): try again a few
                # times, then give up on it rather than block every other device.
                if attempt + 1 == HANDLER_ATTEMPTS or self._stopping.is_set():
                    log.exception("giving up on a message on %.200s", item.topic)
                    return
                log.warning("handling a message on %.200s failed; retrying", item.topic, exc_info=True)
                time.sleep(_RETRY_DELAYS_S[min(attempt, len(_RETRY_DELAYS_S) - 1)])

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


def _set_tcp_nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a unix socket): nothing to tune
        pass
