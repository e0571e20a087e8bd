"""The admin token a control plane writes at its first start, for tests that call its API directly.

``LocalFleet`` reads it itself (``fleet.api_token``, ``fleet.auth_headers()``); tests that serve
the app in-process read it from the data dir with :func:`admin_headers`.
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.control_plane.services.auth import ADMIN_TOKEN_FILE


def admin_token(data_dir: Path) -> str:
    """The first-start admin token of the control plane whose data dir is ``data_dir``."""
    return (data_dir / ADMIN_TOKEN_FILE).read_text().strip()


def admin_headers(data_dir: Path) -> dict[str, str]:
    """``Authorization`` headers with that token."""
    return bearer(admin_token(data_dir))


def bearer(token: str) -> dict[str, str]:
    """``Authorization`` headers for ``token``."""
    return {"Authorization": f"Bearer {token}"}
