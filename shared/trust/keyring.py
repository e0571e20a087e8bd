"""The keyring: which keys may sign what, anchored in a root of trust that rotates by itself.

The keyring is TUF root metadata (``tuf.api.metadata.Root``, python-tuf), so threshold
signatures, distinct-key counting, sequential versions and the rotation rule (version N+1 must be
signed by a threshold of version N's root keys *and* of its own) come from a maintained,
audited library instead of our own code. Roles map as follows:

========  ================  ===================================================
TUF role  edgefleet role    signs
========  ================  ===================================================
root      root of trust     the keyring itself (held offline in production)
targets   publisher         bundle manifests (the ML team or CI)
timestamp online            per-device desired states (the control plane)
snapshot  (online)          unused; TUF requires the role, it gets the online key
========  ================  ===================================================

An agent pins version 1 (or any version) at enrollment and then only moves forward through
:meth:`Keyring.successor`, one version at a time, so a device that missed several rotations
catches up in order. A key removed from a role stops verifying as soon as the new version is
accepted. Everything here takes bytes and time values; nothing touches disk or network.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Role, Root
from tuf.api.serialization import DeserializationError

from edgefleet.shared.errors import ConfigError, KeyringExpiredError, MessageError, SignatureError, TrustError
from edgefleet.shared.trust.signing import SigningKey, key_id, public_key_from_hex

ROOT, PUBLISHER, ONLINE = "root", "targets", "timestamp"
MAX_KEYRING_BYTES = 512 * 1024  # bytes
DEFAULT_KEYRING_LIFETIME = timedelta(days=3650)  # an unattended device must not brick itself on a date


def _sslib_key(public_key: Ed25519PublicKey) -> SSlibKey:
    return SSlibKey.from_crypto(public_key)


@dataclass(frozen=True)
class Keyring:
    """One verified keyring version."""

    metadata: Metadata[Root]
    raw: bytes

    @property
    def root(self) -> Root:
        return self.metadata.signed

    @property
    def version(self) -> int:
        return self.root.version

    @property
    def expires(self) -> datetime:
        return self.root.expires

    def keys_for(self, role: str) -> dict[str, Ed25519PublicKey]:
        """The role's public keys as {edgefleet key id: key} (see :func:`shared.signing.key_id`)."""
        out: dict[str, Ed25519PublicKey] = {}
        for tuf_keyid in self.root.roles[role].keyids:
            public = public_key_from_hex(self.root.keys[tuf_keyid].keyval["public"])
            out[key_id(public)] = public
        return out

    def threshold(self, role: str) -> int:
        return self.root.roles[role].threshold

    @property
    def publisher_keys(self) -> dict[str, Ed25519PublicKey]:
        return self.keys_for(PUBLISHER)

    @property
    def online_keys(self) -> dict[str, Ed25519PublicKey]:
        return self.keys_for(ONLINE)

    @classmethod
    def load_trusted(cls, data: bytes) -> Keyring:
        """Parse a keyring the caller already trusts (pinned at enrollment, or stored after verification).

        It must still be self-consistent: signed by a threshold of its own root keys.
        """
        keyring = parse_keyring(data)
        try:
            keyring.root.verify_delegate(ROOT, keyring.metadata.signed_bytes, keyring.metadata.signatures)
        except RepositoryError as exc:
            raise SignatureError(f"keyring v{keyring.version} is not signed by its own root keys: {exc}") from exc
        return keyring

    def successor(self, data: bytes, now: datetime) -> Keyring:
        """Verify version N+1 against this version N (TUF's root rotation rule) and return it.

        Raises:
            MessageError: Not keyring metadata.
            TrustError: Not exactly the next version.
            SignatureError: Not signed by a threshold of the old root keys and of the new ones.
            KeyringExpiredError: The new version is already expired at ``now``.
        """
        new = parse_keyring(data)
        if new.version != self.version + 1:
            raise TrustError(f"keyring v{new.version} does not follow v{self.version}")
        try:
            result = new.root.get_root_verification_result(
                self.root, new.metadata.signed_bytes, new.metadata.signatures
            )
        except ValueError as exc:
            raise TrustError(f"keyring v{new.version}: {exc}") from exc
        if not result.verified:
            raise SignatureError(
                f"keyring v{new.version} needs {result.first.threshold} signature(s) of the v{self.version} root "
                f"keys (has {len(result.first.signed)}) and {result.second.threshold} of its own "
                f"(has {len(result.second.signed)})"
            )
        if new.root.is_expired(now):
            raise KeyringExpiredError(f"keyring v{new.version} expired at {new.expires.isoformat()}")
        return new

    def root_signed(self, other: Keyring) -> bool:
        """Whether a threshold of this version's root keys signed ``other`` (any version)."""
        try:
            self.root.verify_delegate(ROOT, other.metadata.signed_bytes, other.metadata.signatures)
        except RepositoryError:
            return False
        return True

    def check_not_expired(self, now: datetime) -> None:
        """Raise :class:`KeyringExpiredError` if this version is past its expiry."""
        if self.root.is_expired(now):
            raise KeyringExpiredError(f"keyring v{self.version} expired at {self.expires.isoformat()}")


