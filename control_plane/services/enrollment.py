"""Enrollment: one-time tokens an operator issues, and the device identity a token buys.

An operator issues a token for one device id (``POST /enrollments``); only its sha256 is
stored. The device exchanges it once (``POST /enroll``) for broker credentials: the token is
consumed by one conditional ``UPDATE`` (unused, unexpired, this digest), so two racing uses
cannot both succeed, on SQLite or PostgreSQL. The broker password is returned once and only
its Mosquitto password-file hash is kept, for ``edgefleet broker config``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, update

from edgefleet.control_plane.broker.config import mosquitto_password_hash
from edgefleet.control_plane.db.tables import Device, Enrollment
from edgefleet.shared.errors import MessageError, TrustError
from edgefleet.shared.wire.strict import DEVICE_ID_RE

TOKEN_BYTES = 32  # random bytes in an enrollment token (43 URL-safe characters)
BROKER_PASSWORD_BYTES = 24  # random bytes in a device's broker password


@dataclass(frozen=True, kw_only=True)
class IssuedToken:
    """A token as issued: the only time its clear text exists on the control plane."""

    device_id: str
    token: str
    expires_at: datetime


@dataclass(frozen=True, kw_only=True)
class DeviceCredentials:
    """What a consumed token buys: the device's broker user name and password (shown once)."""

    device_id: str
    username: str
    password: str


def issue_token(session: Session, device_id: str, *, ttl_s: int, now: datetime) -> IssuedToken:
    """Store a one-time token for ``device_id``, valid ``ttl_s`` seconds from ``now``; commits.

    Raises:
        MessageError: ``device_id`` is not a valid device id.
    """
    if not DEVICE_ID_RE.match(device_id):
        raise MessageError(f"device id {device_id!r:.80} must match {DEVICE_ID_RE.pattern}")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    expires = now + timedelta(seconds=ttl_s)
    session.add(Enrollment(token_sha256=token_sha256(token), device_id=device_id, created_at=now, expires_at=expires))
    session.commit()
    return IssuedToken(device_id=device_id, token=token, expires_at=expires)


def enroll(session: Session, token: str, *, now: datetime) -> DeviceCredentials:
    """Consume ``token`` and issue its device a new broker password (registering the device); commits.

    Raises:
        TrustError: The token is unknown, expired or already used (nothing changed).
    """
    digest = token_sha256(token)
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
    assert enrollment is not None  # the UPDATE above just matched it
    password = secrets.token_urlsafe(BROKER_PASSWORD_BYTES)
    device = session.get(Device, enrollment.device_id) or Device(id=enrollment.device_id, created_at=now)
    device.broker_password_hash = mosquitto_password_hash(password)
    session.add(device)
    session.commit()
    return DeviceCredentials(device_id=enrollment.device_id, username=enrollment.device_id, password=password)


def token_sha256(token: str) -> str:
    """The stored form of a token (hex sha256 of its text)."""
    return hashlib.sha256(token.encode()).hexdigest()
