"""``/healthz`` and ``/api/v1/info``: is the process up, and what do agents connect to and pin."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter

from edgefleet.control_plane.api.access import public, require
from edgefleet.control_plane.api.deps import ControlPlaneDep
from edgefleet.control_plane.api.schemas import BrokerAddress, Health, Info, PublicKeys
from edgefleet.control_plane.services.auth import Role

health_router = APIRouter(tags=["health"])
router = APIRouter(prefix="/api/v1", tags=["info"])


@health_router.get("/healthz", dependencies=[public()], response_model=Health)
def healthz(cp: ControlPlaneDep) -> Health:
    """Liveness: the process answers; ``broker_connected`` says whether MQTT is up."""
    return Health(status="ok", broker_connected=cp.bridge.connected)


@router.get("/info", dependencies=[require(Role.VIEWER)], response_model=Info)
def info(cp: ControlPlaneDep) -> Info:
    """Server version, the broker agents connect to, and the public keys they pin at enrollment."""
    current = cp.keyring.current
    return Info(
        version=_package_version(),
        broker=BrokerAddress(host=cp.broker_host, port=cp.broker_port, kind=cp.broker_kind),
        keys=PublicKeys(
            publisher=[k.public_bytes_raw().hex() for k in current.publisher_keys.values()],
            online=[k.public_bytes_raw().hex() for k in current.online_keys.values()],
        ),
        keyring_version=current.version,
    )


def _package_version() -> str:
    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0.0.0+unknown"
