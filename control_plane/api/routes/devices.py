"""``/api/v1/devices``: register, list and read devices; take a model off one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from edgefleet.control_plane.api.access import require
from edgefleet.control_plane.api.auditing import audit_target
from edgefleet.control_plane.api.deps import ControlPlaneDep, SessionDep
from edgefleet.control_plane.api.errors import error_responses
from edgefleet.control_plane.api.schemas import MAX_PAGE, DeviceCreate, DevicePublic, Offset, device_public
from edgefleet.control_plane.db.tables import utcnow
from edgefleet.control_plane.services import devices
from edgefleet.control_plane.services.auth import Role
from edgefleet.shared.errors import NotFoundError

router = APIRouter(prefix="/api/v1", tags=["devices"])


@router.get("/devices", dependencies=[require(Role.VIEWER)], response_model=list[DevicePublic])
def list_devices(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1000,
    offset: Offset = 0,
) -> list[DevicePublic]:
    """Known devices, by id."""
    return [device_public(d.device, d.assignments) for d in devices.list_devices(session, limit=limit, offset=offset)]


@router.post(
    "/devices",
    dependencies=[require(Role.ADMIN)],
    response_model=DevicePublic,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": DevicePublic, "description": "Already registered."}, **error_responses(400)},
)
def register_device(body: DeviceCreate, session: SessionDep, response: Response, request: Request) -> DevicePublic:
    """Register a device before its agent first reports (idempotent: 200 if it exists)."""
    audit_target(request, f"device={body.id}")
    found, created = devices.register_device(session, body.id, now=utcnow())
    if not created:
        response.status_code = status.HTTP_200_OK
    return device_public(found.device, found.assignments)


@router.get(
    "/devices/{device_id}",
    dependencies=[require(Role.VIEWER)],
    response_model=DevicePublic,
    responses=error_responses(404),
)
def get_device(device_id: str, session: SessionDep) -> DevicePublic:
    """One device, with its reported state, online flag and assignments."""
    found = devices.get_device(session, device_id)
    return device_public(found.device, found.assignments)


@router.delete(
    "/devices/{device_id}/assignments/{model_name}",
    dependencies=[require(Role.OPERATOR)],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(404),
)
def unassign_model(device_id: str, model_name: str, session: SessionDep, cp: ControlPlaneDep) -> Response:
    """Stop running a model on a device (a new desired state without it is published)."""
    if not cp.desired.unassign(session, [device_id], model_name, now=cp.clock()):
        raise NotFoundError(f"device {device_id!r} is not assigned model {model_name!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
