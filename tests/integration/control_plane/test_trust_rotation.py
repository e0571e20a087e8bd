"""Trust end to end: enrollment, publisher keys held outside the control plane, revocation,
online-key rotation, and an agent that missed several keyring versions catching up in order.

Real control plane and agent processes over a real Mosquitto; outcomes are read from what the
control plane stored and what the agents serve and persist.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.waiting import eventually

from edgefleet.control_plane.broker.embedded import MosquittoBroker
from edgefleet.control_plane.client import EdgefleetClient
from edgefleet.control_plane.devtools.demo_models import write_demo_models
from edgefleet.control_plane.devtools.local_fleet import LocalFleet
from edgefleet.shared.errors import EdgefleetError
from edgefleet.shared.trust.signing import SigningKey

MODEL = "trusted"


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker
) -> Iterator[tuple[LocalFleet, EdgefleetClient, Path]]:
    workdir = tmp_path_factory.mktemp("trust")
    fleet = LocalFleet(workdir, broker_host=mosquitto.host, broker_port=mosquitto.port)
    client = fleet.start_control_plane()
    try:
        for device_id in ("trust-a", "trust-b"):
            fleet.start_agent(device_id)
        fleet.wait_for_devices(client, ["trust-a", "trust-b"])
        yield fleet, client, workdir
    finally:
        fleet.stop()
        client.close()


def _keyring_version(fleet: LocalFleet, device_id: str) -> int:
    path = fleet.agents[device_id].config_path.parent / "data" / "trust" / "keyring.json"
    return json.loads(path.read_text())["signed"]["version"]


def _wait(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    eventually(predicate, timeout_s=timeout_s, failure=f"timed out waiting for {what}", poll_s=0.1)


def _served_version(fleet: LocalFleet, device_id: str, model: str) -> str | None:
    response = httpx.get(f"{fleet.agents[device_id].api_url}/v2/models/{model}", timeout=5)
    return response.json()["versions"][0] if response.status_code == 200 else None


def _push_with_key(
    fleet: LocalFleet, model_file: Path, version: str, key: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    command = ["models", "push", str(model_file), "--name", MODEL, "--version", version, "--key", str(key)]
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.control_plane", *command, "--api-url", fleet.api_url, "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "EDGEFLEET_TOKEN": fleet.api_token},
    )


def test_enrollment_token_is_single_use(fleet) -> None:
    fleet_, client, _ = fleet
    token = client.create_enrollment("one-shot")["token"]
    first = httpx.post(f"{fleet_.api_url}/api/v1/enroll", json={"token": token}, timeout=10)
    assert first.status_code == 200 and first.json()["device_id"] == "one-shot"
    second = httpx.post(f"{fleet_.api_url}/api/v1/enroll", json={"token": token}, timeout=10)
    assert second.status_code == 400
    assert "already used" in second.json()["detail"]["message"]
    forged = httpx.post(f"{fleet_.api_url}/api/v1/enroll", json={"token": "x" * 43}, timeout=10)
    assert forged.status_code == 400


def test_rotations_publisher_revocation_online_key_and_catch_up(fleet) -> None:
    fleet_, client, workdir = fleet
    models = write_demo_models(workdir / "models", seed=21)
    more = write_demo_models(workdir / "models-2", seed=22)

    # v1.0.0 signed by the control plane's own publisher key (keyring v1), deployed to both.
    client.push_model(models["onnx"], name=MODEL, version="1.0.0")
    ids = [d["id"] for d in client.deploy(MODEL, "1.0.0", devices=["trust-a", "trust-b"])]
    assert [d["status"] for d in client.wait_for_deployments(ids)] == ["succeeded", "succeeded"]
    start_version = client.trust()["version"]

    # trust-b goes offline and misses every rotation below.
    assert fleet_.agents["trust-b"].process.stop() in (0, -signal.SIGTERM)

    # Rotation 1: publishing moves to a CI-held key; the control plane's own key is revoked.
    ci_key = workdir / "ci-publisher.pem"
    ci = SigningKey.load_or_create(ci_key)
    rotated = client.rotate_keyring(publisher_keys=[ci.public_hex])
    assert rotated["publisher_keys"] == [ci.public_hex]
    with pytest.raises(EdgefleetError, match="no longer trusted"):
        client.push_model(more["onnx"], name=MODEL, version="9.9.9")
    pushed = _push_with_key(fleet_, more["onnx"], "2.0.0", ci_key)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert json.loads(pushed.stdout)["version"] == "2.0.0"
    # A bundle signed by a key the keyring does not trust is refused at upload.
    rogue_key = workdir / "rogue.pem"
    SigningKey.load_or_create(rogue_key)
    rogue = _push_with_key(fleet_, more["tflite"], "6.6.6", rogue_key)
    assert rogue.returncode != 0 and "signature" in (rogue.stdout + rogue.stderr).lower()

    [deployment] = client.deploy(MODEL, "2.0.0", devices=["trust-a"])
    [result] = client.wait_for_deployments([deployment["id"]])
    assert result["status"] == "succeeded", result
    assert _keyring_version(fleet_, "trust-a") == start_version + 1
    assert _served_version(fleet_, "trust-a", MODEL) == "2.0.0"

    # Revoked: 1.0.0 was signed by the control plane's old publisher key. The device refuses it
    # and keeps serving 2.0.0.
    [deployment] = client.deploy(MODEL, "1.0.0", devices=["trust-a"])
    [result] = client.wait_for_deployments([deployment["id"]])
    assert result["status"] == "rejected", result
    assert result["error_code"] == "signature_invalid"
    assert _served_version(fleet_, "trust-a", MODEL) == "2.0.0"

    # Rotation 2: a new online key; every desired state is re-signed with it.
    online_before = client.trust()["online_keys"]
    rotated = client.rotate_keyring(rotate_online=True)
    assert rotated["online_keys"] != online_before
    pushed = _push_with_key(fleet_, models["tflite"], "3.0.0", ci_key)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    [deployment] = client.deploy(MODEL, "3.0.0", devices=["trust-a"])
    [result] = client.wait_for_deployments([deployment["id"]])
    assert result["status"] == "succeeded", result
    assert _keyring_version(fleet_, "trust-a") == start_version + 2

    # trust-b comes back after missing two rotations: it must walk v(n) -> v(n+1) -> v(n+2) and
    # then accept a desired state signed by an online key it had never seen.
    assert _keyring_version(fleet_, "trust-b") == start_version
    fleet_.start_agent("trust-b")
    [deployment] = client.deploy(MODEL, "3.0.0", devices=["trust-b"])
    [result] = client.wait_for_deployments([deployment["id"]], timeout_s=60)
    assert result["status"] == "succeeded", result
    assert _keyring_version(fleet_, "trust-b") == start_version + 2
    _wait(lambda: _served_version(fleet_, "trust-b", MODEL) == "3.0.0", what="trust-b serving 3.0.0")

    # A release that sets a version floor: once installed, older versions are refused (a replayed
    # old bundle under a compromised online key cannot downgrade the device).
    pushed = _push_with_key(fleet_, more["tflite"], "4.0.0", ci_key, "--min-version", "3.0.0")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    [deployment] = client.deploy(MODEL, "4.0.0", devices=["trust-a"])
    assert client.wait_for_deployments([deployment["id"]])[0]["status"] == "succeeded"
    [deployment] = client.deploy(MODEL, "2.0.0", devices=["trust-a"])
    [result] = client.wait_for_deployments([deployment["id"]])
    assert (result["status"], result["error_code"]) == ("rejected", "downgrade_refused"), result
    assert _served_version(fleet_, "trust-a", MODEL) == "4.0.0"
    [deployment] = client.deploy(MODEL, "3.0.0", devices=["trust-a"])  # at the floor: allowed
    assert client.wait_for_deployments([deployment["id"]])[0]["status"] == "succeeded"
