"""Desired states that a broker lost reach their device anyway; deployments made with the broker down say so."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, update
from sqlmodel import Session, col
from support.control_plane import FakePublisher

from edgefleet.control_plane.db.tables import DeploymentStatus, Device, ModelVersion
from edgefleet.control_plane.services.desired_states import QUEUED_MESSAGE, DesiredStateService
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.topics import Leaf, device_topic

TTL_S = 1000.0
T0 = 1_800_000_000.0
GRACE_S = 60.0


@pytest.fixture
def engine(engine: Engine) -> Iterator[Engine]:
    with Session(engine) as session:
        for device_id in ("dev-1", "dev-2", "dev-3"):
            session.add(Device(id=device_id, created_at=datetime.now(UTC)))
        session.add(ModelVersion(name="m", version="1", runtime="onnx", bundle_digest="sha256:" + "1" * 64,
                                 bundle_size=1000, manifest_json="{}", created_at=datetime.now(UTC)))
        session.commit()
    yield engine


def _set(engine: Engine, device_id: str, **values: object) -> None:
    with Session(engine) as session:
        session.exec(update(Device).where(col(Device.id) == device_id).values(**values))  # type: ignore[call-overload]
        session.commit()


def test_a_deployment_made_while_the_broker_is_down_is_accepted_and_says_it_is_queued(engine: Engine) -> None:
    up = False
    service = DesiredStateService(FakePublisher(), SigningKey.generate(), ttl_s=TTL_S, broker_up=lambda: up)
    with Session(engine) as session:
        (queued,) = service.assign(session, ["dev-1"], "m", "1", now=T0)
        up = True
        (sent,) = service.assign(session, ["dev-2"], "m", "1", now=T0)

        assert (queued.status, queued.message) == (DeploymentStatus.PENDING, QUEUED_MESSAGE)
        assert "broker" in queued.message and queued.message.startswith("queued")
        assert (sent.status, sent.message) == (DeploymentStatus.PENDING, "")


def test_online_devices_whose_report_lags_get_their_stored_state_again(engine: Engine) -> None:
    publisher = FakePublisher()
    service = DesiredStateService(publisher, SigningKey.generate(), ttl_s=TTL_S)
    with Session(engine) as session:
        service.assign(session, ["dev-1", "dev-2", "dev-3"], "m", "1", now=T0)
    envelopes = {topic: payload for topic, payload, _ in publisher.sent}
    _set(engine, "dev-1", online=True, applied_sequence=0)  # lags: never got it
    _set(engine, "dev-2", online=True, applied_sequence=1)  # has it
    _set(engine, "dev-3", online=False, applied_sequence=0)  # offline: gets the retained state on connect
    publisher.sent.clear()

    with Session(engine) as session:
        assert service.republish_lagging(session, now=T0 + GRACE_S - 1, grace_s=GRACE_S) == []  # still in progress
        assert service.republish_lagging(session, now=T0 + GRACE_S, grace_s=GRACE_S) == ["dev-1"]

    topic = device_topic("dev-1", Leaf.DESIRED)
    assert publisher.sent == [(topic, envelopes[topic], True)]  # the stored envelope, unchanged, retained
