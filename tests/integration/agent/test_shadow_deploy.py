"""Shadow candidates end to end: a real control plane and agent as processes, a real Mosquitto.

v1 serves; v2 (other weights) and v1' (v1's weights under another version) run as shadows on
every request. What is asserted is what the control plane's ``GET /api/v1/shadows`` returns from
the device's reported state, against agreement and differences computed here by running both
models directly on the same inputs; the answers the agent's v2 API gave must be v1's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
from support.waiting import eventually

from edgefleet.control_plane.broker.embedded import MosquittoBroker
from edgefleet.control_plane.client import EdgefleetClient
from edgefleet.control_plane.devtools.demo import direct_predict, v2_infer
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, make_mlp_weights, write_demo_models
from edgefleet.control_plane.devtools.local_fleet import AgentProcess, LocalFleet, spawn

DEVICE = "shadow-a"
MODEL = "mlp"
HEARTBEAT_S = 0.5  # the agent reports shadow stats with each heartbeat: short, to keep the test fast
T = TypeVar("T")


@dataclass
class Fleet:
    fleet: LocalFleet
    client: EdgefleetClient
    http: httpx.Client  # to the control plane
    agent_http: httpx.Client
    paths: dict[str, Path]  # version -> .onnx file

    @property
    def agent(self) -> AgentProcess:
        return self.fleet.agents[DEVICE]


def _start_agent(fleet: LocalFleet, device_id: str) -> AgentProcess:
    """LocalFleet's agent, with a short heartbeat (the restart below goes through start_agent)."""
    path, port = fleet.write_agent_config(device_id)
    text = path.read_text()
    assert "heartbeat_interval_s = 5.0" in text
    path.write_text(text.replace("heartbeat_interval_s = 5.0", f"heartbeat_interval_s = {HEARTBEAT_S}"))
    process = spawn(
        f"agent-{device_id}",
        [sys.executable, "-m", "edgefleet.agent", "run", "--config", str(path)],
        fleet.workdir / "logs" / f"agent-{device_id}.log",
    )
    agent = AgentProcess(device_id=device_id, process=process, config_path=path, api_url=f"http://127.0.0.1:{port}")
    fleet.agents[device_id] = agent
    _wait(lambda: _live(agent.api_url), 30, f"agent did not start:\n{process.log_tail()}")
    return agent


