"""Versioned wire messages between agents and the control plane.

Each message is declared once (see :mod:`edgefleet.shared.wire.schema`): a frozen Struct with
``encode() -> bytes`` and ``decode(bytes) -> Self``. Decoding is strict: unknown versions raise
UnknownSchemaError, anything malformed raises MessageError naming the field, and nothing is
half-parsed. States, kinds and outcomes are StrEnums (equal to their wire strings).

The desired state is the only message that needs a signature: it travels inside a DSSE envelope
(:data:`DESIRED_PAYLOAD_TYPE`) signed by the control plane's online key, and
:func:`verify_desired_state` is the pure check an agent applies before acting on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from msgspec import Meta

from edgefleet.shared.errors import DirectiveError, MessageError
from edgefleet.shared.trust.signing import SigningKey, open_envelope, seal_envelope
from edgefleet.shared.wire.schema import (
    MAX_MESSAGE_BYTES,
    Count,
    DeviceId,
    Digest,
    Finite,
    Name,
    PositiveCount,
    Text32,
    Text64,
    Text2048,
    Url,
    Version,
    WireMessage,
    WireStruct,
)
from edgefleet.shared.wire.strict import check_schema, loads_object

__all__ = [
    "DESIRED_PAYLOAD_TYPE",
    "EVENTS",
    "MAX_MESSAGE_BYTES",
    "MAX_MODELS",
    "MAX_URLS",
    "DeploymentEvent",
    "DesiredState",
    "DeviceStatus",
    "EventKind",
    "ModelDirective",
    "ModelReport",
    "ModelState",
    "Outcome",
    "RejectionEvent",
    "RejectionSubject",
    "ReportedState",
    "ShadowDirective",
    "ShadowReport",
    "ShadowState",
    "decode_event",
    "verify_desired_state",
]

DESIRED_PAYLOAD_TYPE = "application/vnd.edgefleet.desired+json"
MAX_MODELS = 32  # count, models on one device
MAX_URLS = 4  # count, download locations per bundle


class Outcome(StrEnum):
    """How a deployment on a device ended (the Mender/Greengrass set)."""

    SUCCEEDED = "succeeded"
    FAILED_NO_CHANGE = "failed_no_change"
    FAILED_ROLLED_BACK = "failed_rolled_back"
    FAILED_UNABLE_TO_ROLL_BACK = "failed_unable_to_roll_back"
    REJECTED = "rejected"


class ModelState(StrEnum):
    """How a device reports one of its models."""

    SERVING = "serving"
    FAILED = "failed"


class ShadowState(StrEnum):
    """How a device reports a shadow candidate."""

    RUNNING = "running"
    FAILED = "failed"


class RejectionSubject(StrEnum):
    """What a device refused."""

    DESIRED = "desired"
    KEYRING = "keyring"


class EventKind(StrEnum):
    """The kinds of ``edgefleet.event/v1``, each its own message class."""

    DEPLOYMENT = "deployment"
    REJECTED = "rejected"


Urls = Annotated[tuple[Url, ...], Meta(max_length=MAX_URLS)]
SampleRate = Annotated[float, Meta(gt=0.0, le=1.0)]  # fraction of requests mirrored, (0, 1]


# --- desired state -------------------------------------------------------------------------------


class ShadowDirective(WireStruct, frozen=True, kw_only=True, omit_defaults=True):
    """A candidate version that runs beside the serving one on sampled inputs; never served."""

    version: Version
    bundle_digest: Digest
    bundle_size: PositiveCount
    runtime: Text32
    sample_rate: SampleRate
    urls: Urls = ()


class ModelDirective(WireStruct, frozen=True, kw_only=True, omit_defaults=True):
    """One model the device must serve: exactly this bundle, optionally with a shadow candidate.

    ``urls`` are optional HTTP(S) locations of the same bundle (range requests); without them the
    agent fetches it in chunks over MQTT. Either way the bytes must hash to ``bundle_digest``.

    A device does not try again a bundle that failed on it while the desired state names the same
    digest; ``retry`` is how the control plane asks for another attempt at it: any change of the
    number does (absent, the default, is 0, so states from before it decode the same).
    """

    name: Name
    version: Version
    bundle_digest: Digest
    bundle_size: PositiveCount
    runtime: Text32
    urls: Urls = ()
    shadow: ShadowDirective | None = None
    retry: Count = 0


class DesiredState(WireMessage, frozen=True, kw_only=True, tag="edgefleet.desired/v1"):
    """What the control plane wants a device to run (``edgefleet.desired/v1``)."""

    device_id: DeviceId
    sequence: PositiveCount
    issued_at: Finite
    expires_at: Finite
    models: Annotated[tuple[ModelDirective, ...], Meta(max_length=MAX_MODELS)] = ()

    def __post_init__(self) -> None:
        # Refuse to build (and so to sign) what every agent would refuse to decode.
        if len(self.models) > MAX_MODELS:
            raise MessageError(f"desired state: {len(self.models)} models, at most {MAX_MODELS}")
        if len({m.name for m in self.models}) != len(self.models):
            raise MessageError("desired.models: a model name appears twice")

    def seal(self, key: SigningKey) -> bytes:
        """Sign with the control plane's online key; the DSSE envelope is what is published."""
        envelope: bytes = seal_envelope(DESIRED_PAYLOAD_TYPE, self.encode(), [key])
        return envelope


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


