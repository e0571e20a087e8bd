"""Declarative wire messages: a message is declared once, as a frozen msgspec Struct.

A message is a subclass of :class:`WireMessage` whose ``tag`` is its schema
(``"edgefleet.<kind>/v<N>"``, written as the ``"schema"`` field); its fields are annotated with
the constrained types below (patterns, lengths, ranges, enums). From that one declaration come
``encode()`` (canonical JSON: sorted keys, compact), ``decode(bytes)``, equality, immutability and
the registry :data:`MESSAGES` that the tests walk, so a new message is a short declaration. Objects
nested in a message (a model directive, a report line) are :class:`WireStruct`.

Decoding, in order, and nothing is half-parsed:

1. size limit, then JSON that must be one object, with no key twice in any object
   (:func:`~edgefleet.shared.wire.strict.loads_object`);
2. the schema: a known kind with another version raises :class:`UnknownSchemaError`, anything else
   :class:`MessageError`;
3. the declaration, strictly: exact types (no bool for an int, no "7" for 7, no 7.0 for 7), unknown
   fields refused, every constraint; then the fields that must be on the wire although the
   constructor gives them a default (all but those in ``optional_fields``, or, for a struct declared
   ``omit_defaults=True``, all but the defaulted ones). Errors name the field path
   (``desired.models[3].bundle_digest: ...``).

Why msgspec. Measured on the real messages (those of ``bench/wire.py``), microseconds per decode,
best of 5 on 2 busy shared cores; "+dup" adds the strict parse that refuses duplicate keys, which
neither library does by itself (pydantic's figure is its own JSON parse plus that parse)::

                        hand-written   msgspec   msgspec+dup   pydantic v2   pydantic+dup
    desired, 32 models      491          167         267           150          ~267
    reported, 8 models       89           36          77            24           ~65
    chunk request, 256       89           10          46            23           ~54
    deployment event         23            5          18             6           ~18

Strictness, both libraries alike: bools, strings and floats refused as ints, unknown fields
refused, a duplicate key accepted (the last one wins). The deciding differences: msgspec validates
the object our strict parse already built (``msgspec.convert``, one parse), where pydantic's strict
mode refuses a JSON array for a tuple unless it parses the JSON text itself (so: two parses);
pydantic's regexes are faster (Rust), which is why it wins on the desired state alone. And msgspec
Structs are what the messages already were: frozen, slotted, keyword-only value objects with
attributes; and a process that declares one model and decodes one message starts in 0.21 s with
msgspec, 0.60 s with pydantic (0.10 s bare interpreter), which a device pays on every restart.

Before (the hand-written decoders of the previous commit) and after (this module, duplicate-key
parse and presence checks included), interleaved in one process, best of 15, microseconds; the
ratio's range is over three such runs on the busy machine::

                          before   after   before/after
    desired, 32 models      358     183     1.8 - 2.3
    desired, 1 model         32      17     1.3 - 1.8
    reported, 8 models      161     108     1.5 - 1.7
    deployment event         25      21     1.2 - 1.6
    chunk request, 256      117      52     1.6 - 2.3
    chunk error              15      14     0.95 - 1.1 (parity: a three-field message is mostly parse)
    chunk, 64 KiB binary     70      69     1.0 - 1.1 (unchanged code: the noise floor)

The binary chunk path (:mod:`edgefleet.shared.wire.chunks`) is not a Struct and did not change.
"""

from __future__ import annotations

import re
import sys
import typing
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Self

import msgspec
from msgspec import Meta

from edgefleet.shared.errors import MessageError
from edgefleet.shared.wire.strict import (
    DEVICE_ID_RE,
    DIGEST_RE,
    NAME_RE,
    VERSION_RE,
    check_schema,
    loads_object,
)

MAX_MESSAGE_BYTES = 256 * 1024  # bytes, any JSON message on the wire
_MAX_FLOAT = sys.float_info.max
_MAX_INT = 2**63 - 1

# --- constrained field types ---------------------------------------------------------------------

Name = Annotated[str, Meta(pattern=NAME_RE.pattern)]
Version = Annotated[str, Meta(pattern=VERSION_RE.pattern)]
DeviceId = Annotated[str, Meta(pattern=DEVICE_ID_RE.pattern)]
Digest = Annotated[str, Meta(pattern=DIGEST_RE.pattern)]
Url = Annotated[str, Meta(pattern=r"^https?://[^\s]{1,2000}\Z")]
Text32 = Annotated[str, Meta(max_length=32)]  # runtimes, subjects
Text64 = Annotated[str, Meta(max_length=64)]  # ids and error codes
Text2048 = Annotated[str, Meta(max_length=2048)]  # human-readable messages
Count = Annotated[int, Meta(ge=0, le=_MAX_INT)]
PositiveCount = Annotated[int, Meta(ge=1, le=_MAX_INT)]
Finite = Annotated[float, Meta(ge=-_MAX_FLOAT, le=_MAX_FLOAT)]  # NaN and infinities fail both bounds


