"""The control plane's side of the keyring: create it, rotate it, publish every version.

Files in ``<data_dir>/keys/``: ``root.pem`` (root of trust; for one machine it lives here, for a
fleet move it offline and sign new versions with ``edgefleet keys`` where it is kept),
``online.pem`` (signs desired states), ``publisher.pem`` (signs bundles built from uploaded model
files; optional once CI signs with its own key), and ``keyring/<N>.json``, every version ever
issued. All versions are published retained on ``edgefleet/v1/trust/keyring/<N>`` so an agent
that missed several rotations catches up in order.

:class:`KeyringService` is the one owner of the current version and keys: readers ask it each
time (``current``, ``keys``) rather than keep a copy. :func:`rotate_keyring` is the whole rule
of a rotation: issue the next version, publish it, and re-sign desired states with a new
online key.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlmodel import Session

from edgefleet.control_plane.messaging.publisher import MessagePublisher
from edgefleet.control_plane.services.desired_states import DesiredStateService
from edgefleet.control_plane.services.keys import ONLINE_KEY_FILE, ControlPlaneKeys
from edgefleet.shared.errors import ConfigError, MessageError, TrustError
from edgefleet.shared.files import atomic_write_bytes
from edgefleet.shared.trust.keyring import (
    DEFAULT_KEYRING_LIFETIME,
    ONLINE,
    PUBLISHER,
    ROOT,
    Keyring,
    build_keyring,
    next_version,
    sign_keyring,
)
from edgefleet.shared.trust.signing import SigningKey, public_key_from_hex
from edgefleet.shared.wire.topics import keyring_topic

log = logging.getLogger(__name__)
ROOT_KEY_FILE = "root.pem"


class KeyringService:
    """Owns the keyring versions and the keys the control plane holds."""

    def __init__(self, keys_dir: Path, keys: ControlPlaneKeys) -> None:
        self._dir = keys_dir
        self._versions_dir = keys_dir / "keyring"
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._keys = keys
        self._root_key = SigningKey.load_or_create(keys_dir / ROOT_KEY_FILE)
        versions = sorted(int(p.stem) for p in self._versions_dir.glob("*.json") if p.stem.isdigit())
        if not versions:
            metadata = build_keyring(
                version=1,
                root_keys=[self._root_key.public_key],
                root_threshold=1,
                publisher_keys=[keys.publisher.public_key],
                publisher_threshold=1,
                online_keys=[keys.online.public_key],
                expires=(datetime.now(UTC) + DEFAULT_KEYRING_LIFETIME).replace(microsecond=0),
            )
            self._store(Keyring.load_trusted(sign_keyring(metadata, [self._root_key])))
            versions = [1]
        self._current = Keyring.load_trusted(self.raw(versions[-1]))
        if keys.online.key_id not in self._current.online_keys:
            raise ConfigError(f"{keys_dir / ONLINE_KEY_FILE} is not the online key of keyring v{self._current.version}")

    @property
    def current(self) -> Keyring:
        """The newest keyring version."""
        return self._current

    @property
    def keys(self) -> ControlPlaneKeys:
        """The keys the control plane signs with now (the online key changes with a rotation)."""
        return self._keys

    def raw(self, version: int) -> bytes:
        """The signed bytes of one version; FileNotFoundError if it was never issued."""
        return (self._versions_dir / f"{version}.json").read_bytes()

    def publisher_keys(self) -> dict[str, Ed25519PublicKey]:
        """Keys whose bundle signatures the current keyring accepts."""
        return self._current.publisher_keys

    def publisher_threshold(self) -> int:
        return self._current.threshold(PUBLISHER)

    def can_sign_bundles(self) -> bool:
        """Whether the control plane's own publisher key is still trusted (dev-mode publishing)."""
        return self.keys.publisher.key_id in self._current.publisher_keys and self.publisher_threshold() == 1

    def publish_all(self, publisher: MessagePublisher) -> None:
        """Publish every version, retained (at start-up and after each rotation)."""
        for version in range(1, self._current.version + 1):
            publisher.publish(keyring_topic(version), self.raw(version), retain=True)

    def rotate(
        self,
        *,
        publisher_keys: list[Ed25519PublicKey] | None = None,
        publisher_threshold: int | None = None,
        rotate_online: bool = False,
        rotate_root: bool = False,
    ) -> tuple[Keyring, SigningKey | None]:
        """Issue the next keyring version; return it and the new online key if that rotated.

        The old online key file is kept as ``online-<version>.pem`` for the record; the new one
        replaces ``online.pem`` only after the new version is stored, so a crash in between
        leaves a consistent pair.
        """
        with self._lock:
            new_online = SigningKey.generate() if rotate_online else None
            new_root = SigningKey.generate() if rotate_root else None
            metadata = next_version(
                self._current,
                root_keys=[new_root.public_key] if new_root else None,
                publisher_keys=publisher_keys,
                publisher_threshold=publisher_threshold,
                online_keys=[new_online.public_key] if new_online else None,
            )
            signers = [self._root_key] + ([new_root] if new_root else [])
            keyring = self._current.successor(sign_keyring(metadata, signers), datetime.now(UTC))
            self._store(keyring)
            if new_root is not None:
                atomic_write_bytes(self._dir / f"root-{self._current.version}.pem", self._root_key.to_pem(), mode=0o600)
                atomic_write_bytes(self._dir / ROOT_KEY_FILE, new_root.to_pem(), mode=0o600)
                self._root_key = new_root
            if new_online is not None:
                atomic_write_bytes(
                    self._dir / f"online-{self._current.version}.pem", self._keys.online.to_pem(), mode=0o600
                )
                atomic_write_bytes(self._dir / ONLINE_KEY_FILE, new_online.to_pem(), mode=0o600)
                self._keys = ControlPlaneKeys(publisher=self._keys.publisher, online=new_online)
            self._current = keyring
            log.info(
                "keyring v%d issued (root %s, publishers %s, online %s)",
                keyring.version,
                _ids(keyring, ROOT),
                _ids(keyring, PUBLISHER),
                _ids(keyring, ONLINE),
            )
            return keyring, new_online

    def _store(self, keyring: Keyring) -> None:
        path = self._versions_dir / f"{keyring.version}.json"
        if path.exists():
            raise TrustError(f"keyring v{keyring.version} already exists")
        atomic_write_bytes(path, keyring.raw)


