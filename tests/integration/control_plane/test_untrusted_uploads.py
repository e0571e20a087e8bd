"""Hostile uploads against ``edgefleet server`` running as its own process: the 24-byte TFLite file
that crashes LiteRT, garbage ONNX, and the publish options of every path (API and CLI).

A separate process, not uvicorn in a thread: before the fix the 24-byte upload killed the
server with SIGSEGV, which in a thread would have killed the test run with it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from support.auth import admin_headers, admin_token
from support.hostile_models import empty_tflite

from edgefleet.control_plane.broker.embedded import MosquittoBroker, free_port
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, make_mlp_weights
from edgefleet.control_plane.services.publishing import HEALTH_INPUTS_FILE
from edgefleet.shared.bundle.format import verify_bundle
from edgefleet.shared.bundle.manifest import Manifest
from edgefleet.shared.trust.signing import key_id, public_key_from_hex

START_S = 60.0


@dataclass
class ServerProcess:
    popen: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path

    def alive(self) -> bool:
        return self.popen.poll() is None


@pytest.fixture(scope="module")
def server(mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("cp-process")
    port = free_port()
    log = (data_dir / "server.log").open("wb")
    popen = subprocess.Popen(
        [str(Path(sys.executable).parent / "edgefleet"), "server", "--data-dir", str(data_dir), "--port", str(port),
         "--broker-host", mosquitto.host, "--broker-port", str(mosquitto.port), "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # Its own MQTT session: the broker is shared with other test modules.
        env={**_environ(), "EDGEFLEET_CLIENT_ID_SUFFIX": f"test-{uuid.uuid4().hex[:8]}"},
    )
    handle = ServerProcess(popen=popen, base_url=f"http://127.0.0.1:{port}", data_dir=data_dir)
    try:
        deadline = time.monotonic() + START_S
        while not _answers(handle.base_url):
            if not handle.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {(data_dir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield handle
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        log.close()


@pytest.fixture
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60, headers=admin_headers(server.data_dir)) as client:
        yield client


def _environ(server: ServerProcess | None = None) -> dict[str, str]:
    """This process's environment without EDGEFLEET_* variables, plus the server's admin token."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    if server is not None:
        env["EDGEFLEET_TOKEN"] = admin_token(server.data_dir)
    return env


def _answers(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _upload(api: httpx.Client, filename: str, data: bytes, **fields: str) -> httpx.Response:
    name = f"m-{uuid.uuid4().hex[:8]}"
    return api.post("/api/v1/models", data={"name": name, "version": "1.0.0", **fields},
                    files={"file": (filename, data)})


def _manifest(api: httpx.Client, body: dict[str, Any], tmp_path: Path) -> Manifest:
    bundle = tmp_path / "downloaded.bundle"
    bundle.write_bytes(api.get(f"/api/v1/bundles/{body['bundle_digest']}").content)
    keys = [public_key_from_hex(h) for h in api.get("/api/v1/info").json()["keys"]["publisher"]]
    return verify_bundle(bundle, trusted_keys={key_id(k): k for k in keys})


def _assert_no_server_path(message: str, server: ServerProcess) -> None:
    assert str(server.data_dir) not in message
    assert ".upload" not in message
    assert "/tmp" not in message


def test_the_24_byte_tflite_file_is_a_400_and_the_server_still_answers(
    api: httpx.Client, server: ServerProcess
) -> None:
    response = _upload(api, "tiny.tflite", empty_tflite())

    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail["code"] == "runtime_load_failed"
    assert "tiny.tflite" in detail["message"]
    _assert_no_server_path(detail["message"], server)
    assert server.alive()
    assert api.get("/healthz").json()["status"] == "ok"
    assert api.get("/api/v1/models").status_code == 200


def test_a_file_onnxruntime_refuses_is_named_by_the_users_file_name(api: httpx.Client, server: ServerProcess) -> None:
    # Passes the inspection (well-formed protobuf); onnxruntime refuses its opset from the future.
    data = build_onnx_mlp(make_mlp_weights(seed=2)).replace(b"\x10\x11", b"\x10\x7f", 1)

    response = _upload(api, "classifier.onnx", data)

    assert response.status_code == 400, response.text
    message = response.json()["detail"]["message"]
    assert "classifier.onnx" in message
    _assert_no_server_path(message, server)
    assert server.alive()


def test_the_upload_api_takes_a_version_floor_and_a_latency_budget(api: httpx.Client, tmp_path: Path) -> None:
    data = build_onnx_mlp(make_mlp_weights(seed=3))

    response = _upload(api, "m.onnx", data, min_version="0.9.0", latency_budget_ms="12.5")

    assert response.status_code == 201, response.text
    manifest = _manifest(api, response.json(), tmp_path)
    assert (manifest.min_version, manifest.latency_budget_ms) == ("0.9.0", 12.5)


@pytest.mark.parametrize(("fields", "match"), [
    ({"latency_budget_ms": "fast"}, "latency_budget_ms"),
    ({"latency_budget_ms": "-1"}, "latency_budget_ms"),
    ({"min_version": "2.0.0"}, "below its own floor"),
])
def test_bad_publish_options_are_a_400(api: httpx.Client, fields: dict[str, str], match: str) -> None:
    response = _upload(api, "m.onnx", build_onnx_mlp(make_mlp_weights(seed=4)), **fields)
    assert response.status_code == 400, response.text
    assert match in response.json()["detail"]["message"]


def test_models_push_without_a_key_sends_the_floor_and_the_budget(
    server: ServerProcess, api: httpx.Client, tmp_path: Path
) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_onnx_mlp(make_mlp_weights(seed=6)))
    name = f"pushed-{uuid.uuid4().hex[:8]}"

    done = subprocess.run(
        [str(Path(sys.executable).parent / "edgefleet"), "models", "push", str(model), "--name", name,
         "--version", "1.2.0", "--min-version", "1.0.0", "--latency-budget-ms", "40", "--json",
         "--api-url", server.base_url],
        capture_output=True, text=True, timeout=120, env=_environ(server),
    )

    assert done.returncode == 0, done.stdout + done.stderr
    body = api.get(f"/api/v1/models/{name}/versions/1.2.0").json()
    manifest = _manifest(api, body, tmp_path)
    assert (manifest.min_version, manifest.latency_budget_ms) == ("1.0.0", 40.0)


