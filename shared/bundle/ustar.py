"""The tar subset bundles are made of: plain POSIX ustar headers for regular files, and nothing else.

Bundle bytes come from outside, and :mod:`tarfile` parses PAX and GNU extended headers before a
caller sees the member (CPython's PAX header regex is quadratic, CVE-2024-6232; nested PAX headers
recurse; a GNU sparse map that does not parse raises ``ValueError``). The format is ours, so it is
read here, 512 bytes at a time, by a parser that knows only what the writer writes: a ustar header
(``ustar\\0`` magic, version ``00``, octal numbers, a valid checksum) per member, the member's
bytes padded to 512, and two zero blocks at the end. Every other header type (PAX ``x``/``g``,
GNU ``L``/``K``/``S``, links, devices, directories) is refused by its type flag, before any of its
content is read. Headers are written here too, so the two sides cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO

from edgefleet.shared.errors import UnsafeArchiveError

BLOCK = 512  # bytes
RECORD = 20 * BLOCK  # bytes: what tar writers pad the archive to, kept so digests stay stable
MAX_SIZE = 8**11 - 1  # bytes: the largest size an 11-digit octal field holds
_NAME_LEN, _PREFIX_LEN = 100, 155  # bytes
_MAGIC = b"ustar\x0000"  # magic and version, as POSIX.1-1988 defines them
_REGULAR = (b"0", b"\x00")
_LINKS = (b"1", b"2")
_EXTENDED = {b"x": "a PAX extended header", b"g": "a PAX global header", b"L": "a GNU long name",
             b"K": "a GNU long link name", b"S": "a GNU sparse file"}


@dataclass(frozen=True, slots=True)
class Header:
    """One member as its header describes it."""

    name: str
    size: int
    mode: int


def invalid(reason: str) -> UnsafeArchiveError:
    """The error for bytes that are not a bundle archive."""
    return UnsafeArchiveError(f"bundle is not a valid tar archive: {reason}")


def split_name(name: str) -> tuple[str, str] | None:
    """(prefix, name) fields that hold ``name`` in a ustar header, or None if it does not fit."""
    raw = name.encode("ascii", "strict")
    if len(raw) <= _NAME_LEN:
        return "", name
    # The prefix ends at a slash, which the header leaves out; the rest must fit the name field.
    for cut in range(min(len(raw) - 1, _PREFIX_LEN), 0, -1):
        if raw[cut : cut + 1] == b"/" and len(raw) - cut - 1 <= _NAME_LEN:
            return name[:cut], name[cut + 1 :]
    return None


def header(name: str, size: int, mode: int = 0o644) -> bytes:
    """The 512-byte ustar header of a regular file (mtime 0, no owner: reproducible bundles).

    Raises:
        ValueError: ``name`` is not ASCII or does not fit, or ``size`` is out of range. Manifest
            paths are checked against :func:`split_name` and :data:`MAX_SIZE` before this is reached.
    """
    fields = split_name(name)
    if fields is None or not 0 <= size <= MAX_SIZE:
        raise ValueError(f"{name!r:.120} ({size} bytes) does not fit a ustar header")
    prefix, short = fields
    block = bytearray(BLOCK)
    block[0:100] = short.encode("ascii").ljust(100, b"\0")
    block[100:108] = b"%07o\0" % mode
    block[108:116] = block[116:124] = b"0000000\0"  # uid, gid
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"  # mtime
    block[148:156] = b" " * 8  # the checksum counts its own field as spaces
    block[156:157] = b"0"
    block[257:265] = _MAGIC
    block[345:500] = prefix.encode("ascii").ljust(155, b"\0")
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padding(size: int) -> bytes:
    """Zero bytes that round a member of ``size`` bytes up to a whole block."""
    return b"\0" * (-size % BLOCK)


def end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record, for an archive of ``written`` bytes so far."""
    end = written + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-end % RECORD))


def _octal(field: bytes, what: str) -> int:
    # Digits, then NUL/space terminators; base-256 (high bit set) and signs are not ours.
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or not all(0x30 <= c <= 0x37 for c in digits):
        raise invalid(f"{what} field {bytes(field)!r:.40} is not an octal number")
    return int(digits, 8)


def _text(field: bytes, what: str) -> str:
    raw = field.split(b"\0", 1)[0]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise UnsafeArchiveError(f"bundle member has a non-ASCII {what}") from exc


def parse_header(block: bytes) -> Header | None:
    """The member ``block`` describes, or None for the zero block that ends the archive.

    Raises:
        UnsafeArchiveError: Not a ustar header, a bad checksum, or any type but a regular file.
    """
    if len(block) != BLOCK:
        raise invalid("it ends inside a header")
    if block == bytes(BLOCK):
        return None
    stored = _octal(block[148:156], "checksum")
    if stored != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        raise invalid("a header checksum does not match")
    if block[257:265] != _MAGIC:
        raise invalid("a header is not POSIX ustar (bundles use no other tar format)")
    prefix = _text(block[345:500], "name")
    name = _text(block[0:100], "name")
    name = f"{prefix}/{name}" if prefix else name
    kind = block[156:157]
    if kind in _EXTENDED:
        raise UnsafeArchiveError(f"bundle member {name!r:.120} is {_EXTENDED[kind]}; bundles use plain ustar headers")
    if kind in _LINKS:
        raise UnsafeArchiveError(f"bundle member {name!r:.120} is a link; only regular files are allowed")
    if kind not in _REGULAR:
        raise UnsafeArchiveError(f"bundle member {name!r:.120} is a non-regular file; only regular files are allowed")
    return Header(name=name, size=_octal(block[124:136], "size"), mode=_octal(block[100:108], "mode"))


class MemberReader:
    """Reads one member's bytes from the archive stream, then its padding; a short read is an error."""

    def __init__(self, stream: IO[bytes], size: int) -> None:
        self._stream = stream
        self._left = size
        self._pad = -size % BLOCK

    def read(self, n: int) -> bytes:
        """Up to ``n`` of the member's bytes; ``b""`` once all were read."""
        if self._left == 0:
            return b""
        data = self._stream.read(min(n, self._left))
        if not data:
            raise invalid("a member is cut short")
        self._left -= len(data)
        return data

    def read_all(self) -> bytes:
        """All of the member's bytes that are left (callers bound the size first)."""
        parts = []
        while part := self.read(1024 * 1024):
            parts.append(part)
        return b"".join(parts)

    def finish(self) -> None:
        """Skip what was not read and the padding, so the stream is at the next header."""
        while self.read(1024 * 1024):
            pass
        pad = self._stream.read(self._pad)
        if len(pad) != self._pad:
            raise invalid("a member is cut short")
        self._pad = 0


def next_member(stream: IO[bytes]) -> tuple[Header, MemberReader] | None:
    """The next member of ``stream`` and its reader, or None at the end of the archive."""
    header = parse_header(stream.read(BLOCK))
    if header is None:
        return None
    return header, MemberReader(stream, header.size)
