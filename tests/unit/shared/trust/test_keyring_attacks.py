"""Keyring versions offered by whoever can publish on the keyring topics: refused unless they chain.

The attack: 64 well-formed "future" versions signed by a rogue root filled the agent's waiting
room, the real next version was dropped, and a revoked publisher key stayed trusted.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.keyrings import keyring_metadata

from edgefleet.agent.config import TrustConfig
from edgefleet.agent.deployment.trust_store import TrustStore
from edgefleet.shared.errors import MessageError, SignatureError, TrustError
from edgefleet.shared.trust.keyring import Keyring, next_version, parse_keyring, sign_keyring
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.topics import keyring_topic

NOW = datetime(2026, 11, 28, tzinfo=UTC)
ROOT, ROOT2, PUB, PUB2, ONLINE, ROGUE = (SigningKey.generate() for _ in range(6))


def _v1() -> Keyring:
    metadata = keyring_metadata(1, roots=[ROOT], publisher=PUB, online=ONLINE, expires=NOW + timedelta(days=365))
    return Keyring.load_trusted(sign_keyring(metadata, [ROOT]))


def _next(current: Keyring, signers: list[SigningKey], **roles: object) -> Keyring:
    return parse_keyring(sign_keyring(next_version(current, now=NOW, **roles), signers))  # type: ignore[arg-type]


def _rogue(version: int, base: Keyring) -> bytes:
    """A well-formed keyring of ``version`` whose roots (and publisher) are the attacker's."""
    expires = NOW + timedelta(days=365)
    metadata = keyring_metadata(version, roots=[ROGUE], publisher=ROGUE, online=ROGUE, expires=expires)
    return sign_keyring(metadata, [ROGUE])


def _store(tmp_path: Path, keyring: Keyring, pending: int = 64) -> TrustStore:
    pinned = tmp_path / "pinned.json"
    pinned.write_bytes(keyring.raw)
    config = TrustConfig(pinned_keyring_file=str(pinned), max_pending_versions_count=pending)
    return TrustStore(config, tmp_path / "data", lambda: NOW.timestamp())


def test_rogue_future_versions_cannot_crowd_out_the_real_next_version(tmp_path: Path) -> None:
    v1 = _v1()
    v2 = _next(v1, [ROOT], publisher_keys=[PUB2.public_key])  # revokes PUB
    v3 = _next(v2, [ROOT])
    store = _store(tmp_path, v1)
    for version in range(3, 3 + 64):
        with pytest.raises(SignatureError, match="cannot chain"):  # each refusal is reported
            store.offer_keyring(_rogue(version, v1))
    assert store.offer_keyring(v3.raw) is False  # the real v3 still finds room, and waits for v2
    assert store.offer_keyring(v2.raw) is True
    assert store.keyring_version == 3
    assert set(store.publisher_keys) == {PUB2.key_id}  # the revoked key no longer verifies
    restarted = _store(tmp_path, v1)
    assert restarted.keyring_version == 3


def test_a_future_version_chains_through_a_waiting_root_rotation(tmp_path: Path) -> None:
    v1 = _v1()
    v2 = _next(v1, [ROOT])
    v3 = _next(v2, [ROOT, ROOT2], root_keys=[ROOT2.public_key])
    v4 = _next(v3, [ROOT2])  # signed by the root v3 brings in
    store = _store(tmp_path, v1)
    assert store.offer_keyring(v3.raw) is False
    assert store.offer_keyring(v4.raw) is False
    assert store.offer_keyring(v2.raw) is True
    assert store.keyring_version == 4


def test_far_future_versions_are_refused_so_the_waiting_room_is_bounded(tmp_path: Path) -> None:
    v1 = _v1()
    store = _store(tmp_path, v1, pending=2)
    chain = [v1]
    for _ in range(5):
        chain.append(_next(chain[-1], [ROOT]))
    for far in (chain[4], chain[5]):  # v5, v6: past the two versions after the gap
        with pytest.raises(TrustError, match="more than 2 versions ahead of v1"):
            store.offer_keyring(far.raw)
    assert store.offer_keyring(chain[2].raw) is False  # v3 waits
    assert store.offer_keyring(chain[3].raw) is False  # v4 waits
    assert store.offer_keyring(chain[1].raw) is True
    assert store.keyring_version == 4
    assert store.offer_keyring(chain[5].raw) is False  # v6 is in the window now
    assert store.offer_keyring(chain[4].raw) is True
    assert store.keyring_version == 6


def test_the_topic_must_name_the_payloads_version(tmp_path: Path) -> None:
    v1 = _v1()
    v2 = _next(v1, [ROOT])
    store = _store(tmp_path, v1)
    with pytest.raises(TrustError, match="was published on"):
        store.offer_keyring(v2.raw, topic=keyring_topic(7))
    assert store.keyring_version == 1
    assert store.offer_keyring(v2.raw, topic=keyring_topic(2)) is True


def test_a_rollback_is_refused_but_the_retained_history_is_not_reported(tmp_path: Path) -> None:
    v1 = _v1()
    v2 = _next(v1, [ROOT])
    v3 = _next(v2, [ROOT, ROOT2], root_keys=[ROOT2.public_key])
    store = _store(tmp_path, v1)
    store.offer_keyring(v2.raw)
    store.offer_keyring(v3.raw)
    assert store.keyring_version == 3
    # The genuine history, as retained topics deliver it on every connect: ignored silently.
    for genuine in (v1, v2, v3):
        assert store.offer_keyring(genuine.raw) is False
    # An old version the current root never signed: a rollback, reported.
    with pytest.raises(TrustError, match="rollback"):
        store.offer_keyring(_rogue(2, v1))
    # The current version with other bytes.
    with pytest.raises(TrustError, match="differs from the accepted v3"):
        store.offer_keyring(_rogue(3, v1))
    assert store.keyring_version == 3


def _dangling(keyring: Keyring, role: str) -> bytes:
    document = json.loads(keyring.raw)
    document["signed"]["roles"][role]["keyids"].append("ab" * 32)
    return json.dumps(document).encode()


@pytest.mark.parametrize("role", ["root", "targets", "timestamp", "snapshot"])
def test_a_role_naming_a_missing_key_is_a_parser_error(tmp_path: Path, role: str) -> None:
    v1 = _v1()
    v2 = _next(v1, [ROOT])
    with pytest.raises(MessageError, match="which it does not list"):
        parse_keyring(_dangling(v2, role))
    with pytest.raises(MessageError, match="which it does not list"):
        _store(tmp_path, v1).offer_keyring(_dangling(v2, role))
