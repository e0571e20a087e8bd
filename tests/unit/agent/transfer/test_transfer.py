"""ChunkFetcher against an in-memory control plane that can drop, corrupt, refuse and go silent.

The fake answers each requested index by handing ``fetcher.on_message`` the encoded chunk, either
inline (inside ``send_request``) or from its own thread, as paho would. It counts requests per
index, so a test can tell what the fetcher asked for, not only what it ended up with.
"""

from __future__ import annotations

import hashlib
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.agent.config import TransferConfig
from edgefleet.agent.transfer.mqtt_chunks import Cancelled, ChunkFetcher
from edgefleet.shared.errors import BundleIntegrityError, TransferError
from edgefleet.shared.wire.chunks import Chunk, ChunkError, ChunkRequest, chunk_count

CHUNK = 4096
BLOB = random.Random(1234).randbytes(300_000)  # 74 chunks, the last one 992 bytes
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
TOTAL = chunk_count(len(BLOB), CHUNK)

# A window wider than the blob: every chunk is asked for in the first request, which keeps these
# tests fast (the fetcher polls every 0.25 s). The window itself is exercised by the threaded test.
FAST = TransferConfig(chunk_size_bytes=CHUNK, window_chunks=128, chunk_timeout_s=0.2)


class FakeControlPlane:
    """Serves one blob in chunks; each behaviour is a hook a test can replace."""

    def __init__(self, blob: bytes = BLOB, *, digest: str = DIGEST, chunk_size: int = CHUNK) -> None:
        self.blob = blob
        self.digest = digest
        self.chunk_size = chunk_size
        self.fetcher: ChunkFetcher | None = None
        self.requests: Counter[int] = Counter()
        self.request_messages: list[ChunkRequest] = []
        # (index, how many times it has been requested, including this one) -> payload or None to drop
        self.answer: Callable[[int, int], bytes | None] = lambda index, nth: self.chunk(index)
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None

    def chunk(self, index: int) -> bytes:
        data = self.blob[index * self.chunk_size : (index + 1) * self.chunk_size]
        return Chunk(bundle_digest=self.digest, chunk_size=self.chunk_size, index=index, total_size=len(self.blob),
                     data=data).encode()

    def attach(self, downloads: Path, config: TransferConfig = FAST) -> ChunkFetcher:
        self.fetcher = ChunkFetcher(downloads, config, self.send_request)
        return self.fetcher

    def send_request(self, request: ChunkRequest) -> None:
        assert request.bundle_digest == self.digest and request.chunk_size == self.chunk_size
        assert len(request.indices) == len(set(request.indices)), "an index asked for twice in one request"
        self.request_messages.append(request)
        for index in request.indices:
            self.requests[index] += 1
            payload = self.answer(index, self.requests[index])
            if payload is not None:
                self._deliver(payload)

    def _deliver(self, payload: bytes) -> None:
        assert self.fetcher is not None
        if self._queue is None:
            self.fetcher.on_message(payload)
        else:
            self._queue.put(payload)

    def start_thread(self) -> None:
        """Deliver from a thread of our own, like paho's network loop."""
        self._queue = queue.Queue()

        def loop() -> None:
            assert self._queue is not None and self.fetcher is not None
            while (payload := self._queue.get()) is not None:
                self.fetcher.on_message(payload)

        self._thread = threading.Thread(target=loop, name="fake-control-plane", daemon=True)
        self._thread.start()

    def stop_thread(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)


@pytest.fixture
def fake() -> Iterator[FakeControlPlane]:
    plane = FakeControlPlane()
    yield plane
    plane.stop_thread()


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    return tmp_path / "downloads"


def fetch(fetcher: ChunkFetcher, digest: str = DIGEST, size: int = len(BLOB),
          cancel: threading.Event | None = None) -> Path:
    return fetcher.fetch(digest, size, cancel or threading.Event())


def test_fetch_assembles_identical_bytes(fake: FakeControlPlane, downloads: Path) -> None:
    path = fetch(fake.attach(downloads))

    assert path == downloads / f"{DIGEST.removeprefix('sha256:')}.bundle"
    assert path.read_bytes() == BLOB
    assert fake.requests == Counter({i: 1 for i in range(TOTAL)})
    assert sorted(p.name for p in downloads.iterdir()) == [path.name]  # .partial and .have are gone


def test_fetch_with_a_threaded_server_and_a_small_window(fake: FakeControlPlane, downloads: Path) -> None:
    fetcher = fake.attach(downloads, TransferConfig(chunk_size_bytes=CHUNK, window_chunks=16, chunk_timeout_s=2.0))
    fake.start_thread()

    assert fetch(fetcher).read_bytes() == BLOB
    assert fake.requests == Counter({i: 1 for i in range(TOTAL)})
    assert max(len(r.indices) for r in fake.request_messages) <= 16
    assert fetcher.stats["chunks_received"] == TOTAL


def test_an_already_downloaded_bundle_is_not_fetched_again(fake: FakeControlPlane, downloads: Path) -> None:
    fetcher = fake.attach(downloads)
    first = fetch(fetcher)
    fake.requests.clear()

    assert fetch(fetcher) == first
    assert fake.requests == Counter()


