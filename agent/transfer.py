"""Fetching a bundle over MQTT in chunks, resumable across reconnects and restarts.

The agent asks for chunks by index (keeping at most ``window_chunks`` outstanding), writes each
verified chunk at its offset in ``downloads/<hex>.partial`` and appends its index to
``<hex>.have``. After a restart the ``.have`` file says which chunks are already on disk, so a
transfer never starts over from zero. Once every chunk is in, the whole file's sha256 must equal
the digest from the signed desired state; only then is it renamed to ``<hex>.bundle``.

Chunks arrive on paho's network thread (:meth:`ChunkFetcher.on_message`); :meth:`fetch` runs on
the reconciler thread and blocks until the bundle is complete, cancelled or failed.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import TransferConfig
from shared.bundle import sha256_file
from shared.chunks import Chunk, ChunkError, ChunkRequest, chunk_count, decode_chunk_message
from shared.errors import BundleIntegrityError, EdgefleetError, MessageError, TransferError

log = logging.getLogger(__name__)
_INDEX = struct.Struct(">I")


class Cancelled(EdgefleetError):
    code = "superseded"


@dataclass
class _Active:
    digest: str
    size: int
    chunk_size: int
    partial: Path
    fd: int
    have_file: object  # binary file handle, append-only
    have: set[int]
    outstanding: dict[int, float] = field(default_factory=dict)  # index -> time requested
    attempts: dict[int, int] = field(default_factory=dict)
    error: ChunkError | None = None
    received_bytes: int = 0


class ChunkFetcher:
    """Downloads bundles chunk by chunk through a request function and incoming messages."""

    def __init__(self, downloads_dir: Path, config: TransferConfig, send_request: Callable[[ChunkRequest], None]):
        self._dir = downloads_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._config = config
        self._send = send_request
        self._cond = threading.Condition()
        self._active: _Active | None = None
        self.stats = {"chunks_received": 0, "chunks_requested": 0, "chunks_resumed": 0, "duplicates": 0}

    def bundle_path(self, digest: str) -> Path:
        """Where a complete, digest-checked bundle lives."""
        return self._dir / f"{digest.removeprefix('sha256:')}.bundle"

    def fetch(self, digest: str, size: int, cancel: threading.Event) -> Path:
        """Download the bundle ``digest`` of ``size`` bytes; return the path of the complete file.

        Raises:
            TransferError: Chunks stopped coming after repeated requests (retryable).
            BundleIntegrityError: The assembled file does not hash to ``digest``.
            Cancelled: ``cancel`` was set (a newer desired state arrived).
        """
        final = self.bundle_path(digest)
        if final.exists():
            return final
        if size > self._config.max_bundle_bytes:
            raise BundleIntegrityError(f"bundle is {size} bytes, over max_bundle_bytes {self._config.max_bundle_bytes}")
        active = self._open(digest, size)
        total = chunk_count(size, active.chunk_size)
        try:
            with self._cond:
                self._active = active
            self.stats["chunks_resumed"] += len(active.have)
            while True:
                with self._cond:
                    if active.error is not None:
                        raise TransferError(
                            f"control plane refused chunks: {active.error.code}: {active.error.message}"
                        )
                    if len(active.have) == total:
                        break
                    to_request = self._next_requests(active, total, time.monotonic())
                    progress_mark = len(active.have)
                if cancel.is_set():
                    raise Cancelled("a newer desired state superseded this download")
                if to_request:
                    self.stats["chunks_requested"] += len(to_request)
                    self._send(
                        ChunkRequest(bundle_digest=digest, chunk_size=active.chunk_size, indices=tuple(to_request))
                    )
                with self._cond:
                    # Sleep only if nothing arrived meanwhile; answers can beat us back here.
                    if len(active.have) == progress_mark and active.error is None:
                        self._cond.wait(timeout=0.25)
        finally:
            with self._cond:
                self._active = None
            os.close(active.fd)
            active.have_file.close()  # type: ignore[attr-defined]
        if sha256_file(active.partial) != digest:
            # A wrong byte somewhere that chunk hashes did not catch: start clean next time.
            active.partial.unlink(missing_ok=True)
            self._have_path(digest).unlink(missing_ok=True)
            raise BundleIntegrityError(f"downloaded bundle does not hash to {digest}")
        os.replace(active.partial, final)
        self._have_path(digest).unlink(missing_ok=True)
        return final

    def _have_path(self, digest: str) -> Path:
        return self._dir / f"{digest.removeprefix('sha256:')}.have"

    def _open(self, digest: str, size: int) -> _Active:
        hexd = digest.removeprefix("sha256:")
        partial = self._dir / f"{hexd}.partial"
        have_path = self._have_path(digest)
        chunk_size = self._config.chunk_size_bytes
        have: set[int] = set()
        if partial.exists() and have_path.exists():
            raw = have_path.read_bytes()
            # Chunk size is recorded first so a changed setting does not misread old progress.
            if len(raw) >= 4 and _INDEX.unpack_from(raw)[0] == chunk_size:
                usable = (len(raw) - 4) // 4 * 4
                have = {_INDEX.unpack_from(raw, 4 + i)[0] for i in range(0, usable, 4)}
                have = {i for i in have if i < chunk_count(size, chunk_size)}
            else:
                partial.unlink()
        if not partial.exists() or not have:
            have = set()
            have_path.write_bytes(_INDEX.pack(chunk_size))
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, size)
        return _Active(
            digest=digest,
            size=size,
            chunk_size=chunk_size,
            partial=partial,
            fd=fd,
            have_file=have_path.open("ab"),
            have=have,
        )

    def _next_requests(self, active: _Active, total: int, now: float) -> list[int]:
        timeout = self._config.chunk_timeout_s
        expired = [i for i, t in active.outstanding.items() if now - t > timeout]
        for i in expired:
            del active.outstanding[i]
            active.attempts[i] = active.attempts.get(i, 0) + 1
            if active.attempts[i] >= self._config.max_attempts_per_chunk:
                raise TransferError(f"chunk {i} of {active.digest} did not arrive after {active.attempts[i]} requests")
        room = self._config.window_chunks - len(active.outstanding)
        # Only top up when half the window is free: fewer, larger requests.
        if room < max(1, self._config.window_chunks // 2):
            return []
        wanted: list[int] = []
        for i in range(total):
            if len(wanted) >= room:
                break
            if i not in active.have and i not in active.outstanding:
                wanted.append(i)
        for i in wanted:
            active.outstanding[i] = now
        return wanted

    def on_message(self, payload: bytes) -> None:
        """Handle a ``chunks/data`` message (paho's thread): write it if it belongs to the active fetch."""
        try:
            message = decode_chunk_message(payload, max_chunk_bytes=self._config.chunk_size_bytes)
        except MessageError as exc:
            log.warning("dropped a bad chunk message: %s", exc)
            return
        with self._cond:
            active = self._active
            if active is None or message.bundle_digest != active.digest:
                return  # a late chunk of a finished or cancelled transfer
            if isinstance(message, ChunkError):
                active.error = message
                self._cond.notify_all()
                return
            self._store(active, message)
            self._cond.notify_all()

    def _store(self, active: _Active, chunk: Chunk) -> None:
        if chunk.chunk_size != active.chunk_size or chunk.total_size != active.size:
            log.warning("dropped chunk %d: geometry does not match the request", chunk.index)
            return
        active.outstanding.pop(chunk.index, None)
        if chunk.index in active.have:
            self.stats["duplicates"] += 1
            return
        os.pwrite(active.fd, chunk.data, chunk.index * active.chunk_size)
        # The index is recorded only after its bytes are written: a crash between the two costs
        # one chunk, never a wrong one.
        active.have_file.write(_INDEX.pack(chunk.index))  # type: ignore[attr-defined]
        active.have_file.flush()  # type: ignore[attr-defined]
        active.have.add(chunk.index)
        active.received_bytes += len(chunk.data)
        self.stats["chunks_received"] += 1
