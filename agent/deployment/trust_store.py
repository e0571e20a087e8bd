"""What the agent trusts: a keyring that rotates (production) or keys pinned in config (development).

With a pinned keyring (``trust.pinned_keyring_file``, written at enrollment), the current keyring
version lives in ``<data_dir>/trust/keyring.json`` and only moves forward, one verified version at
a time (:meth:`TrustStore.offer_keyring`); versions that arrive out of order wait in memory until
their predecessor has been accepted. Without one, the hex keys in ``[trust]`` are used as they are:
no rotation, meant for development and air-gapped tests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.agent.config import TrustConfig
from edgefleet.shared.errors import ConfigError, EdgefleetError
from edgefleet.shared.files import atomic_write_bytes
from edgefleet.shared.trust.keyring import Keyring, parse_keyring
from edgefleet.shared.trust.signing import key_id, public_key_from_hex

log = logging.getLogger(__name__)


class TrustStore:
    """Current signing keys for publisher (bundles) and online (desired states) roles."""

    def __init__(self, config: TrustConfig, data_dir: Path, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._config = config
        self._lock = threading.Lock()
        self._pending: dict[int, bytes] = {}
        self._path = data_dir / "trust" / "keyring.json"
        self._keyring: Keyring | None = None
        if config.pinned_keyring_file:
            if config.publisher_keys or config.online_keys:
                raise ConfigError("[trust]: use either pinned_keyring_file or static keys, not both")
            source = self._path if self._path.exists() else Path(config.pinned_keyring_file)
            try:
                self._keyring = Keyring.load_trusted(source.read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read keyring {source}: {exc}") from exc
            except EdgefleetError as exc:
                raise ConfigError(f"keyring {source} is not valid: {exc}") from exc
            if not self._path.exists():
                atomic_write_bytes(self._path, self._keyring.raw)
            self._static_publisher: dict[str, Ed25519PublicKey] = {}
            self._static_online: dict[str, Ed25519PublicKey] = {}
        else:
            self._static_publisher = _keys(config.publisher_keys)
            self._static_online = _keys(config.online_keys)
        self._static_threshold = config.publisher_threshold

    @property
    def keyring_version(self) -> int:
        """The accepted keyring version (0 in static-key mode)."""
        return self._keyring.version if self._keyring else 0

    @property
    def publisher_keys(self) -> dict[str, Ed25519PublicKey]:
        return self._keyring.publisher_keys if self._keyring else self._static_publisher

    @property
    def publisher_threshold(self) -> int:
        return self._keyring.threshold("targets") if self._keyring else self._static_threshold

    @property
    def online_keys(self) -> dict[str, Ed25519PublicKey]:
        return self._keyring.online_keys if self._keyring else self._static_online

    def offer_keyring(self, data: bytes) -> bool:
        """Accept newer keyring versions in order; return True if the current version changed.

        Raises:
            EdgefleetError: The offered version is invalid (bad signatures, not TUF root, expired).
        """
        if self._keyring is None:
            return False  # static-key mode: rotation is not available
        with self._lock:
            version = parse_keyring(data).version
            if version <= self._keyring.version:
                return False
            if len(self._pending) < self._config.max_pending_versions_count:
                self._pending[version] = data
            changed = False
            now = datetime.fromtimestamp(self._clock(), UTC)
            while (nxt := self._pending.pop(self._keyring.version + 1, None)) is not None:
                accepted = self._keyring.successor(nxt, now)
                atomic_write_bytes(self._path, accepted.raw)  # persisted before it is used
                log.info("keyring v%d accepted (was v%d)", accepted.version, self._keyring.version)
                self._keyring = accepted
                changed = True
            return changed


def _keys(hex_keys: tuple[str, ...]) -> dict[str, Ed25519PublicKey]:
    keys = [public_key_from_hex(k) for k in hex_keys]
    return {key_id(k): k for k in keys}
