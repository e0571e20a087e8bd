"""The one model version grammar: PEP 440, as :mod:`packaging.version` parses it.

A rollback floor is only a guarantee if every pair of versions can be compared, so a version
that does not parse is refused where it enters (publishing, the manifest decoder), and a
comparison that is still undefined (a floor stored before this rule existed) refuses the install
rather than answering "not older".
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from edgefleet.shared.errors import DowngradeError, MessageError
from edgefleet.shared.wire.strict import VERSION_RE


def check_version(value: str, what: str = "version") -> str:
    """Return ``value`` if it is a model version: the wire's character set and PEP 440.

    Raises:
        MessageError: It is not both.
    """
    if not VERSION_RE.match(value):
        raise MessageError(f"{what}: {value!r:.80} must match {VERSION_RE.pattern}")
    try:
        Version(value)
    except InvalidVersion as exc:
        raise MessageError(f"{what}: {value!r:.80} is not a PEP 440 version (e.g. 1.2.0, 2.0.0rc1)") from exc
    return value


def is_older(a: str, b: str) -> bool:
    """``a < b`` as PEP 440 versions.

    Raises:
        DowngradeError: Either does not parse, so whether ``a`` is below ``b`` is undefined:
            the caller is guarding a floor, and an unknown answer must not let a version in.
    """
    try:
        return Version(a) < Version(b)
    except InvalidVersion as exc:
        raise DowngradeError(f"versions {a!r:.80} and {b!r:.80} cannot be compared as PEP 440 versions") from exc
