"""The declarative wire schema: every registered message, checked the same way.

A new message is covered by adding one example to EXAMPLES (a test fails until it is there):
it must round-trip, encode canonically, refuse unknown fields (at the top and nested), refuse
another schema version as UnknownSchemaError (even with fields this build does not know), refuse
duplicate keys and refuse a message that leaves out a field the wire requires.
"""

from __future__ import annotations

import enum
import json
import typing
from typing import Any, Literal

import msgspec
import pytest

from edgefleet.shared.errors import MessageError, UnknownSchemaError
from edgefleet.shared.wire.chunks import ChunkError, ChunkRequest
from edgefleet.shared.wire.messages import (
    EVENTS,
    DeploymentEvent,
    DesiredState,
    DeviceStatus,
    EventKind,
    ModelDirective,
    ModelReport,
    ModelState,
    Outcome,
    RejectionEvent,
    RejectionSubject,
    ReportedState,
    ShadowDirective,
    ShadowReport,
    ShadowState,
    decode_event,
)
from edgefleet.shared.wire.schema import MESSAGES, WireMessage, WireStruct, explain

DIGEST = "sha256:" + "ab" * 32
SHADOW = ShadowDirective(version="1.1.0", bundle_digest=DIGEST, bundle_size=10, runtime="onnx", sample_rate=0.25,
                         urls=("https://cdn.example.com/b",))
EXAMPLES: dict[str, WireMessage] = {
    "DesiredState": DesiredState(
        device_id="pi-01", sequence=3, issued_at=10.0, expires_at=20.5,
        models=(ModelDirective(name="det", version="1.0.0", bundle_digest=DIGEST, bundle_size=10, runtime="onnx",
                               shadow=SHADOW),),
    ),
    "ReportedState": ReportedState(
        device_id="pi-01", ts=11.0, applied_sequence=3,
        models=(ModelReport(name="det", version="1.0.0", bundle_digest=DIGEST, runtime="onnx",
                            state=ModelState.SERVING),),
        agent={"version": "0.1.0"},
        shadows=(ShadowReport(name="det", serving_version="1.0.0", version="1.1.0", bundle_digest=DIGEST,
                              state=ShadowState.RUNNING, samples=4, agreements=3, mean_abs_diff=0.5),),
    ),
    "DeviceStatus": DeviceStatus(device_id="pi-01", online=True, ts=12.0),
    "DeploymentEvent": DeploymentEvent(event_id="e1", device_id="pi-01", ts=13.0, sequence=3, name="det",
                                       version="1.0.0", bundle_digest=DIGEST, outcome=Outcome.SUCCEEDED),
    "RejectionEvent": RejectionEvent(event_id="e2", device_id="pi-01", ts=14.0, subject=RejectionSubject.KEYRING,
                                     code="bad_signature", message="keyring v4 did not verify"),
    "ChunkRequest": ChunkRequest(bundle_digest=DIGEST, chunk_size=4096, indices=(0, 7)),
    "ChunkError": ChunkError(bundle_digest=DIGEST, code="not_found", message="no such bundle"),
}


def _raw(name: str) -> dict[str, Any]:
    value = json.loads(EXAMPLES[name].encode())
    assert isinstance(value, dict)
    return value


def _decode(name: str, raw: dict[str, Any]) -> object:
    return MESSAGES[name].decode(json.dumps(raw).encode())


STRING_MAPS = {"agent"}  # free-form {str: str} objects, not declared structs


def _nested_objects(value: object) -> list[dict[str, Any]]:
    """Every declared object inside ``value`` (not ``value`` itself), depth first."""
    found: list[dict[str, Any]] = []
    if isinstance(value, dict):
        children = [v for k, v in value.items() if k not in STRING_MAPS]
    else:
        children = value if isinstance(value, list) else []
    for child in children:
        if isinstance(child, dict):
            found.append(child)
        found.extend(_nested_objects(child))
    return found


def _all_structs() -> list[type[WireStruct]]:
    """Every declaration (the bases, which have no fields, are not declarations)."""
    pending, seen = list(WireStruct.__subclasses__()), []
    while pending:
        cls = pending.pop()
        if msgspec.structs.fields(cls):
            seen.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(seen, key=lambda cls: cls.__name__)


