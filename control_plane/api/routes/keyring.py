"""``/api/v1/trust``: the keyring agents pin, every version of it, and its rotation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from edgefleet.control_plane.api.access import require
from edgefleet.control_plane.api.auditing import audit_target
from edgefleet.control_plane.api.deps import ControlPlaneDep, SessionDep
from edgefleet.control_plane.api.errors import error_responses
from edgefleet.control_plane.api.schemas import KeyringRotation, KeyringSummary, RowId
from edgefleet.control_plane.services.auth import Role
from edgefleet.control_plane.services.keyring import KeyringChange, rotate_keyring
from edgefleet.shared.errors import NotFoundError
from edgefleet.shared.trust.keyring import Keyring

router = APIRouter(prefix="/api/v1", tags=["trust"])

_SIGNED_JSON: dict[int | str, dict[str, Any]] = {200: {"content": {"application/json": {}}}}


@router.get("/trust/keyring", dependencies=[require(Role.VIEWER)], response_class=Response, responses=_SIGNED_JSON)
def current_keyring(cp: ControlPlaneDep) -> Response:
    """The current keyring version, signed (what agents pin at enrollment)."""
    return Response(cp.keyring.current.raw, media_type="application/json")


@router.get(
    "/trust/keyring/{version}",
    dependencies=[require(Role.VIEWER)],
    response_class=Response,
    responses={**_SIGNED_JSON, **error_responses(404)},
)
def keyring_version(version: RowId, cp: ControlPlaneDep) -> Response:
    """One keyring version, signed."""
    try:
        return Response(cp.keyring.raw(version), media_type="application/json")
    except FileNotFoundError:
        raise NotFoundError(f"keyring version {version} was never issued") from None


@router.post(
    "/trust/rotate", dependencies=[require(Role.ADMIN)], response_model=KeyringSummary, responses=error_responses(400)
)
def rotate(body: KeyringRotation, cp: ControlPlaneDep, session: SessionDep, request: Request) -> KeyringSummary:
    """Issue the next keyring version, publish it to every device, and re-sign desired states if
    the online key changed."""
    audit_target(request, f"from_version={cp.keyring.current.version}")
    change = KeyringChange(
        publisher_keys=body.publisher_keys,
        publisher_threshold=body.publisher_threshold,
        rotate_online=body.rotate_online,
        rotate_root=body.rotate_root,
    )
    return _summary(rotate_keyring(session, cp.keyring, cp.desired, cp.bridge, change, now=cp.clock()))


@router.get("/trust", dependencies=[require(Role.VIEWER)], response_model=KeyringSummary)
def trust_summary(cp: ControlPlaneDep) -> KeyringSummary:
    """The current keyring in readable form."""
    return _summary(cp.keyring.current)


def _summary(keyring: Keyring) -> KeyringSummary:
    return KeyringSummary(
        version=keyring.version,
        expires=keyring.expires.isoformat(),
        publisher_keys=[k.public_bytes_raw().hex() for k in keyring.publisher_keys.values()],
        publisher_threshold=keyring.threshold("targets"),
        online_keys=[k.public_bytes_raw().hex() for k in keyring.online_keys.values()],
    )
