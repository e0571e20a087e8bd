"""BundleStore: content addressing, idempotent puts, chunk reads and their cache."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.control_plane.bundles.store import BundleStore, normalize_digest
from edgefleet.shared.errors import MessageError, NotFoundError

CHUNK = 1024


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BundleStore]:
    store = BundleStore(tmp_path / "bundles", cache_bytes=2 * CHUNK)
    yield store
    store.close()


def _put(store: BundleStore, data: bytes) -> str:
    tmp = store.new_temp_path()
    tmp.write_bytes(data)
    return store.put_file(tmp)


def test_put_file_stores_under_the_sha256_and_is_idempotent(store: BundleStore) -> None:
    data = os.urandom(5000)
    digest = _put(store, data)

    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    path = store.path_for(digest)
    assert path == store.root / "sha256" / f"{hashlib.sha256(data).hexdigest()}.bundle"
    assert path.read_bytes() == data
    assert not stat.S_IMODE(path.stat().st_mode) & 0o222  # never written again
    assert _put(store, data) == digest
    assert list(store.tmp_dir.iterdir()) == []  # the second copy was discarded
    assert store.size(digest) == 5000


def test_read_chunk_returns_each_slice_and_the_short_last_one(store: BundleStore) -> None:
    data = os.urandom(3 * CHUNK + 10)
    digest = _put(store, data)

    chunks = [store.read_chunk(digest, CHUNK, i) for i in range(4)]

    assert b"".join(chunks) == data
    assert len(chunks[-1]) == 10
    with pytest.raises(MessageError, match="out of range"):
        store.read_chunk(digest, CHUNK, 4)
    with pytest.raises(MessageError, match="chunk size"):
        store.read_chunk(digest, 10, 0)


def test_cached_chunks_do_not_touch_the_disk(store: BundleStore) -> None:
    data = os.urandom(3 * CHUNK)
    digest = _put(store, data)
    first = store.read_chunk(digest, CHUNK, 0)

    # Replace the file's content behind the store's back (it is never supposed to change):
    # a cached chunk still answers, an evicted one is read again.
    path = store.path_for(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"\0" * len(data))
    assert store.read_chunk(digest, CHUNK, 0) is first
    other = _put(store, os.urandom(CHUNK))
    store.read_chunk(other, CHUNK, 0)  # the cache holds under two chunks: chunk 0 is evicted
    assert store.read_chunk(digest, CHUNK, 0) == b"\0" * CHUNK


def test_unknown_and_malformed_digests(store: BundleStore) -> None:
    with pytest.raises(NotFoundError):
        store.read_chunk("sha256:" + "0" * 64, CHUNK, 0)
    with pytest.raises(NotFoundError):
        store.size("0" * 64)
    for bad in ("sha256:../../etc/passwd", "0" * 63, "sha256:" + "A" * 64, "md5:" + "0" * 32, ""):
        with pytest.raises(MessageError):
            store.path_for(bad)
    assert normalize_digest("a" * 64) == "sha256:" + "a" * 64
