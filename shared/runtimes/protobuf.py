"""A bounds-checked reader of the protobuf wire format, enough to walk a message's fields.

Only what :mod:`.onnx_inspect` needs: iterate the (field number, wire type, value) triples of one
message held in a buffer. Every length and offset is checked against the buffer, so hostile
bytes end in a ``ValueError`` (the caller's to translate), never in a read past the end or
unbounded work: each step consumes at least one byte.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5

_MAX_VARINT_BYTES = 10  # a 64-bit value


def read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at ``pos``; returns it and the position after it.

    Raises:
        ValueError: Truncated, or longer than 10 bytes.
    """
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, pos
    raise ValueError("varint longer than 10 bytes")


def fields(buf: memoryview, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int | memoryview]]:
    """The fields of the message in ``buf[start:end]``, in wire order.

    Yields:
        ``(field number, wire type, value)``: an ``int`` for varint and fixed-width fields, a
        ``memoryview`` (no copy) for length-delimited ones.

    Raises:
        ValueError: A truncated field, a length past the end, field number 0, or a wire
            type protobuf 3 does not write (groups, 6, 7).
    """
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == VARINT:
            value, pos = read_varint(buf, pos, end)
            yield number, wire_type, value
        elif wire_type == LENGTH_DELIMITED:
            length, pos = read_varint(buf, pos, end)
            if length > end - pos:
                raise ValueError(f"field {number}: length {length} runs past the end")
            yield number, wire_type, buf[pos : pos + length]
            pos += length
        elif wire_type in (FIXED64, FIXED32):
            width = 8 if wire_type == FIXED64 else 4
            if width > end - pos:
                raise ValueError(f"field {number}: truncated fixed-width value")
            yield number, wire_type, int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        else:
            raise ValueError(f"field {number}: unsupported wire type {wire_type}")


def as_text(value: int | memoryview, what: str) -> str:
    """A length-delimited field as UTF-8 text.

    Raises:
        ValueError: Not length-delimited, or not UTF-8.
    """
    if not isinstance(value, memoryview):
        raise ValueError(f"{what} is not a string")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None


def as_message(value: int | memoryview, what: str) -> memoryview:
    """A length-delimited field as an embedded message's bytes.

    Raises:
        ValueError: Not length-delimited.
    """
    if not isinstance(value, memoryview):
        raise ValueError(f"{what} is not a message")
    return value


def as_int(value: int | memoryview, what: str, *, signed: bool = True) -> int:
    """A varint field as a (two's complement, when ``signed``) 64-bit integer.

    Raises:
        ValueError: Not a varint.
    """
    if isinstance(value, memoryview):
        raise ValueError(f"{what} is not an integer")
    if signed and value >= 1 << 63:
        return value - (1 << 64)
    return value
