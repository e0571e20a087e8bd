"""Bundle transfer over MQTT: chunk requests (JSON) and chunks (binary).

The agent asks for chunks of a bundle by index (``chunks/request``); the control plane answers
each with one binary message on ``chunks/data``::

    offset size  field
    0      4     magic b"EFC1"
    4      32    bundle digest (raw sha256)
    36     4     chunk size in bytes (u32, big endian), the agent's choice
    40     4     chunk index (u32)
    44     8     bundle size in bytes (u64)
    52     32    sha256 of this chunk's data
    84     ...   data: chunk_size bytes, fewer for the last chunk

Each chunk is hashed so a corrupted chunk is refused alone and asked for again; the bundle's
own digest, from the signed desired state, is checked once all chunks are in. When the control
plane cannot serve a request it answers with a JSON :class:`ChunkError` instead.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from edgefleet.shared.errors import MessageError
from edgefleet.shared.wire.strict import (
    DIGEST_RE,
    check_keys,
    check_schema,
    dumps,
    get_int,
    get_list,
    get_str,
    loads_object,
)

MAGIC = b"EFC1"
_HEADER = struct.Struct(">4s32sIIQ32s")
HEADER_BYTES = _HEADER.size
MIN_CHUNK_BYTES = 1024  # bytes
MAX_CHUNK_BYTES = 8 * 1024 * 1024  # bytes, far above any sane setting; brokers cap lower
MAX_INDICES_PER_REQUEST = 256  # count


def chunk_count(total_size: int, chunk_size: int) -> int:
    """How many chunks a bundle of ``total_size`` bytes splits into."""
    return max(1, -(-total_size // chunk_size))


def chunk_length(total_size: int, chunk_size: int, index: int) -> int:
    """Bytes of data chunk ``index`` carries."""
    return min(chunk_size, total_size - index * chunk_size)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRequest:
    """A device asks for some chunks of one bundle (``edgefleet.chunkreq/v1``)."""

    bundle_digest: str
    chunk_size: int
    indices: tuple[int, ...]

    def encode(self) -> bytes:
        return dumps(
            {
                "schema": "edgefleet.chunkreq/v1",
                "bundle_digest": self.bundle_digest,
                "chunk_size": self.chunk_size,
                "indices": list(self.indices),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> ChunkRequest:
        raw = loads_object(data, "chunkreq", 64 * 1024)
        check_schema(raw, "chunkreq", 1)
        check_keys(raw, "chunkreq", {"schema", "bundle_digest", "chunk_size", "indices"})
        indices = get_list(raw, "indices", "chunkreq", max_items=MAX_INDICES_PER_REQUEST)
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 for i in indices):
            raise MessageError("chunkreq.indices: expected 1+ chunk indices (u32)")
        return cls(
            bundle_digest=get_str(raw, "bundle_digest", "chunkreq", pattern=DIGEST_RE),
            chunk_size=get_int(raw, "chunk_size", "chunkreq", minimum=MIN_CHUNK_BYTES, maximum=MAX_CHUNK_BYTES),
            indices=tuple(indices),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkError:
    """The control plane cannot serve a chunk request (``edgefleet.chunkerr/v1``)."""

    bundle_digest: str
    code: str
    message: str

    def encode(self) -> bytes:
        return dumps(
            {
                "schema": "edgefleet.chunkerr/v1",
                "bundle_digest": self.bundle_digest,
                "code": self.code,
                "message": self.message,
            }
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ChunkError:
        check_schema(raw, "chunkerr", 1)
        check_keys(raw, "chunkerr", {"schema", "bundle_digest", "code", "message"})
        return cls(
            bundle_digest=get_str(raw, "bundle_digest", "chunkerr", pattern=DIGEST_RE),
            code=get_str(raw, "code", "chunkerr", max_len=64),
            message=get_str(raw, "message", "chunkerr", max_len=2048),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """One verified-on-decode chunk of a bundle."""

    bundle_digest: str
    chunk_size: int
    index: int
    total_size: int
    data: bytes

    def encode(self) -> bytes:
        header = _HEADER.pack(
            MAGIC,
            bytes.fromhex(self.bundle_digest.removeprefix("sha256:")),
            self.chunk_size,
            self.index,
            self.total_size,
            hashlib.sha256(self.data).digest(),
        )
        return header + self.data


def decode_chunk_message(payload: bytes, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> Chunk | ChunkError:
    """Decode a ``chunks/data`` payload; raise :class:`MessageError` on anything inconsistent."""
    if payload[:1] == b"{":
        return ChunkError.from_dict(loads_object(payload, "chunkerr", 64 * 1024))
    if len(payload) < HEADER_BYTES:
        raise MessageError(f"chunk: {len(payload)} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, digest, chunk_size, index, total, data_hash = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise MessageError(f"chunk: bad magic {magic!r}")
    if not MIN_CHUNK_BYTES <= chunk_size <= max_chunk_bytes:
        raise MessageError(f"chunk: chunk size {chunk_size} outside [{MIN_CHUNK_BYTES}, {max_chunk_bytes}]")
    if total == 0 or index >= chunk_count(total, chunk_size):
        raise MessageError(f"chunk: index {index} out of range for a {total}-byte bundle")
    data = payload[HEADER_BYTES:]
    if len(data) != chunk_length(total, chunk_size, index):
        raise MessageError(f"chunk {index}: {len(data)} data bytes, expected {chunk_length(total, chunk_size, index)}")
    if hashlib.sha256(data).digest() != data_hash:
        raise MessageError(f"chunk {index}: data does not match its sha256")
    return Chunk(
        bundle_digest="sha256:" + digest.hex(), chunk_size=chunk_size, index=index, total_size=total, data=bytes(data)
    )
