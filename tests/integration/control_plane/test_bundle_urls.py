"""A control plane with a public URL names HTTP bundle locations in its signed desired states, and a
plain agent (no HTTP settings of its own) downloads over HTTP: no MQTT chunk is requested."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edgefleet.control_plane.broker.embedded import MosquittoBroker
from edgefleet.control_plane.devtools.demo_models import write_demo_models
from edgefleet.control_plane.devtools.local_fleet import LocalFleet
from edgefleet.shared.trust.signing import stored_envelope_payload
from edgefleet.shared.wire.messages import DESIRED_PAYLOAD_TYPE, DesiredState
from edgefleet.shared.wire.topics import Leaf, device_topic

DEVICE = "url-dev"


def test_directive_urls_take_the_agent_to_http(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    seen: dict[str, list[bytes]] = {"requests": [], "desired": []}
    subscribed = threading.Event()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"url-watch-{time.time_ns()}")
    watcher.on_connect = lambda c, u, f, rc, p: c.subscribe(
        [(device_topic(DEVICE, Leaf.CHUNK_REQUEST), 1), (device_topic(DEVICE, Leaf.DESIRED), 1)]
    )
    watcher.on_subscribe = lambda *a: subscribed.set()
    watcher.on_message = lambda c, u, msg: seen["desired" if msg.topic.endswith("/desired") else "requests"].append(
        msg.payload
    )
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.loop_start()
    fleet = LocalFleet(tmp_path, broker_host=mosquitto.host, broker_port=mosquitto.port, bundle_urls=True)
    client = fleet.start_control_plane()
    try:
        assert subscribed.wait(5)
        fleet.start_agent(DEVICE)
        fleet.wait_for_devices(client, [DEVICE])
        model = write_demo_models(tmp_path / "models")["onnx"]
        client.push_model(model, name="via-http", version="1.0.0")
        [deployment] = client.deploy("via-http", "1.0.0", devices=[DEVICE])
        [result] = client.wait_for_deployments([deployment["id"]], timeout_s=60)
        assert result["status"] == "succeeded", result
    finally:
        fleet.stop()
        client.close()
        watcher.loop_stop()
        watcher.disconnect()
    [directive] = DesiredState.decode(
        stored_envelope_payload(seen["desired"][-1], payload_type=DESIRED_PAYLOAD_TYPE)
    ).models
    assert directive.urls == (f"{fleet.api_url}/api/v1/bundles/{directive.bundle_digest}",)
    assert seen["requests"] == [], "the agent fell back to MQTT chunks"
