"""A TCP proxy a test controls: put it between a client and a broker, then stall, throttle or cut.

Each accepted connection gets a fresh connection to the target and two pump threads, one per
direction: ``up`` (client -> target) and ``down`` (target -> client). The controls:

* :meth:`TcpProxy.pause` / :meth:`TcpProxy.resume`: a paused direction forwards nothing; the bytes
  wait (in the pump and the kernel's socket buffers) and flow, in order, on resume. The
  connection stays open, so neither end notices anything but silence: a black hole that can be
  lifted without breaking the byte stream.
* :meth:`TcpProxy.cut` / :meth:`TcpProxy.restore`: close every connection now (bytes in flight are
  lost) and refuse new ones (accepted and closed at once) until restored: a network outage.
* ``down_bytes_per_s``: a bandwidth cap on the ``down`` direction, so a transfer takes long
  enough to be interrupted in the middle.

Both sockets of a connection set TCP_NODELAY: MQTT's small request/response packets otherwise
stall on Nagle plus delayed ACK.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, ...] = ("up", "down")
_READ_BYTES = 4096  # small reads keep the bandwidth cap smooth
_POLL_S = 0.05  # how often a blocked pump looks at the controls


@dataclass
class _Connection:
    client: socket.socket
    target: socket.socket
    threads: list[threading.Thread] = field(default_factory=list)

    def close(self) -> None:
        for sock in (self.client, self.target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``, under the test's control."""

    def __init__(self, target_host: str, target_port: int, *, down_bytes_per_s: float | None = None) -> None:
        """Listen on a free loopback port (see :attr:`port`); call :meth:`start` to accept.

        Args:
            target_host: Where connections are forwarded.
            target_port: Its port.
            down_bytes_per_s: Cap on target -> client bytes per second (None: no cap).
        """
        self.target = (target_host, target_port)
        self.down_bytes_per_s = down_bytes_per_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._open = {d: threading.Event() for d in DIRECTIONS}  # set: the direction forwards
        for event in self._open.values():
            event.set()
        self._refusing = threading.Event()
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-proxy-accept", daemon=True)
        self.accepted = 0  # connections forwarded (refused ones not counted)
        self.refused = 0
        self.forwarded = {d: 0 for d in DIRECTIONS}  # bytes

    # -- controls ------------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Start accepting connections."""
        self._acceptor.start()
        return self

    def pause(self, *directions: Direction) -> None:
        """Stop forwarding in ``directions`` (default: both), keeping connections open."""
        for d in directions or DIRECTIONS:
            self._open[d].clear()

    def resume(self, *directions: Direction) -> None:
        """Forward again in ``directions`` (default: both); what waited is delivered first."""
        for d in directions or DIRECTIONS:
            self._open[d].set()

    def cut(self) -> int:
        """Close every connection and refuse new ones until :meth:`restore`; return how many were closed."""
        self._refusing.set()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        return len(connections)

    def restore(self) -> None:
        """Accept connections again after :meth:`cut`."""
        self._refusing.clear()

    @property
    def connection_count(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._connections)

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed.set()
        self.cut()
        self._listener.close()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=2)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- forwarding ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            if self._refusing.is_set():
                self.refused += 1
                client.close()
                continue
            try:
                target = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, target):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(_POLL_S)
            connection = _Connection(client, target)
            with self._lock:
                self._connections.append(connection)
                self.accepted += 1
            for direction, src, dst in (("up", client, target), ("down", target, client)):
                thread = threading.Thread(
                    target=self._pump, args=(connection, direction, src, dst), name=f"proxy-{direction}", daemon=True
                )
                connection.threads.append(thread)
                thread.start()

    def _pump(self, connection: _Connection, direction: Direction, src: socket.socket, dst: socket.socket) -> None:
        gate = self._open[direction]
        try:
            while not self._closed.is_set():
                if not gate.wait(_POLL_S):
                    continue  # paused: leave the bytes in the kernel's buffers
                try:
                    data = src.recv(_READ_BYTES)
                except TimeoutError:
                    continue
                if not data:
                    break
                while not gate.wait(_POLL_S):  # paused after the read: hold these bytes until resumed
                    if self._closed.is_set():
                        return
                self._send_all(dst, data)
                self.forwarded[direction] += len(data)
                rate = self.down_bytes_per_s if direction == "down" else None
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass  # cut, or one end went away
        finally:
            with self._lock:
                still_listed = connection in self._connections
                if still_listed:
                    self._connections.remove(connection)
            if still_listed:
                connection.close()

    def _send_all(self, sock: socket.socket, data: bytes) -> None:
        # sendall() on a socket with a timeout may give up half-way; a torn MQTT stream would
        # look like a protocol error rather than the outage a test means to simulate.
        view = memoryview(data)
        while view:
            if self._closed.is_set():
                raise OSError("proxy closed")
            try:
                view = view[sock.send(view) :]
            except TimeoutError:
                continue