def test_dropped_chunks_are_asked_for_again(fake: FakeControlPlane, downloads: Path) -> None:
    fake.answer = lambda index, nth: None if index % 7 == 0 and nth == 1 else fake.chunk(index)

    assert fetch(fake.attach(downloads)).read_bytes() == BLOB
    assert fake.requests == Counter({i: 2 if i % 7 == 0 else 1 for i in range(TOTAL)})


def test_a_corrupted_chunk_is_dropped_and_asked_for_again(fake: FakeControlPlane, downloads: Path) -> None:
    def corrupt_once(index: int, nth: int) -> bytes:
        payload = bytearray(fake.chunk(index))
        if index in (5, TOTAL - 1) and nth == 1:
            payload[-1] ^= 0xFF  # the data no longer matches the hash in the header
        return bytes(payload)

    fake.answer = corrupt_once
    fetcher = fake.attach(downloads)

    assert fetch(fetcher).read_bytes() == BLOB
    assert fake.requests[5] == 2 and fake.requests[TOTAL - 1] == 2
    assert sum(fake.requests.values()) == TOTAL + 2
    assert fetcher.stats["chunks_received"] == TOTAL


def test_chunks_of_another_bundle_are_ignored(fake: FakeControlPlane, downloads: Path) -> None:
    other = FakeControlPlane(bytes(len(BLOB)), digest="sha256:" + "00" * 32)

    def interleave(index: int, nth: int) -> bytes:
        assert fake.fetcher is not None
        fake.fetcher.on_message(other.chunk(index))  # same geometry, different bundle
        return fake.chunk(index)

    fake.answer = interleave
    assert fetch(fake.attach(downloads)).read_bytes() == BLOB


def test_a_download_resumes_without_asking_for_chunks_it_has(fake: FakeControlPlane, downloads: Path) -> None:
    cancel = threading.Event()
    served: list[int] = []

    def go_silent_after_30(index: int, nth: int) -> bytes | None:
        if len(served) == 30:
            cancel.set()  # a newer desired state arrives while the control plane is silent
            return None
        served.append(index)
        return fake.chunk(index)

    fake.answer = go_silent_after_30
    with pytest.raises(Cancelled, match="superseded"):
        fetch(fake.attach(downloads), cancel=cancel)
    assert sorted(served) == list(range(30))
    assert not (downloads / f"{DIGEST.removeprefix('sha256:')}.bundle").exists()

    # A new fetcher on the same directory, as after a restart.
    resumed = FakeControlPlane()
    fetcher = resumed.attach(downloads)

    assert fetch(fetcher).read_bytes() == BLOB
    assert resumed.requests == Counter({i: 1 for i in range(30, TOTAL)})
    assert fetcher.stats["chunks_resumed"] == 30


def test_progress_made_with_another_chunk_size_is_discarded(fake: FakeControlPlane, downloads: Path) -> None:
    cancel = threading.Event()

    def serve_ten(index: int, nth: int) -> bytes | None:
        if index < 10:
            return fake.chunk(index)
        cancel.set()
        return None

    fake.answer = serve_ten
    with pytest.raises(Cancelled):
        fetch(fake.attach(downloads), cancel=cancel)

    # Same bundle, but the chunk size setting changed: the stored indices would mean other offsets.
    bigger = FakeControlPlane(chunk_size=2 * CHUNK)
    fetcher = bigger.attach(downloads, TransferConfig(chunk_size_bytes=2 * CHUNK, window_chunks=128,
                                                      chunk_timeout_s=0.2))
    assert fetch(fetcher).read_bytes() == BLOB
    assert bigger.requests == Counter({i: 1 for i in range(chunk_count(len(BLOB), 2 * CHUNK))})
    assert fetcher.stats["chunks_resumed"] == 0


def test_a_chunk_error_fails_the_transfer(fake: FakeControlPlane, downloads: Path) -> None:
    refusal = ChunkError(bundle_digest=DIGEST, code="not_found", message="no bundle with that digest").encode()
    fake.answer = lambda index, nth: refusal if index == 3 else fake.chunk(index)

    with pytest.raises(TransferError, match="refused chunks: not_found: no bundle with that digest") as info:
        fetch(fake.attach(downloads))
    assert info.value.retryable
    assert not (downloads / f"{DIGEST.removeprefix('sha256:')}.bundle").exists()


def test_silence_fails_after_max_attempts(fake: FakeControlPlane, downloads: Path) -> None:
    fake.answer = lambda index, nth: None
    config = TransferConfig(chunk_size_bytes=CHUNK, window_chunks=128, chunk_timeout_s=0.05, max_attempts_per_chunk=2)

    with pytest.raises(TransferError, match=r"chunk 0 of sha256:[0-9a-f]{64} did not arrive after 2 requests"):
        fetch(fake.attach(downloads, config))
    assert fake.requests[0] == 2


