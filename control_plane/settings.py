"""The control plane's configuration: one frozen pydantic-settings model, every limit with its unit.

Settings come from code (tests, the CLI) or from ``EDGEFLEET_*`` environment variables
(:meth:`ServerSettings.from_env`, where CLI options win over the environment); either way they
are validated once, at construction, so a bad value fails at start rather than at the first
request that needs it, and always as a :class:`ConfigError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self, cast

from pydantic import TypeAdapter, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from edgefleet.shared.errors import ConfigError
from edgefleet.shared.wire.strict import DEVICE_ID_RE

MIB = 1024 * 1024
KIB = 1024
ENV_PREFIX = "EDGEFLEET_"


class ServerSettings(BaseSettings):
    """How one control-plane process runs.

    Attributes:
        data_dir: Where the database (by default), keys, bundles and the embedded broker live.
        database_url: SQLAlchemy URL; empty means ``sqlite:///{data_dir}/edgefleet.db``.
            PostgreSQL works as ``postgresql+psycopg://user:pass@host/db``.
        api_host: Address the HTTP API listens on (used by whoever runs uvicorn).
        api_port: Port of the HTTP API.
        broker_host: MQTT broker to connect to; ``None`` starts the embedded broker.
        broker_port: Broker port; with ``broker_host=None``, ``None`` keeps the embedded broker's
            port of earlier starts (``<data_dir>/broker/port``), or picks a free one at the first
            start; with a broker host, ``None`` means 1883.
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

    The limits below the first block were module constants; each names the module that uses it.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_ignore_empty=True)

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

    # -- MQTT client (messaging/bridge.py, shared/link/paho.py)
    broker_keepalive_s: int = 30  # seconds (paho takes whole seconds)
    broker_reconnect_min_delay_s: int = 1  # seconds; paho's backoff doubles from here
    broker_reconnect_max_delay_s: int = 30  # seconds
    broker_max_inflight_count: int = 20  # QoS 1 messages sent, not yet acknowledged; paho is slower with more
    ingest_queue_max_count: int = 10_000  # messages waiting for the ingest worker
    ingest_batch_max_count: int = 200  # messages written in one transaction at most
    handler_attempts_count: int = 3  # tries for a message whose handler fails for a reason other than its content
    # -- chunk serving (messaging/ingest.py)
    chunk_grant_ttl_s: float = 2.0  # seconds a device's checked right to a bundle serves its next requests unasked
    max_chunk_grants_count: int = 10_000  # remembered (device, bundle, chunk size) rights before they are dropped
    # -- bundle store (bundles/store.py)
    bundle_max_open_files_count: int = 32  # bundle file descriptors kept open for chunk reads
    # 1/N of bundle_cache_bytes is the recency window for the tails of large bundles
    bundle_cache_window_divisor_count: int = 8
    # -- the upload form (api/uploads.py). The description and label limits are not settings: they
    # are the bundle format's (the manifest decoder on every device enforces the same numbers).
    upload_max_field_bytes: int = 8 * KIB  # one text field of the upload form (the description is the longest)
    upload_max_parts_count: int = 16  # parts of the upload form
    upload_form_overhead_bytes: int = 256 * KIB  # bytes allowed beyond the file: boundaries, headers, fields
    # -- desired states (services/desired_states.py). Page sizes and the enrollment TTL bound are
    # not settings: they are part of the API contract, published in the OpenAPI document.
    resign_batch_count: int = 500  # devices re-signed per transaction by resign_expiring
    # online devices whose reported sequence still lags their desired one this long after it was
    # signed get the stored state published again (a broker that lost it); also the job's period
    reconcile_interval_s: float = 60.0  # seconds
    # -- the embedded broker's supervisor (broker/supervisor.py)
    broker_supervise_interval_s: float = 1.0  # seconds between checks that the embedded broker still runs
    broker_restart_max_delay_s: float = 30.0  # seconds, the ceiling of the backoff between failed restarts

    def __init__(self, **values: Any) -> None:
        """Validate ``values`` (code or CLI values only: :meth:`from_env` reads the environment).

        Raises:
            ConfigError: A value that does not parse as its field's type, or an invalid value.
        """
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _config_error(exc) from exc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given: a test's ``ServerSettings()`` must not depend on the caller's environment."""
        return (init_settings,)

    @model_validator(mode="after")
    def _check(self) -> Self:
        """Fill in the derived default and reject values that cannot work.

        Raises:
            ValueError: A port outside 1..65535 (0 for the embedded broker: any free port),
                a non-positive limit or duration, a malformed client id suffix or share group,
                a client certificate without its key (or the reverse), or TLS for the embedded broker.
        """
        if not self.database_url:
            # frozen: the derived default is set once, here, before anyone sees the object
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'edgefleet.db'}")
        if not 1 <= self.api_port <= 65535:
            raise ValueError(f"api_port must be in 1..65535, got {self.api_port}")
        if self.broker_port is not None and not 0 <= self.broker_port <= 65535:
            raise ValueError(f"broker_port must be in 0..65535, got {self.broker_port}")
        if self.public_url is not None and not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", self.public_url):
            raise ValueError(f"public_url must be an http(s) URL, got {self.public_url!r:.80}")
        if self.embedded_broker_kind not in ("auto", "mosquitto", "amqtt"):
            raise ValueError(
                f"embedded_broker_kind must be auto, mosquitto or amqtt, got {self.embedded_broker_kind!r}"
            )
        if (self.broker_tls_cert_file is None) != (self.broker_tls_key_file is None):
            raise ValueError("broker_tls_cert_file and broker_tls_key_file go together: set both or neither")
        uses_tls = any((self.broker_tls_ca_file, self.broker_tls_cert_file, self.broker_tls_key_file))
        if uses_tls and self.broker_host is None:
            raise ValueError("broker_tls_* need broker_host: the embedded broker speaks plaintext on loopback")
        if self.broker_host is not None and self.broker_port == 0:
            raise ValueError("broker_port 0 (any free port) only makes sense for the embedded broker")
        for name in _POSITIVE_SECONDS:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in _POSITIVE_AMOUNTS:
            if getattr(self, name) <= 0:
                unit = "bytes" if name.endswith("_bytes") else "(count)"
                raise ValueError(f"{name} must be > 0 {unit}, got {getattr(self, name)}")
        if self.max_chunk_request_bytes < self.max_chunk_bytes:
            raise ValueError("max_chunk_request_bytes must be at least max_chunk_bytes")
        if self.broker_reconnect_max_delay_s < self.broker_reconnect_min_delay_s:
            raise ValueError("broker_reconnect_max_delay_s must be at least broker_reconnect_min_delay_s")
        if self.broker_max_inflight_count > 65535:
            raise ValueError(f"broker_max_inflight_count must be 1..65535, got {self.broker_max_inflight_count}")
        # Both end up in MQTT client ids / topic filters, where '+', '#' and '/' have meaning.
        if self.client_id_suffix and not DEVICE_ID_RE.match(self.client_id_suffix):
            raise ValueError(f"client_id_suffix {self.client_id_suffix!r} must match {DEVICE_ID_RE.pattern}")
        if self.share_group is not None and not DEVICE_ID_RE.match(self.share_group):
            raise ValueError(f"share_group {self.share_group!r} must match {DEVICE_ID_RE.pattern}")
        return self

    @property
    def embedded_broker(self) -> bool:
        """Whether this process starts its own broker (no ``broker_host`` configured)."""
        return self.broker_host is None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Build settings from ``EDGEFLEET_<FIELD>`` variables (e.g. ``EDGEFLEET_API_PORT``).

        Args:
            environ: The variables to read; ``os.environ`` by default. Empty values count as unset.
            **overrides: Field values that win over the environment (CLI options); None = not given.

        Returns:
            The validated settings; unset variables keep their defaults.

        Raises:
            ConfigError: A variable that does not parse as its field's type, or an invalid value.
        """
        from_env = _MappingEnvSource(cls, os.environ if environ is None else environ)()
        for name, raw in from_env.items():
            annotation = cls.model_fields[name].annotation
            try:
                TypeAdapter(cast(Any, annotation)).validate_python(raw)
            except ValidationError as exc:
                kind = getattr(annotation, "__name__", str(annotation))
                raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r:.80} is not a valid {kind}") from exc
        given = {key: value for key, value in overrides.items() if value is not None}
        return cls(**{**from_env, **given})


