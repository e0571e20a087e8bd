"""The MQTT topic scheme: building, parsing, and the control plane's subscriptions."""

from __future__ import annotations

import re

import pytest
from paho.mqtt.client import topic_matches_sub

from edgefleet.shared.errors import ConfigError, MessageError
from edgefleet.shared.wire.topics import (
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
    ROOT,
    Leaf,
    control_plane_subscriptions,
    device_topic,
    parse_device_topic,
)


@pytest.mark.parametrize("leaf", list(Leaf))
@pytest.mark.parametrize("device_id", ["pi-kitchen-01", "A", "dev_1.x", "d" * 128])
def test_device_topic_round_trip(device_id: str, leaf: Leaf) -> None:
    topic = device_topic(device_id, leaf)
    assert topic == f"edgefleet/v1/devices/{device_id}/{leaf.value}"
    parsed_id, parsed_leaf = parse_device_topic(topic)
    assert (parsed_id, parsed_leaf) == (device_id, leaf)
    assert parsed_leaf is leaf


def test_every_leaf_is_either_published_or_subscribed_by_the_device() -> None:
    assert set(DEVICE_PUBLISHES) | set(DEVICE_SUBSCRIBES) == set(Leaf)
    assert not set(DEVICE_PUBLISHES) & set(DEVICE_SUBSCRIBES)


@pytest.mark.parametrize(
    "device_id",
    ["+", "#", "a/b", "", "-leading-dash", "d" * 129, "dev 1", "dév", "a+b", "pi-kitchen-01\n"],
)
def test_device_topic_refuses_ids_that_are_not_device_ids(device_id: str) -> None:
    with pytest.raises(ConfigError, match="invalid device id"):
        device_topic(device_id, Leaf.DESIRED)


@pytest.mark.parametrize(
    "topic",
    [
        "edgefleet/v2/devices/pi/desired",
        "other/v1/devices/pi/desired",
        "edgefleet/v1/devicesX/pi/desired",
        "/edgefleet/v1/devices/pi/desired",
        "edgefleet/v1/devices",
        "",
        "$share/g/edgefleet/v1/devices/pi/desired",
    ],
)
def test_parse_refuses_foreign_topics(topic: str) -> None:
    with pytest.raises(MessageError, match="not an edgefleet device topic"):
        parse_device_topic(topic)


@pytest.mark.parametrize(
    "topic",
    [
        f"{ROOT}/+/desired",
        f"{ROOT}/#",
        f"{ROOT}//desired",
        f"{ROOT}/",
        f"{ROOT}/-x/desired",
        f"{ROOT}/pi kitchen/desired",
        f"{ROOT}/{'d' * 129}/desired",
        f"{ROOT}/pi-kitchen-01\n/desired",
    ],
)
def test_parse_refuses_bad_device_ids(topic: str) -> None:
    with pytest.raises(MessageError, match="invalid device id in topic"):
        parse_device_topic(topic)


@pytest.mark.parametrize(
    "leaf",
    ["", "desire", "DESIRED", "chunks", "chunks/", "chunks/other", "desired/extra", "desired/", "#", "+", "a/b"],
)
def test_parse_refuses_unknown_leaves(leaf: str) -> None:
    with pytest.raises(MessageError, match=re.escape(f"unknown leaf {leaf!r}")):
        parse_device_topic(f"{ROOT}/pi/{leaf}")


def test_control_plane_subscribes_to_what_devices_publish() -> None:
    subs = control_plane_subscriptions()
    assert subs == [
        "edgefleet/v1/devices/+/reported",
        "edgefleet/v1/devices/+/events",
        "edgefleet/v1/devices/+/status",
        "edgefleet/v1/devices/+/chunks/request",
    ]
    for leaf in Leaf:
        topic = device_topic("pi-kitchen-01", leaf)
        matched = [s for s in subs if topic_matches_sub(s, topic)]
        # exactly one filter for what the device publishes; none for what the control plane sends
        assert len(matched) == (1 if leaf in DEVICE_PUBLISHES else 0), (leaf, matched)


@pytest.mark.parametrize("group", [None, ""])
def test_no_share_group_means_plain_subscriptions(group: str | None) -> None:
    assert all(s.startswith(ROOT + "/+/") for s in control_plane_subscriptions(group))


def test_share_group_prefixes_every_subscription() -> None:
    plain = control_plane_subscriptions()
    shared = control_plane_subscriptions("ingest")
    assert shared == [f"$share/ingest/{s}" for s in plain]
    assert len(shared) == len(DEVICE_PUBLISHES)