def parse_keyring(data: bytes) -> Keyring:
    """Parse keyring bytes without judging their signatures (see :meth:`Keyring.successor`)."""
    if len(data) > MAX_KEYRING_BYTES:
        raise MessageError(f"keyring: {len(data)} bytes, over the {MAX_KEYRING_BYTES}-byte limit")
    try:
        metadata = Metadata.from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise MessageError(f"keyring: not TUF root metadata: {exc}") from exc
    if not isinstance(metadata.signed, Root):
        raise MessageError(f"keyring: expected root metadata, got {metadata.signed.type!r}")
    # TUF checks the roles but not that each names keys it lists, nor the key bytes: checked here,
    # for every role (snapshot too, though unused), so that a verified keyring's keys_for() cannot
    # fail later and a malformed keyring is a message error, never a KeyError.
    for role, role_meta in metadata.signed.roles.items():
        for tuf_keyid in role_meta.keyids:
            key = metadata.signed.keys.get(tuf_keyid)
            if key is None:
                raise MessageError(f"keyring: role {role} names key {tuf_keyid!r:.80}, which it does not list")
            if key.keytype != "ed25519":
                raise MessageError(f"keyring: role {role} has a {key.keytype} key; only ed25519 is accepted")
            try:
                public_key_from_hex(key.keyval.get("public", ""))
            except ConfigError as exc:
                raise MessageError(f"keyring: role {role}: {exc}") from exc
    return Keyring(metadata=metadata, raw=data)


def build_keyring(
    *,
    version: int,
    root_keys: Sequence[Ed25519PublicKey],
    root_threshold: int,
    publisher_keys: Sequence[Ed25519PublicKey],
    publisher_threshold: int,
    online_keys: Sequence[Ed25519PublicKey],
    expires: datetime,
) -> Metadata[Root]:
    """An unsigned keyring version with these roles (sign it with :func:`sign_keyring`).

    Raises:
        ConfigError: A role's threshold is below 1 or above its number of keys.
    """
    for name, keys, threshold in (
        (ROOT, root_keys, root_threshold),
        (PUBLISHER, publisher_keys, publisher_threshold),
        (ONLINE, online_keys, 1),
    ):
        if not 1 <= threshold <= len(keys):
            raise ConfigError(f"role {name}: threshold {threshold} with {len(keys)} key(s)")
    root = Root(version=version, expires=expires, consistent_snapshot=False)
    root.roles = {
        ROOT: Role([], root_threshold),
        PUBLISHER: Role([], publisher_threshold),
        ONLINE: Role([], 1),
        "snapshot": Role([], 1),
    }
    for role, keys in (
        (ROOT, root_keys),
        (PUBLISHER, publisher_keys),
        (ONLINE, online_keys),
        ("snapshot", online_keys),
    ):
        for public in keys:
            root.add_key(_sslib_key(public), role)
    return Metadata(root)


def sign_keyring(metadata: Metadata[Root], signers: Iterable[SigningKey]) -> bytes:
    """Sign a keyring version with root keys (old and new ones, for a rotation) and serialize it."""
    for signer in signers:
        metadata.sign(CryptoSigner(signer.private_key, _sslib_key(signer.public_key)), append=True)
    return metadata.to_bytes()


def next_version(
    current: Keyring,
    *,
    root_keys: Sequence[Ed25519PublicKey] | None = None,
    root_threshold: int | None = None,
    publisher_keys: Sequence[Ed25519PublicKey] | None = None,
    publisher_threshold: int | None = None,
    online_keys: Sequence[Ed25519PublicKey] | None = None,
    lifetime: timedelta = DEFAULT_KEYRING_LIFETIME,
    now: datetime | None = None,
) -> Metadata[Root]:
    """Version N+1 of ``current`` with the given roles replaced (unsigned)."""
    now = now or datetime.now(UTC)
    return build_keyring(
        version=current.version + 1,
        root_keys=list(root_keys) if root_keys is not None else list(current.keys_for(ROOT).values()),
        root_threshold=root_threshold or current.threshold(ROOT),
        publisher_keys=list(publisher_keys) if publisher_keys is not None else list(current.publisher_keys.values()),
        publisher_threshold=publisher_threshold or current.threshold(PUBLISHER),
        online_keys=list(online_keys) if online_keys is not None else list(current.online_keys.values()),
        expires=(now + lifetime).replace(microsecond=0),
    )
