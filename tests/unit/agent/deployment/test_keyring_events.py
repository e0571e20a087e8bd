"""Every keyring refusal reaches the control plane as a rejection event; the serving keys stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.keyrings import keyring_metadata

from edgefleet.agent.config import AgentConfig, TransferConfig, TrustConfig
from edgefleet.agent.deployment.reconciler import Reconciler
from edgefleet.agent.deployment.state_store import StateStore
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.transfer.mqtt_chunks import ChunkFetcher
from edgefleet.shared.trust.keyring import Keyring, next_version, sign_keyring
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.messages import RejectionEvent, RejectionSubject, decode_event
from edgefleet.shared.wire.topics import Leaf, keyring_topic

ROOT, PUB, ONLINE, ROGUE = (SigningKey.generate() for _ in range(4))


def _keyring(version: int, key: SigningKey, publisher: SigningKey) -> bytes:
    expires = datetime.now(UTC) + timedelta(days=365)
    metadata = keyring_metadata(version, roots=[key], publisher=publisher, online=ONLINE, expires=expires)
    return sign_keyring(metadata, [key])


@pytest.fixture
def agent(tmp_path: Path) -> tuple[Reconciler, list[tuple[Leaf, bytes]], bytes]:
    v1 = _keyring(1, ROOT, PUB)
    pinned = tmp_path / "pinned.json"
    pinned.write_bytes(v1)
    config = AgentConfig(
        device_id="dev",
        data_dir=tmp_path / "agent",
        trust=TrustConfig(pinned_keyring_file=str(pinned), max_pending_versions_count=4),
        transfer=TransferConfig(chunk_size_bytes=1024),
    )
    config.data_dir.mkdir()
    published: list[tuple[Leaf, bytes]] = []
    fetcher = ChunkFetcher(config.data_dir / "downloads", config.transfer, lambda request: None)
    reconciler = Reconciler(
        config, StateStore(config.data_dir), ModelHost(), fetcher, lambda leaf, data, _: published.append((leaf, data))
    )
    return reconciler, published, v1


def _events(published: list[tuple[Leaf, bytes]]) -> list[RejectionEvent]:
    events = [decode_event(data) for leaf, data in published if leaf is Leaf.EVENTS]
    assert all(isinstance(e, RejectionEvent) and e.subject is RejectionSubject.KEYRING for e in events)
    return events  # type: ignore[return-value]


def test_rogue_future_far_future_and_rolled_back_keyrings_each_publish_a_rejection(agent) -> None:
    reconciler, published, v1 = agent
    v2 = sign_keyring(next_version(Keyring.load_trusted(v1)), [ROOT])
    reconciler.offer_keyring(v2)
    assert _events(published) == []  # the real next version is accepted silently

    for attack in (
        _keyring(4, ROGUE, ROGUE),  # a future version that cannot chain
        _keyring(40, ROOT, ROGUE),  # far past the waiting window, even if root-signed
        _keyring(1, ROGUE, ROGUE),  # a rollback
        _keyring(2, ROGUE, ROGUE),  # the current version with other bytes
    ):
        reconciler.offer_keyring(attack)
    events = _events(published)
    assert [e.code for e in events] == ["signature_invalid", "untrusted", "untrusted", "untrusted"]
    assert "cannot chain" in events[0].message and "rollback" in events[2].message

    published.clear()
    reconciler.offer_keyring(v1)  # the genuine retained history: not an attack
    assert _events(published) == []


def test_a_keyring_on_another_versions_topic_is_refused_with_an_event(agent) -> None:
    reconciler, published, v1 = agent
    v2 = sign_keyring(next_version(Keyring.load_trusted(v1)), [ROOT])

    reconciler.offer_keyring(v2, topic=keyring_topic(3))

    [event] = _events(published)
    assert event.code == "untrusted"
    published.clear()
    reconciler.offer_keyring(v2, topic=keyring_topic(2))  # the same bytes on their own topic
    assert _events(published) == []
