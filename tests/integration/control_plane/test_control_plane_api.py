"""The real control plane (uvicorn in a thread) against a real Mosquitto and real ONNX models.

Devices are played by plain paho clients: what the tests assert is what a subscriber really
received from the broker, or what the API reads back from the database, never what a library
said it sent.

Not Starlette's TestClient: this Starlette warns that it wants ``httpx2``, and warnings are
errors here; a real server also exercises the streaming upload as a client sends it.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import paho.mqtt.client as mqtt
import pytest
import uvicorn
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text
from sqlmodel import SQLModel
from support.auth import admin_headers
from support.waiting import eventually

from edgefleet.control_plane.app import create_app
from edgefleet.control_plane.broker.embedded import MosquittoBroker, free_port
from edgefleet.control_plane.db.engine import create_db_engine
from edgefleet.control_plane.db.schema import VERSION_TABLE, baseline_metadata, current_revision, head_revision
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, make_mlp_weights
from edgefleet.control_plane.settings import ServerSettings
from edgefleet.shared.bundle.format import sha256_file, verify_bundle
from edgefleet.shared.trust.signing import key_id, public_key_from_hex
from edgefleet.shared.wire.chunks import Chunk, ChunkRequest, chunk_count, decode_chunk_message
from edgefleet.shared.wire.messages import (
    DeploymentEvent,
    DeviceStatus,
    ModelReport,
    Outcome,
    ReportedState,
    verify_desired_state,
)
from edgefleet.shared.wire.topics import Leaf, device_topic

UPLOAD_LIMIT = 256 * 1024  # bytes: above the demo MLP (~30 KB), far below a real limit
CHUNK_SIZE = 4096
WAIT_S = 10.0

T = TypeVar("T")


# --- fixtures ----------------------------------------------------------------------------------


@dataclass
class RunningServer:
    app: FastAPI
    base_url: str
    settings: ServerSettings


def _serve(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the control plane did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # SQLite in the data dir by default; EDGEFLEET_TEST_DATABASE_URL runs on another database.
    database_url = os.environ.get("EDGEFLEET_TEST_DATABASE_URL", "")
    if database_url:
        engine = create_db_engine(database_url)
        SQLModel.metadata.drop_all(engine)
        with engine.begin() as connection:  # or the empty database would pass for one at head
            connection.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
        engine.dispose()
    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("control-plane"),
        database_url=database_url,
        broker_host=mosquitto.host,
        broker_port=mosquitto.port,
        # Its own persistent session: the broker is shared with other test modules.
        client_id_suffix=f"test-{uuid.uuid4().hex[:8]}",
        max_upload_bytes=UPLOAD_LIMIT,
        max_chunk_bytes=CHUNK_SIZE * 4,
    )
    app = create_app(settings)
    uv, thread, base_url = _serve(app)
    try:
        yield RunningServer(app=app, base_url=base_url, settings=settings)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def api(server: RunningServer) -> Iterator[httpx.Client]:
    headers = admin_headers(server.settings.data_dir)
    with httpx.Client(base_url=server.base_url, timeout=30, headers=headers) as client:
        yield client


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    path.write_bytes(build_onnx_mlp(make_mlp_weights(seed=1)))
    return path


class MqttDevice:
    """A paho client playing a device: publishes on its topics, records what it receives."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self.device_id = device_id
        self.received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subscribed: queue.Queue[int] = queue.Queue()
        self._connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{device_id}-{uuid.uuid4().hex[:6]}")
        self.client.on_socket_open = lambda _c, _u, sock: _no_delay(sock)
        self.client.on_connect = lambda *_args: self._connected.set()
        self.client.on_subscribe = lambda _c, _u, mid, *_args: self._subscribed.put(mid)
        self.client.on_message = lambda _c, _u, message: self.received.put(message)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._connected.wait(WAIT_S), "test device did not connect"

    def subscribe(self, leaf: Leaf) -> None:
        _, mid = self.client.subscribe(device_topic(self.device_id, leaf), qos=1)
        assert self._subscribed.get(timeout=WAIT_S) == mid

    def publish(self, leaf: Leaf, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(device_topic(self.device_id, leaf), payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def next_message(self) -> mqtt.MQTTMessage:
        return self.received.get(timeout=WAIT_S)

    def close(self) -> None:
        # Clear what this test left retained, so no other test inherits it.
        for leaf in (Leaf.REPORTED, Leaf.STATUS):
            self.client.publish(device_topic(self.device_id, leaf), b"", qos=1, retain=True).wait_for_publish(WAIT_S)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def make_device(mosquitto: MosquittoBroker) -> Iterator[Callable[[str], MqttDevice]]:
    devices: list[MqttDevice] = []

    def make(device_id: str) -> MqttDevice:
        device = MqttDevice(mosquitto, device_id)
        devices.append(device)
        return device

    yield make
    for device in devices:
        device.close()


def _no_delay(sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _eventually(probe: Callable[[], T], what: str, timeout_s: float = WAIT_S) -> T:
    """Poll ``probe`` until it returns something truthy, and return that."""
    return eventually(probe, timeout_s=timeout_s, failure=f"timed out waiting for {what}")


def _publish_model(api: httpx.Client, path: Path, name: str, version: str, **fields: str) -> httpx.Response:
    with path.open("rb") as f:
        return api.post(
            "/api/v1/models", data={"name": name, "version": version, **fields}, files={"file": (path.name, f)}
        )


def _trusted(api: httpx.Client, role: str) -> dict[str, Any]:
    keys = [public_key_from_hex(h) for h in api.get("/api/v1/info").json()["keys"][role]]
    return {key_id(k): k for k in keys}


# --- info and health ---------------------------------------------------------------------------


def test_info_names_the_broker_and_the_keys_to_pin(api: httpx.Client, mosquitto: MosquittoBroker) -> None:
    assert api.get("/healthz").json() == {"status": "ok", "broker_connected": True}
    info = api.get("/api/v1/info").json()
    assert info["broker"] == {"host": mosquitto.host, "port": mosquitto.port, "kind": "external"}
    assert set(info["keys"]) == {"publisher", "online"}
    publisher, online = info["keys"]["publisher"], info["keys"]["online"]
    assert len(publisher) == len(online) == 1
    assert publisher != online  # stealing the online key alone must not be enough
    for hex_key in publisher + online:
        public_key_from_hex(hex_key)


# --- publishing and downloading ----------------------------------------------------------------


def test_a_published_model_is_a_bundle_signed_by_the_publisher_key(
    api: httpx.Client, onnx_model: Path, tmp_path: Path
) -> None:
    name = _unique("mlp")
    response = _publish_model(api, onnx_model, name, "1.0.0", description="demo", labels='{"team": "cv"}')

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["version"], body["runtime"]) == (name, "1.0.0", "onnx")
    assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}]
    assert body["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]}]
    assert (body["description"], body["labels"]) == ("demo", {"team": "cv"})

    download = api.get(f"/api/v1/bundles/{body['bundle_digest']}")
    assert download.status_code == 200
    assert len(download.content) == body["bundle_size"]
    bundle = tmp_path / "downloaded.bundle"
    bundle.write_bytes(download.content)
    assert sha256_file(bundle) == body["bundle_digest"]
    manifest = verify_bundle(bundle, trusted_keys=_trusted(api, "publisher"))
    assert (manifest.name, manifest.version, manifest.runtime, manifest.model_file) == (
        name, "1.0.0", "onnx", "model.onnx"
    )
    assert manifest.file("model.onnx").sha256 == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    # The online key must not be able to stand in for the publisher key.
    with pytest.raises(Exception, match="valid signature"):
        verify_bundle(bundle, trusted_keys=_trusted(api, "online"))

    listed = api.get("/api/v1/models").json()
    assert [m["bundle_digest"] for m in listed if m["name"] == name] == [body["bundle_digest"]]
    assert api.get(f"/api/v1/models/{name}/versions/1.0.0").json() == body
    assert api.get(f"/api/v1/models/{name}/versions/9.9").status_code == 404


def test_bundles_download_by_range_and_by_bare_or_encoded_digest(api: httpx.Client, onnx_model: Path) -> None:
    body = _publish_model(api, onnx_model, _unique("ranged"), "1").json()
    digest = body["bundle_digest"]
    full = api.get(f"/api/v1/bundles/{digest}").content

    part = api.get(f"/api/v1/bundles/{digest}", headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.content == full[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(full)}"
    tail = api.get(f"/api/v1/bundles/{digest}", headers={"Range": "bytes=-10"})
    assert (tail.status_code, tail.content) == (206, full[-10:])

    assert api.get(f"/api/v1/bundles/{digest.removeprefix('sha256:')}").content == full
    assert api.get(f"/api/v1/bundles/{digest.replace(':', '%3A')}").content == full
    missing = api.get("/api/v1/bundles/" + "0" * 64)
    assert missing.status_code == 404
    assert missing.json()["detail"]["code"] == "not_found"
    bad = api.get("/api/v1/bundles/..%2F..%2Fetc%2Fpasswd")
    assert bad.status_code in (400, 404)


def test_publishing_is_idempotent_for_the_same_bytes_and_a_conflict_for_others(
    api: httpx.Client, onnx_model: Path, tmp_path: Path
) -> None:
    name = _unique("idem")
    first = _publish_model(api, onnx_model, name, "1")
    again = _publish_model(api, onnx_model, name, "1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()

    other = tmp_path / "other.onnx"
    other.write_bytes(build_onnx_mlp(make_mlp_weights(seed=2)))
    conflict = _publish_model(api, other, name, "1")
    assert conflict.status_code == 409
    assert conflict.json()["detail"]["code"] == "conflict"
    assert [m["version"] for m in api.get("/api/v1/models", params={"name": name}).json()] == ["1"]


def test_an_upload_over_the_limit_is_refused_with_413(api: httpx.Client, tmp_path: Path) -> None:
    name = _unique("huge")
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (UPLOAD_LIMIT + 1))

    response = _publish_model(api, big, name, "1")

    assert response.status_code == 413
    assert response.json()["detail"]["code"] == "too_large"
    assert api.get("/api/v1/models", params={"name": name}).json() == []


def test_a_streamed_upload_without_content_length_is_cut_at_the_limit(api: httpx.Client) -> None:
    boundary = "edgefleet-test-boundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nstreamed\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.onnx"\r\n\r\n'
        ).encode()
        for _ in range(UPLOAD_LIMIT // 65536 + 2):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = api.post(
        "/api/v1/models", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"json": {"name": "x", "version": "1"}}, "multipart/form-data"),
        ({"data": {"name": "x", "version": "1"}, "files": {"other": ("m.onnx", b"abc")}}, "file"),
        ({"data": {"version": "1"}, "files": {"file": ("m.onnx", b"abc")}}, "'name' is required"),
        ({"data": {"name": "Bad Name!", "version": "1"}, "files": {"file": ("m.onnx", b"abc")}}, "model name"),
        ({"data": {"name": "x", "version": "1"}, "files": {"file": ("m.bin", b"abc")}}, "runtime"),
        ({"data": {"name": "x", "version": "1", "colour": "red"}, "files": {"file": ("m.onnx", b"abc")}}, "colour"),
        ({"data": {"name": "x", "version": "1", "labels": "[1]"}, "files": {"file": ("m.onnx", b"a")}}, "labels"),
        (
            {"content": b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.onnx\"\r\n\r\nabc",
             "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
            "closing boundary",
        ),
    ],
    ids=["json", "no-file", "no-name", "bad-name", "unknown-extension", "unknown-field", "bad-labels", "truncated"],
)
def test_bad_uploads_get_400_with_a_clear_message(api: httpx.Client, kwargs: dict[str, Any], message: str) -> None:
    response = api.post("/api/v1/models", **kwargs)

    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail["code"] == "message_invalid"
    assert message in detail["message"]


