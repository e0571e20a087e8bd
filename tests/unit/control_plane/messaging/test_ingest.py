"""Ingest handlers against a real SQLite file: what ends up stored, and what is published back.

Chunk answers are collected by a fake publisher and decoded with the agent's own decoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import event as sa_event
from sqlmodel import Session, SQLModel, select
from support.control_plane import FakePublisher

from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.tables import (
    Assignment,
    Deployment,
    DeploymentStatus,
    Device,
    DeviceEvent,
    ModelVersion,
)
from edgefleet.control_plane.messaging.ingest import ChunkErrorCode, Ingestor
from edgefleet.shared.errors import MessageError
from edgefleet.shared.wire.chunks import Chunk, ChunkError, ChunkRequest, chunk_count, decode_chunk_message
from edgefleet.shared.wire.messages import DeploymentEvent, DeviceStatus, ModelReport, Outcome, ReportedState
from edgefleet.shared.wire.topics import DEVICE_PUBLISHES, Leaf, device_topic

NOW = 1_800_000_000.0
CHUNK = 1024  # the smallest chunk size the wire allows: several chunks from a small bundle
MAX_CHUNK = 4096
MAX_REQUEST = 64 * 1024


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BundleStore]:
    store = BundleStore(tmp_path / "bundles", cache_bytes=8 * CHUNK)
    yield store
    store.close()


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def ingestor(engine: Engine, store: BundleStore, publisher: FakePublisher) -> Ingestor:
    return Ingestor(
        engine, store, publisher, max_chunk_bytes=MAX_CHUNK, max_chunk_request_bytes=MAX_REQUEST, clock=lambda: NOW
    )


@pytest.fixture
def bundle(store: BundleStore, tmp_path: Path) -> tuple[str, bytes]:
    """A stored 'bundle' of 3.5 chunks (the store does not care what the bytes are)."""
    data = os.urandom(3 * CHUNK + CHUNK // 2)
    tmp = store.new_temp_path()
    tmp.write_bytes(data)
    return store.put_file(tmp), data


def _digest(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def _add_model(engine: Engine, name: str, version: str, digest: str, size: int = 100) -> None:
    with Session(engine) as session:
        session.add(
            ModelVersion(name=name, version=version, runtime="onnx", bundle_digest=digest, bundle_size=size,
                         manifest_json="{}", created_at=datetime.now(UTC))
        )
        session.commit()


def _add_device(engine: Engine, device_id: str, assignments: dict[str, str] | None = None) -> None:
    with Session(engine) as session:
        session.add(Device(id=device_id, created_at=datetime.now(UTC)))
        session.flush()  # the assignments refer to it
        for name, version in (assignments or {}).items():
            session.add(Assignment(device_id=device_id, model_name=name, version=version))
        session.commit()


def _add_deployment(engine: Engine, device_id: str, name: str, digest: str, sequence: int) -> int:
    with Session(engine) as session:
        row = Deployment(device_id=device_id, model_name=name, version="1", bundle_digest=digest, sequence=sequence,
                         created_at=datetime.now(UTC), updated_at=datetime.now(UTC))
        session.add(row)
        session.commit()
        assert row.id is not None
        return row.id


def _deployment(engine: Engine, deployment_id: int) -> Deployment:
    with Session(engine) as session:
        row = session.get(Deployment, deployment_id)
        assert row is not None
        session.expunge(row)
        return row


def _device(engine: Engine, device_id: str) -> Device | None:
    with Session(engine) as session:
        row = session.get(Device, device_id)
        if row is not None:
            session.expunge(row)
        return row


def _snapshot(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, for "nothing changed" assertions."""
    with Session(engine) as session:
        return {
            table.name: [dict(row._mapping) for row in session.connection().execute(table.select())]
            for table in SQLModel.metadata.sorted_tables
        }


def _report(
    device_id: str = "dev-1", *, applied: int = 1, ts: float = NOW, models: tuple[ModelReport, ...] = ()
) -> bytes:
    return ReportedState(device_id=device_id, ts=ts, applied_sequence=applied, models=models,
                         agent={"version": "0.1.0", "arch": "x86_64"}).encode()


