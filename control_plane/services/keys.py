"""The control plane's signing keys, in ``<data_dir>/keys/``.

- ``publisher.pem`` signs bundle manifests. It sits here only until publishing moves to the
  ML team's CI (the design wants it offline): stealing the online key alone must not be
  enough to install a model, which is why the two are separate keys even now.
- ``online.pem`` signs each device's desired state.

Both are created on first start (Ed25519, PKCS#8 PEM, mode 0600, written atomically).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgefleet.shared.trust.signing import SigningKey

PUBLISHER_KEY_FILE = "publisher.pem"
ONLINE_KEY_FILE = "online.pem"


@dataclass(frozen=True)
class ControlPlaneKeys:
    """The publisher key (bundle manifests) and the online key (desired states)."""

    publisher: SigningKey
    online: SigningKey

    def public_keys(self) -> dict[str, list[str]]:
        """Hex public keys by role, the form agents pin at enrollment (``GET /api/v1/info``)."""
        return {"publisher": [self.publisher.public_hex], "online": [self.online.public_hex]}


def load_or_create_keys(keys_dir: Path) -> ControlPlaneKeys:
    """Load both keys from ``keys_dir``, creating the directory (0700) and missing keys.

    Args:
        keys_dir: Usually ``<data_dir>/keys``.

    Returns:
        The keys.

    Raises:
        ConfigError: A key file exists but is not an Ed25519 PEM private key.
    """
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)  # the key files are 0600 already; don't even list them to others
    return ControlPlaneKeys(
        publisher=SigningKey.load_or_create(keys_dir / PUBLISHER_KEY_FILE),
        online=SigningKey.load_or_create(keys_dir / ONLINE_KEY_FILE),
    )
