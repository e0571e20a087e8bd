"""Who may call each route: one declaration per route, as a dependency.

Every route declares exactly one access rule in its decorator's ``dependencies``:

- ``require(Role.X)``: a bearer API token whose role includes X (:mod:`..services.auth`);
- ``device_or(Role.X)``: that, or a device's own broker credentials as HTTP Basic (the agent
  downloads its bundles with the user name and password it got at enrollment);
- ``public()``: no credential (``/healthz``, and the enrollment exchange, which its one-time
  token guards).

No credential, an unknown, expired or revoked token, or wrong device credentials: 401 with a
``WWW-Authenticate`` challenge. A valid credential without the role: 403. Both in the API's one
error shape, ``{"detail": {"code", "message", "retryable"}}``. The rule is found again from the
route (:func:`declared_access`), which is how the OpenAPI document gets its 401/403 responses and
how the table-driven test checks every route, so a route that declares nothing fails that test.

The rule also tells the audit log (:mod:`.auditing`) who the caller was and what operation it
asked for.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBearer
from sqlmodel import Session

from edgefleet.control_plane.api.auditing import audit_context
from edgefleet.control_plane.api.deps import ControlPlaneDep
from edgefleet.control_plane.api.errors import error_responses
from edgefleet.control_plane.broker.config import verify_password
from edgefleet.control_plane.db.tables import Device, utcnow
from edgefleet.control_plane.services.auth import Role, check_token, find_token

log = logging.getLogger(__name__)

# auto_error=False: a missing credential is answered by the rule below, in the one error shape.
_bearer = HTTPBearer(auto_error=False, scheme_name="apiToken", description="An API token: `edgefleet tokens create`.")


class _DocumentedBasic(HTTPBasic):
    """HTTP Basic in the OpenAPI document only: :func:`_basic_credentials` reads the header, so a
    malformed one is answered in the one error shape rather than by FastAPI's own 401."""

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        return None


_basic = _DocumentedBasic(
    auto_error=False,
    scheme_name="deviceCredentials",
    description="A device's broker user name and password (from enrollment), for bundle downloads.",
)
_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgefleet"'}
_ANY_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgefleet", Basic realm="edgefleet"'}
PUBLIC = "public"


@dataclass(frozen=True, kw_only=True)
class Principal:
    """Who made a request: a token (with its role) or a device."""

    token_id: int | None
    actor: str  # for the audit log: "token 3 (ci)", "device pi-01"
    role: Role | None  # None for a device: it may only download bundles


@dataclass(frozen=True)
class Access:
    """A route's declared rule: the role it needs (``PUBLIC``: none) and whether devices may call it."""

    role: Role | str
    devices: bool = False


def unauthenticated(message: str, *, devices: bool = False) -> HTTPException:
    """The 401 answer, in the API's error shape."""
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail={"code": "unauthenticated", "message": message, "retryable": False},
        headers=_ANY_CHALLENGE if devices else _BEARER_CHALLENGE,
    )


def forbidden(message: str) -> HTTPException:
    """The 403 answer, in the API's error shape."""
    return HTTPException(
        status.HTTP_403_FORBIDDEN, detail={"code": "forbidden", "message": message, "retryable": False}
    )


def _token_principal(session: Session, token: str, *, devices: bool) -> Principal:
    row = find_token(session, token)
    refusal = check_token(row, now=utcnow())
    if refusal is not None or row is None:
        # The caller learns only "401"; the log says which token and why, for whoever runs it.
        log.info("refused an API token: %s%s", refusal, f" (token {row.id})" if row is not None else "")
        raise unauthenticated("the API token is unknown, expired or revoked", devices=devices)
    return Principal(token_id=row.id, actor=f"token {row.id} ({row.name})", role=Role(row.role))


def _device_principal(session: Session, username: str, password: str) -> Principal:
    device = session.get(Device, username) if len(username) <= 128 else None
    if device is None or not device.broker_password_hash or not verify_password(password, device.broker_password_hash):
        raise unauthenticated("unknown device or wrong device credentials", devices=True)
    return Principal(token_id=None, actor=f"device {device.id}", role=None)


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    """HTTP Basic user name and password, if the request carries them (any other scheme: None)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        username, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (username, password) if sep else None


def require(role: Role) -> Any:
    """The access rule "a token whose role includes ``role``", for a route's ``dependencies``."""
    return Depends(_rule(Access(role)))


def device_or(role: Role) -> Any:
    """The access rule "a device's broker credentials, or a token whose role includes ``role``"."""
    return Depends(_rule(Access(role, devices=True)))


def public() -> Any:
    """The access rule "no credential needed" (said explicitly, so no route is public by omission)."""
    return Depends(_rule(Access(PUBLIC)))


def _rule(access: Access) -> Callable[..., Principal | None]:
    if access.role == PUBLIC:

        def open_to_all() -> None:
            return None

        open_to_all.access = access  # type: ignore[attr-defined]
        return open_to_all

    def check(
        request: Request,
        cp: ControlPlaneDep,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal | None:
        context = audit_context(request)
        assert isinstance(access.role, Role)
        with Session(cp.engine) as session:
            if bearer is not None:
                principal = _token_principal(session, bearer.credentials, devices=access.devices)
            elif access.devices and (basic := _basic_credentials(request)) is not None:
                principal = _device_principal(session, *basic)
            else:
                raise unauthenticated(
                    "this needs an API token: send 'Authorization: Bearer <token>'", devices=access.devices
                )
        if context is not None:
            context.principal = principal  # before the role check: a refused attempt is audited with its token
        if principal.role is not None and not principal.role.includes(access.role):
            raise forbidden(f"this needs the {access.role.value} role; this token has {principal.role.value}")
        return principal

    if access.devices:
        # Only for the OpenAPI document: it lists Basic as the second way in. The credentials
        # are read from the header above, so a malformed one is answered like a missing one.
        def check_with_basic(
            request: Request,
            cp: ControlPlaneDep,
            bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
            _basic_doc: Annotated[object, Depends(_basic)],
        ) -> Principal | None:
            return check(request, cp, bearer)

        check_with_basic.access = access  # type: ignore[attr-defined]
        return check_with_basic
    check.access = access  # type: ignore[attr-defined]
    return check


def declared_access(route: APIRoute) -> list[Access]:
    """The access rules ``route`` declares (exactly one for a well-formed route)."""
    return [
        rule
        for dependency in route.dependant.dependencies
        if (rule := getattr(dependency.call, "access", None)) is not None
    ]


def api_routes(routers: Iterable[APIRouter]) -> list[APIRoute]:
    """The routes of ``routers`` (as declared: FastAPI may copy them when a router is included)."""
    return [route for router in routers for route in router.routes if isinstance(route, APIRoute)]


def document_access(routers: Iterable[APIRouter]) -> None:
    """Add the 401 and 403 answers to the OpenAPI responses of every route that needs a credential.

    Call it before the routers are included in the app.
    """
    for route in api_routes(routers):
        rules = declared_access(route)
        if rules and rules[0].role != PUBLIC:
            route.responses = {**error_responses(401, 403), **route.responses}
