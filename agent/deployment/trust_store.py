"""What the agent trusts: a keyring that rotates (production) or keys pinned in config (development).

With a pinned keyring (``trust.pinned_keyring_file``, written at enrollment), the current keyring
version lives in ``<data_dir>/trust/keyring.json`` and only moves forward, one verified version at
a time (:meth:`TrustStore.offer_keyring`). Without one, the hex keys in ``[trust]`` are used as
they are: no rotation, meant for development and air-gapped tests.

Anyone who can publish on a keyring topic can offer versions, so nothing is kept on its word:

- version N+1 must pass TUF's rotation rule against the current version N, or it is refused;
- a version further ahead waits in memory for the gap to fill only if a threshold of the root
  keys of the nearest trusted version below it (the current one, or one already waiting) signed
  it: rogue "future" versions cannot fill the waiting room and crowd out the real next version.
  Each waiting version passes the full rotation rule when its turn comes;
- an older version is the retained history, ignored, if the current root keys signed it or this
  agent accepted it; otherwise it is refused as a rollback;
- a version published on another version's topic is refused.

Every refusal raises, so the caller reports it (the reconciler publishes a rejection event). A
limitation, by design: a version that arrives before its predecessor and is signed only by root
keys the predecessor introduces cannot be judged yet; it is refused and accepted when it is
delivered again after its predecessor (the retained copy is, on the next connect).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.agent.config import TrustConfig
from edgefleet.shared.errors import ConfigError, EdgefleetError, SignatureError, TrustError
from edgefleet.shared.files import atomic_write_bytes
from edgefleet.shared.trust.keyring import Keyring, parse_keyring
from edgefleet.shared.trust.signing import key_id, public_key_from_hex
from edgefleet.shared.wire.topics import KEYRING_ROOT

log = logging.getLogger(__name__)


class TrustStore:
    """Current signing keys for publisher (bundles) and online (desired states) roles."""

    def __init__(self, config: TrustConfig, data_dir: Path, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._config = config
        self._lock = threading.Lock()
        self._pending: dict[int, Keyring] = {}  # future versions signed by trusted root keys
        self._history: set[bytes] = set()  # versions this agent accepted while it ran
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

    def offer_keyring(self, data: bytes, *, topic: str | None = None) -> bool:
        """Accept newer keyring versions in order; return True if the current version changed.

        Args:
            data: The keyring bytes as received.
            topic: The topic they arrived on; its version must be the payload's.

        Raises:
            MessageError: Not keyring metadata (or a malformed one, e.g. a role naming a missing key).
            TrustError: Published on another version's topic; a rollback (an older version the
                current root keys did not sign, or the current version with other bytes); a
                future version that cannot chain to the current one (SignatureError) or is more
                than ``max_pending_versions_count`` versions past the next one.
            SignatureError, KeyringExpiredError: The next version fails TUF's rotation rule.
        """
        if self._keyring is None:
            return False  # static-key mode: rotation is not available
        with self._lock:
            offered = parse_keyring(data)
            if topic is not None and topic != f"{KEYRING_ROOT}/{offered.version}":
                raise TrustError(f"keyring v{offered.version} was published on {topic!r:.120}")
            current = self._keyring
            if offered.version <= current.version:
                self._check_history(offered, current)
                return False
            if offered.version > current.version + 1:
                self._hold(offered, current)
                return False
            now = datetime.fromtimestamp(self._clock(), UTC)
            self._accept(current.successor(data, now))
            while (held := self._pending.pop(self._keyring.version + 1, None)) is not None:
                try:
                    self._accept(self._keyring.successor(held.raw, now))
                except EdgefleetError as exc:
                    # Signed by trusted root keys, yet not a valid successor (expired, say): the
                    # version that did change must still count, so this one is only logged.
                    log.warning("waiting keyring v%d refused: %s", held.version, exc)
                    break
            for version in [v for v in self._pending if v <= self._keyring.version]:
                del self._pending[version]
            return True

    def _accept(self, accepted: Keyring) -> None:
        atomic_write_bytes(self._path, accepted.raw)  # persisted before it is used
        assert self._keyring is not None
        log.info("keyring v%d accepted (was v%d)", accepted.version, self._keyring.version)
        self._history.add(self._keyring.raw)
        self._keyring = accepted

    def _check_history(self, offered: Keyring, current: Keyring) -> None:
        """Ignore the retained history; raise for anything else at or below the current version."""
        if offered.raw == current.raw or offered.raw in self._history:
            return
        if offered.version == current.version:
            raise TrustError(f"keyring v{offered.version} differs from the accepted v{current.version}: refused")
        if not current.root_signed(offered):
            raise TrustError(
                f"keyring v{offered.version} is older than the accepted v{current.version} and not signed by its "
                "root keys: refused (rollback)"
            )

    def _hold(self, offered: Keyring, current: Keyring) -> None:
        """Keep a future version until its predecessor arrives, if it chains to a trusted version."""
        # The window after the gap holds exactly ``limit`` versions, so waiting versions are bounded too.
        limit = self._config.max_pending_versions_count
        version = offered.version
        if version > current.version + 1 + limit:
            raise TrustError(f"keyring v{version} is more than {limit} versions ahead of v{current.version}: refused")
        held = self._pending.get(version)
        if held is not None:
            if held.raw != offered.raw:
                raise TrustError(f"keyring v{version}: another v{version} signed by trusted root keys is waiting")
            return
        below = max((v for v in self._pending if v < version), default=current.version)
        anchor = self._pending.get(below, current)
        if not anchor.root_signed(offered):
            raise SignatureError(
                f"keyring v{version} is not signed by a threshold of the v{anchor.version} root keys, so it cannot "
                f"chain to the trusted v{current.version}: refused"
            )
        self._pending[version] = offered


def _keys(hex_keys: tuple[str, ...]) -> dict[str, Ed25519PublicKey]:
    keys = [public_key_from_hex(k) for k in hex_keys]
    return {key_id(k): k for k in keys}
