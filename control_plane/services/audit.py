"""The audit log: every change asked of the API, who asked, when, and how it ended.

The API records one :class:`~edgefleet.control_plane.db.tables.AuditEntry` per request that
could change something (every method but GET and HEAD), allowed or refused: the outcome is the
HTTP status it was answered with, so a 403 shows who tried what without the role for it. Reads
are not logged (they change nothing, and a dashboard polls). Entries are only ever added.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from edgefleet.control_plane.db.tables import AuditEntry

MAX_TARGET_CHARS = 1000  # characters of the object an entry names; a longer one is cut


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """One change asked of the API, as the request's handling collects it."""

    token_id: int | None
    actor: str
    operation: str
    target: str
    status_code: int


def record(session: Session, entry: AuditRecord, *, now: datetime) -> AuditEntry:
    """Append ``entry`` to the audit log at ``now``; commits."""
    row = AuditEntry(
        at=now,
        token_id=entry.token_id,
        actor=entry.actor[:160],
        operation=entry.operation[:64],
        target=entry.target[:MAX_TARGET_CHARS],
        status_code=entry.status_code,
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


def list_entries(
    session: Session, *, token_id: int | None = None, operation: str | None = None, limit: int, offset: int
) -> list[AuditEntry]:
    """Audit entries, newest first, optionally of one token or operation."""
    query = select(AuditEntry)
    if token_id is not None:
        query = query.where(col(AuditEntry.token_id) == token_id)
    if operation is not None:
        query = query.where(col(AuditEntry.operation) == operation)
    query = query.order_by(col(AuditEntry.id).desc()).limit(limit).offset(offset)
    return list(session.exec(query).all())