# --- reported state ------------------------------------------------------------------------------


class ModelReport(WireStruct, frozen=True, kw_only=True):
    """A model as the device runs it."""

    name: Name
    version: Version
    bundle_digest: Digest
    runtime: Text32
    state: ModelState


class ShadowReport(WireStruct, frozen=True, kw_only=True):
    """How a shadow candidate compares with the serving version, over the samples so far.

    Agreement is top-1 (argmax of the first output) for classifiers; ``max_abs_diff`` and
    ``mean_abs_diff`` compare the first output numerically. Rollout gates read these.
    """

    name: Name
    serving_version: Version
    version: Version
    bundle_digest: Digest
    state: ShadowState
    samples: Count = 0
    agreements: Count = 0
    errors: Count = 0
    mean_abs_diff: Finite = 0.0
    max_abs_diff: Finite = 0.0
    latency_p50_ms: Finite = 0.0
    serving_latency_p50_ms: Finite = 0.0
    message: Text2048 = ""


AgentInfo = Annotated[dict[str, Annotated[str, Meta(max_length=255)]], Meta(max_length=32)]


class ReportedState(WireMessage, frozen=True, kw_only=True, tag="edgefleet.reported/v1"):
    """What a device runs now (``edgefleet.reported/v1``), published retained."""

    optional_fields = frozenset({"shadows"})

    device_id: DeviceId
    ts: Finite
    applied_sequence: Count
    models: Annotated[tuple[ModelReport, ...], Meta(max_length=MAX_MODELS)] = ()
    agent: AgentInfo = {}
    shadows: Annotated[tuple[ShadowReport, ...], Meta(max_length=MAX_MODELS)] = ()


class DeviceStatus(WireMessage, frozen=True, kw_only=True, tag="edgefleet.status/v1"):
    """Liveness (``edgefleet.status/v1``), retained; the offline form is the MQTT last will."""

    device_id: DeviceId
    online: bool
    ts: Finite


# --- events --------------------------------------------------------------------------------------


class DeploymentEvent(WireMessage, frozen=True, kw_only=True, tag="edgefleet.event/v1"):
    """The end of one model's deployment on a device (``edgefleet.event/v1``, kind deployment).

    ``event_id`` is unique per event so the control plane ingests idempotently.
    """

    kind: Literal["deployment"] = "deployment"  # EventKind.DEPLOYMENT; msgspec takes str literals only
    event_id: Text64
    device_id: DeviceId
    ts: Finite
    sequence: Count
    name: Name
    version: Version
    bundle_digest: Digest
    outcome: Outcome
    error_code: Text64 = ""
    message: Text2048 = ""
    duration_s: Finite = 0.0


class RejectionEvent(WireMessage, frozen=True, kw_only=True, tag="edgefleet.event/v1"):
    """A device refused a message (``edgefleet.event/v1``, kind rejected): a desired state that was
    replayed, expired, for another device or badly signed, or a keyring version that did not verify.

    The running models are untouched; the event tells the operator why nothing happened.
    """

    kind: Literal["rejected"] = "rejected"  # EventKind.REJECTED; msgspec takes str literals only
    event_id: Text64
    device_id: DeviceId
    ts: Finite
    subject: RejectionSubject
    code: Text64
    message: Text2048


EVENTS: dict[str, type[DeploymentEvent | RejectionEvent]] = {
    EventKind.DEPLOYMENT: DeploymentEvent,
    EventKind.REJECTED: RejectionEvent,
}


def decode_event(data: bytes) -> DeploymentEvent | RejectionEvent:
    """Decode anything published on a device's ``events`` topic, by its ``kind`` (parsed once)."""
    raw = loads_object(data, "event", MAX_MESSAGE_BYTES)
    check_schema(raw, "event", 1)
    kind = raw.get("kind")
    message_class = EVENTS.get(kind) if isinstance(kind, str) else None
    if message_class is None:
        raise MessageError(f"event.kind: unknown kind {kind!r:.40}")
    return message_class.from_dict(raw)
