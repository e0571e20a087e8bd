"""Desired states: the pure computation, and the service's sequence, signature, expiry and re-signing.

The service runs against a real SQLite file and a fake publisher that records what it was asked
to publish; the published envelopes are checked with the agent's own verifier.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select
from support.control_plane import FakePublisher

from edgefleet.control_plane.db.tables import Assignment, Deployment, DeploymentStatus, Device, ModelVersion
from edgefleet.control_plane.services.desired_states import DesiredStateService, desired_state_for, is_past_half_life
from edgefleet.shared.errors import MessageError, NotFoundError, SignatureError
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.messages import MAX_MODELS, DesiredState, ModelDirective, verify_desired_state
from edgefleet.shared.wire.topics import Leaf, device_topic

TTL_S = 1000.0
T0 = 1_800_000_000.0


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def service(publisher: FakePublisher, key: SigningKey) -> DesiredStateService:
    return DesiredStateService(publisher, key, ttl_s=TTL_S)


def _digest(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def _model(name: str, version: str, n: int, runtime: str = "onnx") -> ModelVersion:
    return ModelVersion(
        name=name,
        version=version,
        runtime=runtime,
        bundle_digest=_digest(n),
        bundle_size=1000 + n,
        manifest_json="{}",
        created_at=datetime.now(UTC),
    )


def _seed(engine: Engine, devices: list[str], models: list[ModelVersion]) -> None:
    with Session(engine) as session:
        for device_id in devices:
            session.add(Device(id=device_id, created_at=datetime.now(UTC)))
        session.add_all(models)
        session.commit()


def _verify(envelope: bytes, key: SigningKey, device_id: str, now: float, last: int = 0) -> DesiredState:
    return verify_desired_state(
        envelope, trusted_keys={key.key_id: key.public_key}, device_id=device_id, last_sequence=last, now=now
    )


# --- the pure computation ----------------------------------------------------------------------


def test_desired_state_for_lists_each_assigned_version_sorted_by_name() -> None:
    rows = [_model("zeta", "2.0", 2, runtime="tflite"), _model("alpha", "1.0", 1)]

    state = desired_state_for("dev-1", 7, rows, issued_at=T0, ttl_s=TTL_S)

    assert state.device_id == "dev-1"
    assert state.sequence == 7
    assert state.issued_at == T0
    assert state.expires_at == T0 + TTL_S
    assert state.models == (
        ModelDirective(name="alpha", version="1.0", bundle_digest=_digest(1), bundle_size=1001, runtime="onnx"),
        ModelDirective(name="zeta", version="2.0", bundle_digest=_digest(2), bundle_size=1002, runtime="tflite"),
    )
    # Same rows in another order, same bytes: nothing depends on query order.
    assert desired_state_for("dev-1", 7, rows[::-1], issued_at=T0, ttl_s=TTL_S).encode() == state.encode()


def test_desired_state_for_no_models_is_an_empty_state() -> None:
    state = desired_state_for("dev-1", 1, [], issued_at=T0, ttl_s=TTL_S)
    assert state.models == ()
    assert DesiredState.decode(state.encode()) == state


@pytest.mark.parametrize(
    ("now", "expected"),
    [(T0, False), (T0 + TTL_S / 2 - 0.001, False), (T0 + TTL_S / 2, True), (T0 + TTL_S * 2, True)],
)
def test_is_past_half_life(now: float, expected: bool) -> None:
    assert is_past_half_life(T0, T0 + TTL_S, now) is expected


# --- assign ------------------------------------------------------------------------------------


def test_assign_publishes_a_retained_state_signed_with_the_online_key(
    engine: Engine, service: DesiredStateService, publisher: FakePublisher, key: SigningKey
) -> None:
    _seed(engine, ["dev-1"], [_model("mlp", "1.0", 1)])

    with Session(engine) as session:
        deployments = service.assign(session, ["dev-1"], "mlp", "1.0", now=T0)

    assert len(publisher.sent) == 1
    topic, envelope, retain = publisher.sent[0]
    assert topic == device_topic("dev-1", Leaf.DESIRED)
    assert retain is True
    state = _verify(envelope, key, "dev-1", now=T0 + 1)
    assert state.sequence == 1
    assert state.issued_at == T0
    assert state.expires_at == T0 + TTL_S
    assert [(m.name, m.version, m.bundle_digest, m.bundle_size) for m in state.models] == [
        ("mlp", "1.0", _digest(1), 1001)
    ]
    # What is stored is what was published, and the deployment names the carrying sequence.
    with Session(engine) as session:
        device = session.get(Device, "dev-1")
        assert device is not None
        assert device.desired_sequence == 1
        assert device.desired_envelope.encode() == envelope
        assert (device.desired_issued_at, device.desired_expires_at) == (T0, T0 + TTL_S)
    assert [(d.device_id, d.sequence, d.status, d.bundle_digest) for d in deployments] == [
        ("dev-1", 1, DeploymentStatus.PENDING, _digest(1))
    ]


def test_the_envelope_does_not_verify_with_another_key_nor_for_another_device(
    engine: Engine, service: DesiredStateService, publisher: FakePublisher, key: SigningKey
) -> None:
    _seed(engine, ["dev-1"], [_model("mlp", "1.0", 1)])
    with Session(engine) as session:
        service.assign(session, ["dev-1"], "mlp", "1.0", now=T0)
    envelope = publisher.sent[0][1]

    with pytest.raises(SignatureError):
        _verify(envelope, SigningKey.generate(), "dev-1", now=T0)
    with pytest.raises(Exception, match="for device 'dev-1'"):
        _verify(envelope, key, "dev-2", now=T0)
    with pytest.raises(Exception, match="expired"):
        _verify(envelope, key, "dev-1", now=T0 + TTL_S)


def test_each_assign_bumps_the_sequence_and_carries_all_the_device_models(
    engine: Engine, service: DesiredStateService, publisher: FakePublisher, key: SigningKey
) -> None:
    _seed(engine, ["dev-1", "dev-2"], [_model("a", "1", 1), _model("b", "1", 2), _model("b", "2", 3)])

    with Session(engine) as session:
        service.assign(session, ["dev-1", "dev-2"], "a", "1", now=T0)
        service.assign(session, ["dev-1"], "b", "1", now=T0 + 1)
        service.assign(session, ["dev-1"], "b", "2", now=T0 + 2)

    states = [_verify(p, key, t.split("/")[-2], now=T0 + 3) for t, p, _ in publisher.sent]
    dev1 = [s for s in states if s.device_id == "dev-1"]
    assert [s.sequence for s in dev1] == [1, 2, 3]
    assert [(m.name, m.version) for m in dev1[-1].models] == [("a", "1"), ("b", "2")]
    dev2 = [s for s in states if s.device_id == "dev-2"]
    assert [(s.sequence, [m.name for m in s.models]) for s in dev2] == [(1, ["a"])]
    with Session(engine) as session:
        assignments = session.exec(select(Assignment).where(Assignment.device_id == "dev-1")).all()
        assert sorted((a.model_name, a.version) for a in assignments) == [("a", "1"), ("b", "2")]


def test_a_newer_assignment_supersedes_the_pending_deployment_of_the_same_model(
    engine: Engine, service: DesiredStateService
) -> None:
    _seed(engine, ["dev-1"], [_model("m", "1", 1), _model("m", "2", 2), _model("other", "1", 3)])
    with Session(engine) as session:
        service.assign(session, ["dev-1"], "m", "1", now=T0)
        service.assign(session, ["dev-1"], "other", "1", now=T0)
        service.assign(session, ["dev-1"], "m", "2", now=T0 + 1)

    with Session(engine) as session:
        rows = session.exec(select(Deployment).order_by(Deployment.id)).all()
        assert [(d.model_name, d.version, d.sequence, d.status) for d in rows] == [
            ("m", "1", 1, DeploymentStatus.SUPERSEDED),
            ("other", "1", 2, DeploymentStatus.PENDING),
            ("m", "2", 3, DeploymentStatus.PENDING),
        ]


def test_assign_to_an_unknown_device_or_version_changes_nothing(
    engine: Engine, service: DesiredStateService, publisher: FakePublisher
) -> None:
    _seed(engine, ["dev-1"], [_model("m", "1", 1)])

    with Session(engine) as session:
        with pytest.raises(NotFoundError, match="ghost"):
            service.assign(session, ["dev-1", "ghost"], "m", "1", now=T0)
        with pytest.raises(NotFoundError, match="version '9'"):
            service.assign(session, ["dev-1"], "m", "9", now=T0)
        with pytest.raises(MessageError):
            service.assign(session, [], "m", "1", now=T0)

    assert publisher.sent == []
    with Session(engine) as session:
        assert session.exec(select(Assignment)).all() == []
        assert session.exec(select(Deployment)).all() == []
        device = session.get(Device, "dev-1")
        assert device is not None and device.desired_sequence == 0


def test_assign_refuses_more_models_than_a_desired_state_may_carry(
    engine: Engine, service: DesiredStateService, publisher: FakePublisher
) -> None:
    names = [f"m{i}" for i in range(MAX_MODELS + 1)]
    _seed(engine, ["dev-1"], [_model(name, "1", i) for i, name in enumerate(names)])
    with Session(engine) as session:
        for name in names[:MAX_MODELS]:
            service.assign(session, ["dev-1"], name, "1", now=T0)
        published = len(publisher.sent)
        with pytest.raises(MessageError, match="at most"):
            service.assign(session, ["dev-1"], names[-1], "1", now=T0)

    assert len(publisher.sent) == published
    with Session(engine) as session:
        assert len(session.exec(select(Assignment)).all()) == MAX_MODELS
        device = session.get(Device, "dev-1")
        assert device is not None and device.desired_sequence == MAX_MODELS


# --- unassign ----------------------------------------------------------------------------------


def test_unassign_publishes_a_state_without_the_model(
    engine: Engine, service: DesiredStateService, publisher: FakePublisher, key: SigningKey
) -> None:
    _seed(engine, ["dev-1"], [_model("a", "1", 1), _model("b", "1", 2)])
    with Session(engine) as session:
        service.assign(session, ["dev-1"], "a", "1", now=T0)
        service.assign(session, ["dev-1"], "b", "1", now=T0)
        assert service.unassign(session, ["dev-1"], "a", now=T0 + 5) == ["dev-1"]
        assert service.unassign(session, ["dev-1"], "a", now=T0 + 6) == []  # nothing left to remove

    assert len(publisher.sent) == 3
    state = _verify(publisher.sent[-1][1], key, "dev-1", now=T0 + 7, last=2)
    assert state.sequence == 3
    assert [m.name for m in state.models] == ["b"]


# --- re-signing --------------------------------------------------------------------------------


def test_resign_expiring_re_signs_only_states_past_half_their_ttl(
    engine: Engine, service: DesiredStateService, publisher: FakePublisher, key: SigningKey
) -> None:
    _seed(engine, ["old", "young", "never"], [_model("m", "1", 1)])
    with Session(engine) as session:
        service.assign(session, ["old"], "m", "1", now=T0)
        service.assign(session, ["young"], "m", "1", now=T0 + 0.4 * TTL_S)
    publisher.sent.clear()
    now = T0 + 0.6 * TTL_S  # past old's midpoint (T0 + 0.5 TTL), before young's (T0 + 0.9 TTL)

    with Session(engine) as session:
        resigned = service.resign_expiring(session, now=now)

    assert resigned == ["old"]
    assert [(t, r) for t, _, r in publisher.sent] == [(device_topic("old", Leaf.DESIRED), True)]
    state = _verify(publisher.sent[0][1], key, "old", now=now, last=1)
    assert state.sequence == 2
    assert (state.issued_at, state.expires_at) == (now, now + TTL_S)
    assert [(m.name, m.version) for m in state.models] == [("m", "1")]
    with Session(engine) as session:
        young = session.get(Device, "young")
        never = session.get(Device, "never")
        assert young is not None and young.desired_sequence == 1 and young.desired_issued_at == T0 + 0.4 * TTL_S
        assert never is not None and never.desired_sequence == 0
        # Re-signing is not a new deployment.
        assert len(session.exec(select(Deployment)).all()) == 2
        # Run again at the same time: the fresh state is not past half-life.
        assert service.resign_expiring(session, now=now) == []
    assert len(publisher.sent) == 1


def test_republish_all_sends_the_stored_envelopes_unchanged(
    engine: Engine, service: DesiredStateService, publisher: FakePublisher
) -> None:
    _seed(engine, ["dev-1", "dev-2"], [_model("m", "1", 1)])
    with Session(engine) as session:
        service.assign(session, ["dev-1"], "m", "1", now=T0)
        first = list(publisher.sent)
        assert service.republish_all(session) == 1

    assert publisher.sent[1:] == first


def test_each_deployment_of_a_model_asks_again_and_nothing_else_does(
    engine: Engine, service: DesiredStateService, publisher: FakePublisher, key: SigningKey
) -> None:
    # A device keeps a failed (model, digest) failed until the directive's retry changes, so
    # deploying the same version again must change it, and re-signing or another model must not.
    _seed(engine, ["dev-1"], [_model("mlp", "1.0", 1), _model("det", "1.0", 2)])

    def retries() -> dict[str, int]:
        state = _verify(publisher.sent[-1][1], key, "dev-1", now=T0 + 1)
        return {m.name: m.retry for m in state.models}

    with Session(engine) as session:
        service.assign(session, ["dev-1"], "mlp", "1.0", now=T0)
        first = retries()
        service.assign(session, ["dev-1"], "det", "1.0", now=T0)
        after_other = retries()
        service.assign(session, ["dev-1"], "mlp", "1.0", now=T0)
        again = retries()
        service.resign_expiring(session, now=T0 + TTL_S)
        resigned = retries()

    assert first == {"mlp": 1}
    assert after_other == {"mlp": 1, "det": 1}
    assert again == {"mlp": 2, "det": 1}
    assert resigned == again
    assert len(publisher.sent) == 4
