"""The agent's device link over the in-memory broker: its topics, status and last will."""

from __future__ import annotations

from support.memory_link import MemoryBroker

from edgefleet.agent.config import BrokerConfig
from edgefleet.agent.link import MqttLink
from edgefleet.shared.wire.messages import DeviceStatus
from edgefleet.shared.wire.topics import KEYRING_ROOT, Leaf, device_topic

NOW = 1_800_000_000.0


def _device_link(
    broker: MemoryBroker, received: list[tuple[Leaf, bytes]], keyrings: list[tuple[str, bytes]]
) -> MqttLink:
    return MqttLink(
        "dev-1",
        BrokerConfig(host="memory", port=1883),
        lambda leaf, payload: received.append((leaf, payload)),
        on_keyring=lambda topic, payload: keyrings.append((topic, payload)),
        link_factory=broker,
        clock=lambda: NOW,
    )


def test_connecting_publishes_online_status_and_the_will_says_offline() -> None:
    broker = MemoryBroker()
    link = _device_link(broker, [], [])
    link.start()
    broker.run_until_idle()
    status_topic = device_topic("dev-1", Leaf.STATUS)
    assert link.connected.is_set()
    assert DeviceStatus.decode(broker.retained[status_topic]).online is True

    broker.drop("dev-1")
    assert not link.connected.is_set()
    assert DeviceStatus.decode(broker.retained[status_topic]) == DeviceStatus(device_id="dev-1", online=False, ts=NOW)


def test_a_clean_stop_says_offline_itself() -> None:
    broker = MemoryBroker()
    link = _device_link(broker, [], [])
    link.start()
    link.stop()
    assert DeviceStatus.decode(broker.retained[device_topic("dev-1", Leaf.STATUS)]).online is False
    assert broker.connected_clients() == []


def test_messages_are_handed_over_by_leaf_and_keyrings_apart() -> None:
    broker = MemoryBroker()
    received: list[tuple[Leaf, bytes]] = []
    keyrings: list[tuple[str, bytes]] = []
    link = _device_link(broker, received, keyrings)
    broker.publish(device_topic("dev-1", Leaf.DESIRED), b"desired", retain=True)
    broker.publish(f"{KEYRING_ROOT}/3", b"keyring", retain=True)
    link.start()
    broker.publish(device_topic("dev-1", Leaf.CHUNK_DATA), b"chunk")
    broker.publish(device_topic("dev-2", Leaf.DESIRED), b"not mine")
    broker.run_until_idle()

    assert received == [(Leaf.DESIRED, b"desired"), (Leaf.CHUNK_DATA, b"chunk")]
    assert keyrings == [(f"{KEYRING_ROOT}/3", b"keyring")]  # with its topic: the version must match


def test_what_is_published_while_offline_leaves_after_reconnecting() -> None:
    broker = MemoryBroker()
    link = _device_link(broker, [], [])
    link.start()
    broker.drop("dev-1")
    link.publish(Leaf.EVENTS, b"event")
    assert (device_topic("dev-1", Leaf.EVENTS), b"event", False) not in broker.published
    broker.client("dev-1").reconnect()
    assert (device_topic("dev-1", Leaf.EVENTS), b"event", False) in broker.published
