"""The one seam between edgefleet and an MQTT broker: what a link promises, and its settings.

Both sides talk to the broker through a :class:`Link`: the agent (one per device) and the control
plane (one per replica). A link is built by a :data:`LinkFactory` from :class:`LinkOptions` and
:class:`LinkHandlers`; the production factory is :class:`~edgefleet.shared.link.driver.PahoDriver`
(many paho clients on one network thread), the unit-test factory an in-memory broker.

The rules every implementation keeps:

- QoS 1 for everything, in and out; a PUBACK is not delivery, so callers that care acknowledge
  at application level.
- ``options.subscriptions`` are made again on every connect (a broker that lost its state has
  none), and ``on_subscribed`` says which of them the broker refused.
- ``publish`` never blocks on the network: while disconnected, messages are queued and sent after
  the next connect.
- Reconnects back off from ``reconnect_min_s`` doubling to ``reconnect_max_s``, forever, until
  :meth:`Link.stop`.
- Handlers run on the link's network thread: they must be quick and must not raise (a raised
  exception is logged and dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

QOS = 1  # everything edgefleet sends or receives


@dataclass(frozen=True, kw_only=True)
class Will:
    """The message the broker publishes for a client that vanished without saying goodbye."""

    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True, kw_only=True)
class LinkOptions:
    """Everything that decides how one connection behaves; the one place these rules live.

    Raises (from implementations):
        ConfigError: TLS files that cannot be read or do not belong together.
    """

    client_id: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None  # TLS is on when any tls_* is set
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    clean_session: bool = False  # persistent: the broker queues what arrives while we are away
    keepalive_s: int = 30  # seconds between PINGREQs on an idle connection
    reconnect_min_s: float = 0.5  # seconds before the first reconnect attempt
    reconnect_max_s: float = 30.0  # seconds, the backoff's ceiling
    max_inflight: int = 20  # unacknowledged QoS 1 messages; paho is slower with larger windows
    manual_ack: bool = False  # True: the owner calls Link.ack once a message is handled
    will: Will | None = None
    subscriptions: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Received:
    """One message as it arrived; hand it back to :meth:`Link.ack` in manual-ack mode."""

    topic: str
    payload: bytes
    mid: int = 0
    qos: int = QOS
    retain: bool = False


@dataclass(frozen=True, kw_only=True)
class LinkHandlers:
    """What the owner wants to hear about; every callback runs on the link's network thread."""

    on_message: Callable[[Received], None]
    on_connected: Callable[[bool], None] | None = None  # argument: the broker kept our session
    on_disconnected: Callable[[], None] | None = None
    on_subscribed: Callable[[Sequence[str]], None] | None = None  # argument: the refused subscriptions


class Delivery(Protocol):
    """A queued publish."""

    def wait(self, timeout_s: float) -> bool:
        """Wait until the broker acknowledged the message; False on timeout or when disconnected."""
        ...


class Link(Protocol):
    """One client connection to the broker."""

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (CONNACK received, not yet lost)."""
        ...

    def start(self) -> None:
        """Connect in the background; reconnect with backoff until :meth:`stop`."""
        ...

    def stop(self, timeout_s: float = 2.0) -> None:
        """Disconnect cleanly (no last will), waiting up to ``timeout_s`` for queued bytes to leave."""
        ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Delivery:
        """Queue ``payload`` for ``topic`` at QoS 1 and return at once.

        Raises:
            BrokerError: The message cannot be queued (an invalid topic).
        """
        ...

    def ack(self, message: Received) -> None:
        """Acknowledge a message received in manual-ack mode (no-op otherwise)."""
        ...


LinkFactory = Callable[[LinkOptions, LinkHandlers], Link]
"""Builds a link: ``PahoDriver.link`` in production, an in-memory broker's ``link`` in unit tests."""
