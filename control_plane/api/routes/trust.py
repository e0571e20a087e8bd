"""Routes for trust and identity: the keyring, its rotation, signed-bundle upload, enrollment."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, Field
from sqlmodel import Session, col, update
from starlette.concurrency import run_in_threadpool

from edgefleet.control_plane.api.deps import ControlPlane, ControlPlaneDep, SessionDep
from edgefleet.control_plane.api.schemas import model_version_public
from edgefleet.control_plane.db.tables import Device, Enrollment, ModelVersionPublic, utcnow
from edgefleet.control_plane.errors import TooLargeError
from edgefleet.control_plane.services.publishing import register_bundle
from edgefleet.shared.errors import ConfigError, MessageError, NotFoundError, TrustError
from edgefleet.shared.trust.signing import public_key_from_hex
from edgefleet.shared.wire.strict import DEVICE_ID_RE

router = APIRouter(prefix="/api/v1", tags=["trust"])
MAX_ENROLLMENT_TTL_S = 7 * 24 * 3600  # seconds


class KeyringRotation(BaseModel):
    """What changes in the next keyring version; omitted roles stay as they are."""

    publisher_keys: list[str] | None = Field(default=None, description="Hex Ed25519 publisher keys (replace all).")
    publisher_threshold: int | None = Field(default=None, ge=1)
    rotate_online: bool = Field(default=False, description="Issue a new online key and re-sign every desired state.")
    rotate_root: bool = Field(default=False, description="Issue a new root key (signed by old and new).")


class KeyringSummary(BaseModel):
    version: int
    expires: str
    publisher_keys: list[str]
    publisher_threshold: int
    online_keys: list[str]


class EnrollmentCreate(BaseModel):
    device_id: str
    ttl_s: int = Field(default=3600, ge=60, le=MAX_ENROLLMENT_TTL_S)


class EnrollmentToken(BaseModel):
    device_id: str
    token: str
    expires_at: str


class EnrollRequest(BaseModel):
    token: str = Field(min_length=16, max_length=128)


class BrokerCredentials(BaseModel):
    host: str
    port: int
    username: str
    password: str


class EnrollResponse(BaseModel):
    device_id: str
    broker: BrokerCredentials
    keyring: str = Field(description="The current keyring (TUF root metadata JSON) for the agent to pin.")
    keyring_version: int


def _keyring(cp: ControlPlane) -> Any:
    if cp.keyring is None:
        raise ConfigError("this control plane runs without a keyring")
    return cp.keyring


@router.get("/trust/keyring", response_class=Response, responses={200: {"content": {"application/json": {}}}})
def current_keyring(cp: ControlPlaneDep) -> Response:
    """The current keyring version, signed (what agents pin at enrollment)."""
    keyring = _keyring(cp)
    return Response(keyring.current.raw, media_type="application/json")


@router.get("/trust/keyring/{version}", response_class=Response, responses={200: {"content": {"application/json": {}}}})
def keyring_version(version: int, cp: ControlPlaneDep) -> Response:
    """One keyring version, signed."""
    try:
        return Response(_keyring(cp).raw(version), media_type="application/json")
    except FileNotFoundError:
        raise NotFoundError(f"keyring version {version} was never issued") from None


@router.post("/trust/rotate", response_model=KeyringSummary)
def rotate_keyring(body: KeyringRotation, cp: ControlPlaneDep, session: SessionDep) -> KeyringSummary:
    """Issue the next keyring version, publish it to every device, and re-sign desired states if
    the online key changed."""
    service = _keyring(cp)
    publisher_keys = None
    if body.publisher_keys is not None:
        try:
            publisher_keys = [public_key_from_hex(k) for k in body.publisher_keys]
        except ConfigError as exc:
            raise MessageError(str(exc)) from exc
    try:
        keyring, new_online = service.rotate(
            publisher_keys=publisher_keys,
            publisher_threshold=body.publisher_threshold,
            rotate_online=body.rotate_online,
            rotate_root=body.rotate_root,
        )
    except ValueError as exc:  # a threshold above the number of keys
        raise MessageError(str(exc)) from exc
    service.publish_all(cp.bridge)
    cp.keys = service.keys
    if new_online is not None:
        cp.desired.rotate_online_key(session, new_online, now=cp.clock())
    return _summary(keyring)


def _summary(keyring: Any) -> KeyringSummary:
    return KeyringSummary(
        version=keyring.version,
        expires=keyring.expires.isoformat(),
        publisher_keys=[k.public_bytes_raw().hex() for k in keyring.publisher_keys.values()],
        publisher_threshold=keyring.threshold("targets"),
        online_keys=[k.public_bytes_raw().hex() for k in keyring.online_keys.values()],
    )


@router.get("/trust", response_model=KeyringSummary)
def trust_summary(cp: ControlPlaneDep) -> KeyringSummary:
    """The current keyring in readable form."""
    return _summary(_keyring(cp).current)


@router.post(
    "/bundles",
    response_model=ModelVersionPublic,
    status_code=status.HTTP_201_CREATED,
    tags=["models"],
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    },
)
async def upload_bundle(request: Request, cp: ControlPlaneDep) -> ModelVersionPublic:
    """Register a bundle signed outside the control plane (``edgefleet models push --key``).

    It must verify against the keyring's publisher keys; the control plane adds no signature.
    """
    tmp = cp.store.new_temp_path(".bundle-upload")
    limit = cp.settings.max_upload_bytes
    try:
        received = 0
        with tmp.open("wb") as f:
            async for block in request.stream():
                received += len(block)
                if received > limit:
                    raise TooLargeError(f"bundle is over the {limit}-byte upload limit")
                f.write(block)
        if received == 0:
            raise MessageError("empty body: send the bundle bytes as application/octet-stream")
        service = _keyring(cp)
        row = await run_in_threadpool(_register, cp, tmp, service)
    finally:
        tmp.unlink(missing_ok=True)
    return row


def _register(cp: ControlPlane, path: Any, service: Any) -> ModelVersionPublic:
    with Session(cp.engine) as session:
        row = register_bundle(
            session,
            cp.store,
            bundle_path=path,
            trusted_keys=service.publisher_keys(),
            threshold=service.publisher_threshold(),
        )
        return model_version_public(row)


@router.post("/enrollments", response_model=EnrollmentToken, status_code=status.HTTP_201_CREATED, tags=["devices"])
def create_enrollment(body: EnrollmentCreate, session: SessionDep, cp: ControlPlaneDep) -> EnrollmentToken:
    """Issue a one-time token that lets one device enroll (``edgefleet-agent enroll``)."""
    if not DEVICE_ID_RE.match(body.device_id):
        raise MessageError(f"device id {body.device_id!r:.80} must match {DEVICE_ID_RE.pattern}")
    token = secrets.token_urlsafe(32)
    now = utcnow()
    expires = now + timedelta(seconds=body.ttl_s)
    session.add(Enrollment(token_sha256=_sha256(token), device_id=body.device_id, created_at=now, expires_at=expires))
    session.commit()
    return EnrollmentToken(device_id=body.device_id, token=token, expires_at=expires.isoformat())


@router.post("/enroll", response_model=EnrollResponse, tags=["devices"])
def enroll(body: EnrollRequest, session: SessionDep, cp: ControlPlaneDep) -> EnrollResponse:
    """Exchange a one-time token for the device's identity: broker credentials and the keyring to pin.

    The token is consumed atomically: a second use, an unknown or an expired token is refused.
    """
    now = utcnow()
    digest = _sha256(body.token)
    consumed = session.exec(  # type: ignore[call-overload]
        update(Enrollment)
        .where(
            col(Enrollment.token_sha256) == digest, col(Enrollment.used_at).is_(None), col(Enrollment.expires_at) > now
        )
        .values(used_at=now)
    )
    if consumed.rowcount != 1:
        session.rollback()
        raise TrustError("enrollment token is unknown, expired or already used")
    enrollment = session.get(Enrollment, digest)
    assert enrollment is not None
    password = secrets.token_urlsafe(24)
    device = session.get(Device, enrollment.device_id) or Device(id=enrollment.device_id, created_at=now)
    device.broker_password_hash = _broker_password_hash(password)
    session.add(device)
    session.commit()
    keyring = _keyring(cp).current
    return EnrollResponse(
        device_id=enrollment.device_id,
        broker=BrokerCredentials(
            host=cp.settings.device_broker_host or cp.broker_host,
            port=cp.settings.device_broker_port or cp.broker_port,
            username=enrollment.device_id,
            password=password,
        ),
        keyring=keyring.raw.decode(),
        keyring_version=keyring.version,
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _broker_password_hash(password: str) -> str:
    """Mosquitto 2.0 password-file hash, so ``edgefleet broker config`` can admit the device."""
    try:
        from edgefleet.control_plane.broker.config import mosquitto_password_hash
    except ImportError:  # pragma: no cover - the broker-config module ships with the control plane
        return ""
    return mosquitto_password_hash(password)
