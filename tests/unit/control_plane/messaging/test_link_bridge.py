"""The control plane's bridge over the in-memory broker: routing by topic, batches, acknowledgements."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from support.memory_link import MemoryBroker, MemoryLink
from support.waiting import within

from edgefleet.control_plane.messaging.bridge import CLIENT_ID, ROUTES, BrokerConnection, MqttBridge, Worker, route
from edgefleet.shared.errors import MessageError
from edgefleet.shared.wire.topics import DEVICE_PUBLISHES, Leaf, control_plane_subscriptions, device_topic

WAIT_S = 5.0


def test_every_device_published_leaf_has_a_worker_and_chunks_have_their_own() -> None:
    assert set(ROUTES) == set(DEVICE_PUBLISHES)
    assert route(device_topic("d", Leaf.CHUNK_REQUEST)) is Worker.CHUNKS
    assert {route(device_topic("d", leaf)) for leaf in DEVICE_PUBLISHES if leaf is not Leaf.CHUNK_REQUEST} == {
        Worker.INGEST
    }
    assert route("not/an/edgefleet/topic") is Worker.INGEST  # rejected there, logged and acknowledged


class Recorder:
    """Handlers that record what they saw, on which thread, and can be held."""

    def __init__(self) -> None:
        self.single: list[tuple[str, bytes, str]] = []
        self.batches: list[list[tuple[str, bytes]]] = []
        self.release = threading.Event()
        self.release.set()
        self.seen = threading.Condition()

    def handle(self, topic: str, payload: bytes) -> None:
        if payload == b"garbage":
            raise MessageError("not a message")
        with self.seen:
            self.single.append((topic, payload, threading.current_thread().name))
            self.seen.notify_all()

    def handle_batch(self, messages: Sequence[tuple[str, bytes]]) -> list[MessageError | None]:
        self.release.wait(WAIT_S)
        with self.seen:
            self.batches.append(list(messages))
            self.seen.notify_all()
        return [MessageError("bad") if p == b"garbage" else None for _, p in messages]

    def wait_for(self, predicate: object) -> bool:
        with self.seen:
            return self.seen.wait_for(predicate, WAIT_S)  # type: ignore[arg-type]


@pytest.fixture
def setup() -> Iterator[tuple[MemoryBroker, MqttBridge, Recorder]]:
    broker = MemoryBroker(autodeliver=True)
    recorder = Recorder()
    bridge = MqttBridge(
        BrokerConnection(host="memory", port=0),
        recorder.handle,
        batch_handler=recorder.handle_batch,
        link_factory=broker,
    )
    bridge.start()
    assert bridge.wait_ready(WAIT_S)
    yield broker, bridge, recorder
    recorder.release.set()
    bridge.stop()


def _link(broker: MemoryBroker) -> MemoryLink:
    return broker.client(CLIENT_ID)


def test_the_bridge_subscribes_to_what_devices_publish_with_a_persistent_session(setup) -> None:
    broker, _, _ = setup
    link = _link(broker)
    assert link.options.subscriptions == tuple(control_plane_subscriptions())
    assert link.options.clean_session is False and link.options.manual_ack is True


def test_chunk_requests_are_served_while_database_writes_are_held(setup) -> None:
    broker, _, recorder = setup
    recorder.release.clear()  # the database is slow
    broker.publish(device_topic("d1", Leaf.REPORTED), b"report")
    broker.publish(device_topic("d1", Leaf.CHUNK_REQUEST), b"request")

    assert recorder.wait_for(lambda: recorder.single)
    assert recorder.single == [(device_topic("d1", Leaf.CHUNK_REQUEST), b"request", "edgefleet-chunks")]
    assert recorder.batches == []
    recorder.release.set()
    assert recorder.wait_for(lambda: recorder.batches)


def test_database_messages_come_in_batches_in_arrival_order_and_are_acknowledged_after(setup) -> None:
    broker, bridge, recorder = setup
    recorder.release.clear()
    broker.publish(device_topic("d0", Leaf.STATUS), b"first")  # taken alone; the rest queue behind it
    topics = [device_topic(f"d{i}", Leaf.STATUS) for i in range(1, 30)]
    for i, topic in enumerate(topics):
        broker.publish(topic, b"garbage" if i == 3 else b"%d" % i)
    assert _link(broker).acked == []
    recorder.release.set()

    assert recorder.wait_for(lambda: sum(len(b) for b in recorder.batches) == 30)
    flat = [m for batch in recorder.batches for m in batch]
    assert [t for t, _ in flat] == [device_topic("d0", Leaf.STATUS), *topics]
    # The first message alone (or with what queued before the worker woke), then the rest at once.
    assert len(recorder.batches) <= 2
    assert recorder.wait_for(lambda: len(_link(broker).acked) == 30)
    assert bridge.messages_handled == 29 and bridge.messages_rejected == 1


def test_a_refused_subscription_keeps_the_bridge_not_ready() -> None:
    broker = MemoryBroker(refuse=[control_plane_subscriptions()[0]])
    bridge = MqttBridge(BrokerConnection(host="memory", port=0), lambda t, p: None, link_factory=broker)
    bridge.start()
    try:
        assert bridge.wait_ready(0.2) is False
    finally:
        bridge.stop()


def test_without_a_batch_handler_each_message_goes_to_the_handler(setup) -> None:
    broker = MemoryBroker(autodeliver=True)
    recorder = Recorder()
    bridge = MqttBridge(BrokerConnection(host="memory", port=0), recorder.handle, link_factory=broker)
    bridge.start()
    try:
        broker.publish(device_topic("d1", Leaf.EVENTS), b"event")
        assert recorder.wait_for(lambda: recorder.single)
        assert recorder.single[0][2] == "edgefleet-ingest"
        assert recorder.wait_for(lambda: len(_link(broker).acked) == 1)
    finally:
        bridge.stop()


class Poisoned:
    """Handlers that fail on b"poison" as a bug or an unforeseen value would (not a MessageError)."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.flaky_left = 1  # b"flaky" fails this many times with a server fault first
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.release.set()

    def _check(self, payload: bytes) -> None:
        if payload == b"poison":
            raise OverflowError("int too large to convert to SQLite INTEGER")
        if payload == b"flaky" and self.flaky_left > 0:
            self.flaky_left -= 1
            raise OSError("disk I/O error")

    def handle(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.calls.append([payload])
        self._check(payload)

    def handle_batch(self, messages: Sequence[tuple[str, bytes]]) -> list[MessageError | None]:
        self.release.wait(WAIT_S)
        with self.lock:
            self.calls.append([p for _, p in messages])
        for _, payload in messages:
            self._check(payload)
        return [None for _ in messages]


@contextlib.contextmanager
def _poison_bridge(*, batches: bool) -> Iterator[tuple[MemoryBroker, Poisoned, MqttBridge]]:
    """A ready bridge on an autodelivering memory broker with :class:`Poisoned` handlers; stopped afterwards."""
    broker = MemoryBroker(autodeliver=True)
    handlers = Poisoned()
    bridge = MqttBridge(
        BrokerConnection(host="memory", port=0),
        handlers.handle,
        batch_handler=handlers.handle_batch if batches else None,
        link_factory=broker,
    )
    bridge.start()
    assert bridge.wait_ready(WAIT_S)
    try:
        yield broker, handlers, bridge
    finally:
        bridge.stop()


def _wait(predicate: Callable[[], object]) -> bool:
    return within(predicate, WAIT_S, poll_s=0.005)


def test_a_poison_chunk_request_is_dropped_and_counted_at_once_never_retried() -> None:
    with _poison_bridge(batches=False) as (broker, handlers, bridge):
        started = time.monotonic()
        broker.publish(device_topic("d1", Leaf.CHUNK_REQUEST), b"poison")
        broker.publish(device_topic("d1", Leaf.CHUNK_REQUEST), b"request")
        assert _wait(lambda: len(_link(broker).acked) == 2)
        elapsed = time.monotonic() - started
        assert handlers.calls == [[b"poison"], [b"request"]]  # tried once
        assert bridge.messages_poisoned == 1 and bridge.messages_handled == 1
        assert elapsed < 0.15  # no retry pauses before the next answer (they were 0.2 s + 1.0 s)


def test_a_poison_message_in_a_batch_spoils_only_itself() -> None:
    with _poison_bridge(batches=True) as (broker, handlers, bridge):
        handlers.release.clear()  # the rest queue up behind the first message and come in one batch
        for i, payload in enumerate([b"first", b"a", b"poison", b"b"]):
            broker.publish(device_topic(f"d{i}", Leaf.STATUS), payload)
        handlers.release.set()
        assert _wait(lambda: len(_link(broker).acked) == 4)
        # The batch failed once, then each of its messages alone: the poison one once, the others applied.
        assert [b"a", b"poison", b"b"] in [call[-3:] for call in handlers.calls if len(call) >= 3]
        assert handlers.calls[-3:] == [[b"a"], [b"poison"], [b"b"]]
        assert handlers.calls.count([b"poison"]) == 1
        assert bridge.messages_handled == 3 and bridge.messages_poisoned == 1


def test_a_server_fault_is_still_tried_again() -> None:
    with _poison_bridge(batches=False) as (broker, handlers, bridge):
        broker.publish(device_topic("d1", Leaf.CHUNK_REQUEST), b"flaky")
        assert _wait(lambda: len(_link(broker).acked) == 1)
        assert handlers.calls == [[b"flaky"], [b"flaky"]]
        assert bridge.messages_handled == 1 and bridge.messages_poisoned == 0


def test_reconnect_listeners_run_after_every_lost_connection_not_at_the_first() -> None:
    broker = MemoryBroker(autodeliver=True)
    bridge = MqttBridge(BrokerConnection(host="memory", port=0), lambda t, p: None, link_factory=broker)
    calls: list[str] = []
    bridge.on_reconnected(lambda: calls.append(threading.current_thread().name))
    bridge.start()
    try:
        assert bridge.wait_ready(WAIT_S)
        assert calls == []  # the first connection: the control plane's start-up publishes itself
        for expected in (1, 2):
            broker.drop(CLIENT_ID)
            assert not bridge.connected
            _link(broker).reconnect()
            assert _wait(lambda n=expected: len(calls) == n)  # type: ignore[misc]
        assert calls == ["edgefleet-reconnected"] * 2  # off the network thread: it may use the database
    finally:
        bridge.stop()
