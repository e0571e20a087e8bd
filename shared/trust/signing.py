"""Ed25519 keys and DSSE envelopes.

A signed document travels as a DSSE envelope (https://github.com/secure-systems-lab/dsse):
``{"payloadType", "payload" (base64), "signatures": [{"keyid", "sig"}]}``; the signature covers
the pre-authentication encoding (PAE) of type and payload, so a signature made for one payload
type can never be replayed as another. :func:`open_envelope` checks the payload type *before*
it returns the payload for parsing, and counts each trusted key at most once toward the
threshold.

Verification takes bytes and keys and returns bytes: no disk, no network, no clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.shared.errors import ConfigError, MessageError, SignatureError
from edgefleet.shared.files import atomic_write_bytes

MAX_ENVELOPE_BYTES = 1024 * 1024  # bytes: a manifest or directive larger than this is garbage
MAX_SIGNATURES = 16  # count: more than this is an attack on the verifier's CPU


def key_id(public_key: Ed25519PublicKey) -> str:
    """Stable identifier of a public key: sha256 of its raw 32 bytes, hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_to_hex(public_key: Ed25519PublicKey) -> str:
    """Raw public key bytes as hex, the form used in configs and API bodies."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a hex-encoded raw Ed25519 public key; :class:`ConfigError` if it is not one."""
    try:
        raw = bytes.fromhex(text)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"public key is not hex: {text!r:.80}") from exc
    if len(raw) != 32:
        raise ConfigError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key with its id."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        """Create a fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def public_hex(self) -> str:
        return public_key_to_hex(self.public_key)

    def sign(self, data: bytes) -> bytes:
        """Sign raw bytes."""
        return self.private_key.sign(data)

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM (the file is protected by mode 0600, not by a passphrase)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Load a PKCS#8 PEM Ed25519 key; :class:`ConfigError` if it is anything else."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        # UnsupportedAlgorithm: a well-formed PEM of a key type this cryptography build lacks.
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("signing keys must be Ed25519")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """Load the key at ``path``, creating it (mode 0600, atomically) on first use."""
        if path.exists():
            return cls.from_pem(path.read_bytes())
        key = cls.generate()
        atomic_write_bytes(path, key.to_pem(), mode=0o600)
        return key


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def seal_envelope(payload_type: str, payload: bytes, keys: Iterable[SigningKey]) -> bytes:
    """Sign ``payload`` with each key and return the DSSE envelope as JSON bytes.

    Raises:
        ConfigError: ``keys`` is empty.
    """
    message = pae(payload_type, payload)
    signatures = [{"keyid": k.key_id, "sig": base64.b64encode(k.sign(message)).decode()} for k in keys]
    if not signatures:
        raise ConfigError("an envelope needs at least one signing key")
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": signatures,
    }
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise MessageError(f"envelope {what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageError(f"envelope {what} is not valid base64") from exc


def open_envelope(
    data: bytes,
    *,
    payload_type: str,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    threshold: int = 1,
) -> bytes:
    """Verify a DSSE envelope and return its payload.

    Args:
        data: The envelope's JSON bytes, as received.
        payload_type: The only payload type accepted; checked before any signature work.
        trusted_keys: key id -> public key of the keys allowed to sign this type.
        threshold: How many distinct trusted keys must have signed.

    Raises:
        ConfigError: ``threshold`` is below 1.
        MessageError: The envelope is not well-formed.
        SignatureError: Wrong payload type, or fewer than ``threshold`` valid trusted signatures.
    """
    if threshold < 1:
        raise ConfigError("a signature threshold below 1 would accept unsigned envelopes")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise MessageError(f"envelope is {len(data)} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit")
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MessageError(f"envelope is not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or set(envelope) != {"payloadType", "payload", "signatures"}:
        raise MessageError("envelope must be an object with exactly payloadType, payload, signatures")
    if envelope["payloadType"] != payload_type:
        raise SignatureError(f"payload type {envelope['payloadType']!r:.80} where {payload_type!r} was expected")
    payload = _b64(envelope["payload"], "payload")
    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or not signatures or len(signatures) > MAX_SIGNATURES:
        raise MessageError(f"envelope must carry 1 to {MAX_SIGNATURES} signatures")
    message = pae(payload_type, payload)
    valid_keyids: set[str] = set()
    for entry in signatures:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
            raise MessageError("each signature must be an object with a keyid string and a sig")
        public_key = trusted_keys.get(entry["keyid"])
        if public_key is None or entry["keyid"] in valid_keyids:
            continue  # unknown keys and a second signature by the same key never count
        try:
            public_key.verify(_b64(entry.get("sig"), "sig"), message)
        except InvalidSignature:
            continue
        valid_keyids.add(entry["keyid"])
    if len(valid_keyids) < threshold:
        raise SignatureError(
            f"{payload_type}: {len(valid_keyids)} valid signature(s) from trusted keys, {threshold} required"
        )
    return payload


def random_token(nbytes: int = 16) -> str:
    """A random URL-safe identifier."""
    return base64.urlsafe_b64encode(os.urandom(nbytes)).rstrip(b"=").decode()


def stored_envelope_payload(data: bytes, *, payload_type: str) -> bytes:
    """The payload of an envelope that was verified before it was stored locally.

    Only for an agent's own persisted state: the signing key may have rotated since, and
    re-verifying would lock the device out of its accepted desired state.
    """
    try:
        envelope = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"stored envelope is not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or envelope.get("payloadType") != payload_type:
        raise MessageError(f"stored envelope is not of type {payload_type}")
    return _b64(envelope.get("payload"), "payload")
