"""The bundle: one uncompressed tar that carries a signed manifest and the files it lists.

Layout (member order is part of the format)::

    manifest.dsse.json        DSSE envelope, payload type MANIFEST_PAYLOAD_TYPE, signed by publisher keys
    files/<path>              every file the manifest lists, nothing else

Uncompressed because model weights do not compress (zstd gets 1.07x on fp32) and a plain tar
can be verified while streaming. A bundle is addressed by the sha256 of its bytes.

The tar is the plain ustar subset :mod:`edgefleet.shared.bundle.ustar` reads and writes; tarfile
never sees bundle bytes. Verification (:func:`verify_bundle`) reads the archive once, as a
stream, and never writes: it checks the envelope's signatures before it reads a second header,
then that the members are exactly the listed files, as regular files with safe names and modes,
of the listed sizes and hashes, within :class:`BundleLimits`. Extraction (:func:`extract_bundle`)
writes our own files from the member bytes and re-hashes while writing, so a bundle swapped on
disk between the two passes is still caught. Whatever else untrusted bytes make go wrong while a
bundle is read is an :class:`UnsafeArchiveError` too: a refusal with a code, never a crash.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.shared.bundle import ustar
from edgefleet.shared.bundle.manifest import (
    BUNDLE_FILES_PREFIX,
    MANIFEST_PAYLOAD_TYPE,
    MAX_MANIFEST_BYTES,
    Compatibility,
    FileEntry,
    Manifest,
)
from edgefleet.shared.errors import (
    BundleError,
    BundleIntegrityError,
    ConflictError,
    EdgefleetError,
    MessageError,
    UnsafeArchiveError,
)
from edgefleet.shared.files import fsync_dir
from edgefleet.shared.tensors import TensorSpec
from edgefleet.shared.trust.signing import SigningKey, open_envelope, seal_envelope

ENVELOPE_MEMBER = "manifest.dsse.json"
FILES_PREFIX = BUNDLE_FILES_PREFIX
_READ_BLOCK = 1024 * 1024  # bytes


@dataclass(frozen=True, kw_only=True)
class BundleLimits:
    """What a device accepts; anything larger is refused before it is unpacked."""

    max_bundle_bytes: int = 2 * 1024**3  # bytes, the whole archive
    max_file_bytes: int = 2 * 1024**3  # bytes, one member
    max_members: int = 257  # count, envelope included


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def make_manifest(
    *,
    name: str,
    version: str,
    runtime: str,
    model_file: str,
    files: Mapping[str, Path],
    inputs: Iterable[TensorSpec],
    outputs: Iterable[TensorSpec],
    description: str = "",
    labels: Mapping[str, str] | None = None,
    compatibility: Compatibility | None = None,
    drift_reference: dict[str, Any] | None = None,
    min_version: str | None = None,
    health_inputs: str | None = None,
    latency_budget_ms: float | None = None,
) -> Manifest:
    """Hash ``files`` (bundle path -> source file) and describe them in a validated manifest."""
    entries = []
    for rel, src in sorted(files.items()):
        h = hashlib.sha256()
        size = 0
        with src.open("rb") as f:
            while block := f.read(_READ_BLOCK):
                h.update(block)
                size += len(block)
        entries.append(FileEntry(path=rel, sha256=h.hexdigest(), size=size))
    manifest = Manifest(
        name=name,
        version=version,
        runtime=runtime,
        model_file=model_file,
        files=tuple(entries),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        compatibility=compatibility or Compatibility(),
        description=description,
        labels=dict(labels or {}),
        drift_reference=drift_reference,
        min_version=min_version,
        health_inputs=health_inputs,
        latency_budget_ms=latency_budget_ms,
    )
    # Round-trip through the strict decoder so a publisher can never sign what a device rejects.
    return Manifest.decode(manifest.encode())


def write_bundle(out: IO[bytes], manifest: Manifest, files: Mapping[str, Path], keys: Iterable[SigningKey]) -> None:
    """Write a signed bundle to ``out``: the envelope, then each listed file."""
    envelope = seal_envelope(MANIFEST_PAYLOAD_TYPE, manifest.encode(), keys)
    written = _write_member(out, ENVELOPE_MEMBER, len(envelope), io.BytesIO(envelope))
    for entry in manifest.files:
        with files[entry.path].open("rb") as f:
            written += _write_member(out, FILES_PREFIX + entry.path, entry.size, f)
    out.write(ustar.end_of_archive(written))


def _write_member(out: IO[bytes], name: str, size: int, source: IO[bytes]) -> int:
    """Write one member (header, bytes, padding); return the bytes written."""
    out.write(ustar.header(name, size))
    copied = 0
    while block := source.read(min(_READ_BLOCK, size - copied)):
        out.write(block)
        copied += len(block)
    if copied != size:
        raise ConflictError(f"{name}: the file changed while the bundle was written ({copied} of {size} bytes)")
    out.write(ustar.padding(size))
    return ustar.BLOCK + size + len(ustar.padding(size))


def build_bundle(path: Path, manifest: Manifest, files: Mapping[str, Path], keys: Iterable[SigningKey]) -> str:
    """Write a bundle file at ``path`` (via a temp file) and return its digest."""
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        write_bundle(f, manifest, files, keys)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


class _Archive:
    """The members of a bundle file, in order, each checked for what does not need the manifest."""

    def __init__(self, stream: IO[bytes], limits: BundleLimits) -> None:
        self._stream = stream
        self._limits = limits
        self._count = 0
        self._open: ustar.MemberReader | None = None

    def next(self) -> tuple[ustar.Header, ustar.MemberReader] | None:
        """The next member and its reader (the previous one is skipped to its end), or None."""
        if self._open is not None:
            self._open.finish()
        found = ustar.next_member(self._stream)
        if found is None:
            return None
        member, reader = found
        self._count += 1
        if self._count > self._limits.max_members:
            raise UnsafeArchiveError(f"bundle has more than {self._limits.max_members} members")
        if member.name.startswith("/") or any(part in ("", ".", "..") for part in member.name.split("/")):
            raise UnsafeArchiveError(f"bundle member {member.name!r:.120} has an unsafe path")
        if member.mode & 0o7000:
            raise UnsafeArchiveError(f"bundle member {member.name!r:.120} has setuid/setgid/sticky bits")
        if member.size > self._limits.max_file_bytes:
            raise UnsafeArchiveError(f"bundle member {member.name!r:.120} is {member.size} bytes, over the limit")
        self._open = reader
        return member, reader

    def members(self) -> Iterator[tuple[ustar.Header, ustar.MemberReader]]:
        while (found := self.next()) is not None:
            yield found


def _open_archive(path: Path, limits: BundleLimits) -> IO[bytes]:
    size = path.stat().st_size
    if size > limits.max_bundle_bytes:
        raise UnsafeArchiveError(f"bundle is {size} bytes, over the {limits.max_bundle_bytes}-byte limit")
    return path.open("rb")


def _read_manifest(
    archive: _Archive,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    threshold: int,
) -> Manifest:
    # The envelope is the first member and is checked before any other header is read.
    first = archive.next()
    if first is None or first[0].name != ENVELOPE_MEMBER:
        raise BundleIntegrityError(f"bundle must start with {ENVELOPE_MEMBER}")
    member, reader = first
    if member.size > MAX_MANIFEST_BYTES * 2:
        raise UnsafeArchiveError(f"{ENVELOPE_MEMBER} is {member.size} bytes, over the limit")
    try:
        payload = open_envelope(
            reader.read_all(), payload_type=MANIFEST_PAYLOAD_TYPE, trusted_keys=trusted_keys, threshold=threshold
        )
    except MessageError as exc:  # a malformed envelope is a bad bundle to every caller of this module
        raise BundleIntegrityError(f"{ENVELOPE_MEMBER} is not a DSSE envelope: {exc}") from exc
    try:
        return Manifest.decode(payload)
    except MessageError as exc:
        raise BundleIntegrityError(f"signed manifest is invalid: {exc}") from exc


def _file_members(archive: _Archive, manifest: Manifest) -> Iterator[tuple[FileEntry, ustar.MemberReader]]:
    """Match each remaining member to its manifest entry, in order, and hand out its reader."""
    expected = {e.path: e for e in manifest.files}
    seen: set[str] = set()
    for member, reader in archive.members():
        if not member.name.startswith(FILES_PREFIX):
            raise BundleIntegrityError(f"unexpected bundle member {member.name!r:.120}")
        rel = member.name[len(FILES_PREFIX) :]
        entry = expected.get(rel)
        if entry is None:
            raise BundleIntegrityError(f"bundle member {rel!r:.120} is not listed in the signed manifest")
        if rel in seen:
            raise BundleIntegrityError(f"bundle member {rel!r:.120} appears twice")
        if member.size != entry.size:
            raise BundleIntegrityError(f"{rel}: {member.size} bytes, the manifest says {entry.size}")
        seen.add(rel)
        yield entry, reader
    missing = expected.keys() - seen
    if missing:
        raise BundleIntegrityError(f"bundle lacks file(s) listed in the manifest: {sorted(missing)}")


def _copy_hashed(reader: ustar.MemberReader, entry: FileEntry, sink: IO[bytes] | None) -> None:
    h = hashlib.sha256()
    size = 0
    while block := reader.read(_READ_BLOCK):
        size += len(block)
        if size > entry.size:
            raise BundleIntegrityError(f"{entry.path}: more bytes than the manifest's {entry.size}")
        h.update(block)
        if sink is not None:
            sink.write(block)
    if size != entry.size or h.hexdigest() != entry.sha256:
        raise BundleIntegrityError(f"{entry.path}: content does not match the sha256 in the signed manifest")


def _as_bundle_error(exc: Exception) -> BundleError:
    """A failure this module did not foresee, as a refusal with a code rather than a dead worker."""
    return UnsafeArchiveError(f"bundle could not be read: {type(exc).__name__}: {exc}"[:500])


def verify_bundle(
    path: Path,
    *,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    threshold: int = 1,
    limits: BundleLimits = BundleLimits(),
) -> Manifest:
    """Check a bundle file completely without writing anything; return its manifest.

    Raises:
        SignatureError: The manifest is not signed by ``threshold`` trusted keys, or has the
            wrong payload type.
        BundleIntegrityError: A malformed manifest or envelope; files missing, extra, or not
            matching the manifest.
        UnsafeArchiveError: Not the plain ustar the writer writes (extended headers, links,
            special files), unsafe paths, odd modes, sizes past ``limits``, or anything else the
            bytes make go wrong.
    """
    try:
        with _open_archive(path, limits) as stream:
            archive = _Archive(stream, limits)
            manifest = _read_manifest(archive, trusted_keys, threshold)
            for entry, reader in _file_members(archive, manifest):
                _copy_hashed(reader, entry, None)
    except (EdgefleetError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: whatever else they cause is a refusal
        raise _as_bundle_error(exc) from exc
    return manifest


def extract_bundle(
    path: Path,
    dest: Path,
    *,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    threshold: int = 1,
    limits: BundleLimits = BundleLimits(),
) -> Manifest:
    """Verify and unpack a bundle's files into a new directory ``dest``.

    ``dest`` must not exist; on any error it is removed, so a half-unpacked bundle is never left.
    Callers should :func:`verify_bundle` first: this pass verifies again while it writes.

    Raises:
        ConflictError: ``dest`` exists already.
        SignatureError, BundleIntegrityError, UnsafeArchiveError: As :func:`verify_bundle`.
        OSError: The files cannot be written (disk full, permissions).
    """
    if dest.exists():
        raise ConflictError(f"cannot unpack the bundle into {dest}: it exists already")
    tmp = dest.with_name(dest.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with _open_archive(path, limits) as stream:
            archive = _Archive(stream, limits)
            manifest = _read_manifest(archive, trusted_keys, threshold)
            for entry, reader in _file_members(archive, manifest):
                target = tmp.joinpath(*entry.path.split("/"))
                # Manifest paths are validated, but check containment anyway: defence in depth.
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise UnsafeArchiveError(f"{entry.path!r} escapes the bundle directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("xb") as sink:
                    _copy_hashed(reader, entry, sink)
                    sink.flush()
                    os.fsync(sink.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except (EdgefleetError, OSError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: whatever else they cause is a refusal
        shutil.rmtree(tmp, ignore_errors=True)
        raise _as_bundle_error(exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
