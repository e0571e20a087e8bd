"""Shadows: which devices have one, found by a query on the ``shadow`` table's columns.

Asking for and removing shadows changes desired states, so that is
:class:`~edgefleet.control_plane.services.desired_states.DesiredStateService`'s; this module
reads. A device is listed while it has a :class:`~edgefleet.control_plane.db.tables.Shadow`
row: an active one, or a removed one it may still report (the API shows the latter only while
the device's last report still names it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sqlmodel import Session, col, select

from edgefleet.control_plane.db.tables import Assignment, Device, Shadow


@dataclass(frozen=True)
class DeviceShadows:
    """A device with its assignments and shadow rows (active and removed)."""

    device: Device
    assignments: list[Assignment]
    shadows: list[Shadow]


def find_shadows(
    session: Session, *, model: str | None = None, device: str | None = None, limit: int, offset: int
) -> list[DeviceShadows]:
    """One page of the devices with a shadow (of ``model``, on ``device``, if given), by device id.

    ``limit`` and ``offset`` count devices.
    """
    query = select(Shadow.device_id).distinct().order_by(col(Shadow.device_id)).offset(offset).limit(limit)
    if model is not None:
        query = query.where(Shadow.model_name == model)
    if device is not None:
        query = query.where(Shadow.device_id == device)
    return devices_with_shadows(session, list(session.exec(query).all()))


def devices_with_shadows(session: Session, device_ids: list[str]) -> list[DeviceShadows]:
    """``device_ids`` (those that exist), by id, each with its assignments and shadow rows."""
    if not device_ids:
        return []
    devices = session.exec(select(Device).where(col(Device.id).in_(device_ids)).order_by(col(Device.id))).all()
    assignments: defaultdict[str, list[Assignment]] = defaultdict(list)
    for a in session.exec(select(Assignment).where(col(Assignment.device_id).in_(device_ids))).all():
        assignments[a.device_id].append(a)
    shadows: defaultdict[str, list[Shadow]] = defaultdict(list)
    for s in session.exec(select(Shadow).where(col(Shadow.device_id).in_(device_ids))).all():
        shadows[s.device_id].append(s)
    return [DeviceShadows(d, assignments[d.id], shadows[d.id]) for d in devices]
