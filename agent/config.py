"""Agent configuration: a TOML file, validated into frozen dataclasses with units in the names.

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

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.shared.errors import ConfigError
from edgefleet.shared.wire.strict import DEVICE_ID_RE


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """How to reach the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    tls_ca_file: str | None = None  # verify the broker against this CA (TLS on when any tls_* is set)
    tls_cert_file: str | None = None  # client certificate (PEM), with tls_key_file
    tls_key_file: str | None = None  # its private key (PEM, unencrypted)

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("[broker] tls_cert_file and tls_key_file go together: set both or neither")


@dataclass(frozen=True, kw_only=True)
class TrustConfig:
    """Public keys pinned on the device (hex Ed25519)."""

    pinned_keyring_file: str | None = None  # keyring pinned at enrollment (rotating trust); else static keys
    publisher_keys: tuple[str, ...] = ()  # static mode (development): hex Ed25519 keys, no rotation
    publisher_threshold: int = 1
    online_keys: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """The local inference API; loopback by default because it has no authentication."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8701
    max_request_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class TransferConfig:
    """Bundle download: over MQTT in chunks, or over HTTP(S) with range requests."""

    chunk_size_bytes: int = 64 * 1024  # under the 128 KiB message limit common on managed brokers
    window_chunks: int = 32  # requested, not yet received: 2 MiB in flight (16: a third slower on loopback)
    chunk_timeout_s: float = 5.0  # no chunk for this long: ask again for the missing ones
    max_attempts_per_chunk: int = 20
    max_bundle_bytes: int = 2 * 1024**3
    http_base_url: str | None = None  # the control plane, e.g. http://127.0.0.1:8700: bundles over HTTP
    prefer_http: bool = False  # with http_base_url: fetch from it rather than in MQTT chunks
    bandwidth_limit_bytes_per_s: int = 0  # cap on download bytes/s over HTTP and MQTT; 0 = no cap
    http_timeout_s: float = 30.0  # connect, read and write timeout of each HTTP request
    http_max_retries: int = 5  # failed HTTP attempts in a row (no bytes gained) before a URL is given up


@dataclass(frozen=True, kw_only=True)
class ShadowConfig:
    """Bounds on what one shadow candidate may cost the device.

    Attributes:
        queue_max_samples: Samples waiting for the candidate; more are dropped (and counted),
            never queued: a slow candidate must not grow memory or slow the serving path.
        latency_reservoir_size: Latencies kept per model (serving and candidate) for the p50.
        stop_timeout_s: How long unloading waits for the candidate's current inference.
    """

    queue_max_samples: int = 64  # count
    latency_reservoir_size: int = 512  # count
    stop_timeout_s: float = 5.0  # seconds


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Inference runtime settings."""

    intra_op_threads: int = 1
    onnx_providers: tuple[str, ...] | None = None  # None: choose from what the node has


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """Server-side dynamic batching of the local inference API (``agent/batching.py``).

    Off by default: a lone request waits up to ``max_queue_delay_us`` for company, which only
    pays off when several clients call the same model at once. It applies only to models whose
    every input and output has a dynamic first dimension, and it assumes the model treats rows
    independently, which the agent cannot check: ``models`` limits it to the models known to.
    """

    enabled: bool = False
    max_batch_size: int = 32  # rows (first-dimension entries) in one model run
    max_queue_delay_us: int = 500  # microseconds the first request of a batch waits for others
    models: tuple[str, ...] = ()  # names of the models to batch; empty: every batchable model

    def __post_init__(self) -> None:
        """Reject sizes that make no sense (the TOML parser has already checked the types).

        Raises:
            ConfigError: If ``max_batch_size`` is under 1 or ``max_queue_delay_us`` over 10 s.
        """
        if self.max_batch_size < 1:
            raise ConfigError("batching.max_batch_size must be at least 1")
        if not 0 <= self.max_queue_delay_us <= 10_000_000:
            raise ConfigError("batching.max_queue_delay_us must be between 0 and 10000000 (10 s)")

    def applies_to(self, model_name: str) -> bool:
        """Whether requests to ``model_name`` are batched."""
        return self.enabled and (not self.models or model_name in self.models)


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything an agent needs to run."""

    device_id: str
    data_dir: Path
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    heartbeat_interval_s: float = 60.0
    health_check_timeout_s: float = 30.0
    slots_kept_per_model: int = 2  # the active slot and one to roll back to

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        """Read and validate a TOML config file; relative ``data_dir`` is taken from the file's folder."""
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read agent config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_dict(raw, base_dir=path.parent)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: Path = Path(".")) -> AgentConfig:
        """Validate a config mapping (the parsed TOML)."""
        raw = dict(raw)
        device_id = raw.pop("device_id", None)
        if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
            raise ConfigError(f"device_id must match {DEVICE_ID_RE.pattern}, got {device_id!r}")
        data_dir = raw.pop("data_dir", None)
        if not isinstance(data_dir, str):
            raise ConfigError("data_dir must be a path string")
        sections = {
            "broker": BrokerConfig,
            "trust": TrustConfig,
            "api": ApiConfig,
            "transfer": TransferConfig,
            "runtime": RuntimeConfig,
            "shadow": ShadowConfig,
            "batching": BatchingConfig,
        }
        values: dict[str, Any] = {"device_id": device_id, "data_dir": (base_dir / data_dir).resolve()}
        for name, kind in sections.items():
            values[name] = _section(kind, raw.pop(name, {}), name)
        scalars = {f.name: f for f in dataclasses.fields(cls) if f.name not in values}
        for key in list(raw):
            if key not in scalars:
                raise ConfigError(f"unknown config key {key!r}")
            values[key] = _coerce(raw.pop(key), scalars[key].type, key)
        trust = values["trust"]
        if trust.pinned_keyring_file:  # relative to the config file, like data_dir
            values["trust"] = dataclasses.replace(
                trust, pinned_keyring_file=str((base_dir / trust.pinned_keyring_file).resolve())
            )
        config = cls(**values)
        _check_ranges(config)
        return config


