"""The in-memory broker fake: routing, retained messages, sessions and wills behave like MQTT's."""

from __future__ import annotations

import pytest
from support.memory_link import MemoryBroker, MemoryLink, topic_matches

from edgefleet.shared.errors import BrokerError
from edgefleet.shared.link.base import LinkHandlers, LinkOptions, Received, Will


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/y/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "anything/at/all", True),
        ("a/+", "a", False),
        ("$share/group/a/+/c", "a/x/c", True),
    ],
)
def test_topic_filters(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


def _link(broker: MemoryBroker, client_id: str, *subscriptions: str, clean: bool = False,
          will: Will | None = None) -> tuple[MemoryLink, list[Received]]:
    inbox: list[Received] = []
    options = LinkOptions(client_id=client_id, host="memory", port=0, clean_session=clean, will=will,
                          subscriptions=subscriptions)
    return broker.link(options, LinkHandlers(on_message=inbox.append)), inbox


def test_messages_reach_matching_subscribers_only() -> None:
    broker = MemoryBroker()
    a, inbox_a = _link(broker, "a", "dev/+/x")
    b, inbox_b = _link(broker, "b", "dev/#")
    a.start()
    b.start()

    a.publish("dev/1/x", b"one")
    b.publish("dev/1/y", b"two")
    broker.run_until_idle()

    assert [(m.topic, m.payload) for m in inbox_a] == [("dev/1/x", b"one")]
    assert [(m.topic, m.payload) for m in inbox_b] == [("dev/1/x", b"one"), ("dev/1/y", b"two")]


def test_a_late_subscriber_gets_the_retained_message_and_an_empty_one_clears_it() -> None:
    broker = MemoryBroker()
    broker.publish("dev/1/desired", b"v1", retain=True)
    broker.publish("dev/1/desired", b"v2", retain=True)
    late, inbox = _link(broker, "late", "dev/+/desired")
    late.start()
    broker.run_until_idle()
    assert [(m.payload, m.retain) for m in inbox] == [(b"v2", True)]

    broker.publish("dev/1/desired", b"", retain=True)
    assert broker.retained == {}


def test_a_persistent_session_keeps_what_arrived_while_away_and_a_clean_one_does_not() -> None:
    broker = MemoryBroker()
    durable, durable_inbox = _link(broker, "durable", "t")
    fleeting, fleeting_inbox = _link(broker, "fleeting", "t", clean=True)
    durable.start()
    fleeting.start()
    durable.stop()
    fleeting.stop()

    broker.publish("t", b"while away")
    durable.start()
    fleeting.start()
    broker.run_until_idle()

    assert [m.payload for m in durable_inbox] == [b"while away"]
    assert fleeting_inbox == []


def test_a_dropped_client_leaves_its_will_and_a_stopped_one_does_not() -> None:
    broker = MemoryBroker()
    watcher, inbox = _link(broker, "watcher", "status/#")
    watcher.start()
    dropped, _ = _link(broker, "dropped", will=Will(topic="status/dropped", payload=b"offline"))
    stopped, _ = _link(broker, "stopped", will=Will(topic="status/stopped", payload=b"offline"))
    dropped.start()
    stopped.start()

    broker.drop("dropped")
    stopped.stop()
    broker.run_until_idle()

    assert [m.topic for m in inbox] == ["status/dropped"]
    assert broker.retained == {"status/dropped": b"offline"}
    assert not dropped.connected


def test_publishing_while_disconnected_is_queued_until_the_next_connect() -> None:
    broker = MemoryBroker()
    watcher, inbox = _link(broker, "watcher", "t")
    watcher.start()
    sender, _ = _link(broker, "sender")

    assert sender.publish("t", b"early").wait(1.0) is False
    broker.run_until_idle()
    assert inbox == []
    sender.start()
    broker.run_until_idle()
    assert [m.payload for m in inbox] == [b"early"]


def test_invalid_topics_are_refused() -> None:
    link, _ = _link(MemoryBroker(), "x")
    link.start()
    with pytest.raises(BrokerError):
        link.publish("a/+/b", b"")


def test_refused_subscriptions_are_reported_and_get_nothing() -> None:
    broker = MemoryBroker(refuse=["secret/#"])
    refused: list[list[str]] = []
    inbox: list[Received] = []
    options = LinkOptions(client_id="c", host="memory", port=0, subscriptions=("open/#", "secret/#"))
    link = broker.link(options, LinkHandlers(on_message=inbox.append, on_subscribed=lambda r: refused.append(list(r))))
    link.start()
    broker.publish("secret/x", b"no")
    broker.publish("open/x", b"yes")
    broker.run_until_idle()
    assert refused == [["secret/#"]]
    assert [m.payload for m in inbox] == [b"yes"]
