"""API tokens and roles: who may call the control plane's API, and for what.

A token is opaque and random (``secrets.token_urlsafe``, with an ``ef_`` prefix so secret
scanners and people can tell what it is); only its sha256 is stored, and its clear text exists
once, in the answer that creates it. A token has one role, an optional expiry and can be
revoked; a revoked or expired token is as unknown as a made-up one.

Roles are a hierarchy, not sets: each role can do everything the roles below it can::

    viewer < operator < publisher < admin
    read     deploy, shadow,   publish models,    devices, enrollment tokens,
             unassign          signed bundles     keyring rotation, tokens, audit

A hierarchy because every operation the API has needs one of these levels and every level's
holder is trusted with the ones below (a publisher who could not deploy what it published would
only ask an operator); one role per token and one comparison per check keep what a token may do
readable, and keep the table of routes and roles (``tests/unit/control_plane/api``) one column.
Sets would be the answer once an operation needs a right that does not nest (say, publishing
without reading); nothing does yet.

Pure decisions (:func:`check_token`) take the stored row and ``now``; the functions that touch
the database take a session and commit.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from sqlmodel import Session, col, func, select

from edgefleet.control_plane.db.tables import ApiToken
from edgefleet.shared.errors import MessageError, NotFoundError
from edgefleet.shared.files import atomic_write_bytes

TOKEN_PREFIX = "ef_"
TOKEN_BYTES = 32  # random bytes in a token (43 URL-safe characters after the prefix)
MAX_TOKEN_CHARS = 256  # characters: a longer Authorization value is refused before it is hashed
ADMIN_TOKEN_FILE = "admin-token"  # under the data dir: the first start's admin token, mode 0600
FIRST_ADMIN_NAME = "first-start admin"


class Role(StrEnum):
    """A token's role; each includes every role before it (see the module docstring)."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    PUBLISHER = "publisher"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """The role's place in the hierarchy: 0 for viewer, up to 3 for admin."""
        return _RANKS[self]

    def includes(self, needed: Role) -> bool:
        """Whether a holder of this role may do what ``needed`` may."""
        return self.rank >= needed.rank


_RANKS = {role: rank for rank, role in enumerate(Role)}


@dataclass(frozen=True, kw_only=True)
class IssuedApiToken:
    """A token as created: the only time its clear text exists on the control plane."""

    row: ApiToken
    token: str


class TokenRefusal(StrEnum):
    """Why a presented token does not authenticate (all answered alike: 401)."""

    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"


def token_sha256(token: str) -> str:
    """The stored form of a token (hex sha256 of its text)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token_text() -> str:
    """A fresh random token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def check_token(row: ApiToken | None, *, now: datetime) -> TokenRefusal | None:
    """Whether a stored token (None: no row has the presented hash) may be used at ``now``.

    Returns:
        None if it may, else why not.
    """
    if row is None:
        return TokenRefusal.UNKNOWN
    if row.revoked_at is not None:
        return TokenRefusal.REVOKED
    if row.expires_at is not None and row.expires_at <= now:
        return TokenRefusal.EXPIRED
    return None


def parse_role(text: str) -> Role:
    """The role named ``text``.

    Raises:
        MessageError: No role has that name.
    """
    try:
        return Role(text)
    except ValueError:
        raise MessageError(f"role must be one of {[r.value for r in Role]}, got {text!r:.40}") from None


def create_token(
    session: Session, *, name: str, role: Role, now: datetime, expires_in_s: int | None = None
) -> IssuedApiToken:
    """Store a new token (its hash) and return it with its clear text; commits.

    Args:
        session: A database session.
        name: What the token is for, for people ("ci", "alice").
        role: What it may do.
        now: The creation time.
        expires_in_s: Seconds until it expires; None: never.

    Raises:
        MessageError: ``name`` is empty or too long, or ``expires_in_s`` is not positive.
    """
    if not name or len(name) > 64:
        raise MessageError("a token's name must be 1 to 64 characters")
    if expires_in_s is not None and expires_in_s <= 0:
        raise MessageError("expires_in_s must be positive")
    token = new_token_text()
    row = ApiToken(
        token_sha256=token_sha256(token),
        name=name,
        role=role.value,
        created_at=now,
        expires_at=None if expires_in_s is None else now + timedelta(seconds=expires_in_s),
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    return IssuedApiToken(row=row, token=token)


def find_token(session: Session, token: str) -> ApiToken | None:
    """The stored row of a presented token's text, if any (whatever its state)."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    return session.exec(select(ApiToken).where(col(ApiToken.token_sha256) == token_sha256(token))).first()


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token ever made, revoked and expired ones too, by id."""
    return list(session.exec(select(ApiToken).order_by(col(ApiToken.id))).all())


def revoke_token(session: Session, token_id: int, *, now: datetime) -> ApiToken:
    """Revoke a token from ``now`` on (revoking it again keeps the first time); commits.

    Raises:
        NotFoundError: No token has that id.
    """
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no token has id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = now
        session.add(row)
        session.commit()
        session.refresh(row)
    return row


def ensure_first_admin_token(session: Session, data_dir: Path, *, now: datetime) -> str | None:
    """On a database with no token at all, make an admin token and write it to the data dir.

    The file (``<data_dir>/admin-token``, mode 0600, written atomically) is how a person on
    this machine, the CLI's default and the local fleet find it; the caller shows it once.

    Returns:
        The new token's clear text, or None if tokens existed already (nothing changed).
    """
    if session.exec(select(func.count()).select_from(ApiToken)).one():
        return None
    token = new_token_text()
    # The file first: a crash before the commit leaves no row, so the next start makes (and
    # writes) another; the other order could leave an admin token nobody was ever shown.
    atomic_write_bytes(data_dir / ADMIN_TOKEN_FILE, token.encode() + b"\n", mode=0o600)
    row = ApiToken(token_sha256=token_sha256(token), name=FIRST_ADMIN_NAME, role=Role.ADMIN.value, created_at=now)
    session.add(row)
    session.commit()
    return token
