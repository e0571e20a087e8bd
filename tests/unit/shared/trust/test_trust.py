"""The keyring (TUF root metadata via python-tuf) and the agent's TrustStore: rotation rules."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.keyrings import keyring_metadata

from edgefleet.agent.config import TrustConfig
from edgefleet.agent.deployment.trust_store import TrustStore
from edgefleet.shared.errors import ConfigError, KeyringExpiredError, MessageError, SignatureError, TrustError
from edgefleet.shared.trust.keyring import Keyring, build_keyring, next_version, parse_keyring, sign_keyring
from edgefleet.shared.trust.signing import SigningKey

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def _v1(root: list[SigningKey], publisher: SigningKey, online: SigningKey, threshold: int = 1) -> Keyring:
    metadata = keyring_metadata(
        1, roots=root, publisher=publisher, online=online, expires=NOW + timedelta(days=365), root_threshold=threshold
    )
    return Keyring.load_trusted(sign_keyring(metadata, root))


@pytest.fixture
def keys() -> dict[str, SigningKey]:
    return {name: SigningKey.generate() for name in ("root", "root2", "pub", "pub2", "online", "online2")}


def test_v1_roles_map_to_edgefleet_key_ids(keys) -> None:
    keyring = _v1([keys["root"]], keys["pub"], keys["online"])
    assert list(keyring.publisher_keys) == [keys["pub"].key_id]
    assert list(keyring.online_keys) == [keys["online"].key_id]
    assert keyring.version == 1


def test_a_keyring_not_signed_by_its_own_root_is_refused(keys) -> None:
    metadata = keyring_metadata(
        1, roots=[keys["root"]], publisher=keys["pub"], online=keys["online"], expires=NOW + timedelta(days=1)
    )
    with pytest.raises(SignatureError, match="not signed by its own root"):
        Keyring.load_trusted(sign_keyring(metadata, [keys["pub"]]))


def test_rotating_the_root_needs_old_and_new_root_signatures(keys) -> None:
    v1 = _v1([keys["root"]], keys["pub"], keys["online"])
    metadata = next_version(v1, root_keys=[keys["root2"].public_key], now=NOW)
    with pytest.raises(SignatureError, match="v1 root keys"):
        v1.successor(sign_keyring(metadata, [keys["root2"]]), NOW)
    metadata = next_version(v1, root_keys=[keys["root2"].public_key], now=NOW)
    with pytest.raises(SignatureError):
        v1.successor(sign_keyring(metadata, [keys["root"]]), NOW)
    metadata = next_version(v1, root_keys=[keys["root2"].public_key], now=NOW)
    v2 = v1.successor(sign_keyring(metadata, [keys["root"], keys["root2"]]), NOW)
    assert v2.version == 2


def test_a_root_threshold_counts_distinct_keys_only(keys) -> None:
    v1 = _v1([keys["root"], keys["root2"]], keys["pub"], keys["online"], threshold=2)
    metadata = next_version(v1, publisher_keys=[keys["pub2"].public_key], now=NOW)
    # The same key signing twice is one signature.
    raw = sign_keyring(metadata, [keys["root"], keys["root"]])
    with pytest.raises(SignatureError):
        v1.successor(raw, NOW)


def test_versions_must_follow_one_by_one(keys) -> None:
    v1 = _v1([keys["root"]], keys["pub"], keys["online"])
    v2 = v1.successor(sign_keyring(next_version(v1, now=NOW), [keys["root"]]), NOW)
    v3_raw = sign_keyring(next_version(v2, now=NOW), [keys["root"]])
    with pytest.raises(TrustError, match="does not follow"):
        v1.successor(v3_raw, NOW)
    with pytest.raises(TrustError, match="does not follow"):
        v2.successor(v2.raw, NOW)  # replaying the current version


def test_an_expired_successor_is_refused(keys) -> None:
    v1 = _v1([keys["root"]], keys["pub"], keys["online"])
    raw = sign_keyring(next_version(v1, lifetime=timedelta(days=1), now=NOW), [keys["root"]])
    with pytest.raises(KeyringExpiredError):
        v1.successor(raw, NOW + timedelta(days=2))


@pytest.mark.parametrize("garbage", [b"", b"{}", b"[]", b"\xff" * 10, b'{"signed": {}, "signatures": []}'])
def test_garbage_is_a_message_error(keys, garbage: bytes) -> None:
    v1 = _v1([keys["root"]], keys["pub"], keys["online"])
    with pytest.raises(MessageError):
        v1.successor(garbage, NOW)


def _edited(keyring: Keyring, edit: Callable[[dict[str, Any]], None]) -> bytes:
    document = json.loads(keyring.raw)
    edit(document["signed"])
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda signed: signed["roles"]["targets"]["keyids"].append("ab" * 32), "which it does not list"),
        (lambda signed: [key["keyval"].update(public="zz") for key in signed["keys"].values()], "not hex"),
        (lambda signed: [key["keyval"].update(public="ab" * 8) for key in signed["keys"].values()], "32 bytes"),
    ],
    ids=["dangling-key-id", "key-not-hex", "key-too-short"],
)
def test_keys_that_tuf_does_not_check_are_a_message_error(keys, edit, match: str) -> None:
    # Unsigned edits: parse_keyring must refuse them before any signature is looked at, so
    # that keys_for() on a keyring that parsed can never raise a KeyError or a ConfigError.
    v1 = _v1([keys["root"]], keys["pub"], keys["online"])
    with pytest.raises(MessageError, match=match):
        parse_keyring(_edited(v1, edit))


def test_a_threshold_beyond_the_keys_is_a_config_error(keys) -> None:
    with pytest.raises(ConfigError, match="threshold 2 with 1 key"):
        build_keyring(
            version=1,
            root_keys=[keys["root"].public_key],
            root_threshold=2,
            publisher_keys=[keys["pub"].public_key],
            publisher_threshold=1,
            online_keys=[keys["online"].public_key],
            expires=NOW + timedelta(days=1),
        )


def _store(tmp_path: Path, keyring: Keyring, now: datetime = NOW) -> TrustStore:
    pinned = tmp_path / "pinned.json"
    pinned.write_bytes(keyring.raw)
    return TrustStore(TrustConfig(pinned_keyring_file=str(pinned)), tmp_path / "data", lambda: now.timestamp())


def test_trust_store_catches_up_in_order_even_when_versions_arrive_out_of_order(tmp_path: Path, keys) -> None:
    v1 = _v1([keys["root"]], keys["pub"], keys["online"])
    v2 = v1.successor(
        sign_keyring(next_version(v1, publisher_keys=[keys["pub2"].public_key], now=NOW), [keys["root"]]), NOW
    )
    v3 = v2.successor(
        sign_keyring(next_version(v2, online_keys=[keys["online2"].public_key], now=NOW), [keys["root"]]), NOW
    )
    store = _store(tmp_path, v1)
    assert store.offer_keyring(v3.raw) is False  # waits for v2
    assert store.keyring_version == 1
    assert store.offer_keyring(v2.raw) is True
    assert store.keyring_version == 3
    # The revoked publisher key no longer verifies; the new one does.
    assert set(store.publisher_keys) == {keys["pub2"].key_id}
    assert set(store.online_keys) == {keys["online2"].key_id}
    # Persisted: a restarted agent starts from v3, not from the pinned v1.
    assert json.loads((tmp_path / "data" / "trust" / "keyring.json").read_text())["signed"]["version"] == 3
    restarted = _store(tmp_path, v1)
    assert restarted.keyring_version == 3
    assert store.offer_keyring(v2.raw) is False  # old versions are ignored


def test_trust_store_refuses_a_forged_next_version(tmp_path: Path, keys) -> None:
    v1 = _v1([keys["root"]], keys["pub"], keys["online"])
    attacker = SigningKey.generate()
    forged = sign_keyring(next_version(v1, publisher_keys=[attacker.public_key], now=NOW), [attacker])
    store = _store(tmp_path, v1)
    with pytest.raises(SignatureError):
        store.offer_keyring(forged)
    assert store.keyring_version == 1
    assert set(store.publisher_keys) == {keys["pub"].key_id}


def test_static_and_keyring_modes_are_exclusive(tmp_path: Path, keys) -> None:
    v1 = _v1([keys["root"]], keys["pub"], keys["online"])
    pinned = tmp_path / "pinned.json"
    pinned.write_bytes(v1.raw)
    with pytest.raises(ConfigError, match="not both"):
        TrustStore(
            TrustConfig(pinned_keyring_file=str(pinned), publisher_keys=(keys["pub"].public_hex,)),
            tmp_path,
            lambda: 0.0,
        )