def _event(event_id: str = "e1", *, device_id: str = "dev-1", sequence: int = 1, digest: str = _digest(1),
           outcome: Outcome = Outcome.SUCCEEDED, error_code: str = "", message: str = "") -> bytes:
    return DeploymentEvent(event_id=event_id, device_id=device_id, ts=NOW - 5, sequence=sequence, name="m",
                           version="1", bundle_digest=digest, outcome=outcome, error_code=error_code,
                           message=message, duration_s=1.5).encode()


def _serving(digest: str, state: str = "serving", name: str = "m") -> ModelReport:
    return ModelReport(name=name, version="1", bundle_digest=digest, runtime="onnx", state=state)


# --- reported state ----------------------------------------------------------------------------


def test_a_first_reported_state_registers_the_device(engine: Engine, ingestor: Ingestor) -> None:
    payload = _report(applied=4, models=(_serving(_digest(1)),))

    ingestor.handle(device_topic("dev-1", Leaf.REPORTED), payload)

    device = _device(engine, "dev-1")
    assert device is not None
    assert device.applied_sequence == 4
    assert device.reported_ts == NOW
    assert json.loads(device.reported_json) == json.loads(payload)
    assert json.loads(device.agent_json) == {"version": "0.1.0", "arch": "x86_64"}
    assert device.created_at == datetime.fromtimestamp(NOW, UTC)
    assert device.last_seen_at == datetime.fromtimestamp(NOW, UTC)
    # It applied sequence 4 that this database never signed (restored from backup, say): the
    # next state must be signed above it or the device would refuse it.
    assert device.desired_sequence == 4


def test_a_report_showing_the_bundle_serving_completes_the_pending_deployment(
    engine: Engine, ingestor: Ingestor
) -> None:
    _add_device(engine, "dev-1")
    done = _add_deployment(engine, "dev-1", "m", _digest(1), sequence=1)
    other_digest = _add_deployment(engine, "dev-1", "other", _digest(2), sequence=1)
    failed_there = _add_deployment(engine, "dev-1", "third", _digest(3), sequence=1)

    ingestor.handle_reported_state("dev-1", _report(models=(
        _serving(_digest(1)),
        _serving(_digest(9), name="other"),  # serves another bundle than the one deployed
        _serving(_digest(3), state="failed", name="third"),
    )))

    assert _deployment(engine, done).status == DeploymentStatus.SUCCEEDED
    assert _deployment(engine, other_digest).status == DeploymentStatus.PENDING
    assert _deployment(engine, failed_there).status == DeploymentStatus.PENDING


def test_an_older_report_does_not_overwrite_a_newer_one(engine: Engine, ingestor: Ingestor) -> None:
    ingestor.handle_reported_state("dev-1", _report(applied=5, ts=NOW))
    ingestor.handle_reported_state("dev-1", _report(applied=4, ts=NOW + 10))  # a redelivered older one

    device = _device(engine, "dev-1")
    assert device is not None
    assert device.applied_sequence == 5
    assert device.reported_ts == NOW


# --- events ------------------------------------------------------------------------------------


def test_the_same_event_twice_is_stored_once(engine: Engine, ingestor: Ingestor) -> None:
    assert ingestor.handle_deployment_event("dev-1", _event("e1")) is True
    assert ingestor.handle_deployment_event("dev-1", _event("e1")) is False
    ingestor.handle(device_topic("dev-1", Leaf.EVENTS), _event("e1"))

    with Session(engine) as session:
        events = session.exec(select(DeviceEvent)).all()
        assert [(e.event_id, e.device_id, e.kind, e.ts) for e in events] == [("e1", "dev-1", "deployment", NOW - 5)]
        assert json.loads(events[0].payload_json)["outcome"] == "succeeded"
    # The event alone registered the device.
    assert _device(engine, "dev-1") is not None


