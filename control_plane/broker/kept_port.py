"""The embedded broker's port, chosen once and kept in its data dir.

Agents are enrolled with the broker's address and keep connecting there: a control plane that
picked a new free port at every start would leave its whole fleet reconnecting to the old one
forever. So the first start picks a free port (or takes ``--broker-port``), writes it to
``<data dir>/broker/port``, and every later start uses that port again. If the kept port is
taken by someone else at a restart, the broker refuses to start (and says which file holds the
port) rather than move silently; an explicit ``--broker-port`` moves it on purpose.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgefleet.control_plane.broker.embedded import BrokerHandle, BrokerSettings, start_embedded_broker
from edgefleet.shared.errors import BrokerError, ConfigError
from edgefleet.shared.files import atomic_write_bytes

PORT_FILE_NAME = "port"
_MAX_PORT_FILE_BYTES = 16  # bytes: a port and a newline


def port_file(broker_dir: Path) -> Path:
    """Where the port of the broker whose data dir is ``broker_dir`` is kept."""
    return broker_dir / PORT_FILE_NAME


def read_kept_port(broker_dir: Path) -> int | None:
    """The port kept by an earlier start; None on a first start.

    Raises:
        ConfigError: The port file holds something other than a TCP port (1..65535).
    """
    path = port_file(broker_dir)
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_PORT_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the embedded broker's port from {path}: {exc}") from exc
    text = raw.decode("ascii", "replace").strip()
    if len(raw) > _MAX_PORT_FILE_BYTES or not text.isdigit() or not 1 <= int(text) <= 65_535:
        raise ConfigError(f"{path} must hold the embedded broker's TCP port (1..65535), got {text[:16]!r}")
    return int(text)


def keep_port(broker_dir: Path, port: int) -> None:
    """Remember ``port`` for the next starts (atomically: a crash leaves the old port or the new)."""
    path = port_file(broker_dir)
    if read_kept_port(broker_dir) != port:
        atomic_write_bytes(path, f"{port}\n".encode())


def embedded_port(broker_dir: Path, configured: int | None) -> int:
    """The port to start the embedded broker on: the configured one, else the kept one, else 0 (pick one).

    Raises:
        ConfigError: The port file is unreadable or holds no port.
    """
    if configured:
        return configured
    return read_kept_port(broker_dir) or 0


def start_on_kept_port(settings: BrokerSettings, *, configured_port: int | None, kind: str = "auto") -> BrokerHandle:
    """Start the embedded broker on its kept port (see the module docstring) and keep the port it got.

    Args:
        settings: Everything but the port; ``data_dir`` is required (the port is kept there).
        configured_port: ``--broker-port``; None or 0: the kept port, or a free one at the first start.
        kind: ``auto``, ``mosquitto`` or ``amqtt`` (see :func:`start_embedded_broker`).

    Raises:
        ConfigError: No data dir, or a port file that holds no port.
        BrokerError: The broker would not start (the kept port is taken: the message says where it is kept).
    """
    if settings.data_dir is None:
        raise ConfigError("the embedded broker needs a data dir to keep its port in")
    broker_dir = Path(settings.data_dir)
    port = embedded_port(broker_dir, configured_port)
    try:
        broker = start_embedded_broker(replace(settings, port=port), kind=kind)
    except BrokerError as exc:
        if port and not configured_port:
            raise BrokerError(
                f"{exc.message}. Port {port} is the one enrolled agents know (kept in {port_file(broker_dir)}): "
                "free it, or move the broker on purpose with --broker-port and re-enroll the agents"
            ) from exc
        raise
    keep_port(broker_dir, broker.port)
    return broker
