"""Keyring versions for trust tests: given roots, one publisher key and one online key."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from tuf.api.metadata import Metadata, Root

from edgefleet.shared.trust.keyring import build_keyring
from edgefleet.shared.trust.signing import SigningKey


def keyring_metadata(
    version: int,
    *,
    roots: Sequence[SigningKey],
    publisher: SigningKey,
    online: SigningKey,
    expires: datetime,
    root_threshold: int = 1,
) -> Metadata[Root]:
    """An unsigned keyring version (sign it with ``sign_keyring``): ``roots`` (``root_threshold`` of them
    to sign), one publisher key and one online key (threshold 1 each)."""
    return build_keyring(
        version=version,
        root_keys=[k.public_key for k in roots],
        root_threshold=root_threshold,
        publisher_keys=[publisher.public_key],
        publisher_threshold=1,
        online_keys=[online.public_key],
        expires=expires,
    )

