"""API tokens and roles: the hierarchy, what makes a token usable, and the first admin token."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from edgefleet.control_plane.db.tables import ApiToken
from edgefleet.control_plane.services.auth import (
    ADMIN_TOKEN_FILE,
    TOKEN_PREFIX,
    Role,
    TokenRefusal,
    check_token,
    create_token,
    ensure_first_admin_token,
    find_token,
    list_tokens,
    parse_role,
    revoke_token,
    token_sha256,
)
from edgefleet.shared.errors import MessageError, NotFoundError

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ORDER = [Role.VIEWER, Role.OPERATOR, Role.PUBLISHER, Role.ADMIN]


@pytest.mark.parametrize("held", ORDER)
@pytest.mark.parametrize("needed", ORDER)
def test_each_role_includes_exactly_the_roles_below_it(held: Role, needed: Role) -> None:
    assert held.includes(needed) == (ORDER.index(held) >= ORDER.index(needed))


def test_roles_parse_by_name_and_nothing_else() -> None:
    assert [parse_role(r.value) for r in ORDER] == ORDER
    with pytest.raises(MessageError, match="role must be one of"):
        parse_role("root")


def _row(**fields: object) -> ApiToken:
    return ApiToken(token_sha256="0" * 64, name="t", role="viewer", created_at=NOW, **fields)


@pytest.mark.parametrize(
    ("row", "refusal"),
    [
        (None, TokenRefusal.UNKNOWN),
        (_row(), None),
        (_row(expires_at=NOW + timedelta(seconds=1)), None),
        (_row(expires_at=NOW), TokenRefusal.EXPIRED),  # the expiry instant is already too late
        (_row(revoked_at=NOW - timedelta(days=1)), TokenRefusal.REVOKED),
        (_row(revoked_at=NOW, expires_at=NOW + timedelta(days=1)), TokenRefusal.REVOKED),
    ],
)
def test_a_token_is_usable_only_while_known_unexpired_and_unrevoked(
    row: ApiToken | None, refusal: TokenRefusal | None
) -> None:
    assert check_token(row, now=NOW) == refusal


def test_a_created_token_is_random_stored_only_hashed_and_found_by_its_text(engine: Engine) -> None:
    with Session(engine) as session:
        issued = create_token(session, name="ci", role=Role.PUBLISHER, now=NOW, expires_in_s=60)
        other = create_token(session, name="ci", role=Role.PUBLISHER, now=NOW)
        assert issued.token.startswith(TOKEN_PREFIX) and len(issued.token) >= 40
        assert issued.token != other.token
        assert issued.row.token_sha256 == token_sha256(issued.token) != issued.token
        assert issued.row.expires_at == NOW + timedelta(seconds=60) and other.row.expires_at is None
        found = find_token(session, issued.token)
        assert found is not None and found.id == issued.row.id
        assert find_token(session, issued.token + "x") is None
        assert find_token(session, "") is None
        assert find_token(session, "x" * 10_000) is None  # not even hashed


@pytest.mark.parametrize(("name", "expires_in_s"), [("", None), ("x" * 65, None), ("ci", 0), ("ci", -5)])
def test_a_token_needs_a_name_and_a_positive_lifetime(engine: Engine, name: str, expires_in_s: int | None) -> None:
    with Session(engine) as session, pytest.raises(MessageError):
        create_token(session, name=name, role=Role.VIEWER, now=NOW, expires_in_s=expires_in_s)


def test_revoking_keeps_the_first_time_and_an_unknown_id_is_404(engine: Engine) -> None:
    with Session(engine) as session:
        issued = create_token(session, name="alice", role=Role.OPERATOR, now=NOW)
        assert issued.row.id is not None
        first = revoke_token(session, issued.row.id, now=NOW + timedelta(seconds=5))
        again = revoke_token(session, issued.row.id, now=NOW + timedelta(seconds=9))
        assert first.revoked_at == again.revoked_at == NOW + timedelta(seconds=5)
        assert check_token(find_token(session, issued.token), now=NOW + timedelta(seconds=6)) == TokenRefusal.REVOKED
        with pytest.raises(NotFoundError):
            revoke_token(session, 12345, now=NOW)


def test_the_first_start_makes_one_admin_token_and_writes_it_owner_only(engine: Engine, tmp_path: Path) -> None:
    data_dir = tmp_path / "cp"
    with Session(engine) as session:
        token = ensure_first_admin_token(session, data_dir, now=NOW)
        assert token is not None
        path = data_dir / ADMIN_TOKEN_FILE
        assert path.read_text() == token + "\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        row = find_token(session, token)
        assert row is not None and row.role == Role.ADMIN.value and check_token(row, now=NOW) is None
        # A restart (tokens exist) changes nothing, even if the file was deleted.
        path.unlink()
        assert ensure_first_admin_token(session, data_dir, now=NOW) is None
        assert not path.exists()
        assert len(list_tokens(session)) == 1