def test_a_bundle_that_does_not_hash_to_its_digest_is_removed(downloads: Path) -> None:
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    liar = FakeControlPlane(BLOB, digest=wrong)  # every chunk is self-consistent; the whole is not

    with pytest.raises(TransferError, match=f"does not hash to {wrong}") as info:
        fetch(liar.attach(downloads), digest=wrong)
    assert info.value.retryable  # wrong bytes on the way are a failed transfer, not a bad bundle
    assert list(downloads.iterdir()) == []  # no .partial, no .have, no .bundle


def test_a_bundle_over_the_size_limit_is_refused_before_any_request(fake: FakeControlPlane, downloads: Path) -> None:
    fetcher = fake.attach(downloads, TransferConfig(chunk_size_bytes=CHUNK, max_bundle_bytes=len(BLOB) - 1))
    with pytest.raises(BundleIntegrityError, match=f"over max_bundle_bytes {len(BLOB) - 1}"):
        fetch(fetcher)
    assert fake.requests == Counter()


def test_a_late_chunk_after_the_fetch_is_ignored(fake: FakeControlPlane, downloads: Path) -> None:
    fetcher = fake.attach(downloads)
    path = fetch(fetcher)
    fetcher.on_message(fake.chunk(0))  # must not raise nor touch the finished file
    fetcher.on_message(b"garbage")
    assert path.read_bytes() == BLOB


def test_top_ups_are_not_left_waiting_for_the_poll_interval(fake: FakeControlPlane, downloads: Path) -> None:
    """The fetch thread is woken only when half the window is free; a lost wake-up would cost a poll."""
    fetcher = fake.attach(downloads, TransferConfig(chunk_size_bytes=CHUNK, window_chunks=4, chunk_timeout_s=5.0))
    fake.start_thread()
    started = time.monotonic()

    assert fetch(fetcher).read_bytes() == BLOB
    # 37 top-ups of 2 chunks: a missed wake-up each would take 37 x FAST.poll_s = 9 s.
    assert time.monotonic() - started < 10 * FAST.poll_s
    assert fake.requests == Counter({i: 1 for i in range(TOTAL)})


def test_no_requests_while_the_link_is_down_and_the_missing_ones_soon_after_it_is_back(
    fake: FakeControlPlane, downloads: Path
) -> None:
    link_up = threading.Event()
    link_up.set()
    config = TransferConfig(chunk_size_bytes=CHUNK, window_chunks=8, chunk_timeout_s=30.0)
    fetcher = ChunkFetcher(downloads, config, fake.send_request, link_up=link_up)
    fake.fetcher = fetcher

    cut = threading.Event()

    def drop_the_request_with_index_10(index: int, nth: int) -> bytes | None:
        if index == 10 and not cut.is_set():
            cut.set()
            link_up.clear()  # the broker went away with this request (the rest of it, 10..15, too)
        if cut.is_set() and 10 <= index < 16 and nth == 1:
            return None
        return fake.chunk(index)

    fake.answer = drop_the_request_with_index_10
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(fetch(fetcher)))
    thread.start()
    deadline = time.monotonic() + 5
    while not (fake.requests[10] == 1 and not link_up.is_set()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    asked_while_down = sum(fake.requests.values())
    time.sleep(3 * FAST.poll_s)
    assert sum(fake.requests.values()) == asked_while_down  # nothing is sent into a dead link

    link_up.set()
    reconnected = time.monotonic()
    thread.join(timeout=10)
    assert outcome and outcome[0] == downloads / f"{DIGEST.removeprefix('sha256:')}.bundle"
    assert time.monotonic() - reconnected < FAST.reconnect_grace_s + 4 * FAST.poll_s  # not chunk_timeout_s (30 s)
    # Only chunks that had been requested but never arrived were asked for twice.
    assert {i for i, n in fake.requests.items() if n > 1} == set(range(10, 16))
    assert all(fake.requests[i] == 1 for i in range(10))


def test_chunk_requests_keep_under_the_bandwidth_cap(fake: FakeControlPlane, downloads: Path) -> None:
    rate = 600_000  # bytes/s: the 300 kB blob, less the bucket's initial burst, takes >= 0.3 s
    config = TransferConfig(chunk_size_bytes=CHUNK, window_chunks=8, bandwidth_limit_bytes_per_s=rate)
    fetcher = fake.attach(downloads, config)
    started = time.monotonic()

    assert fetch(fetcher).read_bytes() == BLOB
    assert time.monotonic() - started >= (len(BLOB) - rate * TransferConfig().bandwidth_burst_s - 8 * CHUNK) / rate


def test_a_cancel_during_a_bandwidth_wait_stops_the_fetch(fake: FakeControlPlane, downloads: Path) -> None:
    config = TransferConfig(chunk_size_bytes=CHUNK, window_chunks=8, bandwidth_limit_bytes_per_s=1024)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    started = time.monotonic()

    with pytest.raises(Cancelled):
        fetch(fake.attach(downloads, config), cancel=cancel)
    assert time.monotonic() - started < 2.0  # 300 kB at 1 kB/s would be five minutes