def test_every_registered_message_has_an_example() -> None:
    assert set(MESSAGES) == set(EXAMPLES)
    assert {"DesiredState", "ReportedState", "DeviceStatus", "DeploymentEvent", "RejectionEvent", "ChunkRequest",
            "ChunkError"} <= set(MESSAGES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_message_round_trips_and_encodes_canonically(name: str) -> None:
    message = EXAMPLES[name]
    data = message.encode()
    assert type(message).decode(data) == message
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    kind, version = type(message).schema()
    assert json.loads(data)["schema"] == f"edgefleet.{kind}/v{version}"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_message_refuses_an_unknown_field(name: str) -> None:
    with pytest.raises(MessageError, match=r"unknown field\(s\) \['unexpected'\]"):
        _decode(name, {**_raw(name), "unexpected": 1})


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if _nested_objects(_raw(n))))
def test_a_message_refuses_an_unknown_field_in_every_nested_object(name: str) -> None:
    for index in range(len(_nested_objects(_raw(name)))):
        raw = _raw(name)
        _nested_objects(raw)[index]["unexpected"] = 1
        with pytest.raises(MessageError, match=r"unknown field\(s\) \['unexpected'\]"):
            _decode(name, raw)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_message_of_another_version_is_an_unknown_schema_not_half_parsed(name: str) -> None:
    kind, version = MESSAGES[name].schema()
    future = {**_raw(name), "schema": f"edgefleet.{kind}/v{version + 1}", "field_of_the_future": [1]}
    with pytest.raises(UnknownSchemaError, match=f"unsupported schema version 'edgefleet.{kind}/v{version + 1}'"):
        _decode(name, future)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_message_over_its_size_limit_is_refused_before_parsing(name: str) -> None:
    limit = MESSAGES[name].max_bytes
    padded = EXAMPLES[name].encode() + b" " * (limit + 1 - len(EXAMPLES[name].encode()))
    with pytest.raises(MessageError, match=f"{limit + 1} bytes, over the {limit}-byte limit"):
        MESSAGES[name].decode(padded)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_message_refuses_a_duplicate_key(name: str) -> None:
    data = EXAMPLES[name].encode()
    first_key = next(iter(json.loads(data)))
    twice = b'{"%s":null,' % first_key.encode() + data[1:]  # the later value would win in most parsers
    with pytest.raises(MessageError, match=f"key '{first_key}' appears twice in one object"):
        MESSAGES[name].decode(twice)


def test_a_duplicate_key_in_a_nested_object_is_refused() -> None:
    data = EXAMPLES["DesiredState"].encode()
    assert b'"name":"det"' in data
    with pytest.raises(MessageError, match=r"desired: key 'name' appears twice"):
        DesiredState.decode(data.replace(b'"name":"det"', b'"name":"det","name":"evil"'))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_message_refuses_to_lack_a_field_the_wire_requires(name: str) -> None:
    optional = MESSAGES[name].optional_fields
    for key in sorted(set(_raw(name)) - {"schema"} - optional):
        raw = _raw(name)
        del raw[key]
        with pytest.raises(MessageError, match=rf"missing field\(s\) \['{key}'\]"):
            _decode(name, raw)


def test_defaulted_fields_of_nested_objects_are_required_on_the_wire_too() -> None:
    raw = _raw("ReportedState")
    del raw["shadows"][0]["samples"]
    with pytest.raises(MessageError, match=r"reported\.shadows\[0\]: missing field\(s\) \['samples'\]"):
        ReportedState.decode(json.dumps(raw).encode())


def test_an_optional_field_is_left_out_when_empty_and_may_be_absent() -> None:
    report = ReportedState(device_id="pi-01", ts=1.0, applied_sequence=0)
    assert "shadows" not in json.loads(report.encode())
    assert ReportedState.decode(report.encode()) == report


def test_directive_defaults_are_left_out_and_may_be_absent() -> None:
    directive = ModelDirective(name="det", version="1", bundle_digest=DIGEST, bundle_size=1, runtime="onnx")
    assert set(directive.to_dict()) == {"name", "version", "bundle_digest", "bundle_size", "runtime"}


