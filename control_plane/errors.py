"""How the control plane's API answers an edgefleet error: the status and body of its response.

The status is the error class's own ``http_status``: :mod:`edgefleet.shared.errors` holds the one
status map, for every API edgefleet serves. The body is ``{"detail": {"code", "message",
"retryable"}}``, the shape the SDK client (:mod:`edgefleet.control_plane.client`) reads back.
"""

from __future__ import annotations

# ConflictError and TooLargeError are part of the shared tree now; they stay importable from here
# until the services and routes that import them from this module import them from there.
from edgefleet.shared.errors import ConflictError, EdgefleetError, TooLargeError

__all__ = ["ConflictError", "TooLargeError", "error_body", "http_status"]


def http_status(error: EdgefleetError) -> int:
    """The HTTP status the API answers ``error`` with: 4xx for the caller's mistakes, 5xx for ours."""
    return error.http_status


def error_body(error: EdgefleetError) -> dict[str, object]:
    """The JSON body the API answers ``error`` with."""
    return {"detail": error.to_dict()}