def test_an_event_sets_the_outcome_of_the_matching_pending_deployment(engine: Engine, ingestor: Ingestor) -> None:
    _add_device(engine, "dev-1")
    target = _add_deployment(engine, "dev-1", "m", _digest(1), sequence=3)
    later = _add_deployment(engine, "dev-1", "m", _digest(1), sequence=9)  # not yet carried to the device
    other_bundle = _add_deployment(engine, "dev-1", "m", _digest(2), sequence=3)

    # Sequence 5: the state carrying deployment 3 was re-signed (same models, new sequence).
    ingestor.handle_deployment_event("dev-1", _event(
        sequence=5, outcome=Outcome.FAILED_ROLLED_BACK, error_code="runtime_load_failed", message="bad graph"
    ))

    row = _deployment(engine, target)
    assert (row.status, row.error_code, row.message) == (
        DeploymentStatus.FAILED_ROLLED_BACK, "runtime_load_failed", "bad graph"
    )
    assert row.updated_at == datetime.fromtimestamp(NOW, UTC)
    assert _deployment(engine, later).status == DeploymentStatus.PENDING
    assert _deployment(engine, other_bundle).status == DeploymentStatus.PENDING


def test_an_event_does_not_reopen_a_finished_deployment(engine: Engine, ingestor: Ingestor) -> None:
    _add_device(engine, "dev-1")
    target = _add_deployment(engine, "dev-1", "m", _digest(1), sequence=1)
    ingestor.handle_deployment_event("dev-1", _event("e1", outcome=Outcome.SUCCEEDED))
    ingestor.handle_deployment_event("dev-1", _event("e2", outcome=Outcome.REJECTED))

    assert _deployment(engine, target).status == DeploymentStatus.SUCCEEDED


# --- status ------------------------------------------------------------------------------------


def test_status_sets_online_and_last_seen(engine: Engine, ingestor: Ingestor) -> None:
    ingestor.handle(device_topic("dev-1", Leaf.STATUS), DeviceStatus(device_id="dev-1", online=True, ts=NOW).encode())
    device = _device(engine, "dev-1")
    assert device is not None and device.online is True
    assert device.last_seen_at == datetime.fromtimestamp(NOW, UTC)

    # The last will carries the time it was set (before the "online"): arrival order wins.
    ingestor.handle_status("dev-1", DeviceStatus(device_id="dev-1", online=False, ts=NOW - 100).encode())
    device = _device(engine, "dev-1")
    assert device is not None and device.online is False


# --- garbage -----------------------------------------------------------------------------------

_GARBAGE: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not json", b"hello"),
    ("not utf-8", b"\xff\xfe\x00garbage"),
    ("a list", b"[1, 2]"),
    ("no schema", b'{"device_id": "dev-1"}'),
    ("future schema", b'{"schema": "edgefleet.reported/v9", "device_id": "dev-1"}'),
    ("huge", b'{"schema": "' + b"x" * (300 * 1024) + b'"}'),
]

_OTHER_DEVICE: dict[Leaf, bytes] = {
    Leaf.REPORTED: _report("dev-2"),
    Leaf.EVENTS: _event(device_id="dev-2"),
    Leaf.STATUS: DeviceStatus(device_id="dev-2", online=True, ts=NOW).encode(),
}


@pytest.mark.parametrize("leaf", [Leaf.REPORTED, Leaf.EVENTS, Leaf.STATUS, Leaf.CHUNK_REQUEST])
@pytest.mark.parametrize(("label", "payload"), _GARBAGE, ids=[g[0] for g in _GARBAGE])
def test_garbage_on_any_topic_is_rejected_without_touching_the_database(
    engine: Engine, ingestor: Ingestor, publisher: FakePublisher, leaf: Leaf, label: str, payload: bytes
) -> None:
    _add_device(engine, "dev-1")
    before = _snapshot(engine)

    with pytest.raises(MessageError):
        ingestor.handle(device_topic("dev-1", leaf), payload)

    assert _snapshot(engine) == before
    assert publisher.sent == []


