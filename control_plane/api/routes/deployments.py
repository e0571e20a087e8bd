"""``/api/v1/deployments``: put a model version on devices, and follow how each ended."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from edgefleet.control_plane.api.access import require
from edgefleet.control_plane.api.auditing import audit_target
from edgefleet.control_plane.api.deps import ControlPlaneDep, SessionDep
from edgefleet.control_plane.api.errors import error_responses
from edgefleet.control_plane.api.schemas import (
    MAX_PAGE,
    DeploymentCreate,
    DeploymentPublic,
    Offset,
    RowId,
    deployment_public,
)
from edgefleet.control_plane.db.tables import DeploymentStatus
from edgefleet.control_plane.services import deployments
from edgefleet.control_plane.services.auth import Role

router = APIRouter(prefix="/api/v1", tags=["deployments"])


@router.post(
    "/deployments",
    dependencies=[require(Role.OPERATOR)],
    response_model=list[DeploymentPublic],
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400, 404),
)
def create_deployments(
    body: DeploymentCreate, session: SessionDep, cp: ControlPlaneDep, request: Request
) -> list[DeploymentPublic]:
    """Deploy a published model version to devices: one pending deployment per device."""
    audit_target(request, f"model={body.model} version={body.version} devices={','.join(body.devices)}")
    rows = cp.desired.assign(session, body.devices, body.model, body.version, now=cp.clock())
    return [deployment_public(row) for row in rows]


@router.get("/deployments", dependencies=[require(Role.VIEWER)], response_model=list[DeploymentPublic])
def list_deployments(
    session: SessionDep,
    device: str | None = None,
    model: str | None = None,
    status_: Annotated[DeploymentStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1000,
    offset: Offset = 0,
) -> list[DeploymentPublic]:
    """Deployments, newest first, optionally of one device, model or status."""
    rows = deployments.list_deployments(
        session, device=device, model=model, status=status_, limit=limit, offset=offset
    )
    return [deployment_public(row) for row in rows]


@router.get(
    "/deployments/{deployment_id}",
    dependencies=[require(Role.VIEWER)],
    response_model=DeploymentPublic,
    responses=error_responses(404),
)
def get_deployment(deployment_id: RowId, session: SessionDep) -> DeploymentPublic:
    """One deployment."""
    return deployment_public(deployments.get_deployment(session, deployment_id))