def test_the_upload_api_takes_health_inputs(api: httpx.Client, tmp_path: Path) -> None:
    samples = tmp_path / "samples.npz"
    np.savez(samples, input=np.full((2, 32), 0.5, np.float32))
    data = build_onnx_mlp(make_mlp_weights(seed=8))

    response = api.post(
        "/api/v1/models",
        data={"name": f"h-{uuid.uuid4().hex[:8]}", "version": "1.0.0"},
        files={"file": ("m.onnx", data), "health_inputs": ("samples.npz", samples.read_bytes())},
    )

    assert response.status_code == 201, response.text
    manifest = _manifest(api, response.json(), tmp_path)
    assert manifest.health_inputs == HEALTH_INPUTS_FILE
    assert manifest.file(HEALTH_INPUTS_FILE).sha256 == hashlib.sha256(samples.read_bytes()).hexdigest()


def test_health_inputs_that_do_not_fit_the_model_are_a_400_naming_the_users_file(
    api: httpx.Client, server: ServerProcess, tmp_path: Path
) -> None:
    samples = tmp_path / "wrong.npz"
    np.savez(samples, image=np.zeros((1, 3), np.float32))

    response = api.post(
        "/api/v1/models",
        data={"name": f"h-{uuid.uuid4().hex[:8]}", "version": "1.0.0"},
        files={"file": ("m.onnx", build_onnx_mlp(make_mlp_weights(seed=9))),
               "health_inputs": ("wrong.npz", samples.read_bytes())},
    )

    assert response.status_code == 400, response.text
    message = response.json()["detail"]["message"]
    assert "wrong.npz" in message and "the model's inputs are ['input']" in message
    _assert_no_server_path(message, server)


def test_models_push_without_a_key_sends_the_health_inputs(
    server: ServerProcess, api: httpx.Client, tmp_path: Path
) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_onnx_mlp(make_mlp_weights(seed=10)))
    samples = tmp_path / "samples.npz"
    np.savez(samples, input=np.ones((1, 32), np.float32))
    name = f"pushed-{uuid.uuid4().hex[:8]}"

    done = subprocess.run(
        [str(Path(sys.executable).parent / "edgefleet"), "models", "push", str(model), "--name", name,
         "--version", "1.0.0", "--health-inputs", str(samples), "--api-url", server.base_url],
        capture_output=True, text=True, timeout=120, env=_environ(server),
    )

    assert done.returncode == 0, done.stdout + done.stderr
    manifest = _manifest(api, api.get(f"/api/v1/models/{name}/versions/1.0.0").json(), tmp_path)
    assert manifest.health_inputs == HEALTH_INPUTS_FILE
