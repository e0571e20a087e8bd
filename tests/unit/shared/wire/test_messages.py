"""Wire messages: round trips, strict refusal of anything off, and the desired-state check.

The property tests feed every decoder arbitrary bytes (and arbitrary JSON, and valid messages with
one field replaced by arbitrary JSON): the only exceptions allowed out are MessageError and, for
envelopes, SignatureError. Anything else would crash the agent's or control plane's MQTT handler.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.shared.bundle.manifest import MANIFEST_PAYLOAD_TYPE, Manifest
from edgefleet.shared.errors import DirectiveError, MessageError, SignatureError, UnknownSchemaError
from edgefleet.shared.trust.signing import SigningKey, open_envelope, seal_envelope
from edgefleet.shared.wire.chunks import (
    HEADER_BYTES,
    MAGIC,
    MIN_CHUNK_BYTES,
    Chunk,
    ChunkError,
    ChunkRequest,
    decode_chunk_message,
)
from edgefleet.shared.wire.messages import (
    DESIRED_PAYLOAD_TYPE,
    MAX_MESSAGE_BYTES,
    DeploymentEvent,
    DesiredState,
    DeviceStatus,
    ModelDirective,
    ModelReport,
    Outcome,
    ReportedState,
    verify_desired_state,
)

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
NOW = 1_700_000_000.0
CONTROL_PLANE = SigningKey.generate()
TRUSTED: dict[str, Ed25519PublicKey] = {CONTROL_PLANE.key_id: CONTROL_PLANE.public_key}

DESIRED = DesiredState(
    device_id="pi-kitchen-01",
    sequence=7,
    issued_at=NOW,
    expires_at=NOW + 3600,
    models=(
        ModelDirective(name="detector", version="1.2.0", bundle_digest=DIGEST, bundle_size=123456, runtime="onnx"),
        ModelDirective(name="classifier", version="2.0.0-rc.1", bundle_digest=OTHER_DIGEST, bundle_size=1,
                       runtime="tflite"),
    ),
)
REPORTED = ReportedState(
    device_id="pi-kitchen-01",
    ts=NOW + 1.5,
    applied_sequence=6,
    models=(
        ModelReport(name="detector", version="1.1.0", bundle_digest=DIGEST, runtime="onnx", state="serving"),
        ModelReport(name="classifier", version="2.0.0", bundle_digest=OTHER_DIGEST, runtime="tflite",
                    state="failed"),
    ),
    agent={"version": "0.1.0", "arch": "aarch64"},
)
EVENT = DeploymentEvent(
    event_id="evt-0001",
    device_id="pi-kitchen-01",
    ts=NOW + 2,
    sequence=7,
    name="detector",
    version="1.2.0",
    bundle_digest=DIGEST,
    outcome=Outcome.FAILED_ROLLED_BACK,
    error_code="runtime_load_failed",
    message="the model would not load",
    duration_s=12.25,
)
STATUS = DeviceStatus(device_id="pi-kitchen-01", online=True, ts=NOW)
REQUEST = ChunkRequest(bundle_digest=DIGEST, chunk_size=4096, indices=(0, 1, 5, 2**32 - 1))
CHUNK_ERROR = ChunkError(bundle_digest=DIGEST, code="not_found", message="no such bundle")


def as_dict(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


# --- round trips -------------------------------------------------------------------------------


def test_desired_state_round_trip() -> None:
    assert DesiredState.decode(DESIRED.encode()) == DESIRED
    assert as_dict(DESIRED.encode())["schema"] == "edgefleet.desired/v1"


def test_desired_state_with_no_models_round_trips() -> None:
    empty = DesiredState(device_id="d1", sequence=1, issued_at=0.0, expires_at=1.0)
    assert DesiredState.decode(empty.encode()) == empty


def test_reported_state_round_trip() -> None:
    assert ReportedState.decode(REPORTED.encode()) == REPORTED


@pytest.mark.parametrize("outcome", list(Outcome))
def test_deployment_event_round_trip(outcome: Outcome) -> None:
    event = msgspec.structs.replace(EVENT, outcome=outcome)
    decoded = DeploymentEvent.decode(event.encode())
    assert decoded == event
    assert decoded.outcome is outcome


@pytest.mark.parametrize("online", [True, False])
def test_device_status_round_trip(online: bool) -> None:
    status = DeviceStatus(device_id="pi-kitchen-01", online=online, ts=NOW)
    assert DeviceStatus.decode(status.encode()) == status


def test_chunk_request_round_trip() -> None:
    assert ChunkRequest.decode(REQUEST.encode()) == REQUEST


@pytest.mark.parametrize(("total", "index"), [(10_000, 0), (10_000, 2), (4096, 0), (1, 0)])
def test_chunk_round_trip(total: int, index: int) -> None:
    size = min(4096, total - index * 4096)
    chunk = Chunk(bundle_digest=DIGEST, chunk_size=4096, index=index, total_size=total, data=bytes([index]) * size)
    payload = chunk.encode()
    assert payload[:4] == MAGIC and len(payload) == HEADER_BYTES + size
    assert decode_chunk_message(payload) == chunk


def test_chunk_error_round_trip() -> None:
    assert decode_chunk_message(CHUNK_ERROR.encode()) == CHUNK_ERROR


# --- versions ----------------------------------------------------------------------------------

ENCODED: dict[str, tuple[bytes, Callable[[bytes], object]]] = {
    "desired": (DESIRED.encode(), DesiredState.decode),
    "reported": (REPORTED.encode(), ReportedState.decode),
    "event": (EVENT.encode(), DeploymentEvent.decode),
    "status": (STATUS.encode(), DeviceStatus.decode),
    "chunkreq": (REQUEST.encode(), ChunkRequest.decode),
    "chunkerr": (CHUNK_ERROR.encode(), decode_chunk_message),
}


@pytest.mark.parametrize("kind", sorted(ENCODED))
def test_an_unknown_schema_version_is_named(kind: str) -> None:
    data, decode = ENCODED[kind]
    raw = as_dict(data)
    raw["schema"] = f"edgefleet.{kind}/v2"
    with pytest.raises(UnknownSchemaError, match=f"unsupported schema version 'edgefleet.{kind}/v2'"):
        decode(dumps(raw))


@pytest.mark.parametrize("kind", sorted(ENCODED))
def test_a_foreign_or_missing_schema_is_a_message_error(kind: str) -> None:
    data, decode = ENCODED[kind]
    raw = as_dict(data)
    for schema in ("edgefleet.other/v1", None, 1):
        raw["schema"] = schema
        with pytest.raises(MessageError, match=f"schema must be 'edgefleet.{kind}/v1'") as info:
            decode(dumps(raw))
        assert not isinstance(info.value, UnknownSchemaError)


# --- garbage -----------------------------------------------------------------------------------


_DELETE = object()


def _desired(**changes: Any) -> bytes:
    raw = as_dict(DESIRED.encode())
    for key, value in changes.items():
        if value is _DELETE:
            del raw[key]
        else:
            raw[key] = value
    return json.dumps(raw).encode()  # allow_nan: NaN is written as the bare token NaN


_MODEL = DESIRED.models[0].to_dict()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"desired"', "expected a JSON object, got str"),
        (_desired(sequence=_DELETE), r"missing field\(s\) \['sequence'\]"),
        (_desired(priority=1), r"unknown field\(s\) \['priority'\]"),
        (_desired(sequence="7"), r"desired\.sequence: expected an integer"),
        (_desired(sequence=True), r"desired\.sequence: expected an integer"),
        (_desired(sequence=7.0), r"desired\.sequence: expected an integer"),
        (_desired(sequence=0), r"desired\.sequence: expected an integer >= 1, got 0"),
        (_desired(sequence=2**63), r"desired\.sequence: expected an integer"),
        (_desired(issued_at=math.nan), r"desired\.issued_at: expected a finite number"),
        (_desired(expires_at=math.inf), r"desired\.expires_at: expected a finite number"),
        (_desired(expires_at=False), r"desired\.expires_at: expected a finite number"),
        (_desired(device_id=5), r"desired\.device_id: expected a string"),
        (_desired(device_id="a/b"), r"desired\.device_id: 'a/b' does not match"),
        (_desired(device_id="+"), r"desired\.device_id: '\+' does not match"),
        (_desired(device_id=""), r"desired\.device_id: '' does not match"),
        (_desired(models={}), r"desired\.models: expected a list"),
        (_desired(models=[_MODEL] * 33), r"desired\.models: expected a list of at most 32"),
        (_desired(models=[_MODEL, _MODEL]), "a model name appears twice"),
        (_desired(models=["detector"]), r"desired\.models\[0\]: expected an object"),
        (_desired(models=[{**_MODEL, "bundle_digest": "sha256:ABC"}]), r"desired\.models\[0\]\.bundle_digest"),
        (_desired(models=[{**_MODEL, "bundle_size": 0}]), r"desired\.models\[0\]\.bundle_size"),
        (_desired(models=[{**_MODEL, "name": "Detector"}]), r"desired\.models\[0\]\.name"),
        (_desired(models=[{**_MODEL, "extra": 1}]), r"desired\.models\[0\]: unknown field"),
        (b" " * (MAX_MESSAGE_BYTES + 1), f"over the {MAX_MESSAGE_BYTES}-byte limit"),
    ],
)
def test_malformed_desired_state_is_a_message_error(data: bytes, message: str) -> None:
    with pytest.raises(MessageError, match=message) as info:
        DesiredState.decode(data)
    assert not isinstance(info.value, UnknownSchemaError)


@pytest.mark.parametrize(
    ("decode", "data", "message"),
    [
        (ReportedState.decode, {"agent": {"v": 1}}, r"reported\.agent"),
        (ReportedState.decode, {"agent": ["v"]}, r"reported\.agent"),
        (ReportedState.decode, {"applied_sequence": -1}, r"reported\.applied_sequence"),
        (ReportedState.decode, {"models": [{**REPORTED.models[0].to_dict(), "state": "dead"}]}, "unknown state"),
        (DeploymentEvent.decode, {"kind": "drift"}, r"event\.kind: unknown kind 'drift'"),
        (DeploymentEvent.decode, {"outcome": "exploded"}, r"event\.outcome: unknown outcome 'exploded'"),
        (DeploymentEvent.decode, {"outcome": ["succeeded"]}, r"event\.outcome: expected a string, got a list"),
        (DeploymentEvent.decode, {"event_id": "x" * 65}, r"event\.event_id"),
        (DeploymentEvent.decode, {"duration_s": "1s"}, r"event\.duration_s"),
        (DeviceStatus.decode, {"online": 1}, r"status\.online: expected true or false"),
        (DeviceStatus.decode, {"online": "true"}, r"status\.online: expected true or false"),
        (DeviceStatus.decode, {"ts": None}, r"status\.ts"),
        (ChunkRequest.decode, {"indices": []}, r"chunkreq\.indices"),
        (ChunkRequest.decode, {"indices": [True]}, r"chunkreq\.indices"),
        (ChunkRequest.decode, {"indices": [-1]}, r"chunkreq\.indices"),
        (ChunkRequest.decode, {"indices": [2**32]}, r"chunkreq\.indices"),
        (ChunkRequest.decode, {"indices": list(range(257))}, r"chunkreq\.indices"),
        (ChunkRequest.decode, {"chunk_size": MIN_CHUNK_BYTES - 1}, r"chunkreq\.chunk_size"),
        (ChunkRequest.decode, {"bundle_digest": "sha256:" + "AB" * 32}, r"chunkreq\.bundle_digest"),
    ],
)
def test_malformed_fields_of_other_messages(decode: Callable[[bytes], object], data: dict[str, Any],
                                            message: str) -> None:
    good = {
        ReportedState.decode: REPORTED,
        DeploymentEvent.decode: EVENT,
        DeviceStatus.decode: STATUS,
        ChunkRequest.decode: REQUEST,
    }[decode].encode()
    with pytest.raises(MessageError, match=message):
        decode(dumps({**as_dict(good), **data}))


# Names and ids are matched with `^...$` patterns; `$` also matches before a trailing newline.
@pytest.mark.parametrize(
    ("decode", "data"),
    [
        (DesiredState.decode, _desired(device_id="pi-kitchen-01\n")),
        (DesiredState.decode, _desired(models=[{**_MODEL, "name": "detector\n"}])),
        (DesiredState.decode, _desired(models=[{**_MODEL, "bundle_digest": DIGEST + "\n"}])),
        (DeviceStatus.decode, dumps({**as_dict(STATUS.encode()), "device_id": "pi-kitchen-01\n"})),
    ],
    ids=["device_id", "model-name", "bundle_digest", "status-device_id"],
)
def test_a_trailing_newline_is_not_part_of_a_valid_name(decode: Callable[[bytes], object], data: bytes) -> None:
    with pytest.raises(MessageError, match="does not match"):
        decode(data)


def test_a_manifest_path_with_a_trailing_newline_is_refused() -> None:
    manifest = {
        "schema": "edgefleet.manifest/v1", "name": "demo", "version": "1", "runtime": "onnx",
        "model_file": "model.onnx\n", "files": [{"path": "model.onnx\n", "sha256": "ab" * 32, "size": 1}],
        "inputs": [], "outputs": [], "created_at": "2024-01-01T00:00:00+00:00",
    }
    with pytest.raises(MessageError, match=r"manifest\.files\[\]\.path"):
        Manifest.decode(dumps(manifest))


# --- the desired state check -------------------------------------------------------------------


def verify(envelope: bytes, **overrides: Any) -> DesiredState:
    kwargs: dict[str, Any] = {
        "trusted_keys": TRUSTED, "device_id": "pi-kitchen-01", "last_sequence": 6, "now": NOW + 10,
    }
    kwargs.update(overrides)
    return verify_desired_state(envelope, **kwargs)


def test_verify_desired_state_accepts_a_valid_directive() -> None:
    assert verify(DESIRED.seal(CONTROL_PLANE)) == DESIRED


def test_verify_desired_state_refuses_another_devices_directive() -> None:
    with pytest.raises(DirectiveError, match="for device 'pi-kitchen-01', this is 'pi-garage-02'"):
        verify(DESIRED.seal(CONTROL_PLANE), device_id="pi-garage-02")


@pytest.mark.parametrize("last_sequence", [7, 8, 1000])
def test_verify_desired_state_refuses_a_replay(last_sequence: int) -> None:
    with pytest.raises(DirectiveError, match=f"sequence 7 is not newer than {last_sequence}"):
        verify(DESIRED.seal(CONTROL_PLANE), last_sequence=last_sequence)


@pytest.mark.parametrize("now", [NOW + 3600, NOW + 3601, NOW + 10**6])
def test_verify_desired_state_refuses_an_expired_directive(now: float) -> None:
    with pytest.raises(DirectiveError, match="desired state 7 expired at"):
        verify(DESIRED.seal(CONTROL_PLANE), now=now)


def test_verify_desired_state_accepts_just_before_expiry() -> None:
    assert verify(DESIRED.seal(CONTROL_PLANE), now=NOW + 3599.999).sequence == 7


def test_verify_desired_state_refuses_an_untrusted_signer() -> None:
    with pytest.raises(SignatureError, match=r"0 valid signature\(s\) from trusted keys"):
        verify(DESIRED.seal(SigningKey.generate()))


def test_verify_desired_state_refuses_a_manifest_signature() -> None:
    # A publisher-signed manifest envelope is not a directive, whoever signed it.
    envelope = seal_envelope(MANIFEST_PAYLOAD_TYPE, DESIRED.encode(), [CONTROL_PLANE])
    with pytest.raises(SignatureError, match="payload type"):
        verify(envelope)


def test_verify_desired_state_refuses_a_signed_but_malformed_payload() -> None:
    envelope = seal_envelope(DESIRED_PAYLOAD_TYPE, b'{"schema": "edgefleet.desired/v1"}', [CONTROL_PLANE])
    with pytest.raises(MessageError, match="missing field"):
        verify(envelope)


# --- chunks ------------------------------------------------------------------------------------

CHUNK = Chunk(bundle_digest=DIGEST, chunk_size=1024, index=2, total_size=3000, data=b"\x07" * 952)


def _corrupt(payload: bytes, at: int) -> bytes:
    raw = bytearray(payload)
    raw[at] ^= 0xFF
    return bytes(raw)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (CHUNK.encode()[: HEADER_BYTES - 1], f"shorter than its {HEADER_BYTES}-byte header"),
        (b"", "shorter than its"),
        (b"EFC2" + CHUNK.encode()[4:], "bad magic"),
        (CHUNK.encode() + b"\x00", "953 data bytes, expected 952"),
        (CHUNK.encode()[:-1], "951 data bytes, expected 952"),
        (_corrupt(CHUNK.encode(), HEADER_BYTES + 10), "data does not match its sha256"),
        (_corrupt(CHUNK.encode(), 60), "data does not match its sha256"),  # inside the header's hash
        (Chunk(bundle_digest=DIGEST, chunk_size=1024, index=3, total_size=3000, data=b"").encode(),
         "index 3 out of range for a 3000-byte bundle"),
        (Chunk(bundle_digest=DIGEST, chunk_size=1024, index=0, total_size=0, data=b"").encode(),
         "out of range for a 0-byte bundle"),
        (Chunk(bundle_digest=DIGEST, chunk_size=512, index=0, total_size=512, data=b"x" * 512).encode(),
         "chunk size 512 outside"),
    ],
    ids=["truncated-header", "empty", "bad-magic", "data-too-long", "data-too-short", "data-corrupted",
         "hash-corrupted", "index-out-of-range", "zero-size-bundle", "chunk-size-too-small"],
)
def test_bad_chunk_is_a_message_error(payload: bytes, message: str) -> None:
    with pytest.raises(MessageError, match=message):
        decode_chunk_message(payload)


def test_a_chunk_larger_than_the_agents_setting_is_refused() -> None:
    chunk = Chunk(bundle_digest=DIGEST, chunk_size=8192, index=0, total_size=8192, data=b"x" * 8192)
    assert decode_chunk_message(chunk.encode()) == chunk
    with pytest.raises(MessageError, match=r"chunk size 8192 outside \[1024, 4096\]"):
        decode_chunk_message(chunk.encode(), max_chunk_bytes=4096)


def test_a_malformed_chunk_error_is_a_message_error() -> None:
    with pytest.raises(MessageError, match=r"chunkerr: missing field\(s\) \['message'\]"):
        decode_chunk_message(b'{"schema": "edgefleet.chunkerr/v1", "bundle_digest": "%s", "code": "x"}'
                             % DIGEST.encode())


# --- properties: decoders raise only our errors ------------------------------------------------

DECODERS: dict[str, Callable[[bytes], object]] = {
    "DesiredState": DesiredState.decode,
    "ReportedState": ReportedState.decode,
    "DeploymentEvent": DeploymentEvent.decode,
    "DeviceStatus": DeviceStatus.decode,
    "ChunkRequest": ChunkRequest.decode,
    "decode_chunk_message": decode_chunk_message,
    "Manifest": Manifest.decode,
    "open_envelope": lambda data: open_envelope(data, payload_type=DESIRED_PAYLOAD_TYPE, trusted_keys=TRUSTED),
}
ALLOWED = (MessageError, SignatureError)

_MANIFEST = {
    "schema": "edgefleet.manifest/v1", "name": "demo", "version": "1.0.0", "runtime": "onnx",
    "model_file": "model.onnx", "files": [{"path": "model.onnx", "sha256": "ab" * 32, "size": 10}],
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], "outputs": [],
    "created_at": "2024-01-01T00:00:00+00:00", "compatibility": {"architectures": [], "accelerators": []},
    "description": "", "labels": {}, "drift_reference": None,
}
# A valid example of what each decoder reads, to mutate one field at a time.
VALID: dict[str, dict[str, Any]] = {
    "DesiredState": as_dict(DESIRED.encode()),
    "ReportedState": as_dict(REPORTED.encode()),
    "DeploymentEvent": as_dict(EVENT.encode()),
    "DeviceStatus": as_dict(STATUS.encode()),
    "ChunkRequest": as_dict(REQUEST.encode()),
    "decode_chunk_message": as_dict(CHUNK_ERROR.encode()),
    "Manifest": _MANIFEST,
    "open_envelope": as_dict(DESIRED.seal(CONTROL_PLANE)),
}
PROPERTY = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _only_our_errors(decode: Callable[[bytes], object], data: bytes) -> None:
    try:
        decode(data)
    except ALLOWED:
        pass


outside_bytes = st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=512).map(lambda b: MAGIC + b),  # past the magic check
    st.binary(max_size=512).map(lambda b: b"{" + b),  # routed to the chunk-error JSON decoder
    json_values.map(lambda v: json.dumps(v).encode()),  # well-formed JSON of any shape
)


@PROPERTY
@given(data=outside_bytes)
def test_every_decoder_raises_only_message_errors_on_arbitrary_bytes(data: bytes) -> None:
    for decode in DECODERS.values():
        _only_our_errors(decode, data)


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(PROPERTY, max_examples=50)
@given(data=st.data())
def test_decoders_raise_only_message_errors_when_one_field_is_replaced(name: str, data: st.DataObject) -> None:
    raw = dict(VALID[name])
    key = data.draw(st.sampled_from(sorted(raw)), label="field")
    raw[key] = data.draw(json_values, label="value")
    _only_our_errors(DECODERS[name], json.dumps(raw).encode())


@PROPERTY
@given(data=st.data())
def test_chunk_header_fields_raise_only_message_errors(data: st.DataObject) -> None:
    payload = bytearray(CHUNK.encode())
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        at = data.draw(st.integers(0, HEADER_BYTES - 1), label="at")
        payload[at] = data.draw(st.integers(0, 255), label="byte")
    _only_our_errors(decode_chunk_message, bytes(payload))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_deeply_nested_json_is_a_message_error(name: str) -> None:
    # Well under every size limit, but deeper than the JSON parser's recursion limit.
    data = b'{"a":' + b"[" * 5000 if name == "decode_chunk_message" else b"[" * 5000
    with pytest.raises(MessageError):
        DECODERS[name](data)


def test_chunk_header_carries_the_bundle_digest_and_the_data_sha256() -> None:
    data = b"payload" * 200
    chunk = Chunk(bundle_digest="sha256:" + hashlib.sha256(data).hexdigest(), chunk_size=2048, index=0,
                  total_size=len(data), data=data)
    decoded = decode_chunk_message(chunk.encode())
    assert isinstance(decoded, Chunk)
    assert decoded.bundle_digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert chunk.encode()[52:84] == hashlib.sha256(data).digest()
