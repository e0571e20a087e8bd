"""The walking skeleton against a real Mosquitto: control plane and agents as real processes.

Publish an ONNX and a TFLite model, deploy both to two agents, infer through each agent's
Open Inference Protocol API and compare with the runtimes run directly; then SIGKILL an agent
and check it serves the same version after restart without fetching the bundle again.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefleet.control_plane.broker.embedded import MosquittoBroker
from edgefleet.control_plane.client import EdgefleetClient
from edgefleet.control_plane.devtools.demo import direct_predict, v2_infer
from edgefleet.control_plane.devtools.demo_models import make_mlp_weights, write_demo_models
from edgefleet.control_plane.devtools.local_fleet import LocalFleet
from edgefleet.shared.wire.topics import Leaf, device_topic

DEVICES = ["edge-a", "edge-b"]
MODELS = {"onnx": "mlp", "tflite": "mlp-lite"}


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker
) -> Iterator[tuple[LocalFleet, EdgefleetClient, dict[str, Path]]]:
    workdir = tmp_path_factory.mktemp("fleet")
    fleet = LocalFleet(workdir, broker_host=mosquitto.host, broker_port=mosquitto.port)
    try:
        client = fleet.start_control_plane()
        for device_id in DEVICES:
            fleet.start_agent(device_id)
        fleet.wait_for_devices(client, DEVICES)
        paths = write_demo_models(workdir / "models", seed=3)
        for runtime, name in MODELS.items():
            client.push_model(paths[runtime], name=name, version="1.0.0")
        yield fleet, client, paths
    finally:
        codes = fleet.stop()
        client.close()
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), codes


def test_deploy_to_two_agents_and_infer_matches_direct_runtime(fleet) -> None:
    fleet_, client, paths = fleet
    ids = [d["id"] for name in MODELS.values() for d in client.deploy(name, "1.0.0", devices=DEVICES)]
    results = client.wait_for_deployments(ids, timeout_s=60)
    assert sorted((r["device_id"], r["model_name"], r["status"]) for r in results) == sorted(
        (d, n, "succeeded") for d in DEVICES for n in MODELS.values()
    )
    x = np.random.default_rng(11).standard_normal((5, make_mlp_weights().n_inputs)).astype(np.float32)
    with httpx.Client(timeout=10) as http:
        for device_id in DEVICES:
            api = fleet_.agents[device_id].api_url
            for runtime, name in MODELS.items():
                got = v2_infer(http, api, name, x)
                expected = direct_predict(runtime, paths[runtime], x)
                assert got.shape == (5, 4)
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
                meta = http.get(f"{api}/v2/models/{name}").json()
                assert meta["versions"] == ["1.0.0"]
    # The control plane saw each device report the digests it was told to run.
    for device_id in DEVICES:
        reported = client.device(device_id)["reported"]
        assert {m["name"]: m["state"] for m in reported["models"]} == {n: "serving" for n in MODELS.values()}


def _watch_chunk_requests(host: str, port: int, device_id: str) -> tuple[mqtt.Client, list[bytes], threading.Event]:
    seen: list[bytes] = []
    subscribed = threading.Event()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{device_id}-{time.time_ns()}")
    watcher.on_connect = lambda c, u, f, rc, p: c.subscribe(device_topic(device_id, Leaf.CHUNK_REQUEST), qos=1)
    watcher.on_subscribe = lambda *a: subscribed.set()
    watcher.on_message = lambda c, u, msg: seen.append(msg.payload)
    watcher.connect(host, port)
    watcher.loop_start()
    return watcher, seen, subscribed


def test_agent_killed_with_sigkill_serves_same_version_after_restart_without_download(fleet, mosquitto) -> None:
    fleet_, client, paths = fleet
    device_id = DEVICES[0]
    results = client.wait_for_deployments(
        [d["id"] for d in client.deploy(MODELS["onnx"], "1.0.0", devices=[device_id])], timeout_s=60
    )
    assert [r["status"] for r in results] == ["succeeded"]
    agent = fleet_.agents[device_id]
    data_dir = agent.config_path.parent / "data"
    assert list((data_dir / "models" / MODELS["onnx"]).iterdir()), "the model was installed into a slot"

    watcher, requests, subscribed = _watch_chunk_requests(mosquitto.host, mosquitto.port, device_id)
    try:
        assert subscribed.wait(5)
        agent.process.signal(signal.SIGKILL)
        agent.process.popen.wait(timeout=10)
        assert agent.process.popen.returncode == -signal.SIGKILL

        restarted = fleet_.start_agent(device_id)
        x = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
        with httpx.Client(timeout=10) as http:
            meta = http.get(f"{restarted.api_url}/v2/models/{MODELS['onnx']}").json()
            assert meta["versions"] == ["1.0.0"]
            got = v2_infer(http, restarted.api_url, MODELS["onnx"], x)
        np.testing.assert_allclose(got, direct_predict("onnx", paths["onnx"], x), atol=1e-6)
        # Give the restarted agent time to connect and see its retained desired state.
        deadline = time.monotonic() + 30
        while not client.device(device_id)["online"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        assert requests == [], "the restarted agent asked for bundle chunks again"
    finally:
        watcher.loop_stop()
        watcher.disconnect()
