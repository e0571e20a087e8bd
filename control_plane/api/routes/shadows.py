"""``/api/v1/shadows``: run a candidate version beside the serving one, and read what devices report."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from edgefleet.control_plane.api.access import require
from edgefleet.control_plane.api.auditing import audit_target
from edgefleet.control_plane.api.deps import ControlPlaneDep, SessionDep
from edgefleet.control_plane.api.errors import error_responses
from edgefleet.control_plane.api.schemas import MAX_PAGE, Offset, ShadowCreate, ShadowPublic, device_shadows_public
from edgefleet.control_plane.services.auth import Role
from edgefleet.control_plane.services.shadows import DeviceShadows, devices_with_shadows, find_shadows
from edgefleet.shared.errors import NotFoundError

router = APIRouter(prefix="/api/v1", tags=["shadows"])


@router.post(
    "/shadows",
    dependencies=[require(Role.OPERATOR)],
    response_model=list[ShadowPublic],
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400, 404, 409),
)
def create_shadows(
    body: ShadowCreate, session: SessionDep, cp: ControlPlaneDep, request: Request
) -> list[ShadowPublic]:
    """Run a candidate version beside the serving one on devices, on sampled inputs; never served.

    The candidate must take the same inputs as each device's serving version (400), every device
    must already run the model (409) at another version (409). A shadow of the model already on
    a device is replaced. Deploying the candidate's version later promotes it and drops the shadow.
    """
    audit_target(request, f"model={body.model} version={body.version} devices={','.join(body.devices)}")
    rows = cp.desired.set_shadow(session, body.devices, body.model, body.version, body.sample_rate, now=cp.clock())
    return _public(devices_with_shadows(session, [r.device_id for r in rows]), body.model)


@router.get("/shadows", dependencies=[require(Role.VIEWER)], response_model=list[ShadowPublic])
def list_shadows(
    session: SessionDep,
    model: str | None = None,
    device: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Devices per page.")] = 1000,
    offset: Offset = 0,
) -> list[ShadowPublic]:
    """Shadows asked for or still reported, per device and model, with each device's latest report.

    Paged by device (``limit`` and ``offset`` count devices); ordered by device, then model.
    """
    return _public(find_shadows(session, model=model, device=device, limit=limit, offset=offset), model)


@router.delete(
    "/shadows/{model_name}",
    dependencies=[require(Role.OPERATOR)],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(404),
)
def delete_shadows(
    model_name: str,
    device: Annotated[list[str], Query(description="Device id; repeatable.")],
    session: SessionDep,
    cp: ControlPlaneDep,
    request: Request,
) -> Response:
    """Stop the shadow of a model on devices (a new desired state without it is published)."""
    audit_target(request, f"devices={','.join(device)}")
    if not cp.desired.clear_shadow(session, device, model_name, now=cp.clock()):
        raise NotFoundError(f"no shadow of model {model_name!r} on device(s) {device[:10]}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _public(found: list[DeviceShadows], model: str | None) -> list[ShadowPublic]:
    """Each device's merged rows, of one model if given (a device reports all its shadows)."""
    rows = [row for d in found for row in device_shadows_public(d.device, d.assignments, d.shadows)]
    return [row for row in rows if model is None or row.model_name == model]