# --- declarations --------------------------------------------------------------------------------


class WireStruct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An object nested in a message: frozen, unknown fields refused.

    msgspec applies ``kw_only`` to the fields of the class that says it, and type checkers read a
    declaration with options but no ``frozen`` as mutable, so every declaration says
    ``frozen=True, kw_only=True`` (a test holds them to it).

    Every field must be present when decoded, defaulted or not, unless the class is declared
    ``omit_defaults=True``: then defaulted fields are left out when at their default, and may be.
    """

    def to_dict(self) -> dict[str, Any]:
        """This object as JSON-ready builtins, as it is encoded."""
        value = msgspec.to_builtins(self, order="sorted")
        assert isinstance(value, dict)
        return value


MESSAGES: dict[str, type[WireMessage]] = {}
"""Every declared message class, by class name (filled as message modules are imported)."""
_SCHEMAS: dict[type[WireMessage], tuple[str, int]] = {}  # (kind, version) by class, read once from its tag


class WireMessage(WireStruct, frozen=True, tag_field="schema"):
    """A top-level message: its msgspec ``tag`` is its schema, ``"edgefleet.<kind>/v<N>"``.

    ``optional_fields`` names defaulted fields added after a version shipped: left out when empty,
    and a sender may leave them out; ``max_bytes`` bounds the encoded message.
    """

    optional_fields: ClassVar[frozenset[str]] = frozenset()
    max_bytes: ClassVar[int] = MAX_MESSAGE_BYTES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        MESSAGES[cls.__name__] = cls

    @classmethod
    def schema(cls) -> tuple[str, int]:
        """(kind, version) of this message, from its tag ``edgefleet.<kind>/v<version>``."""
        schema = _SCHEMAS.get(cls)
        if schema is None:
            tag = cls.__struct_config__.tag
            match = re.fullmatch(r"edgefleet\.([a-z]+)/v([0-9]+)", tag if isinstance(tag, str) else "")
            if match is None:
                raise TypeError(f"{cls.__name__} needs a tag 'edgefleet.<kind>/v<N>', has {tag!r}")
            schema = _SCHEMAS[cls] = (match[1], int(match[2]))
        return schema

    def encode(self) -> bytes:
        """Canonical JSON bytes: compact, keys sorted."""
        if not self.optional_fields:
            return msgspec.json.encode(self, order="sorted")
        out = self.to_dict()
        for name in self.optional_fields:
            if not getattr(self, name):
                del out[name]
        return msgspec.json.encode(out, order="sorted")

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode and check a message.

        Raises:
            UnknownSchemaError: The message is of this kind but another version.
            MessageError: Anything else is wrong; the message names the field.
        """
        kind, version = cls.schema()
        return cls._checked(loads_object(data, kind, cls.max_bytes), kind, version)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        """Check an already parsed JSON object (see :meth:`decode`)."""
        kind, version = cls.schema()
        return cls._checked(raw, kind, version)

    @classmethod
    def _checked(cls, raw: dict[str, Any], kind: str, version: int) -> Self:
        check_schema(raw, kind, version)
        try:
            message = msgspec.convert(raw, cls, strict=True)
        except msgspec.ValidationError as exc:
            raise MessageError(explain(str(exc), kind, raw)) from None
        _check_present(cls, raw, kind)
        return message


# --- decoding helpers ----------------------------------------------------------------------------


def _check_present(cls: type[WireStruct], raw: dict[str, Any], where: str) -> None:
    """Refuse a message that leaves out a defaulted field the wire requires."""
    required, nested = _presence_plan(cls)
    if not required and not nested:
        return
    missing = required - raw.keys()
    if missing:
        raise MessageError(f"{where}: missing field(s) {sorted(missing)}")
    for name, child in nested:
        value = raw.get(name)
        items = value if isinstance(value, list) else [] if value is None else [value]
        for i, item in enumerate(items):
            _check_present(child, item, f"{where}.{name}[{i}]" if isinstance(value, list) else f"{where}.{name}")


_PLANS: dict[type[WireStruct], tuple[frozenset[str], tuple[tuple[str, type[WireStruct]], ...]]] = {}