@dataclass(frozen=True, kw_only=True)
class KeyringChange:
    """What the next keyring version changes; None / False leave a role as it is."""

    publisher_keys: Sequence[str] | None = None  # hex Ed25519 public keys, replacing all
    publisher_threshold: int | None = None
    rotate_online: bool = False
    rotate_root: bool = False


def rotate_keyring(
    session: Session,
    keyring: KeyringService,
    desired: DesiredStateService,
    publisher: MessagePublisher,
    change: KeyringChange,
    *,
    now: float,
) -> Keyring:
    """Issue the next keyring version, publish every version, and re-sign desired states if the
    online key changed (after the publish: agents need the new version to verify them).

    Args:
        session: Database session with no transaction of its own in progress.
        keyring: The owner of the versions and keys.
        desired: Re-signs every desired state with a new online key.
        publisher: Where keyring versions go (retained).
        change: What changes.
        now: Unix seconds (signing time of re-signed desired states).

    Returns:
        The new version.

    Raises:
        MessageError: A publisher key is not hex Ed25519, or the threshold is above the number
            of keys.
    """
    publisher_keys = None
    if change.publisher_keys is not None:
        try:
            publisher_keys = [public_key_from_hex(k) for k in change.publisher_keys]
        except ConfigError as exc:
            raise MessageError(str(exc)) from exc
    try:
        issued, new_online = keyring.rotate(
            publisher_keys=publisher_keys,
            publisher_threshold=change.publisher_threshold,
            rotate_online=change.rotate_online,
            rotate_root=change.rotate_root,
        )
    except ConfigError as exc:  # from the keyring builder: a threshold above the number of keys
        raise MessageError(str(exc)) from exc
    keyring.publish_all(publisher)
    if new_online is not None:
        desired.rotate_online_key(session, new_online, now=now)
    return issued


def _ids(keyring: Keyring, role: str) -> list[str]:
    return [k[:12] for k in keyring.keys_for(role)]
