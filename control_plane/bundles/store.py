"""Content-addressed bundle files: ``<root>/sha256/<hex>.bundle``.

A bundle's name is the sha256 of its bytes, so a stored file never changes, storing the same
bytes twice is a no-op, and a cached chunk can never be stale.

Serving chunks over MQTT is the hot path: a fleet rolling out one bundle asks for the same
chunks many times. :meth:`BundleStore.read_chunk` keeps chunks in memory, bounded by
``cache_bytes``, and a few file descriptors open (``os.pread``: no seek, no shared offset), so the
hundredth device costs a dictionary lookup instead of a disk read.

Devices read a bundle front to back, so a plain LRU fails exactly when it matters: for a bundle
larger than the cache, each read evicts the chunk the next device will need soonest, and every
device that comes later reads the whole bundle from disk again (measured in
``tests/unit/control_plane/bundles/test_chunk_cache.py``). The cache is therefore split in two LRUs:

- the *main* part (7/8 of ``cache_bytes``) admits a chunk only if it lies within the first
  ``main`` bytes of its bundle: a bundle that fits is cached whole; of a larger one, its head stays
  cached and is never pushed out by its own tail (other bundles still displace it by LRU);
- the *window* (1/8) takes every other chunk: devices fetching the same large bundle in step,
  a little apart, still share its tail.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from edgefleet.shared.bundle.format import sha256_file
from edgefleet.shared.errors import BundleIntegrityError, MessageError, NotFoundError
from edgefleet.shared.files import fsync_dir
from edgefleet.shared.wire.chunks import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, chunk_count, chunk_length
from edgefleet.shared.wire.strict import DIGEST_RE

_BARE_HEX_LEN = 64


def normalize_digest(text: str) -> str:
    """Return ``sha256:<hex>`` for ``sha256:<hex>`` or a bare 64-digit lowercase hex.

    Raises:
        MessageError: Anything else (the digest becomes a file name: no other form is safe).
    """
    digest = text if text.startswith("sha256:") else "sha256:" + text
    if not DIGEST_RE.match(digest) or len(digest) != len("sha256:") + _BARE_HEX_LEN:
        raise MessageError(f"not a bundle digest (sha256:<64 lowercase hex>): {text!r:.100}")
    return digest


class BundleStore:
    """Bundle files on local disk, by digest.

    Thread-safe: the API, the ingest worker and the publisher use one instance.
    """

    def __init__(
        self, root: Path, *, cache_bytes: int, max_open_files_count: int = 32, cache_window_divisor_count: int = 8
    ) -> None:
        """Open (and create) the store under ``root``.

        Args:
            root: Usually ``<data_dir>/bundles``.
            cache_bytes: Memory for recently served chunks.
            max_open_files_count: Bundle file descriptors kept open for chunk reads.
            cache_window_divisor_count: 1/N of the cache is the recency window for the tails of
                large bundles.
        """
        self.root = root
        self._objects = root / "sha256"
        self.tmp_dir = root / "tmp"
        self._objects.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._max_open_files = max_open_files_count
        window = cache_bytes // cache_window_divisor_count
        self._main = _LruBytes(cache_bytes - window)
        self._window = _LruBytes(window)
        self.stats = {"chunk_hits": 0, "chunk_misses": 0}
        self._files: OrderedDict[str, tuple[int, int]] = OrderedDict()  # digest -> (fd, size)

    def path_for(self, digest: str) -> Path:
        """Where the bundle ``digest`` is (or would be) stored.

        Raises:
            MessageError: ``digest`` is not a sha256 digest.
        """
        return self._objects / (normalize_digest(digest).removeprefix("sha256:") + ".bundle")

    def exists(self, digest: str) -> bool:
        """Whether the bundle is stored."""
        return self.path_for(digest).is_file()

    def new_temp_path(self, suffix: str = "") -> Path:
        """A fresh, empty file in the store's temp directory (same file system: cheap to move in)."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=suffix)
        os.close(fd)
        return Path(name)

    def put_file(self, tmp_path: Path) -> str:
        """Move ``tmp_path`` into the store under its own digest and return the digest.

        The file is hashed here, not trusted to match a digest computed earlier. Storing bytes
        that are already stored just removes ``tmp_path``.

        Args:
            tmp_path: A file on the same file system as the store (see :meth:`new_temp_path`);
                it is gone afterwards.
        """
        digest = sha256_file(tmp_path)
        final = self.path_for(digest)
        if final.exists():
            tmp_path.unlink()
            return digest
        with tmp_path.open("rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o444)  # content-addressed files are never written again
        os.replace(tmp_path, final)
        fsync_dir(final.parent)
        return digest

    def size(self, digest: str) -> int:
        """Size in bytes of a stored bundle.

        Raises:
            NotFoundError: Not stored.
        """
        with self._lock:
            return self._open(normalize_digest(digest))[1]

    def read_chunk(self, digest: str, chunk_size: int, index: int) -> bytes:
        """Chunk ``index`` of the bundle split into ``chunk_size``-byte chunks.

        Raises:
            NotFoundError: Not stored.
            MessageError: ``chunk_size`` outside the wire limits, or ``index`` past the end.
        """
        digest = normalize_digest(digest)
        if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
            raise MessageError(f"chunk size {chunk_size} outside [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
        key = (digest, chunk_size, index)
        # One lock around the whole read: it keeps a descriptor from being closed (and its
        # number reused for another file) while it is read from; a pread of a cached page is
        # microseconds, and chunk serving is one thread anyway.
        with self._lock:
            data = self._main.get(key)
            if data is None:
                data = self._window.get(key)
            if data is not None:
                self.stats["chunk_hits"] += 1
                return data
            self.stats["chunk_misses"] += 1
            fd, size = self._open(digest)
            count = chunk_count(size, chunk_size)
            if not 0 <= index < count:
                raise MessageError(f"chunk index {index} out of range: the bundle has {count} chunks of {chunk_size}")
            length = chunk_length(size, chunk_size, index)
            data = os.pread(fd, length, index * chunk_size)
            if len(data) != length:
                raise BundleIntegrityError(f"bundle {digest} is truncated on disk ({len(data)} of {length} bytes)")
            offset = index * chunk_size
            if offset + length <= self._main.capacity:
                self._main.put(key, data)
            else:
                self._window.put(key, data)
            return data

    def close(self) -> None:
        """Close cached file descriptors and drop cached chunks."""
        with self._lock:
            for fd, _ in self._files.values():
                os.close(fd)
            self._files.clear()
            self._main.clear()
            self._window.clear()

    def _open(self, digest: str) -> tuple[int, int]:
        entry = self._files.get(digest)
        if entry is not None:
            self._files.move_to_end(digest)
            return entry
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFoundError(f"bundle {digest} is not stored") from None
        entry = (fd, os.fstat(fd).st_size)
        self._files[digest] = entry
        while len(self._files) > self._max_open_files:
            _, (old_fd, _) = self._files.popitem(last=False)
            os.close(old_fd)
        return entry



class _LruBytes:
    """An LRU of byte strings bounded by their total length (not thread-safe: the store locks)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[str, int, int]) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: tuple[str, int, int], data: bytes) -> None:
        if len(data) > self.capacity or key in self._items:
            return
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.capacity:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

