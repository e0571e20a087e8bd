"""What a route can ask for: the running control plane's parts and a database session.

Dependency aliases in the full-stack-fastapi-template style: a route names ``SessionDep`` or
``ControlPlaneDep`` as a parameter type and FastAPI provides it. Who may call a route is
declared in the route's decorator, by :mod:`edgefleet.control_plane.api.access`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlmodel import Session

from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.messaging.bridge import MqttBridge
from edgefleet.control_plane.messaging.ingest import Ingestor
from edgefleet.control_plane.services.desired_states import DesiredStateService
from edgefleet.control_plane.services.keyring import KeyringService
from edgefleet.control_plane.services.keys import ControlPlaneKeys
from edgefleet.control_plane.settings import ServerSettings


@dataclass(frozen=True)
class ControlPlane:
    """The parts the app's lifespan starts, kept on ``app.state.control_plane``.

    Frozen: a part that changes while the control plane runs (the keyring and its keys) is
    owned by its service and read from it each time.
    """

    settings: ServerSettings
    engine: Engine
    store: BundleStore
    desired: DesiredStateService
    ingestor: Ingestor
    bridge: MqttBridge
    keyring: KeyringService
    broker_host: str
    broker_port: int
    broker_kind: str  # "mosquitto" | "amqtt" (embedded) | "external"
    clock: Callable[[], float] = field(default=time.time)

    @property
    def keys(self) -> ControlPlaneKeys:
        """The keys the control plane signs with now."""
        return self.keyring.keys

    def device_broker(self) -> tuple[str, int]:
        """The broker address devices are told to use (the settings may name another than ours)."""
        return (
            self.settings.device_broker_host or self.broker_host,
            self.settings.device_broker_port or self.broker_port,
        )


def get_control_plane(request: Request) -> ControlPlane:
    """The running control plane (set by the app's lifespan)."""
    control_plane: ControlPlane = request.app.state.control_plane
    return control_plane


def get_session(control_plane: Annotated[ControlPlane, Depends(get_control_plane)]) -> Iterator[Session]:
    """A session per request; whatever the route did not commit is rolled back."""
    with Session(control_plane.engine) as session:
        yield session


ControlPlaneDep = Annotated[ControlPlane, Depends(get_control_plane)]
SessionDep = Annotated[Session, Depends(get_session)]
