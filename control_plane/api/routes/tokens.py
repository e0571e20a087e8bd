"""``/api/v1/tokens``: create (shown once), list and revoke API tokens (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from edgefleet.control_plane.api.access import require
from edgefleet.control_plane.api.auditing import audit_target
from edgefleet.control_plane.api.deps import SessionDep
from edgefleet.control_plane.api.errors import error_responses
from edgefleet.control_plane.api.schemas import RowId, TokenCreate, TokenCreated, TokenPublic, token_public
from edgefleet.control_plane.db.tables import utcnow
from edgefleet.control_plane.services import auth
from edgefleet.control_plane.services.auth import Role

router = APIRouter(prefix="/api/v1", tags=["tokens"])


@router.post(
    "/tokens",
    dependencies=[require(Role.ADMIN)],
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400),
)
def create_token(body: TokenCreate, session: SessionDep, request: Request) -> TokenCreated:
    """Create an API token with a role; the answer holds the token itself, this once."""
    issued = auth.create_token(session, name=body.name, role=body.role, now=utcnow(), expires_in_s=body.expires_in_s)
    audit_target(request, f"token={issued.row.id} name={body.name} role={body.role.value}")
    return TokenCreated(**token_public(issued.row).model_dump(), token=issued.token)


@router.get("/tokens", dependencies=[require(Role.ADMIN)], response_model=list[TokenPublic])
def list_tokens(session: SessionDep) -> list[TokenPublic]:
    """Every token, revoked and expired ones too (never the tokens themselves)."""
    return [token_public(row) for row in auth.list_tokens(session)]


@router.delete(
    "/tokens/{token_id}",
    dependencies=[require(Role.ADMIN)],
    response_model=TokenPublic,
    responses=error_responses(404),
)
def revoke_token(token_id: RowId, session: SessionDep) -> TokenPublic:
    """Revoke a token: from now on it is answered like an unknown one (401)."""
    return token_public(auth.revoke_token(session, token_id, now=utcnow()))