_POSITIVE_SECONDS = (
    "reconcile_interval_s",
    "broker_supervise_interval_s",
    "broker_restart_max_delay_s",
    "desired_state_ttl_s",
    "resign_interval_s",
    "broker_connect_timeout_s",
    "broker_keepalive_s",
    "broker_reconnect_min_delay_s",
    "broker_reconnect_max_delay_s",
    "chunk_grant_ttl_s",
)
_POSITIVE_AMOUNTS = (
    "max_upload_bytes",
    "max_chunk_bytes",
    "max_chunk_request_bytes",
    "bundle_cache_bytes",
    "broker_max_inflight_count",
    "ingest_queue_max_count",
    "ingest_batch_max_count",
    "handler_attempts_count",
    "max_chunk_grants_count",
    "bundle_max_open_files_count",
    "bundle_cache_window_divisor_count",
    "upload_max_field_bytes",
    "upload_max_parts_count",
    "upload_form_overhead_bytes",
    "resign_batch_count",
)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (tests pass their own)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # names are matched case-insensitively, as pydantic-settings does for os.environ
        return {name.lower(): value for name, value in self._environ.items() if value != ""}


def _config_error(exc: ValidationError) -> ConfigError:
    """The first validation error as a ConfigError: our validators' own words, else the field and value."""
    error = exc.errors(include_url=False)[0]
    if error["type"] == "value_error":
        return ConfigError(str(error["ctx"]["error"]))
    name = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return ConfigError(f"unknown setting {name!r}")
    return ConfigError(f"{name}={error['input']!r:.80}: {error['msg']}")

