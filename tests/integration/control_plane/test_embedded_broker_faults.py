"""The control plane's embedded broker under faults, with real processes: restarts of the server,
a SIGKILL of the broker, and a desired state the broker lost.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import uvicorn
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session
from support.waiting import within

from edgefleet.control_plane.api.deps import ControlPlane
from edgefleet.control_plane.app import create_app
from edgefleet.control_plane.broker.embedded import find_mosquitto, free_port
from edgefleet.control_plane.broker.kept_port import port_file
from edgefleet.control_plane.db.tables import Device, ModelVersion
from edgefleet.control_plane.settings import ServerSettings
from edgefleet.shared.wire.topics import Leaf, device_topic

WAIT_S = 20.0

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary")


@contextmanager
def _serving(settings: ServerSettings) -> Iterator[FastAPI]:
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the control plane did not start"
        time.sleep(0.02)
    try:
        yield app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _settings(data_dir: Path) -> ServerSettings:
    return ServerSettings(data_dir=data_dir, embedded_broker_kind="mosquitto", broker_supervise_interval_s=0.2)


def _broker_pid(data_dir: Path) -> int | None:
    """The mosquitto process running this data dir's config (found in /proc: it is the server's child)."""
    config = str((data_dir / "broker" / "mosquitto.conf").resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if config.encode() in argv:
            return int(entry.name)
    return None


def _wait(predicate: Callable[[], object], timeout_s: float = WAIT_S) -> bool:
    return within(predicate, timeout_s, poll_s=0.05)


def _retained(host: str, port: int, topic: str) -> bytes | None:
    """The retained message on ``topic`` as a new subscriber gets it, or None."""
    got: list[bytes] = []
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}", clean_session=True)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda _c, _u, message: got.append(bytes(message.payload))
    client.connect(host, port)
    client.loop_start()
    try:
        subscribed.wait(5)
        _wait(lambda: got, timeout_s=1.0)  # a retained message comes right after the SUBACK
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_a_restarted_server_keeps_its_embedded_brokers_port(tmp_path: Path) -> None:
    with _serving(_settings(tmp_path / "cp")) as app:
        first = app.state.broker_port
    with _serving(_settings(tmp_path / "cp")) as app:
        assert app.state.broker_port == first  # enrolled agents find it where they were told
    assert port_file(tmp_path / "cp" / "broker").read_text() == f"{first}\n"


def test_a_killed_broker_comes_back_on_its_port_with_the_state_published_just_before(tmp_path: Path) -> None:
    data_dir = tmp_path / "cp"
    with _serving(_settings(data_dir)) as app:
        cp: ControlPlane = app.state.control_plane
        host, port = cp.broker_host, cp.broker_port
        with Session(cp.engine) as session:
            session.add(Device(id="dev-1", created_at=datetime.now(UTC)))
            session.add(ModelVersion(name="m", version="1", runtime="onnx", bundle_digest="sha256:" + "1" * 64,
                                     bundle_size=1000, manifest_json="{}", created_at=datetime.now(UTC)))
            session.commit()
            cp.desired.assign(session, ["dev-1"], "m", "1", now=time.time())
            envelope = session.get(Device, "dev-1").desired_envelope.encode()  # type: ignore[union-attr]
        topic = device_topic("dev-1", Leaf.DESIRED)
        assert _wait(lambda: _retained(host, port, topic) == envelope)
        pid = _broker_pid(data_dir)
        assert pid is not None

        # A SIGKILL before the next autosave loses what was retained since the last one: here, all of it.
        (data_dir / "broker" / "mosquitto.db").unlink(missing_ok=True)
        os.kill(pid, signal.SIGKILL)

        assert _wait(lambda: _broker_pid(data_dir) not in (None, pid) and _listening(host, port))
        assert _wait(lambda: cp.bridge.connected)
        # published again on the bridge's reconnect: the broker itself had nothing left
        assert _wait(lambda: _retained(host, port, topic) == envelope)