@pytest.mark.parametrize("leaf", list(_OTHER_DEVICE))
def test_a_payload_naming_another_device_is_rejected(engine: Engine, ingestor: Ingestor, leaf: Leaf) -> None:
    before = _snapshot(engine)
    with pytest.raises(MessageError, match="dev-2"):
        ingestor.handle(device_topic("dev-1", leaf), _OTHER_DEVICE[leaf])
    assert _snapshot(engine) == before


@pytest.mark.parametrize("topic", [
    device_topic("dev-1", Leaf.DESIRED),
    device_topic("dev-1", Leaf.CHUNK_DATA),
    "edgefleet/v1/devices/dev-1/unknown",
    "somewhere/else",
])
def test_topics_the_control_plane_does_not_ingest_are_rejected(engine: Engine, ingestor: Ingestor, topic: str) -> None:
    before = _snapshot(engine)
    with pytest.raises(MessageError):
        ingestor.handle(topic, _report())
    assert _snapshot(engine) == before


# --- chunk requests ----------------------------------------------------------------------------


def _chunk_request(digest: str, indices: tuple[int, ...], chunk_size: int = CHUNK) -> bytes:
    return ChunkRequest(bundle_digest=digest, chunk_size=chunk_size, indices=indices).encode()


def test_chunk_requests_are_answered_with_the_bundle_bytes(
    engine: Engine, ingestor: Ingestor, publisher: FakePublisher, bundle: tuple[str, bytes]
) -> None:
    digest, data = bundle
    _add_model(engine, "m", "1", digest, size=len(data))
    _add_device(engine, "dev-1", {"m": "1"})
    count = chunk_count(len(data), CHUNK)
    assert count == 4

    ingestor.handle(device_topic("dev-1", Leaf.CHUNK_REQUEST), _chunk_request(digest, (3, 0)))
    ingestor.handle(device_topic("dev-1", Leaf.CHUNK_REQUEST), _chunk_request(digest, (1, 2, 1)))

    assert {(topic, retain) for topic, _, retain in publisher.sent} == {(device_topic("dev-1", Leaf.CHUNK_DATA), False)}
    chunks = [decode_chunk_message(payload) for _, payload, _ in publisher.sent]
    assert all(isinstance(c, Chunk) for c in chunks)
    assert [c.index for c in chunks if isinstance(c, Chunk)] == [3, 0, 1, 2, 1]
    received = {c.index: c for c in chunks if isinstance(c, Chunk)}
    assert all(c.bundle_digest == digest and c.total_size == len(data) for c in received.values())
    assert len(received[3].data) == CHUNK // 2
    assembled = b"".join(received[i].data for i in range(count))
    assert assembled == data
    assert "sha256:" + hashlib.sha256(assembled).hexdigest() == digest


def _only_error(publisher: FakePublisher, device_id: str = "dev-1") -> ChunkError:
    assert len(publisher.sent) == 1
    topic, payload, retain = publisher.sent[0]
    assert (topic, retain) == (device_topic(device_id, Leaf.CHUNK_DATA), False)
    answer = decode_chunk_message(payload)
    assert isinstance(answer, ChunkError)
    return answer


def test_an_unknown_digest_gets_a_chunk_error(engine: Engine, ingestor: Ingestor, publisher: FakePublisher) -> None:
    _add_device(engine, "dev-1")
    ingestor.handle_chunk_request("dev-1", _chunk_request(_digest(42), (0,)))

    error = _only_error(publisher)
    assert (error.bundle_digest, error.code) == (_digest(42), ChunkErrorCode.BUNDLE_NOT_FOUND)


def test_a_bundle_assigned_to_another_device_is_not_served(
    engine: Engine, ingestor: Ingestor, publisher: FakePublisher, bundle: tuple[str, bytes]
) -> None:
    digest, data = bundle
    _add_model(engine, "m", "1", digest, size=len(data))
    _add_device(engine, "owner", {"m": "1"})
    _add_device(engine, "dev-1")

    ingestor.handle_chunk_request("dev-1", _chunk_request(digest, (0,)))

    assert _only_error(publisher).code == ChunkErrorCode.BUNDLE_NOT_ASSIGNED


