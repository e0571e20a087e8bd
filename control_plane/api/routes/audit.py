"""``/api/v1/audit``: the audit log, newest first (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from edgefleet.control_plane.api.access import require
from edgefleet.control_plane.api.deps import SessionDep
from edgefleet.control_plane.api.schemas import MAX_INT64, MAX_PAGE, AuditEntryPublic, Offset, audit_entry_public
from edgefleet.control_plane.services import audit
from edgefleet.control_plane.services.auth import Role

router = APIRouter(prefix="/api/v1", tags=["audit"])


@router.get("/audit", dependencies=[require(Role.ADMIN)], response_model=list[AuditEntryPublic])
def list_audit(
    session: SessionDep,
    token_id: Annotated[int | None, Query(ge=1, le=MAX_INT64)] = None,
    operation: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Offset = 0,
) -> list[AuditEntryPublic]:
    """Every change asked of the API (allowed or refused), newest first, optionally of one token or operation."""
    rows = audit.list_entries(session, token_id=token_id, operation=operation, limit=limit, offset=offset)
    return [audit_entry_public(row) for row in rows]
