"""The one ``mosquitto.conf`` renderer, for the embedded broker and for the production broker.

Both brokers get the same delivery and persistence rules from :class:`DeliveryLimits` and
:func:`render_mosquitto_conf`; only the listeners, the auth files and the paths differ (the
embedded broker: one plaintext loopback listener in its data dir; production: a TLS listener and
an optional loopback one, see :mod:`edgefleet.control_plane.broker.config`).

Why these defaults:

* ``set_tcp_nodelay true``: without it a QoS 1 request/response stalls 44-88 ms (Nagle plus
  delayed ACK), which a chunked transfer pays on every window.
* ``max_queued_messages 100000``: mosquitto's default of 1000 silently drops QoS 1 messages for a
  slow or offline subscriber (the control plane while it restarts, a device mid-transfer), and a
  PUBACK is not delivery, so nobody notices. Unlimited (0) is refused: one stuck persistent
  session could then take the broker's memory. 100,000 covers an hour of a thousand devices'
  heartbeats queued for an absent control plane.
* persistence on, autosave every few seconds: retained desired states, persistent sessions and
  their queues survive a restart; the interval bounds what a SIGKILL can lose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgefleet.shared.errors import ConfigError

__all__ = [
    "MQTT_MAX_PACKET_SIZE_BYTES",
    "MQTT_MIN_PACKET_SIZE_BYTES",
    "DeliveryLimits",
    "Listener",
    "check_conf_value",
    "render_mosquitto_conf",
]

MQTT_MAX_PACKET_SIZE_BYTES = 268_435_455  # bytes: the largest remaining length MQTT can encode
MQTT_MIN_PACKET_SIZE_BYTES = 20  # bytes: mosquitto refuses smaller values
MIN_QUEUED_MESSAGES = 1000  # count: mosquitto's own default; less only drops sooner


@dataclass(frozen=True, kw_only=True)
class DeliveryLimits:
    """Per-client delivery limits, the same for every broker edgefleet configures.

    Attributes:
        max_queued_messages: QoS 1 messages queued per client beyond those in flight (count).
        max_inflight_messages: QoS 1 messages sent and not yet acknowledged, per client (count);
            paho is slower with larger windows.
        max_packet_size_bytes: Largest MQTT packet a client may send (bytes); a bigger one
            disconnects its sender. Must exceed the control plane's max chunk plus headers.
        autosave_interval_s: Seconds between saves of the persistence database (mosquitto also
            saves on SIGTERM): what a crash can lose.
    """

    max_queued_messages: int = 100_000  # count
    max_inflight_messages: int = 20  # count
    max_packet_size_bytes: int = 2 * 1024 * 1024  # bytes
    autosave_interval_s: int = 5  # seconds

    def __post_init__(self) -> None:
        """Refuse limits that would drop messages, stall clients or that mosquitto rejects.

        Raises:
            ConfigError: A queue under 1000 (0, unlimited, included), an in-flight window outside
                1..65535, a packet size MQTT cannot express, or an autosave interval under 1 s.
        """
        if not self.max_queued_messages >= MIN_QUEUED_MESSAGES:
            raise ConfigError(
                f"max_queued_messages must be >= {MIN_QUEUED_MESSAGES} (mosquitto's own default), "
                f"got {self.max_queued_messages}"
            )
        if not 1 <= self.max_inflight_messages <= 65535:
            raise ConfigError(f"max_inflight_messages must be 1..65535, got {self.max_inflight_messages}")
        if not MQTT_MIN_PACKET_SIZE_BYTES <= self.max_packet_size_bytes <= MQTT_MAX_PACKET_SIZE_BYTES:
            raise ConfigError(
                f"max_packet_size_bytes must be {MQTT_MIN_PACKET_SIZE_BYTES}..{MQTT_MAX_PACKET_SIZE_BYTES}, "
                f"got {self.max_packet_size_bytes}"
            )
        if not self.autosave_interval_s >= 1:
            raise ConfigError(f"autosave_interval_s must be >= 1, got {self.autosave_interval_s}")


@dataclass(frozen=True, kw_only=True)
class Listener:
    """One ``listener`` block and the options that belong to it.

    Attributes:
        port: TCP port.
        bind: Address to bind; empty = every address.
        comment: A line explaining the listener (written as ``# -- <comment>``).
        options: ``mosquitto.conf`` lines of this listener (TLS files, ``require_certificate`` ...).
    """

    port: int
    bind: str = ""
    comment: str = ""
    options: tuple[str, ...] = ()


def render_mosquitto_conf(
    *,
    header: Sequence[str],
    listeners: Sequence[Listener],
    limits: DeliveryLimits,
    persistence_dir: str,
    password_file: str | None,
    acl_file: str | None,
    log_dest: str = "stderr",
    run_as_user: str | None = None,
    extra_lines: Sequence[str] = (),
) -> str:
    """Render a mosquitto 2.0 ``mosquitto.conf``.

    Args:
        header: Comment lines at the top (without ``#``).
        listeners: The listeners, in order; global settings come before the first.
        limits: Delivery limits.
        persistence_dir: Mosquitto's database directory.
        password_file: The ``passwd`` file; None = anonymous clients are admitted (embedded only).
        acl_file: The ACL file, or None for none.
        log_dest: Mosquitto's ``log_dest`` (stderr suits systemd's journal and our child logs).
        run_as_user: Mosquitto's ``user`` option; None = its default.
        extra_lines: Raw lines appended last (after the listeners: they apply to the last one).

    Returns:
        The file's text.

    Raises:
        ConfigError: A value with a line break (it would inject options) or no listener.
    """
    if not listeners:
        raise ConfigError("a mosquitto config needs at least one listener")
    for value in (persistence_dir, password_file or "", acl_file or "", log_dest, run_as_user or "", *extra_lines):
        check_conf_value(value)
    lines = [f"# {line}" for line in header]
    lines += ["", "# -- who may connect, and what they may do (same rules on every listener)"]
    lines.append("per_listener_settings false")
    if password_file is None:
        lines.append("allow_anonymous true")
    else:
        lines += ["allow_anonymous false", f"password_file {password_file}"]
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    lines += [
        "",
        "# -- delivery: a PUBACK is not delivery, so queue generously and never drop at the default 1000",
        "set_tcp_nodelay true",
        f"max_queued_messages {limits.max_queued_messages}",
        "max_queued_bytes 0",
        f"max_inflight_messages {limits.max_inflight_messages}",
        # applies to every client (v3.1.1 too): a bigger packet disconnects its sender
        f"max_packet_size {limits.max_packet_size_bytes}",
        "",
        "# -- persistence: retained desired states, persistent sessions and their queues survive restarts",
        "persistence true",
        f"persistence_location {persistence_dir.rstrip('/')}/",
        "persistence_file mosquitto.db",
        f"autosave_interval {limits.autosave_interval_s}",
        "",
        f"log_dest {log_dest}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "connection_messages true",
    ]
    if run_as_user:
        lines.append(f"user {run_as_user}")
    for listener in listeners:
        for value in (listener.bind, listener.comment, *listener.options):
            check_conf_value(value)
        lines.append("")
        if listener.comment:
            lines.append(f"# -- {listener.comment}")
        lines.append(f"listener {listener.port} {listener.bind}".rstrip())
        lines += listener.options
    lines += extra_lines
    return "\n".join(lines) + "\n"


def check_conf_value(value: str) -> None:
    """Refuse a value that would end its ``mosquitto.conf`` line early.

    Raises:
        ConfigError: ``value`` holds a line break or a NUL.
    """
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(f"broker setting contains a line break: {value!r:.200}")
