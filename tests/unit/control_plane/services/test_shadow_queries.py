"""Shadows on the control plane: which devices are listed (a query on the ``shadow`` table), and
what removing or promoting a shadow leaves in it. A real SQLite file, a fake publisher."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select
from support.control_plane import FakePublisher

from edgefleet.control_plane.api.schemas import device_shadows_public
from edgefleet.control_plane.db.tables import Assignment, Device, ModelVersion, Shadow
from edgefleet.control_plane.services.desired_states import DesiredStateService
from edgefleet.control_plane.services.shadows import find_shadows
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.messages import ReportedState, ShadowReport, verify_desired_state

T0 = 1_800_000_000.0
NOW = datetime.fromtimestamp(T0, UTC)


@pytest.fixture
def engine(engine: Engine) -> Iterator[Engine]:
    with Session(engine) as session:
        for n, version in enumerate(["1.0.0", "2.0.0"], start=1):
            for name in ("clf", "det"):
                session.add(
                    ModelVersion(
                        name=name, version=version, runtime="onnx", bundle_digest=_digest(name, n),
                        bundle_size=100, manifest_json="{}", created_at=NOW,
                    )
                )
        session.add_all([Device(id=device_id, created_at=NOW) for device_id in ("d1", "d2", "d3", "d4")])
        session.flush()
        for device_id in ("d1", "d2", "d3", "d4"):
            session.add(Assignment(device_id=device_id, model_name="clf", version="1.0.0"))
            session.add(Assignment(device_id=device_id, model_name="det", version="1.0.0"))
        session.add(_shadow("d1", "clf"))
        session.add(_shadow("d2", "clf", removed=True))
        session.add(_shadow("d3", "det"))
        session.commit()
    yield engine


def _digest(name: str, n: int) -> str:
    return "sha256:" + (f"{n:02x}" * 32 if name == "clf" else f"{n + 16:02x}" * 32)


def _shadow(device_id: str, model: str, *, removed: bool = False) -> Shadow:
    return Shadow(
        device_id=device_id, model_name=model, version="2.0.0", bundle_digest=_digest(model, 2), sample_rate=0.5,
        created_at=NOW, removed_at=NOW if removed else None,
    )


def _ids(engine: Engine, **filters: str | int) -> list[str]:
    with Session(engine) as session:
        limit = int(filters.pop("limit", 100))
        offset = int(filters.pop("offset", 0))
        found = find_shadows(session, limit=limit, offset=offset, **filters)  # type: ignore[arg-type]
        return [d.device.id for d in found]


def test_devices_with_a_shadow_row_are_found_by_model_device_and_page(engine: Engine) -> None:
    assert _ids(engine) == ["d1", "d2", "d3"]  # d4 never had one
    assert _ids(engine, model="clf") == ["d1", "d2"]
    assert _ids(engine, model="det") == ["d3"]
    assert _ids(engine, device="d2") == ["d2"]
    assert _ids(engine, model="det", device="d1") == []
    assert _ids(engine, limit=1, offset=1) == ["d2"]  # pages count devices


def test_a_removed_shadow_is_listed_only_while_its_device_still_reports_it(engine: Engine) -> None:
    report = ShadowReport(
        name="clf", serving_version="1.0.0", version="2.0.0", bundle_digest=_digest("clf", 2), state="running"
    )
    with Session(engine) as session:
        [found] = find_shadows(session, device="d2", limit=10, offset=0)
        assert device_shadows_public(found.device, found.assignments, found.shadows) == []
        found.device.reported_json = (
            ReportedState(device_id="d2", ts=T0, applied_sequence=1, shadows=(report,)).encode().decode()
        )
        [row] = device_shadows_public(found.device, found.assignments, found.shadows)
    assert (row.model_name, row.version, row.sample_rate, row.report is not None) == ("clf", None, None, True)


def test_clearing_a_shadow_keeps_its_row_removed_and_drops_it_from_the_desired_state(engine: Engine) -> None:
    publisher, key = FakePublisher(), SigningKey.generate()
    service = DesiredStateService(publisher, key, ttl_s=100.0)
    with Session(engine) as session:
        assert service.clear_shadow(session, ["d1", "d4"], "clf", now=T0 + 1) == ["d1"]
        assert service.clear_shadow(session, ["d1"], "clf", now=T0 + 2) == []  # nothing active is left
        row = session.exec(select(Shadow).where(Shadow.device_id == "d1")).one()
        assert row.removed_at == datetime.fromtimestamp(T0 + 1, UTC) and row.version == "2.0.0"
    [(topic, envelope, _)] = publisher.sent
    assert topic.endswith("/d1/desired")
    state = verify_desired_state(
        envelope, trusted_keys={key.key_id: key.public_key}, device_id="d1", last_sequence=0, now=T0 + 1
    )
    assert [(m.name, m.shadow) for m in state.models] == [("clf", None), ("det", None)]
    assert _ids(engine, model="clf") == ["d1", "d2"]  # still listed while d1 may report it


def test_deploying_the_candidate_promotes_it_and_marks_the_shadow_removed(engine: Engine) -> None:
    service = DesiredStateService(FakePublisher(), SigningKey.generate(), ttl_s=100.0)
    with Session(engine) as session:
        service.assign(session, ["d3"], "det", "2.0.0", now=T0 + 5)
        row = session.exec(select(Shadow).where(Shadow.device_id == "d3")).one()
        assert row.removed_at == datetime.fromtimestamp(T0 + 5, UTC)
        # Deploying another version of a shadowed model leaves the shadow as it was.
        service.assign(session, ["d1"], "clf", "1.0.0", now=T0 + 6)
        assert session.exec(select(Shadow).where(Shadow.device_id == "d1")).one().removed_at is None
