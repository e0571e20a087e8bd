"""Versioned wire messages between agents and the control plane.

Each message is a frozen dataclass with ``encode() -> bytes`` and ``decode(bytes) -> Self``.
Decoding is strict (see :mod:`shared.strict`): unknown versions raise UnknownSchemaError,
anything malformed raises MessageError, and nothing is half-parsed.

The desired state is the only message that needs a signature: it travels inside a DSSE envelope
(:data:`DESIRED_PAYLOAD_TYPE`) signed by the control plane's online key, and
:func:`verify_desired_state` is the pure check an agent applies before acting on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.shared.errors import DirectiveError, MessageError
from edgefleet.shared.trust.signing import SigningKey, open_envelope, seal_envelope
from edgefleet.shared.wire.strict import (
    DEVICE_ID_RE,
    DIGEST_RE,
    NAME_RE,
    VERSION_RE,
    check_keys,
    check_schema,
    dumps,
    get_float,
    get_int,
    get_list,
    get_str,
    loads_object,
)

DESIRED_PAYLOAD_TYPE = "application/vnd.edgefleet.desired+json"
MAX_MESSAGE_BYTES = 256 * 1024  # bytes, any JSON message on the wire
MAX_MODELS = 32  # count, models on one device


class Outcome(StrEnum):
    """How a deployment on a device ended (the Mender/Greengrass set)."""

    SUCCEEDED = "succeeded"
    FAILED_NO_CHANGE = "failed_no_change"
    FAILED_ROLLED_BACK = "failed_rolled_back"
    FAILED_UNABLE_TO_ROLL_BACK = "failed_unable_to_roll_back"
    REJECTED = "rejected"


MAX_URLS = 4  # count, download locations per bundle
_URL_RE = re.compile(r"^https?://[^\s]{1,2000}\Z")


def _urls(raw: dict[str, Any], what: str) -> tuple[str, ...]:
    if "urls" not in raw:
        return ()
    urls = get_list(raw, "urls", what, max_items=MAX_URLS)
    if not all(isinstance(u, str) and _URL_RE.match(u) for u in urls):
        raise MessageError(f"{what}.urls: expected http(s) URLs")
    return tuple(urls)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowDirective:
    """A candidate version that runs beside the serving one on sampled inputs; never served."""

    version: str
    bundle_digest: str
    bundle_size: int
    runtime: str
    sample_rate: float  # fraction of requests mirrored to the candidate, (0, 1]
    urls: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "bundle_digest": self.bundle_digest,
            "bundle_size": self.bundle_size,
            "runtime": self.runtime,
            "sample_rate": self.sample_rate,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        return out

    @classmethod
    def from_dict(cls, raw: object) -> ShadowDirective:
        what = "desired.models[].shadow"
        if not isinstance(raw, dict):
            raise MessageError(f"{what}: expected an object")
        check_keys(raw, what, {"version", "bundle_digest", "bundle_size", "runtime", "sample_rate"}, {"urls"})
        rate = get_float(raw, "sample_rate", what)
        if not 0.0 < rate <= 1.0:
            raise MessageError(f"{what}.sample_rate: must be in (0, 1], got {rate}")
        return cls(
            version=get_str(raw, "version", what, pattern=VERSION_RE),
            bundle_digest=get_str(raw, "bundle_digest", what, pattern=DIGEST_RE),
            bundle_size=get_int(raw, "bundle_size", what, minimum=1),
            runtime=get_str(raw, "runtime", what, max_len=32),
            sample_rate=rate,
            urls=_urls(raw, what),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelDirective:
    """One model the device must serve: exactly this bundle, optionally with a shadow candidate.

    ``urls`` are optional HTTP(S) locations of the same bundle (range requests); without them the
    agent fetches it in chunks over MQTT. Either way the bytes must hash to ``bundle_digest``.
    """

    name: str
    version: str
    bundle_digest: str
    bundle_size: int
    runtime: str
    urls: tuple[str, ...] = ()
    shadow: ShadowDirective | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "bundle_digest": self.bundle_digest,
            "bundle_size": self.bundle_size,
            "runtime": self.runtime,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.shadow is not None:
            out["shadow"] = self.shadow.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: object) -> ModelDirective:
        if not isinstance(raw, dict):
            raise MessageError("desired.models[]: expected an object")
        check_keys(
            raw, "desired.models[]", {"name", "version", "bundle_digest", "bundle_size", "runtime"}, {"urls", "shadow"}
        )
        return cls(
            name=get_str(raw, "name", "desired.models[]", pattern=NAME_RE),
            version=get_str(raw, "version", "desired.models[]", pattern=VERSION_RE),
            bundle_digest=get_str(raw, "bundle_digest", "desired.models[]", pattern=DIGEST_RE),
            bundle_size=get_int(raw, "bundle_size", "desired.models[]", minimum=1),
            runtime=get_str(raw, "runtime", "desired.models[]", max_len=32),
            urls=_urls(raw, "desired.models[]"),
            shadow=ShadowDirective.from_dict(raw["shadow"]) if raw.get("shadow") is not None else None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DesiredState:
    """What the control plane wants a device to run (``edgefleet.desired/v1``)."""

    device_id: str
    sequence: int
    issued_at: float
    expires_at: float
    models: tuple[ModelDirective, ...] = ()

    def __post_init__(self) -> None:
        # Refuse to build (and so to sign) what every agent would refuse to decode.
        if len(self.models) > MAX_MODELS:
            raise MessageError(f"desired state: {len(self.models)} models, at most {MAX_MODELS}")
        if len({m.name for m in self.models}) != len(self.models):
            raise MessageError("desired.models: a model name appears twice")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "edgefleet.desired/v1",
            "device_id": self.device_id,
            "sequence": self.sequence,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "models": [m.to_dict() for m in self.models],
        }

    def encode(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> DesiredState:
        raw = loads_object(data, "desired", MAX_MESSAGE_BYTES)
        check_schema(raw, "desired", 1)
        check_keys(raw, "desired", {"schema", "device_id", "sequence", "issued_at", "expires_at", "models"})
        models = tuple(ModelDirective.from_dict(m) for m in get_list(raw, "models", "desired", max_items=MAX_MODELS))
        return cls(
            device_id=get_str(raw, "device_id", "desired", pattern=DEVICE_ID_RE),
            sequence=get_int(raw, "sequence", "desired", minimum=1),
            issued_at=get_float(raw, "issued_at", "desired"),
            expires_at=get_float(raw, "expires_at", "desired"),
            models=models,
        )

    def seal(self, key: SigningKey) -> bytes:
        """Sign with the control plane's online key; the DSSE envelope is what is published."""
        return seal_envelope(DESIRED_PAYLOAD_TYPE, self.encode(), [key])


