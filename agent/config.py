"""Agent configuration: a TOML file plus ``EDGEFLEET_AGENT_*`` overrides, as frozen pydantic-settings models.

Every value is validated strictly (TOML types, no silent coercion: ``port = "1883"`` is refused),
every limit is a field with its unit in the name, and every failure is a :class:`ConfigError`
that names the key. Environment variables override the file (and any value given in code):
``EDGEFLEET_AGENT_<FIELD>`` for top-level fields, ``EDGEFLEET_AGENT_<SECTION>__<FIELD>`` for
section fields (``EDGEFLEET_AGENT_BROKER__PORT=8883``; lists as JSON:
``EDGEFLEET_AGENT_TRUST__ONLINE_KEYS='["ab.."]'``).

Example (``edgefleet-agent init-config`` writes one)::

    device_id = "pi-kitchen-01"
    data_dir = "/var/lib/edgefleet-agent"

    [broker]
    host = "127.0.0.1"
    port = 1883

    [trust]
    publisher_keys = ["<hex ed25519 public key>"]
    online_keys = ["<hex ed25519 public key>"]

    [api]
    port = 8701
"""

from __future__ import annotations

import json
import tomllib
import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edgefleet.shared.errors import ConfigError
from edgefleet.shared.wire.strict import DEVICE_ID_RE

ENV_PREFIX = "EDGEFLEET_AGENT_"
ENV_NESTED_DELIMITER = "__"

# Field types: TOML values are checked strictly; lists arrive from TOML and become tuples (frozen).
Count = Annotated[int, Field(ge=0)]  # a non-negative integer (count, bytes, port ...)
Seconds = Annotated[float, Field(ge=0)]  # a non-negative, finite number
Strings = Annotated[tuple[str, ...], Field(strict=False)]