def test_a_file_that_does_not_load_is_refused(api: httpx.Client, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx graph")
    name = _unique("broken")

    response = _publish_model(api, broken, name, "1")

    assert response.status_code == 400
    assert response.json()["detail"]["code"] == "runtime_load_failed"
    assert api.get("/api/v1/models", params={"name": name}).json() == []


# --- devices and deployments -------------------------------------------------------------------


def test_deploying_publishes_a_retained_desired_state_that_verifies(
    api: httpx.Client, onnx_model: Path, make_device: Callable[[str], MqttDevice]
) -> None:
    name, device_id = _unique("deployed"), _unique("dev")
    model = _publish_model(api, onnx_model, name, "2.0").json()
    registered = api.post("/api/v1/devices", json={"id": device_id})
    assert registered.status_code == 201
    assert api.post("/api/v1/devices", json={"id": device_id}).status_code == 200

    response = api.post("/api/v1/deployments", json={"model": name, "version": "2.0", "devices": [device_id]})

    assert response.status_code == 201, response.text
    [deployment] = response.json()
    assert (deployment["device_id"], deployment["model_name"], deployment["version"]) == (device_id, name, "2.0")
    assert (deployment["status"], deployment["sequence"], deployment["bundle_digest"]) == (
        "pending", 1, model["bundle_digest"]
    )
    assert api.get(f"/api/v1/deployments/{deployment['id']}").json() == deployment

    # Subscribing only now: what arrives is the broker's retained copy.
    device = make_device(device_id)
    device.subscribe(Leaf.DESIRED)
    message = device.next_message()
    assert message.topic == device_topic(device_id, Leaf.DESIRED)
    assert message.retain
    state = verify_desired_state(
        message.payload, trusted_keys=_trusted(api, "online"), device_id=device_id, last_sequence=0, now=time.time()
    )
    assert state.sequence == deployment["sequence"]
    assert [(m.name, m.version, m.bundle_digest, m.bundle_size, m.runtime) for m in state.models] == [
        (name, "2.0", model["bundle_digest"], model["bundle_size"], "onnx")
    ]
    shown = api.get(f"/api/v1/devices/{device_id}").json()
    assert shown["desired_sequence"] == 1
    assert shown["assignments"] == [{"model_name": name, "version": "2.0"}]


def test_deploying_to_unknown_devices_or_versions_is_404(api: httpx.Client, onnx_model: Path) -> None:
    name, device_id = _unique("m"), _unique("dev")
    _publish_model(api, onnx_model, name, "1")
    api.post("/api/v1/devices", json={"id": device_id})

    ghost = api.post("/api/v1/deployments", json={"model": name, "version": "1", "devices": [device_id, "ghost-1"]})
    assert ghost.status_code == 404
    assert "ghost-1" in ghost.json()["detail"]["message"]
    unknown = api.post("/api/v1/deployments", json={"model": name, "version": "7", "devices": [device_id]})
    assert unknown.status_code == 404
    assert api.get("/api/v1/deployments", params={"device": device_id}).json() == []
    invalid = api.post("/api/v1/deployments", json={"model": name, "version": "1", "devices": []})
    assert invalid.status_code == 422
    assert invalid.json()["detail"]["code"] == "request_invalid"
    assert api.post("/api/v1/devices", json={"id": "no/slashes"}).status_code in (400, 422)


def test_devices_register_by_reporting_and_their_messages_drive_deployments(
    api: httpx.Client, onnx_model: Path, make_device: Callable[[str], MqttDevice]
) -> None:
    name, device_id = _unique("fleet"), _unique("dev")
    model = _publish_model(api, onnx_model, name, "1").json()
    digest = model["bundle_digest"]
    device = make_device(device_id)
    # Garbage first: it must be dropped without stopping ingest of what follows.
    device.publish(Leaf.REPORTED, b"\x00 not a report")
    device.publish(Leaf.STATUS, DeviceStatus(device_id=device_id, online=True, ts=time.time()).encode(), retain=True)
    device.publish(
        Leaf.REPORTED,
        ReportedState(device_id=device_id, ts=time.time(), applied_sequence=0, agent={"version": "t"}).encode(),
        retain=True,
    )

    def registered() -> dict[str, Any] | None:
        response = api.get(f"/api/v1/devices/{device_id}")
        return response.json() if response.status_code == 200 and response.json().get("reported") else None

    shown = _eventually(registered, "the device to register itself")
    assert shown is not None  # _eventually returns only a truthy value
    assert shown["online"] is True
    assert shown["agent"] == {"version": "t"}
    assert device_id in [d["id"] for d in api.get("/api/v1/devices").json()]

    first, second = (
        api.post("/api/v1/deployments", json={"model": name, "version": "1", "devices": [device_id]}).json()[0]
        for _ in range(2)
    )
    assert api.get(f"/api/v1/deployments/{first['id']}").json()["status"] == "superseded"

    # The device fetches the bundle over MQTT, chunk by chunk.
    device.subscribe(Leaf.CHUNK_DATA)
    count = chunk_count(model["bundle_size"], CHUNK_SIZE)
    device.publish(
        Leaf.CHUNK_REQUEST,
        ChunkRequest(bundle_digest=digest, chunk_size=CHUNK_SIZE, indices=tuple(range(count))).encode(),
    )
    chunks: dict[int, bytes] = {}
    while len(chunks) < count:
        chunk = decode_chunk_message(device.next_message().payload)
        assert isinstance(chunk, Chunk), chunk
        chunks[chunk.index] = chunk.data
    assembled = b"".join(chunks[i] for i in range(count))
    assert assembled == api.get(f"/api/v1/bundles/{digest}").content
    assert "sha256:" + hashlib.sha256(assembled).hexdigest() == digest

    event = DeploymentEvent(
        event_id=uuid.uuid4().hex, device_id=device_id, ts=time.time(), sequence=second["sequence"], name=name,
        version="1", bundle_digest=digest, outcome=Outcome.FAILED_ROLLED_BACK, error_code="health_check",
        message="probe failed",
    ).encode()
    device.publish(Leaf.EVENTS, event)
    device.publish(Leaf.EVENTS, event)  # a redelivery
    done = _eventually(
        lambda: (d := api.get(f"/api/v1/deployments/{second['id']}").json())["status"] != "pending" and d,
        "the event to be ingested",
    )
    assert (done["status"], done["error_code"], done["message"]) == (
        "failed_rolled_back", "health_check", "probe failed"
    )

    # Deploy again; this time the device reports the bundle serving.
    third = api.post("/api/v1/deployments", json={"model": name, "version": "1", "devices": [device_id]}).json()[0]
    report = ReportedState(
        device_id=device_id, ts=time.time(), applied_sequence=third["sequence"], agent={"version": "t"},
        models=(ModelReport(name=name, version="1", bundle_digest=digest, runtime="onnx", state="serving"),),
    )
    device.publish(Leaf.REPORTED, report.encode(), retain=True)
    _eventually(
        lambda: api.get(f"/api/v1/deployments/{third['id']}").json()["status"] == "succeeded",
        "the report to complete the deployment",
    )
    listed = api.get("/api/v1/deployments", params={"device": device_id, "model": name}).json()
    assert [d["status"] for d in listed] == ["succeeded", "failed_rolled_back", "superseded"]
    assert api.get(f"/api/v1/devices/{device_id}").json()["applied_sequence"] == third["sequence"]

    device.publish(Leaf.STATUS, DeviceStatus(device_id=device_id, online=False, ts=time.time()).encode(), retain=True)
    _eventually(
        lambda: api.get(f"/api/v1/devices/{device_id}").json()["online"] is False, "the device to go offline"
    )


def test_unassigning_publishes_a_state_without_the_model(
    api: httpx.Client, onnx_model: Path, make_device: Callable[[str], MqttDevice]
) -> None:
    name, device_id = _unique("gone"), _unique("dev")
    _publish_model(api, onnx_model, name, "1")
    api.post("/api/v1/devices", json={"id": device_id})
    api.post("/api/v1/deployments", json={"model": name, "version": "1", "devices": [device_id]})

    assert api.delete(f"/api/v1/devices/{device_id}/assignments/{name}").status_code == 204
    assert api.delete(f"/api/v1/devices/{device_id}/assignments/{name}").status_code == 404

    device = make_device(device_id)
    device.subscribe(Leaf.DESIRED)
    state = verify_desired_state(
        device.next_message().payload, trusted_keys=_trusted(api, "online"), device_id=device_id,
        last_sequence=1, now=time.time(),
    )
    assert (state.sequence, state.models) == (2, ())


# --- OpenAPI -----------------------------------------------------------------------------------


def test_the_openapi_document_describes_every_route(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/healthz", "get"), ("/api/v1/info", "get"), ("/api/v1/models", "post"), ("/api/v1/models", "get"),
        ("/api/v1/models/{name}/versions/{version}", "get"), ("/api/v1/bundles/{digest}", "get"),
        ("/api/v1/devices", "get"), ("/api/v1/devices", "post"), ("/api/v1/devices/{device_id}", "get"),
        ("/api/v1/devices/{device_id}/assignments/{model_name}", "delete"), ("/api/v1/deployments", "post"),
        ("/api/v1/deployments", "get"), ("/api/v1/deployments/{deployment_id}", "get"),
        ("/api/v1/bundles", "post"), ("/api/v1/enrollments", "post"), ("/api/v1/enroll", "post"),
        ("/api/v1/trust", "get"), ("/api/v1/trust/rotate", "post"),
    }
    # A superset: features add routes; none of these may disappear.
    assert expected <= {(p, m) for p, ops in paths.items() for m in ops}
    for path, method in expected - {("/api/v1/bundles/{digest}", "get"), (
            "/api/v1/devices/{device_id}/assignments/{model_name}", "delete")}:
        responses = paths[path][method]["responses"]
        success = responses.get("200") or responses["201"]
        assert success["content"]["application/json"]["schema"], (path, method)
    upload = paths["/api/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(upload["required"]) == {"file", "name", "version"}
    assert "application/x-tar" in paths["/api/v1/bundles/{digest}"]["get"]["responses"]["206"]["content"]
    assert paths["/api/v1/deployments"]["post"]["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }


# --- the schema ---------------------------------------------------------------------------------


def test_a_database_from_before_migrations_is_upgraded_when_the_control_plane_starts(
    mosquitto: MosquittoBroker, tmp_path: Path, onnx_model: Path
) -> None:
    data_dir = tmp_path / "cp"
    data_dir.mkdir()
    url = f"sqlite:///{data_dir / 'edgefleet.db'}"
    engine = create_db_engine(url)
    tables = baseline_metadata()
    tables.create_all(engine)  # what every start did before migrations
    created = datetime(2026, 11, 1)
    with engine.begin() as connection:
        connection.execute(
            tables.tables["device"].insert(),
            [{"id": "old-device", "created_at": created, "online": False, "desired_sequence": 0,
              "desired_envelope": "", "applied_sequence": 0, "reported_json": "", "agent_json": "{}",
              "broker_password_hash": ""}],
        )
    settings = ServerSettings(
        data_dir=data_dir,
        broker_host=mosquitto.host,
        broker_port=mosquitto.port,
        client_id_suffix=f"test-{uuid.uuid4().hex[:8]}",
    )
    uv, thread, base_url = _serve(create_app(settings))
    try:
        assert current_revision(engine) == head_revision()
        headers = admin_headers(data_dir)
        device = httpx.get(f"{base_url}/api/v1/devices/old-device", headers=headers).json()
        assert (device["id"], device["created_at"]) == ("old-device", "2026-11-01T00:00:00Z")
        assert httpx.get(f"{base_url}/api/v1/shadows", headers=headers).json() == []
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        engine.dispose()


# --- the embedded broker -----------------------------------------------------------------------


def test_without_a_broker_host_the_app_starts_and_stops_its_own(tmp_path: Path) -> None:
    app = create_app(ServerSettings(data_dir=tmp_path / "cp"))
    uv, thread, base_url = _serve(app)
    try:
        info = httpx.get(f"{base_url}/api/v1/info", headers=admin_headers(tmp_path / "cp")).json()
        host, port = info["broker"]["host"], info["broker"]["port"]
        assert (host, port) == (app.state.broker_host, app.state.broker_port)
        assert info["broker"]["kind"] in ("mosquitto", "amqtt")
        assert httpx.get(f"{base_url}/healthz").json()["broker_connected"] is True
        with socket.create_connection((host, port), timeout=5):
            pass
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/deployments/9223372036854775808",
        "/api/v1/deployments?offset=9223372036854775808",
        "/api/v1/devices?offset=9223372036854775808",
        "/api/v1/shadows?offset=9223372036854775808",
        "/api/v1/audit?token_id=9223372036854775808",
        "/api/v1/trust/keyring/9223372036854775808",
    ],
)
def test_integers_past_64_bits_are_a_422_not_a_server_error(api: httpx.Client, path: str) -> None:
    response = api.get(path)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["code"] == "request_invalid"


def test_a_422_never_echoes_the_input_back(api: httpx.Client) -> None:
    secret = "s3cret-" + "x" * 5000
    response = api.post("/api/v1/devices", json={"id": secret})
    assert response.status_code == 422, response.text
    assert "s3cret" not in response.text
    assert len(response.content) < 2000
