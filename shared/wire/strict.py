"""Strict decoding helpers for JSON objects that come from outside the process.

Every wire object names its schema (``"schema": "edgefleet.<kind>/v<N>"``); a known kind with an
unknown version raises :class:`UnknownSchemaError`, anything malformed raises
:class:`MessageError` naming the field. Unknown fields are rejected rather than ignored so a
message is never half-understood, and a key that appears twice in one object is refused: parsers
disagree on which of the two wins, so a signer and a verifier could read different messages.

Wire messages are declared in :mod:`edgefleet.shared.wire.schema`; the ``get_*`` helpers here serve
the hand-checked documents (the bundle manifest, inference requests).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from edgefleet.shared.errors import MessageError, UnknownSchemaError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")


class _DuplicateKeyError(MessageError):
    """A key appears twice in one JSON object (raised from inside the parser)."""

    code = "duplicate_key"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(f"key {key!r:.80} appears twice in one object")
            seen.add(key)
    return obj


def loads_object(data: bytes | str, what: str, max_bytes: int) -> dict[str, Any]:
    """Parse JSON bytes that must hold one object, within ``max_bytes``, no key twice in an object."""
    if len(data) > max_bytes:
        raise MessageError(f"{what}: {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        value = json.loads(data, object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as exc:
        raise MessageError(f"{what}: {exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MessageError(f"{what}: not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise MessageError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def check_schema(raw: dict[str, Any], kind: str, version: int) -> None:
    """Require ``raw["schema"] == "edgefleet.<kind>/v<version>"``."""
    schema = raw.get("schema")
    expected = f"edgefleet.{kind}/v{version}"
    if schema == expected:
        return
    if isinstance(schema, str) and schema.startswith(f"edgefleet.{kind}/v"):
        raise UnknownSchemaError(f"{kind}: unsupported schema version {schema!r}, this build speaks {expected!r}")
    raise MessageError(f"{kind}: schema must be {expected!r}, got {schema!r:.80}")


def check_keys(raw: dict[str, Any], what: str, required: set[str], optional: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Reject missing and unknown keys."""
    missing = required - raw.keys()
    if missing:
        raise MessageError(f"{what}: missing field(s) {sorted(missing)}")
    unknown = raw.keys() - required - optional
    if unknown:
        raise MessageError(f"{what}: unknown field(s) {sorted(unknown)[:5]}")


def get_str(
    raw: dict[str, Any], key: str, what: str, *, pattern: re.Pattern[str] | None = None, max_len: int = 1024
) -> str:
    """A string field, optionally matching ``pattern``."""
    value = raw.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise MessageError(f"{what}.{key}: expected a string of at most {max_len} chars")
    if pattern is not None and not pattern.match(value):
        raise MessageError(f"{what}.{key}: {value!r:.80} does not match {pattern.pattern}")
    return value


def get_int(raw: dict[str, Any], key: str, what: str, *, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    """An integer field within bounds (booleans are not integers here)."""
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise MessageError(f"{what}.{key}: expected an integer in [{minimum}, {maximum}], got {value!r:.40}")
    return value


def get_float(raw: dict[str, Any], key: str, what: str) -> float:
    """A finite number field."""
    value = raw.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise MessageError(f"{what}.{key}: expected a finite number, got {value!r:.40}")
    return float(value)


def get_list(raw: dict[str, Any], key: str, what: str, *, max_items: int) -> list[Any]:
    """A list field of bounded length."""
    value = raw.get(key)
    if not isinstance(value, list) or len(value) > max_items:
        raise MessageError(f"{what}.{key}: expected a list of at most {max_items} items")
    return value


def get_str_map(raw: dict[str, Any], key: str, what: str, *, max_items: int = 64) -> dict[str, str]:
    """A flat ``{str: str}`` object field (labels, metadata)."""
    value = raw.get(key)
    if (
        not isinstance(value, dict)
        or len(value) > max_items
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 128 and len(v) <= 1024 for k, v in value.items()
        )
    ):
        raise MessageError(f"{what}.{key}: expected an object of at most {max_items} string pairs")
    return dict(value)


def dumps(value: dict[str, Any]) -> bytes:
    """Canonical compact JSON bytes for the wire."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
