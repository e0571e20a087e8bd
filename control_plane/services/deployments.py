"""Deployments: reading them back (they are created by the desired-state service and closed by
the outcomes devices report)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, col, select

from edgefleet.control_plane.db.tables import Deployment, DeploymentStatus
from edgefleet.shared.errors import NotFoundError


def list_deployments(
    session: Session,
    *,
    device: str | None = None,
    model: str | None = None,
    status: DeploymentStatus | None = None,
    limit: int,
    offset: int,
) -> Sequence[Deployment]:
    """One page of deployments, newest first, optionally of one device, model or status."""
    query = select(Deployment).order_by(col(Deployment.id).desc()).offset(offset).limit(limit)
    if device is not None:
        query = query.where(Deployment.device_id == device)
    if model is not None:
        query = query.where(Deployment.model_name == model)
    if status is not None:
        query = query.where(col(Deployment.status) == status)
    return session.exec(query).all()


def get_deployment(session: Session, deployment_id: int) -> Deployment:
    """One deployment.

    Raises:
        NotFoundError: No such deployment.
    """
    row = session.get(Deployment, deployment_id)
    if row is None:
        raise NotFoundError(f"deployment {deployment_id} does not exist")
    return row