def _live(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/v2/health/live", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(probe: Callable[[], T], timeout_s: float, what: str) -> T:
    return eventually(probe, timeout_s=timeout_s, failure=f"timed out after {timeout_s} s: {what}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("shadow-fleet")
    fleet = LocalFleet(workdir, broker_host=mosquitto.host, broker_port=mosquitto.port)
    client: EdgefleetClient | None = None
    try:
        client = fleet.start_control_plane()
        _start_agent(fleet, DEVICE)
        fleet.wait_for_devices(client, [DEVICE])
        paths = {
            "1.0.0": write_demo_models(workdir / "v1", seed=1)["onnx"],
            "2.0.0": write_demo_models(workdir / "v2", seed=2)["onnx"],
            "1.0.1": write_demo_models(workdir / "v1-again", seed=1)["onnx"],  # v1's weights, another bundle
        }
        wide = workdir / "wide" / "classifier.onnx"
        wide.parent.mkdir()
        wide.write_bytes(build_onnx_mlp(make_mlp_weights(n_inputs=16, seed=1)))
        paths["3.0.0"] = wide  # other inputs: never a valid shadow of v1
        for version, path in paths.items():
            client.push_model(path, name=MODEL, version=version)
        deployed = client.wait_for_deployments([d["id"] for d in client.deploy(MODEL, "1.0.0", devices=[DEVICE])])
        assert [d["status"] for d in deployed] == ["succeeded"]
        with (
            httpx.Client(base_url=fleet.api_url, timeout=10, headers=fleet.auth_headers()) as http,
            httpx.Client(timeout=10) as agent_http,
        ):
            yield Fleet(fleet=fleet, client=client, http=http, agent_http=agent_http, paths=paths)
    finally:
        codes = fleet.stop()
        if client is not None:
            client.close()
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), codes


# --- helpers -----------------------------------------------------------------------------------


def _shadow_rows(env: Fleet) -> list[dict[str, Any]]:
    response = env.http.get("/api/v1/shadows", params={"model": MODEL, "device": DEVICE})
    assert response.status_code == 200, response.text
    return response.json()


def _report_of(env: Fleet, version: str, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        for row in _shadow_rows(env):
            report = row["report"]
            if report is not None and report["version"] == version and predicate(report):
                return row
        return None

    return _wait(probe, 20, f"{what}; last rows: {_shadow_rows(env)}")


def _requests(n: int, seed: int) -> list[np.ndarray]:
    """``n`` requests of 1 to 3 rows each (the agent counts rows as samples)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, 4)), 32)).astype(np.float32) for _ in range(n)]


def _infer_all(env: Fleet, xs: list[np.ndarray]) -> list[np.ndarray]:
    return [v2_infer(env.agent_http, env.agent.api_url, MODEL, x) for x in xs]


def _expected(env: Fleet, xs: list[np.ndarray], serving: str, candidate: str) -> dict[str, float]:
    """Agreement and differences computed here, running both model files directly."""
    a = np.concatenate([direct_predict("onnx", env.paths[serving], x) for x in xs]).astype(np.float64)
    b = np.concatenate([direct_predict("onnx", env.paths[candidate], x) for x in xs]).astype(np.float64)
    diff = np.abs(a - b)
    return {
        "samples": a.shape[0],
        "agreements": int(np.count_nonzero(a.argmax(axis=1) == b.argmax(axis=1))),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": float(diff.max()),
    }


def _agent_state(env: Fleet) -> dict[str, Any]:
    return json.loads((env.agent.config_path.parent / "data" / "state.json").read_text())


def _post_shadow(
    env: Fleet, version: str, sample_rate: float = 1.0, devices: list[str] | None = None
) -> httpx.Response:
    body = {"model": MODEL, "version": version, "devices": devices or [DEVICE], "sample_rate": sample_rate}
    return env.http.post("/api/v1/shadows", json=body)


# --- tests ---------------------------------------------------------------------------------------


def test_shadow_requests_are_refused_with_the_usual_statuses(env: Fleet) -> None:
    assert env.http.post("/api/v1/devices", json={"id": "idle-device"}).status_code == 201
    cases = [
        (_post_shadow(env, "9.9.9"), 404, "not_found"),  # not published
        (_post_shadow(env, "2.0.0", devices=["no-such-device"]), 404, "not_found"),
        (_post_shadow(env, "1.0.0"), 409, "conflict"),  # already serving it
        (_post_shadow(env, "2.0.0", devices=["idle-device"]), 409, "conflict"),  # does not run the model
        (_post_shadow(env, "2.0.0", sample_rate=0.0), 400, "message_invalid"),
        (_post_shadow(env, "2.0.0", sample_rate=1.5), 400, "message_invalid"),
        (_post_shadow(env, "3.0.0"), 400, "bundle_incompatible"),  # other inputs
    ]
    for response, status, code in cases:
        assert (response.status_code, response.json()["detail"]["code"]) == (status, code), response.text
    delete = env.http.delete(f"/api/v1/shadows/{MODEL}", params={"device": DEVICE})
    assert delete.status_code == 404
    assert _shadow_rows(env) == []


def test_shadow_sees_every_request_and_reports_what_running_both_models_gives(env: Fleet) -> None:
    response = _post_shadow(env, "2.0.0")
    assert response.status_code == 201, response.text
    [row] = response.json()
    assert (row["device_id"], row["serving_version"], row["version"], row["sample_rate"]) == (
        DEVICE,
        "1.0.0",
        "2.0.0",
        1.0,
    )
    _report_of(env, "2.0.0", lambda r: r["state"] == "running", "the shadow did not start")

    xs = _requests(40, seed=7)
    answers = _infer_all(env, xs)
    for x, got in zip(xs, answers, strict=True):
        np.testing.assert_allclose(got, direct_predict("onnx", env.paths["1.0.0"], x), rtol=0, atol=1e-6)
    v2_answers = [direct_predict("onnx", env.paths["2.0.0"], x) for x in xs]
    assert not np.allclose(np.concatenate(answers), np.concatenate(v2_answers))
    # The shadow is never served, under any name.
    assert env.agent_http.get(f"{env.agent.api_url}/v2/models/{MODEL}").json()["versions"] == ["1.0.0"]
    assert env.agent_http.get(f"{env.agent.api_url}/v2/models/{MODEL}/versions/2.0.0").status_code == 404

    expected = _expected(env, xs, "1.0.0", "2.0.0")
    row = _report_of(env, "2.0.0", lambda r: r["samples"] >= expected["samples"], "samples did not arrive")
    report = row["report"]
    assert report["message"] == ""  # nothing dropped, no error
    assert (report["samples"], report["agreements"], report["errors"]) == (
        expected["samples"],
        expected["agreements"],
        0,
    )
    assert 0 < expected["agreements"] < expected["samples"]  # the two versions really differ
    assert report["mean_abs_diff"] == pytest.approx(expected["mean_abs_diff"], rel=1e-5)
    assert report["max_abs_diff"] == pytest.approx(expected["max_abs_diff"], rel=1e-5)
    assert report["latency_p50_ms"] > 0 and report["serving_latency_p50_ms"] > 0
    assert (report["serving_version"], report["state"]) == ("1.0.0", "running")
    assert row["agreement"] == pytest.approx(expected["agreements"] / expected["samples"])
    assert _agent_state(env)["shadows"][MODEL]["state"] == "running"


def test_identical_weights_agree_everywhere_and_survive_an_agent_restart(env: Fleet) -> None:
    assert _post_shadow(env, "1.0.1").status_code == 201
    _report_of(env, "1.0.1", lambda r: r["state"] == "running", "the new shadow did not replace the old")
    xs = _requests(25, seed=8)
    _infer_all(env, xs)
    rows = sum(x.shape[0] for x in xs)
    report = _report_of(env, "1.0.1", lambda r: r["samples"] >= rows, "samples did not arrive")["report"]
    assert (report["samples"], report["agreements"], report["errors"]) == (rows, rows, 0)
    assert report["max_abs_diff"] == 0.0 and report["mean_abs_diff"] == 0.0

    # SIGKILL: on boot the agent loads the staged shadow again (fresh stats) and mirrors again.
    env.agent.process.signal(signal.SIGKILL)
    env.agent.process.popen.wait(timeout=10)
    env.fleet.start_agent(DEVICE)
    _report_of(env, "1.0.1", lambda r: r["state"] == "running" and r["samples"] < rows, "no fresh report after restart")
    xs = _requests(5, seed=9)
    _infer_all(env, xs)
    rows = sum(x.shape[0] for x in xs)
    report = _report_of(env, "1.0.1", lambda r: r["samples"] >= rows, "no samples after restart")["report"]
    assert (report["samples"], report["agreements"]) == (rows, rows)


def test_removing_the_shadow_unloads_it_and_drops_it_from_the_report(env: Fleet) -> None:
    assert _post_shadow(env, "2.0.0", sample_rate=0.5).status_code == 201
    _report_of(env, "2.0.0", lambda r: r["state"] == "running", "the shadow did not start")
    assert _agent_state(env)["shadows"][MODEL]["sample_rate"] == 0.5
    response = env.http.delete(f"/api/v1/shadows/{MODEL}", params={"device": DEVICE})
    assert response.status_code == 204
    _wait(lambda: _shadow_rows(env) == [], 20, "the device still reports the shadow")
    assert _agent_state(env)["shadows"] == {}
    assert "shadow mlp:2.0.0 unloaded" in env.agent.process.log_path.read_text()


def test_deploying_the_shadowed_version_promotes_it_and_drops_the_shadow(env: Fleet) -> None:
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet.control_plane",
            "shadow",
            MODEL,
            "2.0.0",
            "--device",
            DEVICE,
            "--sample-rate",
            "1",
            "--api-url",
            env.fleet.api_url,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "EDGEFLEET_TOKEN": env.fleet.api_token},
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    rows = json.loads(cli.stdout)
    assert [(r["device_id"], r["version"], r["sample_rate"]) for r in rows] == [(DEVICE, "2.0.0", 1.0)]
    _report_of(env, "2.0.0", lambda r: r["state"] == "running", "the shadow did not start")
    deployed = env.client.wait_for_deployments([d["id"] for d in env.client.deploy(MODEL, "2.0.0", devices=[DEVICE])])
    assert [d["status"] for d in deployed] == ["succeeded"]
    _wait(lambda: _shadow_rows(env) == [], 20, "the promoted version is still reported as a shadow")
    assert _agent_state(env)["shadows"] == {}
    x = _requests(1, seed=10)[0]
    np.testing.assert_allclose(
        v2_infer(env.agent_http, env.agent.api_url, MODEL, x), direct_predict("onnx", env.paths["2.0.0"], x), atol=1e-6
    )
