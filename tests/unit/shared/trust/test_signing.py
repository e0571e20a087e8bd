"""DSSE envelopes and Ed25519 keys: what opens, what does not, and why."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.shared.errors import ConfigError, MessageError, SignatureError
from edgefleet.shared.trust.signing import (
    MAX_ENVELOPE_BYTES,
    MAX_SIGNATURES,
    SigningKey,
    key_id,
    open_envelope,
    pae,
    public_key_from_hex,
    public_key_to_hex,
    seal_envelope,
)

TYPE = "application/vnd.edgefleet.test+json"
PAYLOAD = b'{"hello": "world"}'


def trusted(*keys: SigningKey) -> dict[str, Ed25519PublicKey]:
    return {k.key_id: k.public_key for k in keys}


@pytest.fixture(scope="module")
def alice() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def bob() -> SigningKey:
    return SigningKey.generate()


def reseal(envelope: bytes, **changes: Any) -> bytes:
    raw = json.loads(envelope)
    raw.update(changes)
    return json.dumps(raw).encode()


def test_pae_matches_the_dsse_spec_example() -> None:
    expected = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert pae("http://example.com/HelloWorld", b"hello world") == expected


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t/ä", "é".encode()) == b"DSSEv1 4 t/\xc3\xa4 2 \xc3\xa9"


def test_seal_then_open_returns_the_payload(alice: SigningKey) -> None:
    envelope = seal_envelope(TYPE, PAYLOAD, [alice])
    assert open_envelope(envelope, payload_type=TYPE, trusted_keys=trusted(alice)) == PAYLOAD


def test_the_envelope_is_the_dsse_json_shape(alice: SigningKey) -> None:
    raw = json.loads(seal_envelope(TYPE, PAYLOAD, [alice]))
    assert raw == {
        "payloadType": TYPE,
        "payload": base64.b64encode(PAYLOAD).decode(),
        "signatures": [{"keyid": alice.key_id, "sig": raw["signatures"][0]["sig"]}],
    }
    alice.public_key.verify(base64.b64decode(raw["signatures"][0]["sig"]), pae(TYPE, PAYLOAD))


def test_seal_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="at least one signing key"):
        seal_envelope(TYPE, PAYLOAD, [])


def test_an_unknown_key_is_ignored(alice: SigningKey, bob: SigningKey) -> None:
    envelope = seal_envelope(TYPE, PAYLOAD, [bob, alice])  # bob is not trusted, alice is
    assert open_envelope(envelope, payload_type=TYPE, trusted_keys=trusted(alice)) == PAYLOAD


def test_only_unknown_keys_is_refused(alice: SigningKey, bob: SigningKey) -> None:
    envelope = seal_envelope(TYPE, PAYLOAD, [bob])
    with pytest.raises(SignatureError, match=r"0 valid signature\(s\) from trusted keys, 1 required"):
        open_envelope(envelope, payload_type=TYPE, trusted_keys=trusted(alice))


def test_a_keyid_claimed_by_another_key_does_not_count(alice: SigningKey, bob: SigningKey) -> None:
    raw = json.loads(seal_envelope(TYPE, PAYLOAD, [bob]))
    raw["signatures"][0]["keyid"] = alice.key_id  # bob's signature, labelled as alice's
    with pytest.raises(SignatureError, match=r"0 valid signature\(s\)"):
        open_envelope(json.dumps(raw).encode(), payload_type=TYPE, trusted_keys=trusted(alice))


def test_threshold_counts_distinct_keys(alice: SigningKey, bob: SigningKey) -> None:
    keys = trusted(alice, bob)
    both = seal_envelope(TYPE, PAYLOAD, [alice, bob])
    assert open_envelope(both, payload_type=TYPE, trusted_keys=keys, threshold=2) == PAYLOAD

    alice_twice = seal_envelope(TYPE, PAYLOAD, [alice, alice, alice])
    with pytest.raises(SignatureError, match=r"1 valid signature\(s\) from trusted keys, 2 required"):
        open_envelope(alice_twice, payload_type=TYPE, trusted_keys=keys, threshold=2)


def test_a_threshold_below_one_never_opens_an_unsigned_envelope(alice: SigningKey, bob: SigningKey) -> None:
    # AgentConfig accepts trust.publisher_threshold = 0 and passes it straight through to here.
    forged = seal_envelope(TYPE, PAYLOAD, [bob])
    with pytest.raises((ConfigError, SignatureError), match="threshold|signature"):
        open_envelope(forged, payload_type=TYPE, trusted_keys=trusted(alice), threshold=0)


def test_a_signature_for_another_payload_is_refused(alice: SigningKey) -> None:
    envelope = reseal(seal_envelope(TYPE, PAYLOAD, [alice]), payload=base64.b64encode(b'{"hello": "mars"}').decode())
    with pytest.raises(SignatureError, match=r"0 valid signature\(s\)"):
        open_envelope(envelope, payload_type=TYPE, trusted_keys=trusted(alice))


def test_wrong_payload_type_is_refused_before_the_signature_or_payload(alice: SigningKey) -> None:
    other = seal_envelope("application/other", PAYLOAD, [alice])
    expected = re.escape(f"payload type 'application/other' where '{TYPE}' was expected")
    with pytest.raises(SignatureError, match=expected):
        open_envelope(other, payload_type=TYPE, trusted_keys=trusted(alice))
    # An undecodable payload does not matter: the type is checked first.
    garbage = reseal(other, payload="***")
    with pytest.raises(SignatureError, match="payload type"):
        open_envelope(garbage, payload_type=TYPE, trusted_keys=trusted(alice))


def test_a_signature_of_the_wrong_length_does_not_count(alice: SigningKey) -> None:
    raw = json.loads(seal_envelope(TYPE, PAYLOAD, [alice]))
    raw["signatures"][0]["sig"] = base64.b64encode(b"short").decode()
    with pytest.raises(SignatureError, match=r"0 valid signature\(s\)"):
        open_envelope(json.dumps(raw).encode(), payload_type=TYPE, trusted_keys=trusted(alice))


def _envelope_with(alice: SigningKey, mutate: str) -> bytes:
    good = seal_envelope(TYPE, PAYLOAD, [alice])
    raw = json.loads(good)
    match mutate:
        case "extra-field":
            raw["comment"] = "hi"
        case "missing-field":
            del raw["signatures"]
        case "payload-not-base64":
            raw["payload"] = "not base64!"
        case "payload-not-a-string":
            raw["payload"] = 12
        case "sig-not-base64":
            raw["signatures"][0]["sig"] = "@@@"
        case "sig-missing":
            del raw["signatures"][0]["sig"]
        case "keyid-not-a-string":
            raw["signatures"][0]["keyid"] = 7
        case "signature-not-an-object":
            raw["signatures"] = ["sig"]
        case "no-signatures":
            raw["signatures"] = []
        case "signatures-not-a-list":
            raw["signatures"] = {"keyid": alice.key_id}
        case "too-many-signatures":
            raw["signatures"] = raw["signatures"] * (MAX_SIGNATURES + 1)
        case "not-an-object":
            return json.dumps([raw]).encode()
        case "not-json":
            return good[:-1]
        case "not-utf8":
            return b"\xff\xfe" + good
        case "oversize":
            return good + b" " * (MAX_ENVELOPE_BYTES + 1 - len(good))
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("extra-field", "exactly payloadType, payload, signatures"),
        ("missing-field", "exactly payloadType, payload, signatures"),
        ("payload-not-base64", "payload is not valid base64"),
        ("payload-not-a-string", "payload must be a base64 string"),
        ("sig-not-base64", "sig is not valid base64"),
        ("sig-missing", "sig must be a base64 string"),
        ("keyid-not-a-string", "keyid string"),
        ("signature-not-an-object", "keyid string"),
        ("no-signatures", f"1 to {MAX_SIGNATURES} signatures"),
        ("signatures-not-a-list", f"1 to {MAX_SIGNATURES} signatures"),
        ("too-many-signatures", f"1 to {MAX_SIGNATURES} signatures"),
        ("not-an-object", "exactly payloadType, payload, signatures"),
        ("not-json", "not JSON"),
        ("not-utf8", "not JSON"),
        ("oversize", f"over the {MAX_ENVELOPE_BYTES}-byte limit"),
    ],
)
def test_malformed_envelope_is_a_message_error(alice: SigningKey, mutate: str, message: str) -> None:
    data = _envelope_with(alice, mutate)
    with pytest.raises(MessageError, match=message):
        open_envelope(data, payload_type=TYPE, trusted_keys=trusted(alice))


def test_exactly_max_signatures_is_accepted(alice: SigningKey, bob: SigningKey) -> None:
    envelope = seal_envelope(TYPE, PAYLOAD, [bob] * (MAX_SIGNATURES - 1) + [alice])
    assert open_envelope(envelope, payload_type=TYPE, trusted_keys=trusted(alice)) == PAYLOAD


def test_load_or_create_makes_a_private_file_and_reloads_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "publisher.pem"
    created = SigningKey.load_or_create(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["publisher.pem"]  # no temp file left

    reloaded = SigningKey.load_or_create(path)
    assert reloaded.key_id == created.key_id
    assert reloaded.sign(b"x") == created.sign(b"x")  # Ed25519 is deterministic: same private key


def test_from_pem_refuses_garbage() -> None:
    with pytest.raises(ConfigError, match="not a PEM private key"):
        SigningKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


def test_from_pem_refuses_a_non_ed25519_key() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError, match="must be Ed25519"):
        SigningKey.from_pem(pem)


def test_public_key_hex_round_trip(alice: SigningKey) -> None:
    text = public_key_to_hex(alice.public_key)
    assert len(text) == 64 and text == alice.public_hex
    assert key_id(public_key_from_hex(text)) == alice.key_id


@pytest.mark.parametrize(
    ("text", "message"),
    [("zz" * 32, "not hex"), ("ab" * 31, "32 bytes, got 31"), ("", "32 bytes, got 0")],
)
def test_public_key_from_hex_refuses_non_keys(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        public_key_from_hex(text)
