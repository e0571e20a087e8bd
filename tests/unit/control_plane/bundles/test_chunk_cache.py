"""Serving one bundle to many devices over MQTT costs one read of it from disk, not one per device.

Devices are simulated at the control plane's chunk handler (the real :class:`Ingestor` on a real
SQLite file, with a publisher that collects and decodes what would go out); disk reads are counted
by wrapping ``os.pread`` as the bundle store calls it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, event
from sqlmodel import Session, select

from edgefleet.control_plane.bundles import store as bundle_store
from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.tables import Assignment, Device, ModelVersion
from edgefleet.control_plane.messaging.ingest import ChunkErrorCode, Ingestor
from edgefleet.shared.wire.chunks import Chunk, ChunkError, ChunkRequest, chunk_count, decode_chunk_message
from edgefleet.shared.wire.topics import Leaf, device_topic

CHUNK = 4096
WINDOW = 8  # indices per request, as an agent tops up half of a 16-chunk window
DEVICES = [f"dev-{i}" for i in range(4)]
_PREAD = os.pread


class Collector:
    def __init__(self) -> None:
        self.by_topic: dict[str, list[bytes]] = {}

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self.by_topic.setdefault(topic, []).append(payload)


class DiskReads:
    """Counts the bundle store's ``os.pread`` calls and bytes."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    def __call__(self, fd: int, n: int, offset: int) -> bytes:
        data = _PREAD(fd, n, offset)
        self.calls += 1
        self.bytes += len(data)
        return data


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> DiskReads:
    counter = DiskReads()
    monkeypatch.setattr(bundle_store.os, "pread", counter)
    return counter


def _setup(
    engine: Engine, tmp_path: Path, size: int, cache_bytes: int, clock: Callable[[], float] = time.time
) -> tuple[BundleStore, Ingestor, Collector, bytes, str]:
    store = BundleStore(tmp_path / "bundles", cache_bytes=cache_bytes)
    blob = os.urandom(size)
    tmp = store.new_temp_path()
    tmp.write_bytes(blob)
    digest = store.put_file(tmp)
    with Session(engine) as session:
        session.add(
            ModelVersion(
                name="big",
                version="1",
                runtime="onnx",
                bundle_digest=digest,
                bundle_size=size,
                manifest_json="{}",
                created_at=datetime.now(UTC),
            )
        )
        for device_id in DEVICES:
            session.add(Device(id=device_id, created_at=datetime.now(UTC)))
            session.flush()
            session.add(Assignment(device_id=device_id, model_name="big", version="1"))
        session.commit()
    collector = Collector()
    ingestor = Ingestor(
        engine, store, collector, max_chunk_bytes=CHUNK, max_chunk_request_bytes=WINDOW * CHUNK, clock=clock
    )
    return store, ingestor, collector, blob, digest


def _request(ingestor: Ingestor, device_id: str, digest: str, indices: range) -> None:
    payload = ChunkRequest(bundle_digest=digest, chunk_size=CHUNK, indices=tuple(indices)).encode()
    ingestor.handle(device_topic(device_id, Leaf.CHUNK_REQUEST), payload)


def _received(collector: Collector, device_id: str) -> bytes:
    chunks = [decode_chunk_message(p) for p in collector.by_topic[device_topic(device_id, Leaf.CHUNK_DATA)]]
    assert all(isinstance(c, Chunk) for c in chunks)
    return b"".join(c.data for c in sorted(chunks, key=lambda c: c.index))  # type: ignore[union-attr]


def _serve_one_after_another(ingestor: Ingestor, digest: str, total: int) -> None:
    for device_id in DEVICES:
        for start in range(0, total, WINDOW):
            _request(ingestor, device_id, digest, range(start, min(total, start + WINDOW)))


def test_devices_fetching_together_cost_one_read_of_the_bundle(
    engine: Engine, tmp_path: Path, reads: DiskReads
) -> None:
    size = 96 * CHUNK + 123
    store, ingestor, collector, blob, digest = _setup(engine, tmp_path, size, cache_bytes=4 * size)
    total = chunk_count(size, CHUNK)

    # A rollout wave: the devices' requests interleave, each a few windows behind the previous one.
    for step in range(0, total + 2 * WINDOW * len(DEVICES), WINDOW):
        for lag, device_id in enumerate(DEVICES):
            start = step - lag * 2 * WINDOW
            if 0 <= start < total:
                _request(ingestor, device_id, digest, range(start, min(total, start + WINDOW)))

    assert all(_received(collector, d) == blob for d in DEVICES)
    assert reads.calls == total and reads.bytes == size
    store.close()


def test_devices_fetching_one_after_another_cost_one_read_of_the_bundle(
    engine: Engine, tmp_path: Path, reads: DiskReads
) -> None:
    size = 96 * CHUNK + 123
    store, ingestor, collector, blob, digest = _setup(engine, tmp_path, size, cache_bytes=2 * size)
    total = chunk_count(size, CHUNK)

    _serve_one_after_another(ingestor, digest, total)

    assert all(_received(collector, d) == blob for d in DEVICES)
    assert reads.bytes == size
    store.close()


def test_a_bundle_larger_than_the_cache_is_not_read_in_full_for_every_device(
    engine: Engine, tmp_path: Path, reads: DiskReads
) -> None:
    """A plain LRU cache reads such a bundle completely for every device that comes later (each read
    evicts the chunk the next device needs soonest); the store keeps a stable part of it instead."""
    size = 160 * CHUNK
    cache = 80 * CHUNK
    store, ingestor, collector, blob, digest = _setup(engine, tmp_path, size, cache_bytes=cache)
    total = chunk_count(size, CHUNK)

    _serve_one_after_another(ingestor, digest, total)

    assert all(_received(collector, d) == blob for d in DEVICES)
    later_devices = reads.bytes - size
    # Each later device reads only what does not fit (a plain LRU: the whole bundle, every time).
    assert store.stats["chunk_hits"] > 0
    assert later_devices <= (len(DEVICES) - 1) * (size - cache * 7 // 8)
    store.close()


def test_the_database_is_asked_once_per_grant_period_and_a_withdrawn_bundle_is_refused_after_it(
    engine: Engine, tmp_path: Path
) -> None:
    now = [1_800_000_000.0]
    store, ingestor, collector, blob, digest = _setup(engine, tmp_path, 64 * CHUNK, 1 << 20, clock=lambda: now[0])
    queries: list[str] = []
    event.listen(
        engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statement.startswith("SELECT") and queries.append(statement),
    )
    device = DEVICES[0]

    for start in range(0, 64, WINDOW):
        _request(ingestor, device, digest, range(start, start + WINDOW))
    assert len(queries) == 1  # one database check for a whole transfer within the period
    assert _received(collector, device) == blob

    with Session(engine) as session:  # the deployment is withdrawn
        for row in session.exec(select(Assignment).where(Assignment.device_id == device)).all():
            session.delete(row)
        session.commit()
    queries.clear()
    now[0] += 2.0  # the default chunk_grant_ttl_s
    _request(ingestor, device, digest, range(WINDOW))

    assert queries  # the grant expired: the database was asked again
    answer = decode_chunk_message(collector.by_topic[device_topic(device, Leaf.CHUNK_DATA)][-1])
    assert isinstance(answer, ChunkError) and answer.code == ChunkErrorCode.BUNDLE_NOT_ASSIGNED
    store.close()
