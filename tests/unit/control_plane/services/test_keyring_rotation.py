"""Keyring rotation as a service: the new version is returned, published, and a new online key
re-signs every desired state; the keyring service is the one owner of the keys."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session
from support.control_plane import FakePublisher

from edgefleet.control_plane.db.tables import Device, ModelVersion
from edgefleet.control_plane.services.desired_states import DesiredStateService
from edgefleet.control_plane.services.keyring import KeyringChange, KeyringService, rotate_keyring
from edgefleet.control_plane.services.keys import load_or_create_keys
from edgefleet.shared.errors import MessageError
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.messages import verify_desired_state
from edgefleet.shared.wire.topics import keyring_topic

T0 = 1_800_000_000.0


@pytest.fixture
def engine(engine: Engine) -> Iterator[Engine]:
    with Session(engine) as session:
        session.add(Device(id="d1", created_at=datetime.now(UTC)))
        session.add(
            ModelVersion(
                name="m", version="1", runtime="onnx", bundle_digest="sha256:" + "1" * 64, bundle_size=10,
                manifest_json="{}", created_at=datetime.now(UTC),
            )
        )
        session.commit()
    yield engine


def test_rotating_the_online_key_publishes_the_version_and_re_signs_with_the_new_key(
    engine: Engine, tmp_path: Path
) -> None:
    keyring = KeyringService(tmp_path / "keys", load_or_create_keys(tmp_path / "keys"))
    publisher = FakePublisher()
    desired = DesiredStateService(publisher, keyring.keys.online, ttl_s=100.0)
    with Session(engine) as session:
        desired.assign(session, ["d1"], "m", "1", now=T0)  # a desired state, signed with the old key
    old_online = keyring.keys.online
    publisher.sent.clear()
    with Session(engine) as session:
        issued = rotate_keyring(
            session, keyring, desired, publisher, KeyringChange(rotate_online=True), now=T0 + 1
        )
    assert issued.version == 2 and keyring.current is issued
    new_online = keyring.keys.online
    assert new_online.key_id != old_online.key_id and new_online.key_id in issued.online_keys
    topics = [topic for topic, _, _ in publisher.sent]
    assert topics[:2] == [keyring_topic(1), keyring_topic(2)]  # every version, before the desired state
    [(_, envelope, _)] = publisher.sent[2:]
    state = verify_desired_state(
        envelope, trusted_keys={new_online.key_id: new_online.public_key}, device_id="d1", last_sequence=1,
        now=T0 + 1,
    )
    assert state.sequence == 2 and [m.name for m in state.models] == ["m"]


def test_a_bad_publisher_key_or_threshold_is_a_message_error(tmp_path: Path, engine: Engine) -> None:
    keyring = KeyringService(tmp_path / "keys", load_or_create_keys(tmp_path / "keys"))
    desired = DesiredStateService(FakePublisher(), keyring.keys.online, ttl_s=100.0)
    with Session(engine) as session:
        with pytest.raises(MessageError):
            rotate_keyring(
                session, keyring, desired, FakePublisher(), KeyringChange(publisher_keys=["zz"]), now=T0
            )
        one_key = [SigningKey.generate().public_hex]
        with pytest.raises(MessageError):
            rotate_keyring(
                session, keyring, desired, FakePublisher(),
                KeyringChange(publisher_keys=one_key, publisher_threshold=2), now=T0,
            )
    assert keyring.current.version == 1