class _Section(BaseModel):
    """A ``[section]`` of the file: frozen, strict, unknown keys refused; errors are ConfigErrors."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)
    section: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        """Validate ``values``.

        Raises:
            ConfigError: A value of the wrong type, out of range, or an unknown key.
        """
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _config_error(exc, self.section) from exc

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Make each field's default readable on the class (``ShadowConfig.stop_timeout_s``), as it was
        when the sections were dataclasses: callers use those as their own parameters' defaults."""
        super().__pydantic_init_subclass__(**kwargs)
        for name, info in cls.model_fields.items():
            if info.default_factory is None and not info.is_required():
                type.__setattr__(cls, name, info.default)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied, validated again (``model_copy`` would not validate)."""
        return type(self)(**{**dict(self), **changes})


class BrokerConfig(_Section):
    """How to reach the MQTT broker."""

    section: ClassVar[str] = "broker"

    host: str = "127.0.0.1"
    port: Count = 1883
    username: str | None = None
    password: str | None = None
    keepalive_s: Count = 30  # seconds
    reconnect_min_s: Seconds = 0.5
    reconnect_max_s: Seconds = 30.0
    tls_ca_file: str | None = None  # verify the broker against this CA (TLS on when any tls_* is set)
    tls_cert_file: str | None = None  # client certificate (PEM), with tls_key_file
    tls_key_file: str | None = None  # its private key (PEM, unencrypted)
    # count: QoS 1 messages sent and not yet acknowledged (shared/link/paho.py); paho is slower with more
    max_inflight_count: Count = 20

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("[broker] tls_cert_file and tls_key_file go together: set both or neither")
        return self


class TrustConfig(_Section):
    """Public keys pinned on the device (hex Ed25519)."""

    section: ClassVar[str] = "trust"

    pinned_keyring_file: str | None = None  # keyring pinned at enrollment (rotating trust); else static keys
    publisher_keys: Strings = ()  # static mode (development): hex Ed25519 keys, no rotation
    publisher_threshold: Count = 1
    online_keys: Strings = ()
    # count: future keyring versions held while waiting for a gap to fill (deployment/trust_store.py)
    max_pending_versions_count: Count = 64


class ApiConfig(_Section):
    """The local inference API; loopback by default because it has no authentication."""

    section: ClassVar[str] = "api"

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Count = 8701
    max_request_bytes: Count = 64 * 1024 * 1024


class TransferConfig(_Section):
    """Bundle download: over MQTT in chunks, or over HTTP(S) with range requests."""

    section: ClassVar[str] = "transfer"

    chunk_size_bytes: Count = 64 * 1024  # under the 128 KiB message limit common on managed brokers
    window_chunks: Count = 32  # requested, not yet received: 2 MiB in flight (16: a third slower on loopback)
    chunk_timeout_s: Seconds = 5.0  # no chunk for this long: ask again for the missing ones
    max_attempts_per_chunk: Count = 20
    max_bundle_bytes: Count = 2 * 1024**3
    http_base_url: str | None = None  # the control plane, e.g. http://127.0.0.1:8700: bundles over HTTP
    prefer_http: bool = False  # with http_base_url: fetch from it rather than in MQTT chunks
    bandwidth_limit_bytes_per_s: Count = 0  # cap on download bytes/s over HTTP and MQTT; 0 = no cap
    http_timeout_s: Seconds = 30.0  # connect, read and write timeout of each HTTP request
    http_max_retries: Count = 5  # failed HTTP attempts in a row (no bytes gained) before a URL is given up
    # seconds of traffic at the capped rate that may pass at once after an idle spell (transfer/bandwidth.py)
    bandwidth_burst_s: Seconds = 0.25
    poll_s: Seconds = 0.25  # the chunk fetch loop's sleep when nothing arrives (transfer/mqtt_chunks.py)
    reconnect_grace_s: Seconds = 0.5  # after a reconnect, before outstanding chunks are asked for again


class ShadowConfig(_Section):
    """Bounds on what one shadow candidate may cost the device.

    Attributes:
        queue_max_samples: Samples waiting for the candidate; more are dropped (and counted),
            never queued: a slow candidate must not grow memory or slow the serving path.
        latency_reservoir_size: Latencies kept per model (serving and candidate) for the p50.
        stop_timeout_s: How long unloading waits for the candidate's current inference.
    """

    section: ClassVar[str] = "shadow"

    queue_max_samples: Count = 64  # count
    latency_reservoir_size: Count = 512  # count
    stop_timeout_s: Seconds = 5.0  # seconds


class RuntimeConfig(_Section):
    """Inference runtime settings."""

    section: ClassVar[str] = "runtime"

    intra_op_threads: Count = 1
    onnx_providers: Annotated[tuple[str, ...] | None, Field(strict=False)] = None  # None: what the node has


class BatchingConfig(_Section):
    """Server-side dynamic batching of the local inference API (``agent/serving/batching.py``).

    Off by default: a lone request waits up to ``max_queue_delay_us`` for company, which only
    pays off when several clients call the same model at once. It applies only to models whose
    every input and output has a dynamic first dimension, and it assumes the model treats rows
    independently, which the agent cannot check: ``models`` limits it to the models known to.
    """

    section: ClassVar[str] = "batching"

    enabled: bool = False
    max_batch_size: Count = 32  # rows (first-dimension entries) in one model run
    max_queue_delay_us: Count = 500  # microseconds the first request of a batch waits for others
    models: Strings = ()  # names of the models to batch; empty: every batchable model

    @model_validator(mode="after")
    def _sizes_make_sense(self) -> Self:
        if self.max_batch_size < 1:
            raise ValueError("batching.max_batch_size must be at least 1")
        if not 0 <= self.max_queue_delay_us <= 10_000_000:
            raise ValueError("batching.max_queue_delay_us must be between 0 and 10000000 (10 s)")
        return self

    def applies_to(self, model_name: str) -> bool:
        """Whether requests to ``model_name`` are batched."""
        return self.enabled and (not self.models or model_name in self.models)


class AgentConfig(BaseSettings):
    """Everything an agent needs to run."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_ignore_empty=True,
    )

    device_id: str
    data_dir: Annotated[Path, Field(strict=False)]
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    heartbeat_interval_s: Seconds = 60.0
    health_check_timeout_s: Seconds = 30.0
    slots_kept_per_model: Count = 2  # the active slot and one to roll back to
    retry_delay_s: Seconds = 5.0  # after a retryable failure (transfer), try the same desired state again
    # deaths of the agent while a bundle is activated or checked before it ends runtime_crashed
    max_interrupted_attempts_count: Count = 3
    retire_grace_s: Seconds = 5.0  # an old model stays open this long after a swap (serving/host.py)

    def __init__(self, **values: Any) -> None:
        """Validate ``values``; ``EDGEFLEET_AGENT_*`` variables override them.

        Raises:
            ConfigError: A value of the wrong type, out of range, or an unknown key.
        """
        # Sections given as models become tables, so an override of one key keeps the others.
        values = {key: dict(value) if isinstance(value, BaseModel) else value for key, value in values.items()}
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _config_error(exc, "") from exc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment wins over the file (passed in as keyword values); no dotenv, no secrets dir."""
        return env_settings, init_settings

    @field_validator("device_id")
    @classmethod
    def _device_id_is_a_topic_level(cls, value: str) -> str:
        if not DEVICE_ID_RE.match(value):
            raise ValueError(f"device_id must match {DEVICE_ID_RE.pattern}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> Self:
        """Values of the right type that still make no sense."""
        checks = [
            (
                1024 <= self.transfer.chunk_size_bytes <= 8 * 1024 * 1024,
                "transfer.chunk_size_bytes must be between 1 KiB and 8 MiB",
            ),
            (self.transfer.window_chunks >= 1, "transfer.window_chunks must be at least 1"),
            (self.transfer.http_timeout_s > 0, "transfer.http_timeout_s must be positive"),
            (self.transfer.chunk_timeout_s > 0, "transfer.chunk_timeout_s must be positive"),
            (self.transfer.max_attempts_per_chunk >= 1, "transfer.max_attempts_per_chunk must be at least 1"),
            (self.transfer.poll_s > 0, "transfer.poll_s must be positive"),
            (1 <= self.broker.port <= 65535, "broker.port must be 1..65535"),
            (1 <= self.broker.max_inflight_count <= 65535, "broker.max_inflight_count must be 1..65535"),
            (1 <= self.api.port <= 65535, "api.port must be 1..65535"),
            (self.trust.publisher_threshold >= 1, "trust.publisher_threshold must be at least 1"),
            (self.trust.max_pending_versions_count >= 1, "trust.max_pending_versions_count must be at least 1"),
            (self.heartbeat_interval_s > 0, "heartbeat_interval_s must be positive"),
            (self.retry_delay_s > 0, "retry_delay_s must be positive"),
            (self.runtime.intra_op_threads >= 1, "runtime.intra_op_threads must be at least 1"),
            (self.slots_kept_per_model >= 1, "slots_kept_per_model must be at least 1"),
            (self.shadow.queue_max_samples >= 1, "shadow.queue_max_samples must be at least 1"),
            (self.shadow.latency_reservoir_size >= 1, "shadow.latency_reservoir_size must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def replace(self, **changes: Any) -> AgentConfig:
        """A copy with ``changes`` applied (sections as models or tables), validated again."""
        return AgentConfig(**{**dict(self), **changes})

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        """Read and validate a TOML config file; relative ``data_dir`` is taken from the file's folder.

        Raises:
            ConfigError: The file cannot be read, is not TOML, or holds an invalid value.
        """
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read agent config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_dict(raw, base_dir=path.parent)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: Path = Path(".")) -> AgentConfig:
        """Validate a config mapping (the parsed TOML); relative paths are taken from ``base_dir``.

        Raises:
            ConfigError: An invalid value, naming its key.
        """
        config = cls(**raw)
        # model_copy skips validation (and the environment): these values are validated, only made absolute
        trust = config.trust
        if trust.pinned_keyring_file:  # relative to the config file, like data_dir
            pinned = str((base_dir / trust.pinned_keyring_file).resolve())
            trust = trust.model_copy(update={"pinned_keyring_file": pinned})
        return config.model_copy(update={"data_dir": (base_dir / config.data_dir).resolve(), "trust": trust})


SECTIONS: dict[str, type[_Section]] = {
    "broker": BrokerConfig,
    "trust": TrustConfig,
    "api": ApiConfig,
    "transfer": TransferConfig,
    "runtime": RuntimeConfig,
    "shadow": ShadowConfig,
    "batching": BatchingConfig,
}


def _config_error(exc: ValidationError, section: str) -> ConfigError:
    """The first validation error, in the words the agent has always used (key first)."""
    error = exc.errors(include_url=False)[0]
    path = ([section] if section else []) + [str(part) for part in error["loc"] if not isinstance(part, int)]
    kind = error["type"]
    if kind == "value_error":  # our own validators: their message already names the key
        return ConfigError(str(error["ctx"]["error"]))
    if path[:1] == ["device_id"]:
        value = None if kind == "missing" else error["input"]
        return ConfigError(f"device_id must match {DEVICE_ID_RE.pattern}, got {value!r}")
    if kind == "extra_forbidden" and len(path) == 1:
        return ConfigError(f"unknown config key {path[0]!r}")
    if kind == "extra_forbidden":
        known = sorted(SECTIONS[path[0]].model_fields)
        return ConfigError(f"unknown key {path[1]!r} in [{path[0]}]; known: {known}")
    if len(path) == 1 and path[0] in SECTIONS:
        return ConfigError(f"[{path[0]}] must be a table")
    owner: type[BaseModel] = SECTIONS[path[0]] if len(path) > 1 else AgentConfig
    field = owner.model_fields.get(path[-1])
    expected = _expected(field.annotation) if field is not None else "valid"
    return ConfigError(f"{'.'.join(path)} must be {expected}")


def _expected(annotation: Any) -> str:
    """What a field takes, in TOML's words."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is tuple:
        return "a list of strings"
    return {
        bool: "true or false",
        int: "a non-negative integer",
        float: "a non-negative number",
        str: "a string",
        Path: "a path string",
    }.get(annotation, "valid")


def render_config(config: AgentConfig) -> str:
    """Serialize a config back to TOML (for ``init-config``, enrollment and tests)."""
    lines = [f"device_id = {_toml(config.device_id)}", f"data_dir = {_toml(str(config.data_dir))}"]
    for name, field in AgentConfig.model_fields.items():
        value = getattr(config, name)
        if name in ("device_id", "data_dir") or name in SECTIONS:
            continue
        if value != field.default:
            lines.append(f"{name} = {_toml(value)}")
    for name in SECTIONS:
        lines.append(f"\n[{name}]")
        for key, value in dict(getattr(config, name)).items():
            if value is not None:
                lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes (ensure_ascii would emit surrogate pairs).
    return json.dumps(str(value), ensure_ascii=False)
