"""The embedded broker, mosquitto and amqtt, as real paho-mqtt 2.x clients see it.

Every assertion is about messages a subscriber actually received (never PUBACK/SUBACK alone); every wait
is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.control_plane.broker.embedded import (
    BrokerHandle,
    BrokerSettings,
    MosquittoBroker,
    enable_tcp_nodelay,
    free_port,
    start_amqtt,
    start_embedded_broker,
    start_mosquitto,
)
from edgefleet.shared.errors import BrokerError, ConfigError

pytestmark = pytest.mark.timeout(30)

WAIT_S = 5.0


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Client:
    """A paho 2.x client (callback API v2) that records what it receives; every wait is bounded."""

    def __init__(self, broker: BrokerHandle, client_id: str | None = None, clean_session: bool = True) -> None:
        self.broker = broker
        self.client_id = client_id or f"test-{uuid.uuid4().hex[:10]}"
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean_session)
        enable_tcp_nodelay(self.paho)
        self.paho.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]  # quick teardown
        self.nodelay: list[int] = []
        previous = self.paho.on_socket_open

        def on_socket_open(c: mqtt.Client, userdata: object, sock: socket.socket) -> None:
            previous(c, userdata, sock)
            self.nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        self.paho.on_socket_open = on_socket_open
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._subacks: set[int] = set()
        self.session_present: bool | None = None
        self.connect_reason: object = None
        self.paho.on_connect = self._on_connect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_disconnect = self._on_disconnect

    def _on_connect(self, _c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, reason: object, _p: object) -> None:
        self.session_present = flags.session_present
        self.connect_reason = reason
        self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, _codes: object, _p: object) -> None:
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def _on_disconnect(self, *_args: object) -> None:
        self._disconnected.set()

    def connect(self) -> Client:
        self.paho.connect(self.broker.host, self.broker.port, keepalive=30)
        self.paho.loop_start()
        assert self._connected.wait(WAIT_S), f"no CONNACK from {self.broker.url}"
        assert not getattr(self.connect_reason, "is_failure", False), self.connect_reason
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK (for ordering only: tests assert on received messages)."""
        result, mid = self.paho.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, WAIT_S), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        return info

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[Received]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.messages) >= count, timeout_s)
            return list(self.messages)

    def wait_until(self, predicate: Callable[[list[Received]], bool], timeout_s: float = WAIT_S) -> list[Received]:
        with self._cond:
            self._cond.wait_for(lambda: predicate(self.messages), timeout_s)
            return list(self.messages)

    def wait_disconnected(self, timeout_s: float = WAIT_S) -> bool:
        return self._disconnected.wait(timeout_s)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(broker: BrokerHandle, client_id: str | None = None, clean_session: bool = True) -> Client:
        client = Client(broker, client_id, clean_session)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def amqtt_broker() -> Iterator[BrokerHandle]:
    with start_amqtt(BrokerSettings()) as handle:
        yield handle


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest) -> BrokerHandle:
    return request.getfixturevalue("mosquitto" if request.param == "mosquitto" else "amqtt_broker")


def unique_topic(name: str) -> str:
    return f"test/{name}/{uuid.uuid4().hex[:10]}"


def _publish_to_an_offline_session(
    broker: BrokerHandle, clients: Callable[..., Client], name: str, payloads: list[bytes]
) -> tuple[str, str]:
    """A persistent session subscribes to a new topic at QoS 1 and disconnects; then ``payloads`` are
    published there at QoS 1, each acknowledged by the broker. Returns (topic, the session's client id)."""
    topic = unique_topic(name)
    device_id = f"device-{uuid.uuid4().hex[:10]}"
    device = clients(broker, device_id, clean_session=False).connect()
    device.subscribe(topic, qos=1)
    device.close()
    assert device.wait_disconnected()
    publisher = clients(broker).connect()
    infos = [publisher.publish(topic, payload, qos=1) for payload in payloads]
    for info in infos:
        info.wait_for_publish(WAIT_S)
    return topic, device_id


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie left to a non-reaping init counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.02)
    return process_gone(pid)


# ----------------------------------------------------------------------------------------- both brokers


def test_200_qos1_messages_arrive_all_and_in_order(broker: BrokerHandle, clients: Callable[..., Client]) -> None:
    topic = unique_topic("order")
    subscriber = clients(broker).connect()
    subscriber.subscribe(topic, qos=1)
    publisher = clients(broker).connect()
    sent = [f"message-{i:03d}".encode() for i in range(200)]
    for payload in sent:
        publisher.publish(topic, payload, qos=1)

    received = subscriber.wait_for(len(sent))

    assert [m.payload for m in received] == sent
    assert {(m.topic, m.qos, m.retain) for m in received} == {(topic, 1, False)}
    assert subscriber.nodelay == [1] and publisher.nodelay == [1]


