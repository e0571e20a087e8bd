"""``/api/v1/enrollments`` and ``/api/v1/enroll``: one-time tokens, and a device's identity for one."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from edgefleet.control_plane.api.access import public, require
from edgefleet.control_plane.api.auditing import audit_target
from edgefleet.control_plane.api.deps import ControlPlaneDep, SessionDep
from edgefleet.control_plane.api.schemas import (
    BrokerCredentials,
    EnrollmentCreate,
    EnrollmentToken,
    EnrollRequest,
    EnrollResponse,
)
from edgefleet.control_plane.db.tables import utcnow
from edgefleet.control_plane.services import enrollment
from edgefleet.control_plane.services.auth import Role

router = APIRouter(prefix="/api/v1", tags=["devices"])


@router.post(
    "/enrollments",
    dependencies=[require(Role.ADMIN)],
    response_model=EnrollmentToken,
    status_code=status.HTTP_201_CREATED,
)
def create_enrollment(body: EnrollmentCreate, session: SessionDep, request: Request) -> EnrollmentToken:
    """Issue a one-time token that lets one device enroll (``edgefleet-agent enroll``)."""
    audit_target(request, f"device={body.device_id}")
    issued = enrollment.issue_token(session, body.device_id, ttl_s=body.ttl_s, now=utcnow())
    return EnrollmentToken(device_id=issued.device_id, token=issued.token, expires_at=issued.expires_at.isoformat())


@router.post("/enroll", dependencies=[public()], response_model=EnrollResponse)
def enroll(body: EnrollRequest, session: SessionDep, cp: ControlPlaneDep, request: Request) -> EnrollResponse:
    """Exchange a one-time token for the device's identity: broker credentials and the keyring to pin.

    The token is consumed atomically: a second use, an unknown or an expired token is refused.
    """
    credentials = enrollment.enroll(session, body.token, now=utcnow())
    audit_target(request, f"device={credentials.device_id}")
    host, port = cp.device_broker()
    keyring = cp.keyring.current
    return EnrollResponse(
        device_id=credentials.device_id,
        broker=BrokerCredentials(host=host, port=port, username=credentials.username, password=credentials.password),
        keyring=keyring.raw.decode(),
        keyring_version=keyring.version,
    )
