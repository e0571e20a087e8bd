"""Enrollment: a token is issued for one device, buys broker credentials once, and never again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from edgefleet.control_plane.broker.config import verify_password
from edgefleet.control_plane.db.tables import Device, Enrollment
from edgefleet.control_plane.services.enrollment import enroll, issue_token, token_sha256
from edgefleet.shared.errors import MessageError, TrustError

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_a_token_buys_credentials_once_and_only_its_hash_is_stored(engine: Engine) -> None:
    with Session(engine) as session:
        issued = issue_token(session, "pi-01", ttl_s=600, now=NOW)
        assert issued.expires_at == NOW + timedelta(seconds=600)
        stored = session.get(Enrollment, token_sha256(issued.token))
        assert stored is not None and stored.device_id == "pi-01" and issued.token not in stored.token_sha256
        credentials = enroll(session, issued.token, now=NOW + timedelta(seconds=1))
        assert (credentials.device_id, credentials.username) == ("pi-01", "pi-01")
        device = session.get(Device, "pi-01")  # registered by enrolling
        assert device is not None and verify_password(credentials.password, device.broker_password_hash)
        with pytest.raises(TrustError, match="already used"):
            enroll(session, issued.token, now=NOW + timedelta(seconds=2))


def test_an_expired_or_unknown_token_is_refused_and_changes_nothing(engine: Engine) -> None:
    with Session(engine) as session:
        issued = issue_token(session, "pi-02", ttl_s=60, now=NOW)
        with pytest.raises(TrustError):
            enroll(session, issued.token, now=NOW + timedelta(seconds=60))
        with pytest.raises(TrustError):
            enroll(session, "x" * 43, now=NOW)
        assert session.get(Device, "pi-02") is None
        stored = session.get(Enrollment, token_sha256(issued.token))
        assert stored is not None and stored.used_at is None


def test_a_token_names_a_valid_device_id(engine: Engine) -> None:
    with Session(engine) as session, pytest.raises(MessageError, match="must match"):
        issue_token(session, "../etc", ttl_s=60, now=NOW)
