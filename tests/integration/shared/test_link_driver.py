"""The paho driver against a real Mosquitto: many links on one thread, reconnects, clean goodbyes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from edgefleet.control_plane.broker.embedded import MosquittoBroker
from edgefleet.shared.link.base import LinkHandlers, LinkOptions, Received, Will
from edgefleet.shared.link.driver import PahoDriver, PahoLink

WAIT_S = 10.0


@pytest.fixture
def driver() -> Iterator[PahoDriver]:
    driver = PahoDriver()
    driver.start()
    yield driver
    driver.stop()


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.subscribed = threading.Event()
        self.cond = threading.Condition()

    def on_message(self, message: Received) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()

    def wait_count(self, n: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.messages) >= n, WAIT_S)


def _link(driver: PahoDriver, broker: MosquittoBroker, client_id: str, inbox: Inbox, *subscriptions: str,
          will: Will | None = None) -> PahoLink:
    options = LinkOptions(client_id=client_id, host=broker.host, port=broker.port, subscriptions=subscriptions,
                          will=will, reconnect_min_s=0.1, reconnect_max_s=0.5)
    handlers = LinkHandlers(on_message=inbox.on_message, on_subscribed=lambda refused: inbox.subscribed.set())
    return driver.link(options, handlers)


def test_fifty_links_on_one_thread_each_get_their_own_messages(driver: PahoDriver, mosquitto: MosquittoBroker) -> None:
    inboxes = [Inbox() for _ in range(50)]
    tag = time.time_ns()
    links = [_link(driver, mosquitto, f"drv-{tag}-{i}", inbox, f"drv/{tag}/{i}") for i, inbox in enumerate(inboxes)]
    for link in links:
        link.start()
    assert all(inbox.subscribed.wait(WAIT_S) for inbox in inboxes)

    for i, link in enumerate(links):
        for n in range(10):
            link.publish(f"drv/{tag}/{(i + 1) % 50}", b"%d:%d" % (i, n))

    for i, inbox in enumerate(inboxes):
        assert inbox.wait_count(10)
        sender = (i - 1) % 50
        assert [m.payload for m in inbox.messages] == [b"%d:%d" % (sender, n) for n in range(10)]
    assert driver.link_count == 50
    for link in links:
        link.stop()


def test_a_link_reconnects_and_resubscribes_after_a_broker_restart(
    driver: PahoDriver, fresh_mosquitto: MosquittoBroker
) -> None:
    inbox = Inbox()
    link = _link(driver, fresh_mosquitto, "drv-restart", inbox, "restart/t")
    link.start()
    assert inbox.subscribed.wait(WAIT_S)
    inbox.subscribed.clear()

    fresh_mosquitto.restart()

    # Subscriptions are made again on every connect, whatever the broker kept.
    assert inbox.subscribed.wait(WAIT_S), "the link did not reconnect and subscribe again"
    link.publish("restart/t", b"after")
    assert inbox.wait_count(1)
    assert inbox.messages[-1].payload == b"after"
    link.stop()


def test_messages_published_while_the_broker_is_down_leave_after_reconnecting(
    driver: PahoDriver, fresh_mosquitto: MosquittoBroker
) -> None:
    inbox = Inbox()
    watcher = _link(driver, fresh_mosquitto, "drv-watcher", inbox, "queued/t")
    sender = _link(driver, fresh_mosquitto, "drv-sender", Inbox())
    watcher.start()
    sender.start()
    assert inbox.subscribed.wait(WAIT_S) and sender.wait_connected(WAIT_S)
    inbox.subscribed.clear()
    fresh_mosquitto.kill()  # a crash: the broker saves nothing, subscriptions included
    deadline = time.monotonic() + WAIT_S
    while sender.connected and time.monotonic() < deadline:
        time.sleep(0.05)

    # Retained, so that it does not matter whether the watcher resubscribes before it arrives.
    sender.publish("queued/t", b"while down", retain=True)
    fresh_mosquitto.restart()
    assert inbox.subscribed.wait(WAIT_S)
    assert inbox.wait_count(1)
    assert [m.payload for m in inbox.messages] == [b"while down"]
    watcher.stop()
    sender.stop()


def test_a_clean_stop_does_not_fire_the_last_will(driver: PahoDriver, mosquitto: MosquittoBroker) -> None:
    inbox = Inbox()
    tag = time.time_ns()
    watcher = _link(driver, mosquitto, f"drv-will-watch-{tag}", inbox, f"will/{tag}")
    leaver = _link(driver, mosquitto, f"drv-will-{tag}", Inbox(), will=Will(topic=f"will/{tag}", payload=b"gone",
                                                                            retain=False))
    watcher.start()
    leaver.start()
    assert inbox.subscribed.wait(WAIT_S) and leaver.wait_connected(WAIT_S)

    leaver.stop()
    watcher.publish(f"will/{tag}", b"marker")
    assert inbox.wait_count(1)
    assert [m.payload for m in inbox.messages] == [b"marker"]
    watcher.stop()
