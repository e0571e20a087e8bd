"""The REST API, one module per resource; :data:`ROUTERS` is every router the app mounts, in order.

Each module parses the request, calls one service function (``control_plane/services/``) and
shapes the answer (``api/schemas.py``); no business rule lives here.

Where the next features attach:

- who may call a route: each declares one access rule in its decorator
  (``dependencies=[require(Role.X)]``, :mod:`edgefleet.control_plane.api.access`); every change
  is audited by :mod:`edgefleet.control_plane.api.auditing`;
- rollouts, telemetry, the dashboard: one new module here each (``rollouts.py``,
  ``telemetry.py``, ...) over its own service, added to :data:`ROUTERS`.
"""

from __future__ import annotations

from fastapi import APIRouter

from edgefleet.control_plane.api.routes import (
    audit,
    bundles,
    deployments,
    devices,
    enrollment,
    health,
    keyring,
    models,
    shadows,
    tokens,
)

ROUTERS: tuple[APIRouter, ...] = (
    health.health_router,
    health.router,
    models.router,
    bundles.router,
    devices.router,
    enrollment.router,
    deployments.router,
    shadows.router,
    keyring.router,
    tokens.router,
    audit.router,
)
