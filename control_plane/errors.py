"""Errors only the control plane raises, on top of the shared tree in :mod:`shared.errors`.

::

    EdgefleetError (shared)
    ├── ConflictError        the resource exists with different content (HTTP 409)
    └── TooLargeError        an upload or request over a configured limit (HTTP 413)

:func:`http_status` maps every edgefleet error to the HTTP status the API answers with.
"""

from __future__ import annotations

from edgefleet.shared.errors import (
    BundleError,
    ConfigError,
    EdgefleetError,
    MessageError,
    NotFoundError,
    RuntimeLoadError,
    TrustError,
)


class ConflictError(EdgefleetError):
    """The same name/version exists with different content."""

    code = "conflict"


class TooLargeError(EdgefleetError):
    """Input over a configured size limit."""

    code = "too_large"


# Checked in order: subclasses before their parents.
_STATUS_BY_ERROR: tuple[tuple[type[EdgefleetError], int], ...] = (
    (NotFoundError, 404),
    (ConflictError, 409),
    (TooLargeError, 413),
    (MessageError, 400),
    (RuntimeLoadError, 400),
    (BundleError, 400),
    (TrustError, 400),
    (ConfigError, 400),
)


def http_status(error: EdgefleetError) -> int:
    """The HTTP status for ``error``: 4xx for the caller's mistakes, 500 for ours."""
    for cls, status in _STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 503 if error.retryable else 500