def test_retained_message_reaches_a_later_subscriber(broker: BrokerHandle, clients: Callable[..., Client]) -> None:
    topic = unique_topic("retained")
    publisher = clients(broker).connect()
    publisher.publish(topic, b"desired-state-v1", qos=1, retain=True)
    publisher.publish(topic, b"desired-state-v2", qos=1, retain=True).wait_for_publish(WAIT_S)

    late = clients(broker).connect()
    late.subscribe(topic, qos=1)
    received = late.wait_for(1)

    assert received == [Received(topic, b"desired-state-v2", 1, True)]


def test_persistent_session_gets_qos1_messages_published_while_offline(
    broker: BrokerHandle, clients: Callable[..., Client]
) -> None:
    sent = [f"directive-{i}".encode() for i in range(20)]
    topic, device_id = _publish_to_an_offline_session(broker, clients, "offline", sent)

    device_again = clients(broker, device_id, clean_session=False).connect()  # no new SUBSCRIBE
    received = device_again.wait_for(len(sent))

    assert device_again.session_present is True
    assert [m.payload for m in received] == sent
    # RETAIN=0: they match an established subscription (amqtt 0.12.1 says 1 unless patched)
    assert {(m.topic, m.qos, m.retain) for m in received} == {(topic, 1, False)}


def test_retained_messages_go_only_to_subscribers_of_their_topic(
    broker: BrokerHandle, clients: Callable[..., Client]
) -> None:
    """amqtt 0.12.1 unpatched sends every connecting client the retained messages of all topics that any
    client subscribed to."""
    theirs, mine = unique_topic("theirs"), unique_topic("mine")
    publisher = clients(broker).connect()
    publisher.publish(theirs, b"device A state", qos=1, retain=True).wait_for_publish(WAIT_S)
    publisher.publish(mine, b"device B state", qos=1, retain=True).wait_for_publish(WAIT_S)
    device_a = clients(broker).connect()
    device_a.subscribe(theirs, qos=1)
    assert [m.payload for m in device_a.wait_for(1)] == [b"device A state"]

    device_b = clients(broker).connect()
    device_b.subscribe(mine, qos=1)
    received = device_b.wait_until(lambda msgs: any(m.topic == mine for m in msgs))

    # anything sent on connect would have arrived before the answer to the later SUBSCRIBE
    assert received == [Received(mine, b"device B state", 1, True)]


@pytest.mark.parametrize("start", [start_mosquitto, start_amqtt], ids=["mosquitto", "amqtt"])
def test_stop_leaves_no_process_and_no_listener(
    start: Callable[[BrokerSettings], BrokerHandle], tmp_path: Path
) -> None:
    handle = start(BrokerSettings())
    pid, port, data_dir = handle.pid, handle.port, handle.data_dir
    assert pid is not None and not process_gone(pid)
    assert data_dir.is_dir()

    handle.stop()
    handle.stop()  # idempotent

    assert process_gone(pid)
    assert handle.pid is None and not handle.is_running()
    assert not data_dir.exists(), "the temporary data dir owned by the handle must be deleted"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    with pytest.raises(BrokerError):
        handle.restart()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("starter", ["start_mosquitto", "start_amqtt"])
