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

Each chunk is hashed so a corrupted chunk is refused alone and asked for again. The sender computes
that hash, so it proves nothing against forgery: the bundle's own digest, from the signed desired
state, is checked once all chunks are in, and a mismatch is a failed transfer that is retried from
a clean download (agent.transfer.mqtt_chunks). When the control
plane cannot serve a request it answers with a JSON :class:`ChunkError` instead.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta

from edgefleet.shared.errors import MessageError
from edgefleet.shared.wire.schema import Digest, Text64, Text2048, WireMessage

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


ChunkIndex = Annotated[int, Meta(ge=0, lt=2**32)]  # u32, as in the header


class ChunkRequest(WireMessage, frozen=True, kw_only=True, tag="edgefleet.chunkreq/v1"):
    """A device asks for some chunks of one bundle (``edgefleet.chunkreq/v1``)."""

    max_bytes = 64 * 1024

    bundle_digest: Digest
    chunk_size: Annotated[int, Meta(ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES)]
    indices: Annotated[tuple[ChunkIndex, ...], Meta(min_length=1, max_length=MAX_INDICES_PER_REQUEST)]


class ChunkError(WireMessage, frozen=True, kw_only=True, tag="edgefleet.chunkerr/v1"):
    """The control plane cannot serve a chunk request (``edgefleet.chunkerr/v1``)."""

    max_bytes = 64 * 1024

    bundle_digest: Digest
    code: Text64
    message: Text2048


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
        return ChunkError.decode(payload)
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