def _presence_plan(cls: type[WireStruct]) -> tuple[frozenset[str], tuple[tuple[str, type[WireStruct]], ...]]:
    """(defaulted fields that must be present, nested structs that have such fields), per class."""
    plan = _PLANS.get(cls)
    if plan is None:
        omit = cls.__struct_config__.omit_defaults
        required: set[str] = set()
        nested: list[tuple[str, type[WireStruct]]] = []
        for f in msgspec.structs.fields(cls):
            has_default = f.default is not msgspec.NODEFAULT or f.default_factory is not msgspec.NODEFAULT
            optional = f.name in getattr(cls, "optional_fields", ())
            if has_default and not omit and not optional:
                required.add(f.encode_name)
            for child in _structs_in(f.type):
                if _presence_plan(child) != (frozenset(), ()):
                    nested.append((f.encode_name, child))
        plan = (frozenset(required), tuple(nested))
        _PLANS[cls] = plan
    return plan


def _structs_in(tp: Any) -> Iterator[type[WireStruct]]:
    """The WireStruct classes a field type holds: directly, optionally, or as tuple items."""
    if isinstance(tp, type) and issubclass(tp, WireStruct):
        yield tp
        return
    for arg in typing.get_args(tp) if typing.get_origin(tp) is not Annotated else typing.get_args(tp)[:1]:
        yield from _structs_in(arg)


_AT = re.compile(r" - at `(\$[^`]*)`\Z")
_PATH_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_MISSING_FIELD = re.compile(r"Object missing required field `(.+)`")
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(.+)`")
_NO_MATCH = re.compile(r"Expected `str` matching regex '(.*)'", re.DOTALL)
_BAD_ENUM = re.compile(r"Invalid enum value (.+)")
_NOT_FINITE = re.compile(r"Expected `float` [<>]= -?" + re.escape(repr(_MAX_FLOAT)))
_TYPE_NAME = re.compile(r"`([a-z| ]+)`")
_BAD_LENGTH = re.compile(r"Expected `(str|array|object)` of length ([<>])= ([0-9]+)")
_GOT_BOOL = re.compile(r"got `bool`")
_UNITS = {"str": "chars", "array": "items", "object": "entries"}
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a finite number",  # every float on the wire is Finite
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "an object",
    "null": "null",
}
_MISSING = object()


def explain(error: str, what: str, raw: object) -> str:
    """A msgspec validation error in the wire's words: ``<what>.<path>: <problem>, got <value>``.

    Args:
        error: ``str()`` of the msgspec error, ``"<problem> - at `$.a[0].b`"``.
        what: The message kind, the path's root (``desired``).
        raw: The object that was validated, to quote the offending value.
    """
    found = _AT.search(error)
    path = found[1] if found else "$"
    problem = error[: found.start()] if found else error
    where = what + path[1:]
    value = _value_at(raw, path)
    got = "" if value is _MISSING else f", got {value!r:.40}"
    if match := _MISSING_FIELD.fullmatch(problem):
        return f"{where}: missing field(s) ['{match[1]}']"
    if match := _UNKNOWN_FIELD.fullmatch(problem):
        return f"{where}: unknown field(s) ['{match[1]}']"
    if match := _NO_MATCH.fullmatch(problem):
        pattern = match[1].replace("\\\\", "\\")  # msgspec quotes the pattern with its backslashes doubled
        return f"{where}: {'' if value is _MISSING else f'{value!r:.80} '}does not match {pattern}"
    if match := _BAD_ENUM.fullmatch(problem):
        noun = path.rpartition(".")[2].partition("[")[0] or "value"
        return f"{where}: unknown {noun} {match[1]:.40}"
    if _NOT_FINITE.fullmatch(problem):
        return f"{where}: expected a finite number{got}"
    if match := _BAD_LENGTH.fullmatch(problem):
        bound = "at most" if match[2] == "<" else "at least"
        size = f", got {len(value)}" if isinstance(value, str | list | dict) else got
        return f"{where}: expected {_TYPE_WORDS[match[1]]} of {bound} {match[3]} {_UNITS[match[1]]}{size}"
    text = _GOT_BOOL.sub("got a boolean", problem)
    text = _TYPE_NAME.sub(lambda m: " or ".join(_TYPE_WORDS.get(t.strip(), t) for t in m[1].split("|")), text)
    text = text[:1].lower() + text[1:]
    return f"{where}: {text}{'' if ', got ' in text else got}"


def _value_at(raw: object, path: str) -> object:
    """The value at a msgspec path (``$.models[0].name``) in ``raw``, or ``_MISSING``."""
    value = raw
    for key, index in _PATH_STEP.findall(path[1:]):
        if key and isinstance(value, dict) and key in value:
            value = value[key]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            return _MISSING
    return value