@pytest.mark.parametrize("cls", _all_structs(), ids=lambda cls: cls.__name__)
def test_every_declaration_is_frozen_strict_and_keyword_only(cls: type[WireStruct]) -> None:
    config = cls.__struct_config__
    assert config.frozen and config.forbid_unknown_fields
    fields = msgspec.structs.fields(cls)
    with pytest.raises(TypeError):
        cls(*[None] * len(fields))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_message_cannot_be_changed(name: str) -> None:
    message = EXAMPLES[name]
    field = msgspec.structs.fields(message)[0].name
    with pytest.raises(AttributeError):
        setattr(message, field, None)


@pytest.mark.parametrize("cls", _all_structs(), ids=lambda cls: cls.__name__)
def test_states_kinds_outcomes_and_subjects_are_enumerated(cls: type[WireStruct]) -> None:
    for f in msgspec.structs.fields(cls):
        if f.name in ("state", "kind", "outcome", "subject"):
            enumerated = isinstance(f.type, type) and issubclass(f.type, enum.StrEnum)
            assert enumerated or typing.get_origin(f.type) is Literal, f"{cls.__name__}.{f.name} is {f.type}"


def test_every_event_kind_has_its_message_class() -> None:
    assert set(EVENTS) == set(EventKind)
    for kind, cls in EVENTS.items():
        assert {f.name: f.default for f in msgspec.structs.fields(cls)}["kind"] == kind


@pytest.mark.parametrize("name", ["DeploymentEvent", "RejectionEvent"])
def test_decode_event_dispatches_on_the_kind(name: str) -> None:
    assert decode_event(EXAMPLES[name].encode()) == EXAMPLES[name]


def test_enum_fields_compare_equal_to_their_wire_strings() -> None:
    decoded = ReportedState.decode(EXAMPLES["ReportedState"].encode())
    assert decoded.models[0].state is ModelState.SERVING
    assert decoded.models[0].state == "serving"
    built_with_a_string = ModelReport(name="det", version="1.0.0", bundle_digest=DIGEST, runtime="onnx",
                                      state="serving")  # type: ignore[arg-type]
    assert built_with_a_string == decoded.models[0]


# --- error messages, from msgspec's words to the wire's ------------------------------------------


@pytest.mark.parametrize(
    ("error", "raw", "expected"),
    [
        ("Object missing required field `sequence`", {}, "desired: missing field(s) ['sequence']"),
        ("Object contains unknown field `x` - at `$.models[0]`", {}, "desired.models[0]: unknown field(s) ['x']"),
        ("Expected `int`, got `str` - at `$.sequence`", {"sequence": "7"},
         "desired.sequence: expected an integer, got a string"),
        ("Expected `int`, got `bool` - at `$.sequence`", {"sequence": True},
         "desired.sequence: expected an integer, got a boolean"),
        ("Expected `int` >= 1 - at `$.sequence`", {"sequence": 0}, "desired.sequence: expected an integer >= 1, got 0"),
        ("Expected `float` <= 1.7976931348623157e+308 - at `$.ts`", {"ts": float("inf")},
         "desired.ts: expected a finite number, got inf"),
        ("Expected `array` of length <= 32 - at `$.models`", {"models": [0] * 33},
         "desired.models: expected a list of at most 32 items, got 33"),
        ("Expected `str` matching regex '^a\\\\Z' - at `$.models[1].name`", {"models": [{}, {"name": "b"}]},
         "desired.models[1].name: 'b' does not match ^a\\Z"),
        ("Invalid enum value 'dead' - at `$.models[0].state`", {"models": [{"state": "dead"}]},
         "desired.models[0].state: unknown state 'dead'"),
        ("Expected `object | null`, got `int` - at `$.shadow`", {"shadow": 3},
         "desired.shadow: expected an object or null, got an integer"),
    ],
)
def test_validation_errors_name_the_field_path_and_the_value(error: str, raw: object, expected: str) -> None:
    assert explain(error, "desired", raw) == expected
