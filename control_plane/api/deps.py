"""What a route can ask for: the running control plane's parts and a database session."""

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


@dataclass
class ControlPlane:
    """The parts the app's lifespan starts, kept on ``app.state.control_plane``."""

    settings: ServerSettings
    engine: Engine
    keys: ControlPlaneKeys
    store: BundleStore
    desired: DesiredStateService
    ingestor: Ingestor
    bridge: MqttBridge
    broker_host: str
    broker_port: int
    broker_kind: str  # "mosquitto" | "amqtt" (embedded) | "external"
    clock: Callable[[], float] = field(default=time.time)
    keyring: KeyringService | None = None


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
