"""The audit log's side of the API: each change a request asks for is recorded with its outcome.

:class:`AuditMiddleware` puts an empty :class:`AuditContext` into every request's scope; the
route's access rule (:mod:`.access`) fills in who called, the route names the operation, and a
route whose object is in its body adds it (:func:`audit_target`). Once the answer's status is
known (or the request failed with no answer, a 500) the middleware appends one entry through
:mod:`edgefleet.control_plane.services.audit`, for every method that can change something,
whether it was allowed or refused. Not stored: requests that reached no route (a 404 for an
unknown path: no operation), and refused requests from callers who proved no identity (no or a
bad token, a failed enrollment exchange), which anyone who reaches the API could send by the
million to fill the disk; those go to the server log only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgefleet.control_plane.db.tables import utcnow
from edgefleet.control_plane.services.audit import AuditRecord, record

if TYPE_CHECKING:
    from edgefleet.control_plane.api.access import Principal

log = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SCOPE_KEY = "edgefleet.audit"


@dataclass
class AuditContext:
    """What a request's handling has learnt about it, for its audit entry."""

    principal: Principal | None = None
    targets: list[str] = field(default_factory=list)


def audit_context(request: Request) -> AuditContext | None:
    """The request's audit context (None outside :class:`AuditMiddleware`, as in unit tests)."""
    context = request.scope.get(_SCOPE_KEY)
    return context if isinstance(context, AuditContext) else None


def audit_target(request: Request, target: str) -> None:
    """Name the object a change acts on, beyond its path parameters (e.g. a body's device ids)."""
    context = audit_context(request)
    if context is not None:
        context.targets.append(target)


class AuditMiddleware:
    """Records one audit entry per request that could change something (pure ASGI: no buffering)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in READ_METHODS:
            await self.app(scope, receive, send)
            return
        context = AuditContext()
        scope[_SCOPE_KEY] = context
        status_code = 500  # if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            entry = _entry(scope, context, status_code)
            if entry is not None:
                await run_in_threadpool(_append, scope, entry)


def _entry(scope: Scope, context: AuditContext, status_code: int) -> AuditRecord | None:
    route = scope.get("route")
    operation = getattr(route, "name", None)
    if not operation:
        return None
    params = scope.get("path_params") or {}
    target = " ".join([*(f"{k}={v}" for k, v in params.items()), *context.targets])
    principal = context.principal
    if principal is None and status_code >= 400:
        log.info("refused anonymous %s %s: %d", operation, target, status_code)
        return None
    return AuditRecord(
        token_id=principal.token_id if principal else None,
        actor=principal.actor if principal else "anonymous",
        operation=operation,
        target=target,
        status_code=status_code,
    )


def _append(scope: Scope, entry: AuditRecord) -> None:
    control_plane = getattr(scope["app"].state, "control_plane", None)
    if control_plane is None:
        return
    try:
        with Session(control_plane.engine) as session:
            record(session, entry, now=utcnow())
    except Exception:  # the change itself is done (or refused); a lost entry must not turn it into an error
        log.exception("could not append to the audit log: %s", entry)
