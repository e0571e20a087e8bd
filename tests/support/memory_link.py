"""An in-memory MQTT broker and links for unit tests: the fake behind the shared link seam.

:class:`MemoryBroker` is a :data:`~edgefleet.shared.link.base.LinkFactory`. It routes by topic
filter (``+``, ``#``, ``$share/<group>/`` prefixes), keeps retained messages, keeps persistent
sessions (subscriptions and messages queued while a ``clean_session=False`` client is away),
and publishes a client's last will when the test cuts it off with :meth:`MemoryBroker.drop`.

Deliveries are queued, not made on the publisher's stack, so a test decides when messages move:
:meth:`MemoryBroker.run_until_idle` delivers until nothing is left (handlers that publish add to
the queue). ``MemoryBroker(autodeliver=True)`` delivers at once instead, for code that waits on
another thread for an answer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgefleet.shared.errors import BrokerError
from edgefleet.shared.link.base import LinkHandlers, LinkOptions, Received


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches an MQTT topic filter (a ``$share/<group>/`` prefix is ignored)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass
class _Session:
    subscriptions: tuple[str, ...] = ()
    offline_queue: list[Received] = field(default_factory=list)


class MemoryDelivery:
    """A publish through the fake: acknowledged at once while connected."""

    def __init__(self, delivered: bool) -> None:
        self._delivered = delivered

    def wait(self, timeout_s: float) -> bool:
        """Whether the broker took the message (no waiting: the fake answers at once)."""
        return self._delivered


class MemoryBroker:
    """A topic router with retained messages, persistent sessions and last wills."""

    def __init__(self, *, autodeliver: bool = False, refuse: Sequence[str] = ()) -> None:
        """Create the broker.

        Args:
            autodeliver: Deliver on the publisher's stack instead of on :meth:`run_until_idle`.
            refuse: Topic filters whose subscription the broker refuses (as an ACL would).
        """
        self._autodeliver = autodeliver
        self.refuse = frozenset(refuse)
        self._lock = threading.RLock()
        self._links: dict[str, MemoryLink] = {}
        self._sessions: dict[str, _Session] = {}
        self._queue: deque[tuple[MemoryLink, Received]] = deque()
        self._mid = 0
        self.retained: dict[str, bytes] = {}
        self.published: list[tuple[str, bytes, bool]] = []  # (topic, payload, retain), in order

    def link(self, options: LinkOptions, handlers: LinkHandlers) -> MemoryLink:
        """A link to this broker (the LinkFactory interface)."""
        return MemoryLink(self, options, handlers)

    __call__ = link

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish as a client outside the links (a test playing the other side)."""
        with self._lock:
            self.published.append((topic, payload, retain))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)  # an empty retained message clears the topic
            for client_id, session in self._sessions.items():
                if not any(topic_matches(f, topic) for f in session.subscriptions):
                    continue
                message = Received(topic=topic, payload=payload, mid=self._next_mid())
                link = self._links.get(client_id)
                if link is not None and link.connected:
                    self._queue.append((link, message))
                else:
                    session.offline_queue.append(message)
        if self._autodeliver:
            self.run_until_idle()

    def run_until_idle(self, max_messages: int = 1_000_000) -> int:
        """Deliver queued messages (and what their handlers publish) until none is left; return how many."""
        delivered = 0
        while delivered < max_messages:
            with self._lock:
                if not self._queue:
                    return delivered
                link, message = self._queue.popleft()
            if link.connected:
                link.deliver(message)
            delivered += 1
        return delivered

    def drop(self, client_id: str) -> None:
        """Cut a client off as a network failure would: its last will is published."""
        with self._lock:
            link = self._links.get(client_id)
        if link is None or not link.connected:
            return
        link.lose_connection()
        if link.options.will is not None:
            self.publish(link.options.will.topic, link.options.will.payload, retain=link.options.will.retain)

    def client(self, client_id: str) -> MemoryLink:
        """The link last connected under ``client_id`` (KeyError if none)."""
        with self._lock:
            return self._links[client_id]

    def connected_clients(self) -> list[str]:
        """Client ids connected now."""
        with self._lock:
            return sorted(cid for cid, link in self._links.items() if link.connected)

    # -- used by MemoryLink -----------------------------------------------------------------------

    def attach(self, link: MemoryLink) -> bool:
        """Connect a link; return whether a session was present."""
        options = link.options
        with self._lock:
            old = self._links.get(options.client_id)
            if old is not None and old is not link and old.connected:
                old.lose_connection()  # MQTT: a second connection with the same id takes over
            present = options.client_id in self._sessions and not options.clean_session
            session = self._sessions.get(options.client_id) if present else None
            if session is None:
                session = _Session()
            granted = tuple(f for f in options.subscriptions if f not in self.refuse)
            session.subscriptions = tuple(dict.fromkeys(session.subscriptions + granted))
            self._sessions[options.client_id] = session
            self._links[options.client_id] = link
            backlog, session.offline_queue = session.offline_queue, []
            self._queue.extend((link, message) for message in backlog)
            for topic, payload in self.retained.items():
                if any(topic_matches(f, topic) for f in granted):
                    message = Received(topic=topic, payload=payload, mid=self._next_mid(), retain=True)
                    self._queue.append((link, message))
        return present

    def detach(self, link: MemoryLink) -> None:
        """Disconnect a link cleanly (no last will); a clean session is forgotten."""
        with self._lock:
            if self._links.get(link.options.client_id) is link:
                del self._links[link.options.client_id]
            if link.options.clean_session:
                self._sessions.pop(link.options.client_id, None)

    def _next_mid(self) -> int:
        self._mid = self._mid % 65535 + 1
        return self._mid