def _check_ranges(config: AgentConfig) -> None:
    """Values of the right type that still make no sense."""
    checks = [
        (
            1024 <= config.transfer.chunk_size_bytes <= 8 * 1024 * 1024,
            "transfer.chunk_size_bytes must be between 1 KiB and 8 MiB",
        ),
        (config.transfer.window_chunks >= 1, "transfer.window_chunks must be at least 1"),
        (config.transfer.http_timeout_s > 0, "transfer.http_timeout_s must be positive"),
        (config.transfer.chunk_timeout_s > 0, "transfer.chunk_timeout_s must be positive"),
        (config.transfer.max_attempts_per_chunk >= 1, "transfer.max_attempts_per_chunk must be at least 1"),
        (1 <= config.broker.port <= 65535, "broker.port must be 1..65535"),
        (1 <= config.api.port <= 65535, "api.port must be 1..65535"),
        (config.trust.publisher_threshold >= 1, "trust.publisher_threshold must be at least 1"),
        (config.heartbeat_interval_s > 0, "heartbeat_interval_s must be positive"),
        (config.runtime.intra_op_threads >= 1, "runtime.intra_op_threads must be at least 1"),
        (config.slots_kept_per_model >= 1, "slots_kept_per_model must be at least 1"),
        (config.shadow.queue_max_samples >= 1, "shadow.queue_max_samples must be at least 1"),
        (config.shadow.latency_reservoir_size >= 1, "shadow.latency_reservoir_size must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _section(kind: type[Any], raw: object, name: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown key {key!r} in [{name}]; known: {sorted(fields)}")
        values[key] = _coerce(value, fields[key].type, f"{name}.{key}")
    return kind(**values)


def _coerce(value: object, type_name: object, where: str) -> Any:
    """Check a TOML value against the field's annotation (a string under postponed evaluation)."""
    t = str(type_name)
    if t.startswith("tuple[str"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
        return tuple(value)
    if t.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        return value
    if t == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if t == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where} must be a non-negative integer")
        return value
    if t == "float":
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where} must be a non-negative number")
        return float(value)
    if t == "Path":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a path string")
        return Path(value)
    raise ConfigError(f"{where}: unsupported setting type {t}")


def render_config(config: AgentConfig) -> str:
    """Serialize a config back to TOML (for ``init-config`` and tests)."""
    lines = [f"device_id = {_toml(config.device_id)}", f"data_dir = {_toml(str(config.data_dir))}"]
    top_defaults = AgentConfig(device_id="x", data_dir=Path("."))
    for f in dataclasses.fields(AgentConfig):
        value = getattr(config, f.name)
        if f.name in ("device_id", "data_dir") or dataclasses.is_dataclass(value):
            continue
        if value != getattr(top_defaults, f.name):
            lines.append(f"{f.name} = {_toml(value)}")
    for f in dataclasses.fields(AgentConfig):
        section = getattr(config, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        lines.append(f"\n[{f.name}]")
        for sf in dataclasses.fields(section):
            value = getattr(section, sf.name)
            if value is not None:
                lines.append(f"{sf.name} = {_toml(value)}")
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