@pytest.mark.parametrize(
    ("chunk_size", "indices", "code"),
    [
        (MAX_CHUNK + 1024, (0,), ChunkErrorCode.CHUNK_TOO_LARGE),
        (CHUNK, (0, 4), ChunkErrorCode.CHUNK_OUT_OF_RANGE),
        (MAX_CHUNK, tuple(range(MAX_REQUEST // MAX_CHUNK + 1)), ChunkErrorCode.REQUEST_TOO_LARGE),
    ],
)
def test_requests_past_the_limits_get_one_chunk_error_and_no_chunks(
    engine: Engine,
    ingestor: Ingestor,
    publisher: FakePublisher,
    bundle: tuple[str, bytes],
    chunk_size: int,
    indices: tuple[int, ...],
    code: str,
) -> None:
    digest, data = bundle
    _add_model(engine, "m", "1", digest, size=len(data))
    _add_device(engine, "dev-1", {"m": "1"})

    ingestor.handle_chunk_request("dev-1", _chunk_request(digest, indices, chunk_size))

    error = _only_error(publisher)
    assert (error.bundle_digest, error.code) == (digest, code)


# --- dispatch table and batches ------------------------------------------------------------------


def test_every_leaf_a_device_publishes_has_a_handler(ingestor: Ingestor) -> None:
    assert set(ingestor.routes) == set(DEVICE_PUBLISHES)


def test_a_batch_is_applied_in_arrival_order_like_one_message_at_a_time(engine: Engine, ingestor: Ingestor) -> None:
    _add_device(engine, "dev-1")
    deployment = _add_deployment(engine, "dev-1", "m", _digest(1), sequence=1)
    messages = [
        (device_topic("dev-1", Leaf.STATUS), DeviceStatus(device_id="dev-1", online=True, ts=NOW).encode()),
        (device_topic("dev-2", Leaf.REPORTED), _report("dev-2", applied=3)),
        (device_topic("dev-2", Leaf.REPORTED), _report("dev-2", applied=2, ts=NOW + 1)),  # older: ignored
        (device_topic("dev-1", Leaf.EVENTS), _event("e1")),
        (device_topic("dev-1", Leaf.EVENTS), _event("e1")),  # a duplicate within the batch
        (device_topic("dev-1", Leaf.STATUS), DeviceStatus(device_id="dev-1", online=False, ts=NOW).encode()),
    ]
    assert ingestor.handle_batch(messages) == [None] * len(messages)

    with Session(engine) as session:
        assert [e.event_id for e in session.exec(select(DeviceEvent)).all()] == ["e1"]
    assert _deployment(engine, deployment).status == DeploymentStatus.SUCCEEDED
    dev1, dev2 = _device(engine, "dev-1"), _device(engine, "dev-2")
    assert dev1 is not None and dev1.online is False  # arrival order: the last status wins
    assert dev2 is not None and dev2.applied_sequence == 3


def test_garbage_in_a_batch_is_rejected_alone(engine: Engine, ingestor: Ingestor) -> None:
    results = ingestor.handle_batch([
        (device_topic("dev-1", Leaf.REPORTED), b"not json"),
        (device_topic("dev-1", Leaf.REPORTED), _report("dev-1", applied=2)),
        (device_topic("dev-1", Leaf.STATUS), DeviceStatus(device_id="dev-9", online=True, ts=NOW).encode()),
        (device_topic("dev-1", Leaf.DESIRED), b"{}"),
        ("elsewhere/dev-1/reported", _report("dev-1")),
    ])

    assert [type(r) for r in results] == [MessageError, type(None), MessageError, MessageError, MessageError]
    device = _device(engine, "dev-1")
    assert device is not None and device.applied_sequence == 2 and device.online is False


def test_a_batch_uses_one_transaction(engine: Engine, ingestor: Ingestor) -> None:
    commits: list[object] = []

    def count(conn: object) -> None:
        commits.append(conn)

    sa_event.listen(engine, "commit", count)
    try:
        ingestor.handle_batch([(device_topic(f"dev-{i}", Leaf.REPORTED), _report(f"dev-{i}")) for i in range(50)])
    finally:
        sa_event.remove(engine, "commit", count)
    assert len(commits) == 1
    assert all(_device(engine, f"dev-{i}") is not None for i in range(50))


def test_a_batch_that_hits_a_constraint_is_applied_one_message_at_a_time(
    engine: Engine, ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestor.handle_deployment_event("dev-1", _event("e1"))
    # Another replica commits e1 between our duplicate check and our commit: the check misses it.
    calls = {"n": 0}
    real = Ingestor._apply_event

    def racing(self: Ingestor, session: Session, device_id: str, event: DeploymentEvent, now: float) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            session.add(DeviceEvent(event_id=event.event_id, device_id=device_id, ts=event.ts, kind="deployment",
                                    payload_json="{}", received_at=datetime.fromtimestamp(NOW, UTC)))
            return True
        return real(self, session, device_id, event, now)

    monkeypatch.setattr(Ingestor, "_apply_event", racing)
    results = ingestor.handle_batch([
        (device_topic("dev-1", Leaf.EVENTS), _event("e1")),
        (device_topic("dev-2", Leaf.REPORTED), _report("dev-2", applied=7)),
    ])

    assert results == [None, None]
    dev2 = _device(engine, "dev-2")
    assert dev2 is not None and dev2.applied_sequence == 7  # not lost with the failed batch
    with Session(engine) as session:
        assert [e.event_id for e in session.exec(select(DeviceEvent)).all()] == ["e1"]


def test_a_chunk_request_in_a_batch_is_served(
    ingestor: Ingestor, engine: Engine, publisher: FakePublisher, bundle: tuple[str, bytes]
) -> None:
    digest, data = bundle
    _add_model(engine, "m", "1", digest, size=len(data))
    _add_device(engine, "dev-1", {"m": "1"})

    results = ingestor.handle_batch([(device_topic("dev-1", Leaf.CHUNK_REQUEST), _chunk_request(digest, (0,)))])

    assert results == [None]
    [(topic, payload, _)] = publisher.sent
    assert topic == device_topic("dev-1", Leaf.CHUNK_DATA)
    chunk = decode_chunk_message(payload)
    assert isinstance(chunk, Chunk) and chunk.data == data[:CHUNK]


_HUGE = "1" + "0" * 400  # a 400-digit number: fits no column, no float, no u64


def _with_number(message: bytes, field: str, number: str) -> bytes:
    raw = json.loads(message)
    raw[field] = 0  # a placeholder the number's text replaces, so it stays exactly as sent
    return json.dumps(raw).replace(f'"{field}": 0', f'"{field}": {number}').encode()


_UNFIT = [_HUGE, f"-{_HUGE}", f"{_HUGE}.5", "1e400"]
_NUMBER_CASES = [
    *[(leaf, field, n) for leaf, field in [(Leaf.STATUS, "ts"), (Leaf.REPORTED, "ts"), (Leaf.EVENTS, "ts"),
                                          (Leaf.EVENTS, "duration_s")] for n in _UNFIT],
    # integer columns are signed 64-bit: one past the largest is refused too
    *[(leaf, field, n) for leaf, field in [(Leaf.REPORTED, "applied_sequence"), (Leaf.EVENTS, "sequence")]
      for n in [*_UNFIT, "9223372036854775808"]],
]


@pytest.mark.parametrize(("leaf", "field", "number"), _NUMBER_CASES)
def test_a_number_that_does_not_fit_is_a_message_error_never_another_exception(
    engine: Engine, ingestor: Ingestor, leaf: Leaf, field: str, number: str
) -> None:
    _add_device(engine, "dev-1")
    valid = {
        Leaf.STATUS: DeviceStatus(device_id="dev-1", online=True, ts=NOW).encode(),
        Leaf.REPORTED: _report("dev-1"),
        Leaf.EVENTS: _event(),
    }[leaf]
    payload = _with_number(valid, field, number)
    before = _snapshot(engine)

    results = ingestor.handle_batch([(device_topic("dev-1", leaf), payload)])

    assert len(results) == 1 and isinstance(results[0], MessageError)
    assert _snapshot(engine) == before
