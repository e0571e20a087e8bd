"""Devices: registering one ahead of its agent, and reading devices with their assignments.

A device also registers itself when its agent first reports (see messaging's ingest); what
it should run is changed through :class:`~edgefleet.control_plane.services.desired_states.DesiredStateService`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from edgefleet.control_plane.db.tables import Assignment, Device
from edgefleet.shared.errors import MessageError, NotFoundError
from edgefleet.shared.wire.strict import DEVICE_ID_RE


@dataclass(frozen=True)
class AssignedDevice:
    """A device and the model versions it is assigned."""

    device: Device
    assignments: list[Assignment]


def list_devices(session: Session, *, limit: int, offset: int) -> list[AssignedDevice]:
    """One page of devices, by id."""
    devices = session.exec(select(Device).order_by(col(Device.id)).offset(offset).limit(limit)).all()
    by_device: dict[str, list[Assignment]] = {d.id: [] for d in devices}
    if devices:
        for a in session.exec(select(Assignment).where(col(Assignment.device_id).in_(list(by_device)))).all():
            by_device[a.device_id].append(a)
    return [AssignedDevice(d, by_device[d.id]) for d in devices]


def get_device(session: Session, device_id: str) -> AssignedDevice:
    """One device.

    Raises:
        NotFoundError: No such device.
    """
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not registered")
    return AssignedDevice(device, _assignments(session, device_id))


def register_device(session: Session, device_id: str, *, now: datetime) -> tuple[AssignedDevice, bool]:
    """Register ``device_id`` unless it is known (idempotent); commits.

    Returns:
        The device, and whether it was created now.

    Raises:
        MessageError: Not a valid device id.
    """
    if not DEVICE_ID_RE.match(device_id):
        raise MessageError(f"device id {device_id!r:.140} must match {DEVICE_ID_RE.pattern}")
    device = session.get(Device, device_id)
    if device is not None:
        return AssignedDevice(device, _assignments(session, device_id)), False
    device = Device(id=device_id, created_at=now)
    session.add(device)
    session.commit()
    session.refresh(device)
    return AssignedDevice(device, []), True


def _assignments(session: Session, device_id: str) -> list[Assignment]:
    return list(session.exec(select(Assignment).where(Assignment.device_id == device_id)).all())