def verify_desired_state(
    envelope: bytes,
    *,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    device_id: str,
    last_sequence: int,
    now: float,
) -> DesiredState:
    """The agent's check of a desired state: signature, device binding, freshness, expiry.

    Args:
        envelope: The retained message as received.
        trusted_keys: The control plane's online key(s) the device pins.
        device_id: This device's id; a directive for another device is refused.
        last_sequence: Highest sequence already accepted; an equal one is a duplicate, a lower
            one a replay.
        now: Current unix time in seconds (passed in: no clock here).

    Raises:
        SignatureError, MessageError: Not a validly signed desired state.
        DirectiveError: Replayed, for another device, or expired.
    """
    state = DesiredState.decode(open_envelope(envelope, payload_type=DESIRED_PAYLOAD_TYPE, trusted_keys=trusted_keys))
    if state.device_id != device_id:
        raise DirectiveError(f"desired state is for device {state.device_id!r}, this is {device_id!r}")
    if state.sequence <= last_sequence:
        raise DirectiveError(f"desired state sequence {state.sequence} is not newer than {last_sequence}")
    if now >= state.expires_at:
        raise DirectiveError(f"desired state {state.sequence} expired at {state.expires_at:.0f} (now {now:.0f})")
    return state


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelReport:
    """A model as the device runs it."""

    name: str
    version: str
    bundle_digest: str
    runtime: str
    state: str  # "serving" | "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "bundle_digest": self.bundle_digest,
            "runtime": self.runtime,
            "state": self.state,
        }

    @classmethod
    def from_dict(cls, raw: object) -> ModelReport:
        if not isinstance(raw, dict):
            raise MessageError("reported.models[]: expected an object")
        check_keys(raw, "reported.models[]", {"name", "version", "bundle_digest", "runtime", "state"})
        state = get_str(raw, "state", "reported.models[]", max_len=32)
        if state not in ("serving", "failed"):
            raise MessageError(f"reported.models[].state: unknown state {state!r}")
        return cls(
            name=get_str(raw, "name", "reported.models[]", pattern=NAME_RE),
            version=get_str(raw, "version", "reported.models[]", pattern=VERSION_RE),
            bundle_digest=get_str(raw, "bundle_digest", "reported.models[]", pattern=DIGEST_RE),
            runtime=get_str(raw, "runtime", "reported.models[]", max_len=32),
            state=state,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowReport:
    """How a shadow candidate compares with the serving version, over the samples so far.

    Agreement is top-1 (argmax of the first output) for classifiers; ``max_abs_diff`` and
    ``mean_abs_diff`` compare the first output numerically. Rollout gates read these.
    """

    name: str
    serving_version: str
    version: str
    bundle_digest: str
    state: str  # "running" | "failed"
    samples: int = 0
    agreements: int = 0
    errors: int = 0
    mean_abs_diff: float = 0.0
    max_abs_diff: float = 0.0
    latency_p50_ms: float = 0.0
    serving_latency_p50_ms: float = 0.0
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "serving_version": self.serving_version,
            "version": self.version,
            "bundle_digest": self.bundle_digest,
            "state": self.state,
            "samples": self.samples,
            "agreements": self.agreements,
            "errors": self.errors,
            "mean_abs_diff": self.mean_abs_diff,
            "max_abs_diff": self.max_abs_diff,
            "latency_p50_ms": self.latency_p50_ms,
            "serving_latency_p50_ms": self.serving_latency_p50_ms,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, raw: object) -> ShadowReport:
        what = "reported.shadows[]"
        if not isinstance(raw, dict):
            raise MessageError(f"{what}: expected an object")
        check_keys(raw, what, _SHADOW_REPORT_KEYS)
        state = get_str(raw, "state", what, max_len=32)
        if state not in ("running", "failed"):
            raise MessageError(f"{what}.state: unknown state {state!r}")
        return cls(
            name=get_str(raw, "name", what, pattern=NAME_RE),
            serving_version=get_str(raw, "serving_version", what, pattern=VERSION_RE),
            version=get_str(raw, "version", what, pattern=VERSION_RE),
            bundle_digest=get_str(raw, "bundle_digest", what, pattern=DIGEST_RE),
            state=state,
            message=get_str(raw, "message", what, max_len=2048),
            **{k: get_int(raw, k, what) for k in ("samples", "agreements", "errors")},
            **{
                k: get_float(raw, k, what)
                for k in ("mean_abs_diff", "max_abs_diff", "latency_p50_ms", "serving_latency_p50_ms")
            },
        )


