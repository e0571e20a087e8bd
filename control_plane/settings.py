"""The control plane's configuration: one frozen dataclass, every limit with its unit.

Settings come from code (tests, the CLI) or from ``EDGEFLEET_*`` environment variables
(:meth:`ServerSettings.from_env`); either way they are validated once, at construction, so a
bad value fails at start rather than at the first request that needs it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgefleet.shared.errors import ConfigError
from edgefleet.shared.wire.strict import DEVICE_ID_RE

MIB = 1024 * 1024
ENV_PREFIX = "EDGEFLEET_"


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How one control-plane process runs.

    Attributes:
        data_dir: Where the database (by default), keys, bundles and the embedded broker live.
        database_url: SQLAlchemy URL; empty means ``sqlite:///{data_dir}/edgefleet.db``.
            PostgreSQL works as ``postgresql+psycopg://user:pass@host/db``.
        api_host: Address the HTTP API listens on (used by whoever runs uvicorn).
        api_port: Port of the HTTP API.
        broker_host: MQTT broker to connect to; ``None`` starts the embedded broker.
        broker_port: Broker port; with ``broker_host=None``, ``None`` picks a free port for the
            embedded broker; with a broker host, ``None`` means 1883.
        embedded_broker_kind: Which embedded broker to start: ``auto`` (Mosquitto when its
            binary is installed, else the in-process-style amqtt), ``mosquitto`` or ``amqtt``.
        broker_username: MQTT user name, if the broker requires one.
        broker_password: MQTT password, if the broker requires one.
        broker_tls_ca_file: CA certificate (PEM) to verify the broker with; setting any
            ``broker_tls_*`` turns TLS on (without a CA file: the system's CAs).
        broker_tls_cert_file: Client certificate (PEM) to present, with ``broker_tls_key_file``.
        broker_tls_key_file: The client certificate's private key (PEM, unencrypted).
        public_url: The control plane's URL as devices reach it; when set, desired states name
            ``{public_url}/api/v1/bundles/<digest>`` so agents download over HTTP range requests
            (MQTT chunks remain the fallback).
        device_broker_host: Broker host handed to devices at enrollment; default: the one the
            control plane itself connects to (often a loopback or internal address).
        device_broker_port: Broker port handed to devices at enrollment (e.g. the TLS port).
        client_id_suffix: Appended to the MQTT client id ``edgefleet-control-plane``; each
            replica needs its own, because a persistent session belongs to one client id.
        share_group: If set, ingest subscriptions are shared (``$share/<group>/...``) so
            several replicas split the device traffic.
        desired_state_ttl_s: Seconds a signed desired state stays valid.
        resign_interval_s: Seconds between runs of the job that re-signs desired states past
            half their TTL.
        broker_connect_timeout_s: Seconds start-up waits for the first broker connection
            before it goes on without one (paho keeps retrying in the background).
        max_upload_bytes: Largest model file accepted by ``POST /api/v1/models``.
        max_chunk_bytes: Largest chunk size a device may ask for over MQTT.
        max_chunk_request_bytes: Largest total (chunk size x chunk count) one chunk request
            may ask for; bounds the memory one request can pin in the MQTT send queue.
        bundle_cache_bytes: Memory for recently served bundle chunks.
    """

    data_dir: Path = Path(".edgefleet")
    database_url: str = ""
    api_host: str = "127.0.0.1"
    api_port: int = 8700
    broker_host: str | None = None
    broker_port: int | None = None
    embedded_broker_kind: str = "auto"  # auto (mosquitto if installed, else amqtt) | mosquitto | amqtt
    broker_username: str | None = None
    broker_password: str | None = None
    broker_tls_ca_file: str | None = None
    broker_tls_cert_file: str | None = None
    broker_tls_key_file: str | None = None
    public_url: str | None = None  # e.g. https://cp.example.com: named in directives for HTTP download
    device_broker_host: str | None = None  # what enrollment tells devices (e.g. the public TLS name)
    device_broker_port: int | None = None
    client_id_suffix: str = ""
    share_group: str | None = None
    desired_state_ttl_s: float = 7 * 24 * 3600.0  # seconds
    resign_interval_s: float = 3600.0  # seconds
    broker_connect_timeout_s: float = 10.0  # seconds
    max_upload_bytes: int = 512 * MIB  # bytes
    max_chunk_bytes: int = 1 * MIB  # bytes
    max_chunk_request_bytes: int = 64 * MIB  # bytes
    bundle_cache_bytes: int = 256 * MIB  # bytes

    def __post_init__(self) -> None:
        """Fill in the derived default and reject values that cannot work.

        Raises:
            ConfigError: A port outside 1..65535 (0 for the embedded broker: any free port),
                a non-positive limit or duration, a malformed client id suffix or share group,
                a client certificate without its key (or the reverse), or TLS for the embedded broker.
        """
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'edgefleet.db'}")
        if not 1 <= self.api_port <= 65535:
            raise ConfigError(f"api_port must be in 1..65535, got {self.api_port}")
        if self.broker_port is not None and not 0 <= self.broker_port <= 65535:
            raise ConfigError(f"broker_port must be in 0..65535, got {self.broker_port}")
        if self.public_url is not None and not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", self.public_url):
            raise ConfigError(f"public_url must be an http(s) URL, got {self.public_url!r:.80}")
        if self.embedded_broker_kind not in ("auto", "mosquitto", "amqtt"):
            raise ConfigError(
                f"embedded_broker_kind must be auto, mosquitto or amqtt, got {self.embedded_broker_kind!r}"
            )
        if (self.broker_tls_cert_file is None) != (self.broker_tls_key_file is None):
            raise ConfigError("broker_tls_cert_file and broker_tls_key_file go together: set both or neither")
        uses_tls = any((self.broker_tls_ca_file, self.broker_tls_cert_file, self.broker_tls_key_file))
        if uses_tls and self.broker_host is None:
            raise ConfigError("broker_tls_* need broker_host: the embedded broker speaks plaintext on loopback")
        if self.broker_host is not None and self.broker_port == 0:
            raise ConfigError("broker_port 0 (any free port) only makes sense for the embedded broker")
        for name in ("desired_state_ttl_s", "resign_interval_s", "broker_connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_upload_bytes", "max_chunk_bytes", "max_chunk_request_bytes", "bundle_cache_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 bytes, got {getattr(self, name)}")
        if self.max_chunk_request_bytes < self.max_chunk_bytes:
            raise ConfigError("max_chunk_request_bytes must be at least max_chunk_bytes")
        # Both end up in MQTT client ids / topic filters, where '+', '#' and '/' have meaning.
        if self.client_id_suffix and not DEVICE_ID_RE.match(self.client_id_suffix):
            raise ConfigError(f"client_id_suffix {self.client_id_suffix!r} must match {DEVICE_ID_RE.pattern}")
        if self.share_group is not None and not DEVICE_ID_RE.match(self.share_group):
            raise ConfigError(f"share_group {self.share_group!r} must match {DEVICE_ID_RE.pattern}")

    @property
    def embedded_broker(self) -> bool:
        """Whether this process starts its own broker (no ``broker_host`` configured)."""
        return self.broker_host is None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Build settings from ``EDGEFLEET_<FIELD>`` variables (e.g. ``EDGEFLEET_API_PORT``).

        Args:
            environ: The variables to read; ``os.environ`` by default.
            **overrides: Field values that win over the environment (CLI options).

        Returns:
            The validated settings; unset variables keep their defaults.

        Raises:
            ConfigError: A variable that does not parse as its field's type, or an invalid value.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, _PARSERS.get(f.name, str))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "data_dir": Path,
    "api_port": int,
    "broker_port": int,
    "device_broker_port": int,
    "desired_state_ttl_s": float,
    "resign_interval_s": float,
    "broker_connect_timeout_s": float,
    "max_upload_bytes": int,
    "max_chunk_bytes": int,
    "max_chunk_request_bytes": int,
    "bundle_cache_bytes": int,
}


def _parse(name: str, raw: str, parser: Callable[[str], Any]) -> Any:
    try:
        return parser(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r:.80} is not a valid {parser.__name__}") from exc