def test_broker_dies_when_its_parent_is_sigkilled(starter: str, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from edgefleet.control_plane.broker.embedded import BrokerSettings, {starter}
        handle = {starter}(BrokerSettings(data_dir={str(tmp_path)!r}))
        print(handle.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    broker_pid: int | None = None
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line.strip().isdigit(), f"parent did not report a broker pid: {line!r}"
        broker_pid = int(line)
        assert not process_gone(broker_pid)
        parent.kill()
        parent.wait(WAIT_S)
        assert wait_gone(broker_pid), f"broker pid {broker_pid} outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(WAIT_S)
        if parent.stdout:
            parent.stdout.close()
        if broker_pid is not None and not process_gone(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)  # do not leave an orphan behind when the test fails


def test_a_broker_started_from_a_worker_thread_outlives_that_thread(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG fires when the forking *thread* exits: it must not be armed from a worker thread."""
    started: list[BrokerHandle] = []
    worker = threading.Thread(target=lambda: started.append(start_mosquitto(BrokerSettings(data_dir=tmp_path))))
    worker.start()
    worker.join(WAIT_S)
    assert started, "start_mosquitto did not return in the worker thread"
    with started[0] as handle:
        pid = handle.pid
        assert pid is not None
        time.sleep(0.2)
        assert not process_gone(pid) and handle.is_running()


# ----------------------------------------------------------------------------------------- mosquitto


def test_mosquitto_restart_keeps_retained_messages(
    fresh_mosquitto: MosquittoBroker, clients: Callable[..., Client]
) -> None:
    topic = unique_topic("persisted")
    port = fresh_mosquitto.port
    publisher = clients(fresh_mosquitto).connect()
    publisher.publish(topic, b"kept across restarts", qos=1, retain=True).wait_for_publish(WAIT_S)
    old_pid = fresh_mosquitto.pid

    fresh_mosquitto.restart()

    assert fresh_mosquitto.port == port and fresh_mosquitto.pid not in (None, old_pid)
    assert old_pid is not None and process_gone(old_pid)
    late = clients(fresh_mosquitto).connect()
    late.subscribe(topic, qos=1)
    assert late.wait_for(1) == [Received(topic, b"kept across restarts", 1, True)]


def test_mosquitto_restart_keeps_a_persistent_sessions_queue(
    fresh_mosquitto: MosquittoBroker, clients: Callable[..., Client]
) -> None:
    sent = [f"chunk-{i}".encode() for i in range(50)]
    _, device_id = _publish_to_an_offline_session(fresh_mosquitto, clients, "queued", sent)

    fresh_mosquitto.restart()

    device_again = clients(fresh_mosquitto, device_id, clean_session=False).connect()
    assert [m.payload for m in device_again.wait_for(len(sent))] == sent


def test_mosquitto_disconnects_a_client_sending_an_oversized_packet(
    tmp_path: Path, clients: Callable[..., Client]
) -> None:
    with start_mosquitto(BrokerSettings(data_dir=tmp_path, max_packet_size_bytes=1024)) as handle:
        topic = unique_topic("size")
        subscriber = clients(handle).connect()
        subscriber.subscribe(topic, qos=1)
        big = clients(handle).connect()
        big.publish(topic, b"x" * 2048, qos=1)
        assert big.wait_disconnected(), "the broker must drop a client that exceeds max_packet_size"

        small = clients(handle).connect()
        small.publish(topic, b"fits", qos=1)

        received = subscriber.wait_until(lambda msgs: any(m.payload == b"fits" for m in msgs))
        assert [m.payload for m in received] == [b"fits"]


def test_mosquitto_start_failure_reports_the_log(tmp_path: Path) -> None:
    settings = BrokerSettings(data_dir=tmp_path, extra_config=("no_such_option 1",))
    with pytest.raises(BrokerError) as caught:
        start_mosquitto(settings)
    assert caught.value.code == "broker_failed"
    assert "no_such_option" in str(caught.value)


@pytest.mark.parametrize("start", [start_mosquitto, start_amqtt], ids=["mosquitto", "amqtt"])
def test_a_port_already_listened_on_is_refused(start: Callable[[BrokerSettings], BrokerHandle]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(BrokerError, match=str(port)):
            start(BrokerSettings(port=port))


def test_explicit_port_and_data_dir_are_used(tmp_path: Path) -> None:
    port = free_port()
    with start_mosquitto(BrokerSettings(port=port, data_dir=tmp_path / "data")) as handle:
        assert handle.port == port and handle.url == f"mqtt://127.0.0.1:{port}"
        assert (tmp_path / "data" / "mosquitto.conf").is_file()
    assert (tmp_path / "data").is_dir(), "a caller's data dir is never deleted"


def test_start_embedded_broker_prefers_mosquitto() -> None:
    with start_embedded_broker(BrokerSettings()) as handle:
        assert handle.kind == "mosquitto"


# ----------------------------------------------------------------------------------------- amqtt


def test_amqtt_refuses_settings_it_cannot_honour(tmp_path: Path) -> None:
    password_file = tmp_path / "passwd"
    password_file.write_text("")
    with pytest.raises(ConfigError, match="password_file"):
        start_amqtt(BrokerSettings(password_file=password_file))


def test_amqtt_restart_forgets_retained_messages(clients: Callable[..., Client]) -> None:
    """Documents the limitation: amqtt keeps everything in memory."""
    with start_amqtt(BrokerSettings()) as handle:
        old = unique_topic("forgotten")
        clients(handle).connect().publish(old, b"gone after restart", qos=1, retain=True).wait_for_publish(WAIT_S)
        handle.restart()
        marker = unique_topic("marker")
        clients(handle).connect().publish(marker, b"after restart", qos=1, retain=True).wait_for_publish(WAIT_S)

        late = clients(handle).connect()
        late.subscribe(old, qos=1)  # retained messages for it would be sent before the next SUBACK
        late.subscribe(marker, qos=1)
        received = late.wait_until(lambda msgs: any(m.topic == marker for m in msgs))
        assert [m.payload for m in received] == [b"after restart"]


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        BrokerSettings(port=70_000)
    with pytest.raises(ConfigError):
        BrokerSettings(max_packet_size_bytes=10)
    with pytest.raises(ConfigError):
        BrokerSettings(extra_config=("allow_anonymous true\nlistener 1883",))