_SHADOW_REPORT_KEYS = {
    "name",
    "serving_version",
    "version",
    "bundle_digest",
    "state",
    "samples",
    "agreements",
    "errors",
    "mean_abs_diff",
    "max_abs_diff",
    "latency_p50_ms",
    "serving_latency_p50_ms",
    "message",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportedState:
    """What a device runs now (``edgefleet.reported/v1``), published retained."""

    device_id: str
    ts: float
    applied_sequence: int
    models: tuple[ModelReport, ...] = ()
    agent: dict[str, str] = field(default_factory=dict)
    shadows: tuple[ShadowReport, ...] = ()

    def encode(self) -> bytes:
        out: dict[str, Any] = {
            "schema": "edgefleet.reported/v1",
            "device_id": self.device_id,
            "ts": self.ts,
            "applied_sequence": self.applied_sequence,
            "models": [m.to_dict() for m in self.models],
            "agent": dict(self.agent),
        }
        if self.shadows:
            out["shadows"] = [s.to_dict() for s in self.shadows]
        return dumps(out)

    @classmethod
    def decode(cls, data: bytes) -> ReportedState:
        raw = loads_object(data, "reported", MAX_MESSAGE_BYTES)
        check_schema(raw, "reported", 1)
        check_keys(raw, "reported", {"schema", "device_id", "ts", "applied_sequence", "models", "agent"}, {"shadows"})
        agent = raw["agent"]
        if (
            not isinstance(agent, dict)
            or not all(isinstance(k, str) and isinstance(v, str) and len(v) < 256 for k, v in agent.items())
            or len(agent) > 32
        ):
            raise MessageError("reported.agent: expected an object of at most 32 short strings")
        return cls(
            device_id=get_str(raw, "device_id", "reported", pattern=DEVICE_ID_RE),
            ts=get_float(raw, "ts", "reported"),
            applied_sequence=get_int(raw, "applied_sequence", "reported"),
            models=tuple(ModelReport.from_dict(m) for m in get_list(raw, "models", "reported", max_items=MAX_MODELS)),
            agent=dict(agent),
            shadows=tuple(ShadowReport.from_dict(x) for x in get_list(raw, "shadows", "reported", max_items=MAX_MODELS))
            if "shadows" in raw
            else (),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentEvent:
    """The end of one model's deployment on a device (``edgefleet.event/v1``, kind deployment).

    ``event_id`` is unique per event so the control plane ingests idempotently.
    """

    event_id: str
    device_id: str
    ts: float
    sequence: int
    name: str
    version: str
    bundle_digest: str
    outcome: Outcome
    error_code: str = ""
    message: str = ""
    duration_s: float = 0.0

    def encode(self) -> bytes:
        return dumps(
            {
                "schema": "edgefleet.event/v1",
                "kind": "deployment",
                "event_id": self.event_id,
                "device_id": self.device_id,
                "ts": self.ts,
                "sequence": self.sequence,
                "name": self.name,
                "version": self.version,
                "bundle_digest": self.bundle_digest,
                "outcome": self.outcome.value,
                "error_code": self.error_code,
                "message": self.message,
                "duration_s": self.duration_s,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> DeploymentEvent:
        raw = loads_object(data, "event", MAX_MESSAGE_BYTES)
        check_schema(raw, "event", 1)
        check_keys(
            raw,
            "event",
            {
                "schema",
                "kind",
                "event_id",
                "device_id",
                "ts",
                "sequence",
                "name",
                "version",
                "bundle_digest",
                "outcome",
                "error_code",
                "message",
                "duration_s",
            },
        )
        if raw["kind"] != "deployment":
            raise MessageError(f"event.kind: unknown kind {raw['kind']!r:.40}")
        try:
            outcome = Outcome(raw["outcome"])
        except ValueError:
            raise MessageError(f"event.outcome: unknown outcome {raw['outcome']!r:.40}") from None
        return cls(
            event_id=get_str(raw, "event_id", "event", max_len=64),
            device_id=get_str(raw, "device_id", "event", pattern=DEVICE_ID_RE),
            ts=get_float(raw, "ts", "event"),
            sequence=get_int(raw, "sequence", "event"),
            name=get_str(raw, "name", "event", pattern=NAME_RE),
            version=get_str(raw, "version", "event", pattern=VERSION_RE),
            bundle_digest=get_str(raw, "bundle_digest", "event", pattern=DIGEST_RE),
            outcome=outcome,
            error_code=get_str(raw, "error_code", "event", max_len=64),
            message=get_str(raw, "message", "event", max_len=2048),
            duration_s=get_float(raw, "duration_s", "event"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceStatus:
    """Liveness (``edgefleet.status/v1``), retained; the offline form is the MQTT last will."""

    device_id: str
    online: bool
    ts: float

    def encode(self) -> bytes:
        return dumps(
            {"schema": "edgefleet.status/v1", "device_id": self.device_id, "online": self.online, "ts": self.ts}
        )

    @classmethod
    def decode(cls, data: bytes) -> DeviceStatus:
        raw = loads_object(data, "status", MAX_MESSAGE_BYTES)
        check_schema(raw, "status", 1)
        check_keys(raw, "status", {"schema", "device_id", "online", "ts"})
        if not isinstance(raw["online"], bool):
            raise MessageError("status.online: expected true or false")
        return cls(
            device_id=get_str(raw, "device_id", "status", pattern=DEVICE_ID_RE),
            online=raw["online"],
            ts=get_float(raw, "ts", "status"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectionEvent:
    """A device refused a message (``edgefleet.event/v1``, kind rejected): a desired state that was
    replayed, expired, for another device or badly signed, or a keyring version that did not verify.

    The running models are untouched; the event tells the operator why nothing happened.
    """

    event_id: str
    device_id: str
    ts: float
    subject: str  # "desired" | "keyring"
    code: str
    message: str

    def encode(self) -> bytes:
        return dumps(
            {
                "schema": "edgefleet.event/v1",
                "kind": "rejected",
                "event_id": self.event_id,
                "device_id": self.device_id,
                "ts": self.ts,
                "subject": self.subject,
                "code": self.code,
                "message": self.message,
            }
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RejectionEvent:
        check_keys(raw, "event", {"schema", "kind", "event_id", "device_id", "ts", "subject", "code", "message"})
        subject = get_str(raw, "subject", "event", max_len=32)
        if subject not in ("desired", "keyring"):
            raise MessageError(f"event.subject: unknown subject {subject!r}")
        return cls(
            event_id=get_str(raw, "event_id", "event", max_len=64),
            device_id=get_str(raw, "device_id", "event", pattern=DEVICE_ID_RE),
            ts=get_float(raw, "ts", "event"),
            subject=subject,
            code=get_str(raw, "code", "event", max_len=64),
            message=get_str(raw, "message", "event", max_len=2048),
        )


def decode_event(data: bytes) -> DeploymentEvent | RejectionEvent:
    """Decode anything published on a device's ``events`` topic, by its ``kind``."""
    raw = loads_object(data, "event", MAX_MESSAGE_BYTES)
    check_schema(raw, "event", 1)
    if raw.get("kind") == "rejected":
        return RejectionEvent.from_dict(raw)
    return DeploymentEvent.decode(data)
