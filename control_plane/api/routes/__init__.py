"""The REST API, one module per resource; :data:`ROUTERS` is every router the app mounts, in order.

Each module parses the request, calls one service function (``control_plane/services/``) and
shapes the answer (``api/schemas.py``); no business rule lives here.

Where the next features attach:

- auth (issue 8: tokens, roles, audit): a principal dependency in ``api/deps.py`` that routes
  declare, and an ``audit`` service the write routes' services call;
- rollouts, telemetry, the dashboard: one new module here each (``rollouts.py``,
  ``telemetry.py``, ...) over its own service, added to :data:`ROUTERS`.
"""

from __future__ import annotations

from fastapi import APIRouter

from edgefleet.control_plane.api.routes import (
    bundles,
    deployments,
    devices,
    enrollment,
    health,
    keyring,
    models,
    shadows,
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
)
