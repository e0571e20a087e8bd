"""Many paho clients on one network thread: :class:`PahoDriver` and the links it runs.

Theory of operation. paho's own loop (``loop_start``) costs a thread per client and waits with
``select()``, which fails for file descriptors at or above 1024: one process tops out near 339
clients. The driver instead uses paho's external-loop API on one thread and a ``selectors``
selector (epoll on Linux: no descriptor ceiling):

- ``on_socket_open`` / ``on_socket_close`` register and unregister a client's socket for reading;
  readable sockets get ``loop_read``, writable ones ``loop_write``, and every client gets
  ``loop_misc`` (keepalive pings, dead-connection detection) once per ``misc_interval_s``.
- Interest in writing is recomputed from ``want_write()`` after anything touched a client.
  Another thread that queues a packet (``publish``, ``ack``) only asks the driver, through a
  wake-up socket, to look at that client: paho is never driven from two threads.
- A closed socket schedules a reconnect after the link's :class:`Backoff` delay; a CONNACK
  that accepts resets it. paho's own reconnect logic (its loop thread) is never used.
- ``reconnect()`` opens the TCP connection (and TLS handshake) blocking, on the driver thread:
  instant on a LAN, but a broker that blackholes SYNs stalls every client of the driver for up
  to paho's connect timeout.

Every callback a :class:`LinkHandlers` holds runs on the driver thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from edgefleet.shared.errors import BrokerError
from edgefleet.shared.link.backoff import Backoff
from edgefleet.shared.link.base import QOS, LinkHandlers, LinkOptions, Received
from edgefleet.shared.link.paho import client_for, set_nodelay

log = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0  # seconds between loop_misc calls per client (keepalive resolution)


class PahoDelivery:
    """A queued paho publish (see :class:`~edgefleet.shared.link.base.Delivery`)."""

    def __init__(self, info: mqtt.MQTTMessageInfo) -> None:
        self._info = info

    def wait(self, timeout_s: float) -> bool:
        """Wait until the broker acknowledged the message; False on timeout or when disconnected."""
        try:
            self._info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError):
            return False  # paho says: not connected, or the message was dropped
        return self._info.is_published()


class PahoDriver:
    """One network thread for any number of :class:`PahoLink` (also a :data:`LinkFactory`)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        misc_interval_s: float = MISC_INTERVAL_S,
        name: str = "edgefleet-mqtt",
    ) -> None:
        """Create the driver; :meth:`start` starts its thread.

        Args:
            clock: Monotonic seconds, for reconnect and keepalive deadlines.
            misc_interval_s: Seconds between ``loop_misc`` calls of each client.
            name: The network thread's name.
        """
        self._clock = clock
        self._misc_interval_s = misc_interval_s
        self._name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: list[Callable[[], None]] = []  # from other threads, run on the driver thread
        self._dirty: set[PahoLink] = set()  # links whose write interest may have changed
        self._links: set[PahoLink] = set()
        self._timers: list[tuple[float, int, PahoLink]] = []  # (when, tie-break, link) reconnects due
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._stopping = False
        self._next_misc = 0.0

    # -- LinkFactory ------------------------------------------------------------------------------

    def link(self, options: LinkOptions, handlers: LinkHandlers) -> PahoLink:
        """A link driven by this driver; it connects when started.

        Raises:
            ConfigError: TLS files that cannot be read or do not belong together.
        """
        return PahoLink(self, options, handlers)

    __call__ = link

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the network thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close every link's socket (no DISCONNECT: stop links first to say goodbye) and the thread."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        for link in list(self._links):
            self._close_socket(link)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def link_count(self) -> int:
        """How many links the driver runs now."""
        return len(self._links)

    # -- called by links, from any thread ---------------------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the driver thread (at once when called from it)."""
        if threading.get_ident() == self._thread_id:
            fn()
            return
        with self._lock:
            self._calls.append(fn)
        self._wake()

    def touch(self, link: PahoLink) -> None:
        """``link`` may have bytes to write: recompute its write interest on the driver thread."""
        with self._lock:
            self._dirty.add(link)
        if threading.get_ident() != self._thread_id:
            self._wake()

    def attach(self, link: PahoLink) -> None:
        """Run ``link`` and connect it now (driver thread)."""
        self._links.add(link)
        self._schedule(link, 0.0)

    def detach(self, link: PahoLink) -> None:
        """Forget ``link`` and close its socket if still open (driver thread)."""
        self._links.discard(link)
        self._close_socket(link)

    def schedule_reconnect(self, link: PahoLink, delay_s: float) -> None:
        """Try to connect ``link`` again after ``delay_s`` (driver thread)."""
        if link in self._links:
            self._schedule(link, delay_s)

    def register(self, link: PahoLink, sock: Any) -> None:
        """Watch a newly opened socket for reading (driver thread)."""
        self._selector.register(sock, selectors.EVENT_READ, link)
        link.watched = selectors.EVENT_READ

    def unregister(self, link: PahoLink, sock: Any) -> None:
        """Stop watching a socket paho is about to close (driver thread)."""
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass  # never registered, or already gone
        link.watched = 0

    # -- the network thread -----------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the driver is closed

    def _schedule(self, link: PahoLink, delay_s: float) -> None:
        heapq.heappush(self._timers, (self._clock() + delay_s, next(self._order), link))

    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        while True:
            with self._lock:
                if self._stopping:
                    return
            for key, mask in self._selector.select(self._timeout()):
                link = key.data
                if link is None:
                    self._drain_wake()
                    continue
                self._service(link, mask)
            self._run_calls()
            self._run_due()
            self._sync_interest()

    def _timeout(self) -> float:
        with self._lock:
            if self._calls or self._dirty:
                return 0.0
        now = self._clock()
        until = self._next_misc
        if self._timers:
            until = min(until, self._timers[0][0])
        return max(0.0, min(until - now, self._misc_interval_s))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _service(self, link: PahoLink, mask: int) -> None:
        client = link.client
        try:
            if mask & selectors.EVENT_READ:
                client.loop_read()
                sock = client.socket()
                # TLS may hold whole records already decrypted: the selector will not report them.
                while isinstance(sock, ssl.SSLSocket) and sock.pending() and client.socket() is sock:
                    client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        except Exception:  # one client's failure must not stop the others
            log.exception("MQTT client %s failed while reading or writing", link.client_id)
        self._dirty.add(link)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            try:
                fn()
            except Exception:
                log.exception("MQTT driver call failed")

    def _run_due(self) -> None:
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, link = heapq.heappop(self._timers)
            if link in self._links and link.client.socket() is None:
                link.reconnect()
                self._dirty.add(link)
        if now >= self._next_misc:
            self._next_misc = now + self._misc_interval_s
            for link in list(self._links):
                if link.client.socket() is not None:
                    try:
                        link.client.loop_misc()
                    except Exception:
                        log.exception("MQTT client %s failed its keepalive check", link.client_id)
                    self._dirty.add(link)

    def _sync_interest(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for link in dirty:
            sock = link.client.socket()
            if sock is None or not link.watched:
                continue
            wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.client.want_write() else 0)
            if wanted != link.watched:
                self._selector.modify(sock, wanted, link)
                link.watched = wanted

    def _close_socket(self, link: PahoLink) -> None:
        sock = link.client.socket()
        if sock is None:
            return
        self.unregister(link, sock)
        try:
            sock.close()
        except OSError:
            pass


