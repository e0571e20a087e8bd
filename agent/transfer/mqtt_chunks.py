"""Fetching a bundle over MQTT in chunks, resumable across reconnects and restarts.

Progress lives on disk in two files that every way of downloading shares (:class:`PartialDownload`;
:mod:`agent.http_fetch` uses the same pair, so a download can start over HTTP and finish over MQTT,
or the other way round):

- ``downloads/<hex>.partial``: the bundle's bytes, each chunk written at its offset;
- ``downloads/<hex>.have``: the chunk size (u32), then the index (u32) of each chunk whose bytes
  are completely written, appended only after the bytes are.

After a restart the ``.have`` file says which chunks are already on disk, so a transfer never starts
over from zero. Once every chunk is in, the whole file's sha256 must equal the digest from the
signed desired state; only then is it renamed to ``<hex>.bundle``. A chunk's own hash is computed
by whoever sends it, so it catches corruption, not forgery: bytes that do not hash to the signed
digest are a failed *transfer* (retryable, downloaded again from clean), never a bad bundle that
would end the rollout.

Over MQTT the agent asks for chunks by index, keeping at most ``window_chunks`` outstanding and
asking for more when half the window is free. Chunks arrive on paho's network thread
(:meth:`ChunkFetcher.on_message`); :meth:`ChunkFetcher.fetch` runs on the reconciler thread and
blocks until the bundle is complete, cancelled or failed. While the broker connection is down no
requests go out; when it comes back, chunks still outstanding are asked for again after a short
grace (chunks the broker kept for our persistent session arrive within it), not after the full
``chunk_timeout_s``.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from edgefleet.agent.config import TransferConfig
from edgefleet.agent.transfer.bandwidth import BandwidthLimiter
from edgefleet.shared.bundle.format import sha256_file
from edgefleet.shared.errors import BundleIntegrityError, EdgefleetError, MessageError, TransferError
from edgefleet.shared.files import fsync_dir
from edgefleet.shared.wire.chunks import (
    Chunk,
    ChunkError,
    ChunkRequest,
    chunk_count,
    chunk_length,
    decode_chunk_message,
)

log = logging.getLogger(__name__)
_INDEX = struct.Struct(">I")


class Cancelled(EdgefleetError):
    code = "superseded"


class PartialDownload:
    """A bundle being downloaded: its ``.partial`` bytes and its ``.have`` list of complete chunks.

    Not thread-safe: the owner serializes calls (ChunkFetcher under its condition's lock).
    """

    def __init__(self, directory: Path, digest: str, size: int, chunk_size: int) -> None:
        """Open (creating or resuming) the partial download of ``digest``.

        Progress recorded with another chunk size is discarded: its indices would mean other offsets.
        """
        hexd = digest.removeprefix("sha256:")
        self.digest = digest
        self.size = size
        self.chunk_size = chunk_size
        self.total = chunk_count(size, chunk_size)
        self.partial = directory / f"{hexd}.partial"
        self.have_path = directory / f"{hexd}.have"
        self.have: set[int] = set()
        if self.partial.exists() and self.have_path.exists():
            raw = self.have_path.read_bytes()
            # Chunk size is recorded first so a changed setting does not misread old progress.
            if len(raw) >= 4 and _INDEX.unpack_from(raw)[0] == chunk_size:
                usable = (len(raw) - 4) // 4 * 4  # a torn last record (crash mid-append) is ignored
                indices = (_INDEX.unpack_from(raw, 4 + i)[0] for i in range(0, usable, 4))
                self.have = {i for i in indices if i < self.total}
            else:
                self.partial.unlink()
        if not self.partial.exists() or not self.have:
            self.have = set()
            self.have_path.write_bytes(_INDEX.pack(chunk_size))
        self.resumed = len(self.have)
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(self._fd, size)
            self._have_file: BinaryIO = self.have_path.open("ab")
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False

    @property
    def complete(self) -> bool:
        """Whether every chunk is on disk."""
        return len(self.have) == self.total

    def chunk_span(self, index: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of chunk ``index``."""
        start = index * self.chunk_size
        return start, start + chunk_length(self.size, self.chunk_size, index)

    def missing_runs(self) -> list[tuple[int, int]]:
        """Chunks not yet on disk, as ``[first, last + 1)`` index ranges in order."""
        runs: list[tuple[int, int]] = []
        start: int | None = None
        for i in range(self.total):
            if i in self.have:
                if start is not None:
                    runs.append((start, i))
                    start = None
            elif start is None:
                start = i
        if start is not None:
            runs.append((start, self.total))
        return runs

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write bytes at ``offset`` (within the bundle's size)."""
        if offset < 0 or offset + len(data) > self.size:
            raise BundleIntegrityError(f"write of {len(data)} bytes at {offset} is outside a {self.size}-byte bundle")
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def mark(self, index: int) -> bool:
        """Record chunk ``index`` as completely written; False if it already was."""
        if index in self.have:
            return False
        # The index is recorded only after its bytes are written: a crash between the two costs
        # one chunk, never a wrong one.
        self._have_file.write(_INDEX.pack(index))
        self._have_file.flush()
        self.have.add(index)
        return True

    def close(self) -> None:
        """Close the files, keeping the progress on disk (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            self._have_file.close()

    def discard(self) -> None:
        """Close and delete the progress: the next attempt starts clean."""
        self.close()
        self.partial.unlink(missing_ok=True)
        self.have_path.unlink(missing_ok=True)

    def finish(self, final: Path) -> Path:
        """Check the complete file against the digest and move it to ``final``.

        Raises:
            TransferError: The bytes do not hash to the digest: corrupted or forged on the way, so
                the progress is deleted and the retry (the error is retryable) starts clean.
        """
        if not self.complete:
            raise TransferError(f"{self.digest}: {self.total - len(self.have)} chunks still missing")
        os.fsync(self._fd)  # durable before it is renamed into place
        self.close()
        if sha256_file(self.partial) != self.digest:
            # A wrong byte somewhere that chunk hashes (if any) did not catch: start clean next time.
            self.discard()
            raise TransferError(
                f"downloaded bundle does not hash to {self.digest}: corrupted or forged in transit, discarded; "
                "the next attempt downloads it again"
            )
        os.replace(self.partial, final)
        self.have_path.unlink(missing_ok=True)
        fsync_dir(final.parent)
        return final


def bundle_path(downloads_dir: Path, digest: str) -> Path:
    """Where a complete, digest-checked bundle lives."""
    return downloads_dir / f"{digest.removeprefix('sha256:')}.bundle"


@dataclass
class _Active:
    download: PartialDownload
    outstanding: dict[int, float] = field(default_factory=dict)  # index -> time requested
    attempts: dict[int, int] = field(default_factory=dict)
    retry: deque[int] = field(default_factory=deque)  # asked for once, timed out: ask again first
    next_new: int = 0  # every index below was asked for, or is on disk
    error: ChunkError | None = None
    received_bytes: int = 0


class ChunkFetcher:
    """Downloads bundles chunk by chunk through a request function and incoming messages."""

    def __init__(
        self,
        downloads_dir: Path,
        config: TransferConfig,
        send_request: Callable[[ChunkRequest], None],
        *,
        limiter: BandwidthLimiter | None = None,
        link_up: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a fetcher.

        Args:
            downloads_dir: Where partial and complete bundles are kept.
            config: Chunk size, window, timeouts, size limit, bandwidth cap.
            send_request: Publishes a chunk request (QoS 1).
            limiter: The device's bandwidth cap (shared with HTTP); default: one from ``config``.
            link_up: Set while the broker connection is up; None if always assumed up.
            clock: Monotonic seconds, for request timeouts.
        """
        self._dir = downloads_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._config = config
        self._send = send_request
        self._limiter = limiter or BandwidthLimiter.for_transfer(config)
        self._link_up = link_up
        self._clock = clock
        self._cond = threading.Condition()
        self._active: _Active | None = None
        self.stats = {"chunks_received": 0, "chunks_requested": 0, "chunks_resumed": 0, "duplicates": 0}

    def bundle_path(self, digest: str) -> Path:
        """Where a complete, digest-checked bundle lives."""
        return bundle_path(self._dir, digest)

    def fetch(self, digest: str, size: int, cancel: threading.Event) -> Path:
        """Download the bundle ``digest`` of ``size`` bytes; return the path of the complete file.

        Raises:
            TransferError: Chunks stopped coming after repeated requests, or the assembled file does
                not hash to ``digest`` (both retryable; in the second case the progress is deleted).
            BundleIntegrityError: ``size`` is over ``max_bundle_bytes``.
            Cancelled: ``cancel`` was set (a newer desired state arrived).
        """
        final = self.bundle_path(digest)
        if final.exists():
            return final
        if size > self._config.max_bundle_bytes:
            raise BundleIntegrityError(f"bundle is {size} bytes, over max_bundle_bytes {self._config.max_bundle_bytes}")
        active = _Active(download=PartialDownload(self._dir, digest, size, self._config.chunk_size_bytes))
        download = active.download
        try:
            with self._cond:
                self._active = active
            self.stats["chunks_resumed"] += download.resumed
            link_was_up = True
            while True:
                with self._cond:
                    if active.error is not None:
                        raise TransferError(
                            f"control plane refused chunks: {active.error.code}: {active.error.message}"
                        )
                    if download.complete:
                        break
                    now = self._clock()
                    link_is_up = self._link_up is None or self._link_up.is_set()
                    if link_is_up and not link_was_up:
                        self._after_reconnect(active, now)
                    link_was_up = link_is_up
                    to_request = self._next_requests(active, now) if link_is_up else []
                    progress_mark = len(download.have)
                if cancel.is_set():
                    raise Cancelled("a newer desired state superseded this download")
                if to_request:
                    if not self._limiter.consume(len(to_request) * download.chunk_size, cancel):
                        raise Cancelled("a newer desired state superseded this download")
                    with self._cond:
                        sent_at = self._clock()  # the cap may have held us: time from now
                        for i in to_request:
                            if i in active.outstanding:
                                active.outstanding[i] = sent_at
                    self.stats["chunks_requested"] += len(to_request)
                    self._send(
                        ChunkRequest(bundle_digest=digest, chunk_size=download.chunk_size, indices=tuple(to_request))
                    )
                with self._cond:
                    # Sleep only if nothing arrived meanwhile; answers can beat us back here.
                    if len(download.have) == progress_mark and active.error is None and not download.complete:
                        self._cond.wait(timeout=self._config.poll_s)
        except BaseException:
            with self._cond:
                self._active = None
            download.close()
            raise
        with self._cond:
            self._active = None
        return download.finish(final)

    def _after_reconnect(self, active: _Active, now: float) -> None:
        # Requests or answers in flight when the link dropped may be gone (a broker that lost its
        # state) or may still come (a persistent session): ask again soon, not a full timeout later.
        expire_at = now - self._config.chunk_timeout_s + self._config.reconnect_grace_s
        for i, requested in active.outstanding.items():
            active.outstanding[i] = min(requested, expire_at)

    def _next_requests(self, active: _Active, now: float) -> list[int]:
        timeout = self._config.chunk_timeout_s
        expired = sorted(i for i, t in active.outstanding.items() if now - t > timeout)
        for i in expired:
            del active.outstanding[i]
            active.attempts[i] = active.attempts.get(i, 0) + 1
            if active.attempts[i] >= self._config.max_attempts_per_chunk:
                raise TransferError(
                    f"chunk {i} of {active.download.digest} did not arrive after {active.attempts[i]} requests"
                )
            active.retry.append(i)
        room = self._config.window_chunks - len(active.outstanding)
        if room < self._topup_room():
            return []
        have = active.download.have
        wanted: list[int] = []
        while active.retry and len(wanted) < room:
            i = active.retry.popleft()
            if i not in have and i not in active.outstanding:
                wanted.append(i)
        # A cursor, not a scan from 0: a 2 GiB bundle has 32k chunks, asked for 8 at a time.
        total = active.download.total
        while active.next_new < total and len(wanted) < room:
            i = active.next_new
            active.next_new += 1
            if i not in have and i not in active.outstanding:
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
            if active is None or message.bundle_digest != active.download.digest:
                return  # a late chunk of a finished or cancelled transfer
            if isinstance(message, ChunkError):
                active.error = message
                self._cond.notify_all()
                return
            self._store(active, message)
            # Wake the fetch thread only when it has something to do: a wake-up per chunk costs a
            # GIL hand-over on paho's thread for every 64 KiB (a third of the throughput, measured).
            if self._fetch_has_work(active):
                self._cond.notify_all()

    def _topup_room(self) -> int:
        # Top up only when half the window is free: fewer, larger requests.
        return max(1, self._config.window_chunks // 2)

    def _fetch_has_work(self, active: _Active) -> bool:
        download = active.download
        if download.complete:
            return True
        more_to_ask = bool(active.retry) or active.next_new < download.total
        return more_to_ask and self._config.window_chunks - len(active.outstanding) >= self._topup_room()

    def _store(self, active: _Active, chunk: Chunk) -> None:
        download = active.download
        if chunk.chunk_size != download.chunk_size or chunk.total_size != download.size:
            log.warning("dropped chunk %d: geometry does not match the request", chunk.index)
            return
        active.outstanding.pop(chunk.index, None)
        if chunk.index in download.have:
            self.stats["duplicates"] += 1
            return
        download.write(chunk.index * download.chunk_size, chunk.data)
        download.mark(chunk.index)
        active.received_bytes += len(chunk.data)
        self.stats["chunks_received"] += 1