class MemoryLink:
    """A :class:`~edgefleet.shared.link.base.Link` to a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, options: LinkOptions, handlers: LinkHandlers) -> None:
        self.broker = broker
        self.options = options
        self._handlers = handlers
        self._connected = False
        self.acked: list[Received] = []
        self.pending: list[tuple[str, bytes, bool]] = []  # published while disconnected

    @property
    def connected(self) -> bool:
        """Whether the link is connected now."""
        return self._connected

    def start(self) -> None:
        """Connect at once; subscriptions, retained messages and the session backlog follow."""
        self.reconnect()

    def reconnect(self) -> None:
        """Connect again (after :meth:`MemoryBroker.drop`): what was published meanwhile goes out."""
        present = self.broker.attach(self)
        self._connected = True
        if self._handlers.on_connected is not None:
            self._handlers.on_connected(present)
        if self._handlers.on_subscribed is not None:
            self._handlers.on_subscribed([f for f in self.options.subscriptions if f in self.broker.refuse])
        pending, self.pending = self.pending, []
        for topic, payload, retain in pending:
            self.broker.publish(topic, payload, retain=retain)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Disconnect cleanly: no last will."""
        if self._connected:
            self._connected = False
            self.broker.detach(self)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> MemoryDelivery:
        """Route at once while connected; queue until the next connect otherwise."""
        if not topic or "+" in topic or "#" in topic:
            raise BrokerError(f"cannot publish to {topic!r}: not a topic name")
        if not self._connected:
            self.pending.append((topic, payload, retain))
            return MemoryDelivery(False)
        self.broker.publish(topic, payload, retain=retain)
        return MemoryDelivery(True)

    def ack(self, message: Received) -> None:
        """Record the acknowledgement (tests assert on :attr:`acked`)."""
        if self.options.manual_ack:
            self.acked.append(message)

    def deliver(self, message: Received) -> None:
        """Hand a message to the owner (called by the broker)."""
        self._handlers.on_message(message)

    def lose_connection(self) -> None:
        """The connection went away (called by the broker)."""
        self._connected = False
        if self._handlers.on_disconnected is not None:
            self._handlers.on_disconnected()