class PahoLink:
    """One paho client run by a :class:`PahoDriver` (see :class:`~edgefleet.shared.link.base.Link`)."""

    def __init__(self, driver: PahoDriver, options: LinkOptions, handlers: LinkHandlers) -> None:
        """Build the client (nothing connects until :meth:`start`).

        Raises:
            ConfigError: TLS files that cannot be read or do not belong together.
        """
        self._driver = driver
        self._options = options
        self._handlers = handlers
        self.client_id = options.client_id
        self.client = client_for(options)
        self.client.on_socket_open = self._socket_opened
        self.client.on_socket_close = self._socket_closed
        self.client.on_socket_register_write = self._wants_write
        self.client.on_socket_unregister_write = _ignore  # the driver asks want_write() itself
        self.client.on_connect = self._connected_cb
        self.client.on_disconnect = self._disconnected_cb
        self.client.on_subscribe = self._subscribed_cb
        self.client.on_message = self._message_cb
        self.watched = 0  # selector events registered for the socket (driver thread only)
        self._backoff = Backoff(options.reconnect_min_s, options.reconnect_max_s)
        self._up = threading.Event()
        self._closed = threading.Event()
        self._closed.set()
        self._stopping = False
        self._subscribe_mid: int | None = None

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (CONNACK received, not yet lost)."""
        return self._up.is_set()

    @property
    def address(self) -> str:
        """``host:port`` of the broker this link connects to, for log lines."""
        host = self._options.host
        return f"[{host}]:{self._options.port}" if ":" in host else f"{host}:{self._options.port}"

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until connected; False on timeout."""
        return self._up.wait(timeout_s)

    def start(self) -> None:
        """Connect in the background on the driver's thread; reconnect with backoff until :meth:`stop`."""
        self.client.connect_async(self._options.host, self._options.port, keepalive=self._options.keepalive_s)
        self._driver.call_soon(lambda: self._driver.attach(self))

    def stop(self, timeout_s: float = 2.0) -> None:
        """Send DISCONNECT (the broker drops the last will), wait for the socket to close, forget it."""
        self._stopping = True
        if self._up.is_set():
            self.client.disconnect()
            self._driver.touch(self)
            self._closed.wait(timeout_s)
        self._up.clear()
        self._driver.call_soon(lambda: self._driver.detach(self))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> PahoDelivery:
        """Queue ``payload`` for ``topic`` at QoS 1 (sent now, or after the next connect).

        Raises:
            BrokerError: paho refused to queue it (an invalid topic).
        """
        try:
            info = self.client.publish(topic, payload, qos=QOS, retain=retain)
        except ValueError as exc:
            raise BrokerError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerError(f"cannot publish to {topic!r}: {mqtt.error_string(info.rc)}")
        self._driver.touch(self)
        return PahoDelivery(info)

    def ack(self, message: Received) -> None:
        """Acknowledge a message in manual-ack mode (the PUBACK leaves from the driver thread)."""
        if self._options.manual_ack and message.qos > 0 and self._up.is_set():
            self.client.ack(message.mid, message.qos)
            self._driver.touch(self)

    # -- driver thread ----------------------------------------------------------------------------

    def reconnect(self) -> None:
        """Open a new connection; on failure, schedule the next attempt (driver thread)."""
        if self._stopping:
            return
        try:
            rc = self.client.reconnect()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            delay = self._backoff.next_delay()
            # Every failed try, with where and when next: "disconnected" alone cannot tell an
            # operator that the broker moved or is down.
            log.warning(
                "%s cannot reach the MQTT broker at %s (%s); next try in %.1f s",
                self.client_id, self.address, exc, delay,
            )
            self._closed.set()
            self._driver.schedule_reconnect(self, delay)
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("MQTT connect of %s failed: %s", self.client_id, mqtt.error_string(rc))

    def _socket_opened(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        set_nodelay(sock)
        self._closed.clear()
        self._driver.register(self, sock)

    def _socket_closed(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._driver.unregister(self, sock)
        self._up.clear()
        self._closed.set()
        if not self._stopping:
            delay = self._backoff.next_delay()
            log.warning("%s lost its connection to the MQTT broker at %s; next try in %.1f s",
                        self.client_id, self.address, delay)
            self._driver.schedule_reconnect(self, delay)

    def _wants_write(self, _client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        self._driver.touch(self)

    def _connected_cb(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker at %s refused %s: %s", self.address, self.client_id, reason)
            return  # the broker closes the socket; the backoff keeps growing
        self._backoff.reset()
        self._up.set()
        if self._options.subscriptions:
            result, mid = client.subscribe([(topic, QOS) for topic in self._options.subscriptions])
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._subscribe_mid = mid
            else:
                log.error("%s cannot subscribe: %s", self.client_id, mqtt.error_string(result))
        self._call(self._handlers.on_connected, bool(flags.session_present))
        if not self._options.subscriptions:
            self._call(self._handlers.on_subscribed, ())

    def _subscribed_cb(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [t for t, r in zip(self._options.subscriptions, reasons, strict=False) if r.is_failure]
        self._call(self._handlers.on_subscribed, refused)

    def _disconnected_cb(self, _c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self._up.clear()
        if not self._stopping:
            log.info("%s disconnected from the MQTT broker at %s: %s", self.client_id, self.address, reason)
        self._call(self._handlers.on_disconnected)

    def _message_cb(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        received = Received(
            topic=message.topic, payload=bytes(message.payload), mid=message.mid, qos=message.qos,
            retain=bool(message.retain),
        )
        self._call(self._handlers.on_message, received)

    def _call(self, handler: Callable[..., None] | None, *args: object) -> None:
        if handler is None:
            return
        try:
            handler(*args)
        except Exception:  # a bug in a handler must not kill the network thread
            log.exception("MQTT handler of %s failed", self.client_id)


def _ignore(*_args: object) -> None:
    return None

