"""The MQTT topic scheme, in one place.

Every device owns the subtree ``edgefleet/v1/devices/<device_id>/``; broker ACLs grant a device
exactly that subtree (read: ``desired``, ``chunks/data``; write: the rest)::

    desired         control plane -> device   retained, DSSE-signed desired state
    reported        device -> control plane   retained, the device's reported state
    events          device -> control plane   deployment outcomes and other events
    status          device -> control plane   retained online/offline (offline = MQTT last will)
    chunks/request  device -> control plane   which bundle chunks the device wants next
    chunks/data     control plane -> device   the chunks (binary), or a chunk error (JSON)

The control plane subscribes with ``+`` for the device id; replicas can share ingest by
prefixing :func:`control_plane_subscriptions` with ``$share/<group>/``.
"""

from __future__ import annotations

from enum import StrEnum

from edgefleet.shared.errors import ConfigError, MessageError
from edgefleet.shared.wire.strict import DEVICE_ID_RE

ROOT = "edgefleet/v1/devices"
KEYRING_ROOT = "edgefleet/v1/trust/keyring"  # fleet-wide, retained, one topic per version: readable by all
KEYRING_SUBSCRIPTION = KEYRING_ROOT + "/+"


class Leaf(StrEnum):
    """The per-device topics."""

    DESIRED = "desired"
    REPORTED = "reported"
    EVENTS = "events"
    STATUS = "status"
    CHUNK_REQUEST = "chunks/request"
    CHUNK_DATA = "chunks/data"


DEVICE_PUBLISHES = (Leaf.REPORTED, Leaf.EVENTS, Leaf.STATUS, Leaf.CHUNK_REQUEST)
DEVICE_SUBSCRIBES = (Leaf.DESIRED, Leaf.CHUNK_DATA)


def device_topic(device_id: str, leaf: Leaf) -> str:
    """The topic ``leaf`` of ``device_id``."""
    if not DEVICE_ID_RE.match(device_id):
        raise ConfigError(f"invalid device id {device_id!r:.80}")
    return f"{ROOT}/{device_id}/{leaf}"


def keyring_topic(version: int) -> str:
    """Where keyring ``version`` is published (retained)."""
    return f"{KEYRING_ROOT}/{version}"


def control_plane_subscriptions(share_group: str | None = None) -> list[str]:
    """Topic filters the control plane subscribes to (optionally as a shared subscription)."""
    prefix = f"$share/{share_group}/" if share_group else ""
    return [f"{prefix}{ROOT}/+/{leaf}" for leaf in DEVICE_PUBLISHES]


def parse_device_topic(topic: str) -> tuple[str, Leaf]:
    """Split a per-device topic into (device id, leaf); :class:`MessageError` if it is not one."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        raise MessageError(f"not an edgefleet device topic: {topic!r:.200}")
    device_id, _, leaf = topic[len(prefix) :].partition("/")
    if not DEVICE_ID_RE.match(device_id):
        raise MessageError(f"invalid device id in topic {topic!r:.200}")
    try:
        return device_id, Leaf(leaf)
    except ValueError:
        raise MessageError(f"unknown leaf {leaf!r:.80} in topic {topic!r:.200}") from None
