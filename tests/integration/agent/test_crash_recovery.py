"""Trustworthy delivery, with real processes: SIGKILL in every state, a full disk, a cut network.

A real control plane and real agent processes talk through a real Mosquitto. Each scenario
checks what the control plane recorded (its deployments API), what the agent serves (its KServe
v2 API, against onnxruntime run directly on the expected model), and what the agent left on
disk (``state.json``, its model slots, its downloads): nothing lost, nothing half-installed.

* Every deployment state: agents run with ``EDGEFLEET_FAULT_PAUSE_AT=<state>`` (see
  :mod:`agent.faults`), are SIGKILLed while paused there, and restarted; the deployment must end
  as :data:`agent.deployment.RECOVERY` says, a kill while the candidate was loaded or checked
  being retried. All states run at once, one device each.
* A model that crashes the runtime: ``EDGEFLEET_FAULT_SIGNAL_AT`` makes the agent die of SIGSEGV
  in the same state on every attempt; the restarts must end it as ``runtime_crashed``.
* Disk full while staging, and while a desired state arrives: the agent's data dir is a small
  tmpfs in its own mount namespace.
* Network cut mid-transfer, and a stalled transfer superseded by a newer desired state: the
  agent reaches the broker through :class:`tcp_proxy.TcpProxy`, which the test throttles,
  cuts and stalls; a paho subscriber on the broker itself records every chunk request.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from support.tcp_proxy import TcpProxy
from support.waiting import eventually

from edgefleet.agent.deployment.planner import MAX_INTERRUPTED_ATTEMPTS
from edgefleet.agent.deployment.state_store import STATE_FILE, AgentState
from edgefleet.control_plane.broker.embedded import MosquittoBroker
from edgefleet.control_plane.client import EdgefleetClient
from edgefleet.control_plane.devtools.demo import direct_predict, v2_infer
from edgefleet.control_plane.devtools.demo_models import INPUT_NAME, OUTPUT_NAME, build_onnx_mlp, make_mlp_weights
from edgefleet.control_plane.devtools.local_fleet import AgentProcess, FleetError, LocalFleet
from edgefleet.shared.wire.chunks import ChunkRequest, chunk_count
from edgefleet.shared.wire.topics import ROOT, Leaf, parse_device_topic

N_INPUTS = 32
KILL_STATES = ("downloading", "verifying", "staging", "activating", "health_checking", "rolling_back")
ROLLED_BACK_STATES = ("activating", "health_checking", "rolling_back")  # RECOVERY: roll back
RETRIED_STATES = ("activating", "health_checking")  # rolled back, then deployed again: a kill is no verdict
FAULT_PAUSE_S = 60  # the agent sits in the state until killed; far longer than the test needs
CHUNK_BYTES = 16 * 1024  # small chunks for the proxied agent: a multi-MiB transfer is hundreds of requests
HEARTBEAT_S = 0.5  # crash devices report often, so a premature "serving" would reach the control plane


@dataclass(frozen=True)
class Model:
    """A model file the test published, and the bundle the control plane made of it."""

    name: str
    version: str
    path: Path
    digest: str
    size: int

    @property
    def slot(self) -> str:
        return f"{self.version}-{self.digest[7:19]}"


def failing_onnx() -> bytes:
    """Loads in onnxruntime, fails on the agent's warm-up input: Reshape ``[batch, 32]`` to ``[7, 5]``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", [INPUT_NAME, "shape"], [OUTPUT_NAME])],
        "fails_at_run_time",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", N_INPUTS])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [7, 5])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [7, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def mlp_onnx(seed: int, hidden: tuple[int, ...] = (16,)) -> bytes:
    return build_onnx_mlp(make_mlp_weights(n_inputs=N_INPUTS, hidden=hidden, n_outputs=4, seed=seed))


@dataclass
class Fleet:
    """The module's control plane, the published models, and the broker-side chunk request log."""

    fleet: LocalFleet
    client: EdgefleetClient
    broker: MosquittoBroker
    models: dict[str, Model]
    requests: ChunkRequestWatcher


class ChunkRequestWatcher:
    """Every ``chunks/request`` the broker forwards, by device, as a plain subscriber sees it."""

    def __init__(self, host: str, port: int) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, ChunkRequest]] = []
        subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-chunks-{os.getpid()}")
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{ROOT}/+/{Leaf.CHUNK_REQUEST}", qos=1)
        self._client.on_subscribe = lambda *a: subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the chunk request watcher could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device_id, _ = parse_device_topic(msg.topic)
        with self._lock:
            self._seen.append((device_id, ChunkRequest.decode(msg.payload)))

    def mark(self) -> int:
        """A position: :meth:`since` returns what arrived after it."""
        with self._lock:
            return len(self._seen)

    def since(self, mark: int, device_id: str, digest: str | None = None) -> list[ChunkRequest]:
        with self._lock:
            seen = self._seen[mark:]
        return [r for d, r in seen if d == device_id and (digest is None or r.bundle_digest == digest)]

    def close(self) -> None:
        self._client.disconnect()  # before loop_stop: the loop thread then closes the socket
        self._client.loop_stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("crash")
    local = LocalFleet(workdir, broker_host=mosquitto.host, broker_port=mosquitto.port)
    watcher = ChunkRequestWatcher(mosquitto.host, mosquitto.port)
    client: EdgefleetClient | None = None
    try:
        client = local.start_control_plane()
        sources = {
            "crash/1.0.0": mlp_onnx(1),
            "crash/2.0.0": mlp_onnx(2),
            "crash/2.0.0+bad": failing_onnx(),
            "disk/1.0.0": mlp_onnx(4),
            "disk/2.0.0": mlp_onnx(5, hidden=(1024, 1280)),  # ~5.3 MiB: downloads, cannot also unpack
            "disk/3.0.0": mlp_onnx(6),
            "net/1.0.0": mlp_onnx(7, hidden=(768, 960)),  # ~3 MiB: ~190 chunks of 16 KiB
            "stuck/1.0.0": mlp_onnx(8),
            "stuck/2.0.0": mlp_onnx(9),
            "stuck/3.0.0": mlp_onnx(10),
            "segv/1.0.0": mlp_onnx(11),
            "segv/2.0.0": mlp_onnx(12),
            "full/1.0.0": mlp_onnx(13),
            "full/2.0.0": mlp_onnx(14),
        }
        models = {}
        for key, data in sources.items():
            name, version = key.split("/")
            path = workdir / "models" / f"{name}-{version}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            row = client.push_model(path, name=name, version=version)
            models[key] = Model(name, version, path, row["bundle_digest"], row["bundle_size"])
        yield Fleet(local, client, mosquitto, models, watcher)
    finally:
        watcher.close()
        with ThreadPoolExecutor(8) as pool:  # agents stop in parallel; each takes a while to say goodbye
            list(pool.map(lambda a: a.process.stop(), list(local.agents.values())))
        codes = local.stop()
        if client is not None:
            client.close()
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), codes


# -- helpers -----------------------------------------------------------------------------------


def _wait(what: str, condition: Callable[[], bool], timeout_s: float = 30.0, poll_s: float = 0.05) -> None:
    failure = f"timed out after {timeout_s:.0f} s waiting for {what}"
    eventually(condition, timeout_s=timeout_s, failure=failure, poll_s=poll_s)


def _deploy(f: Fleet, key: str, devices: list[str], timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
    """Deploy and wait for every device's outcome; returns the deployments by device."""
    model = f.models[key]
    created = f.client.deploy(model.name, model.version, devices=devices)
    done = f.client.wait_for_deployments([d["id"] for d in created], timeout_s=timeout_s)
    return {d["device_id"]: d for d in done}


def _state(agent: AgentProcess) -> AgentState:
    """The agent's state file, parsed strictly (a torn or inconsistent file fails here)."""
    return AgentState.from_dict(json.loads((agent.data_dir / STATE_FILE).read_text()))


def _assert_serves(agent: AgentProcess, model: Model) -> None:
    """The agent's v2 API serves exactly ``model`` and answers what onnxruntime says it should."""
    x = np.random.default_rng(3).standard_normal((4, N_INPUTS)).astype(np.float32)
    with httpx.Client(timeout=10) as http:
        meta = http.get(f"{agent.api_url}/v2/models/{model.name}").json()
        assert meta["versions"] == [model.version], meta
        got = v2_infer(http, agent.api_url, model.name, x)
    np.testing.assert_allclose(got, direct_predict("onnx", model.path, x), atol=1e-5)


def _assert_installed(
    agent: AgentProcess, active: Model, slots: set[str], *, check_downloads: bool = True
) -> AgentState:
    """Nothing half-installed: the state is settled, the disk holds exactly ``slots``, no download is left."""
    state = _state(agent)
    assert state.in_progress is None, state.in_progress
    assert state.active[active.name].bundle_digest == active.digest
    model_dir = agent.data_dir / "models" / active.name
    assert {p.name for p in model_dir.iterdir()} == slots
    assert (model_dir / state.active[active.name].slot / state.active[active.name].model_file).is_file()
    assert not list((agent.data_dir / "models").glob("*/*.unpacking"))
    assert not list(agent.data_dir.glob(".*.tmp")), "temp files of interrupted writes left behind"
    if check_downloads:
        assert [p.name for p in (agent.data_dir / "downloads").iterdir()] == [], "download files left behind"
    return state


def _start_all(fleet: LocalFleet, starts: dict[str, dict[str, Any]]) -> dict[str, AgentProcess]:
    """Start (or restart) several agents at once: each pays seconds of imports, in parallel."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = {d: pool.submit(fleet.start_agent, d, **kwargs) for d, kwargs in starts.items()}
        return {d: future.result() for d, future in futures.items()}


# -- SIGKILL in every deployment state -----------------------------------------------------------


@dataclass
class CrashRun:
    """What one device went through: the deployment it was killed in, and what it ended as."""

    state: str
    device_id: str
    target: Model
    stored_before_kill: AgentState | None = None
    status_at_kill: str = ""
    serving_at_kill: list[str] = field(default_factory=list)  # the versions its v2 API named while paused
    deployment: dict[str, Any] = field(default_factory=dict)
    requests_after_restart: list[ChunkRequest] = field(default_factory=list)


def _device(state: str) -> str:
    return "crash-" + state.replace("_", "-")


@pytest.fixture(scope="module")
def crash_runs(fleet: Fleet) -> dict[str, CrashRun]:
    """Every kill state at once, one device each: pause a deployment in the state, SIGKILL, restart.

    Devices killed after activation first install v1 (the version a rollback must restore). The
    fault variables are read when the agent starts, so those run v1's deployment without them and
    restart with them; the others never pass their pause state before the deployment that
    matters (rolling_back needs a failing health check), so they start with the variables set.
    """
    f = fleet
    runs = {
        s: CrashRun(s, _device(s), f.models["crash/2.0.0+bad" if s == "rolling_back" else "crash/2.0.0"])
        for s in KILL_STATES
    }
    fault = {
        r.device_id: {"EDGEFLEET_FAULT_PAUSE_AT": r.state, "EDGEFLEET_FAULT_PAUSE_S": str(FAULT_PAUSE_S)}
        for r in runs.values()
    }
    with_v1 = [_device(s) for s in ROLLED_BACK_STATES]
    restart_for_fault = [_device(s) for s in ("activating", "health_checking")]
    config = {"heartbeat_interval_s": HEARTBEAT_S}
    agents = _start_all(
        f.fleet,
        {r.device_id: {"config": config, "env": fault[r.device_id]} for r in runs.values()}
        | {d: {"config": config} for d in restart_for_fault},
    )
    f.fleet.wait_for_devices(f.client, with_v1)
    assert {d: x["status"] for d, x in _deploy(f, "crash/1.0.0", with_v1).items()} == dict.fromkeys(
        with_v1, "succeeded"
    )
    with ThreadPoolExecutor(len(restart_for_fault)) as pool:
        list(pool.map(lambda d: agents[d].process.stop(), restart_for_fault))
    agents |= _start_all(f.fleet, {d: {"env": fault[d]} for d in restart_for_fault})

    deployment_ids = {}
    for target in {r.target for r in runs.values()}:
        on = [r.device_id for r in runs.values() if r.target == target]
        for created in f.client.deploy(target.name, target.version, devices=on):
            deployment_ids[created["device_id"]] = created["id"]
    for run in runs.values():
        log_path = agents[run.device_id].process.log_path
        _wait(f"{run.device_id} to pause in {run.state}", lambda p=log_path, s=run.state: f"fault pause at {s}" in (
            p.read_text(errors="replace")
        ))
    # Paused for two heartbeats: a model reported "serving" before its health check passed
    # would have reached the control plane by now and been taken for success.
    time.sleep(2.5 * HEARTBEAT_S)
    with httpx.Client(timeout=10) as http:
        for run in runs.values():
            meta = http.get(f"{agents[run.device_id].api_url}/v2/models/{run.target.name}")
            run.serving_at_kill = meta.json().get("versions", []) if meta.status_code == 200 else []
    for run in runs.values():
        agent = agents[run.device_id]
        agent.process.signal(signal.SIGKILL)
        assert agent.process.popen.wait(timeout=10) == -signal.SIGKILL
        run.stored_before_kill = _state(agent)
        run.status_at_kill = f.client.deployment(deployment_ids[run.device_id])["status"]
        # What a kill in the middle of an atomic write leaves: a later boot must sweep it.
        (agent.data_dir / f".{STATE_FILE}.killed.tmp").write_text("{half a state")

    mark = f.requests.mark()
    _start_all(f.fleet, {r.device_id: {} for r in runs.values()})
    done = f.client.wait_for_deployments(list(deployment_ids.values()), timeout_s=60)
    by_device = {r.device_id: r for r in runs.values()}
    for deployment in done:
        by_device[deployment["device_id"]].deployment = deployment
    # A wrongful retry of a rolled-back bundle would ask for chunks right after the boot that
    # reported the rollback; give those requests time to reach the broker.
    time.sleep(0.5)
    for run in runs.values():
        run.requests_after_restart = f.requests.since(mark, run.device_id)
    return runs


@pytest.mark.parametrize("state", KILL_STATES)
def test_sigkill_in_each_state_recovers_per_the_table(
    fleet: Fleet, crash_runs: dict[str, CrashRun], state: str
) -> None:
    run = crash_runs[state]
    agent = fleet.fleet.agents[run.device_id]
    v1 = fleet.models["crash/1.0.0"]
    assert run.stored_before_kill is not None
    assert run.stored_before_kill.in_progress is not None, "the state was persisted before the step"
    assert run.stored_before_kill.in_progress.state == state
    assert run.status_at_kill == "pending", "an outcome was reported before the deployment ended"

    if state in ROLLED_BACK_STATES:  # the unproven candidate was never what the API served
        assert run.serving_at_kill == [v1.version], run.serving_at_kill
    assert not (agent.data_dir / f".{STATE_FILE}.killed.tmp").exists(), "a torn temp file survived the restart"
    if state in RETRIED_STATES:
        assert run.deployment["status"] == "succeeded", run.deployment
        serving = run.target
        _assert_serves(agent, run.target)
        stored = _assert_installed(agent, run.target, {v1.slot, run.target.slot})
        assert stored.failed == {} and stored.interrupted == {}
        assert run.requests_after_restart, "the interrupted deployment was not tried again"
    elif state in ROLLED_BACK_STATES:
        assert run.deployment["status"] == "failed_rolled_back", run.deployment
        assert run.deployment["error_code"] == "agent_restarted"
        serving = v1
        _assert_serves(agent, v1)
        stored = _assert_installed(agent, v1, {v1.slot})
        assert stored.failed == {"crash": run.target.digest}, "a rolled-back bundle must not be retried"
        assert run.requests_after_restart == [], "the rolled-back bundle was fetched again"
    else:  # RESTART: done again, resuming what was already on disk
        assert run.deployment["status"] == "succeeded", run.deployment
        serving = run.target
        _assert_serves(agent, run.target)
        stored = _assert_installed(agent, run.target, {run.target.slot})
        assert stored.failed == {}
        if state != "downloading":  # the bundle was complete on disk: not fetched again
            assert run.requests_after_restart == []
    reported = fleet.client.device(run.device_id)["reported"]
    assert [(m["name"], m["version"], m["state"]) for m in reported["models"]] == [
        ("crash", serving.version, "serving")
    ]


# -- disk full while staging ---------------------------------------------------------------------

TMPFS_BYTES = 8 * 1024 * 1024  # holds the big bundle once, not twice


def test_disk_full_while_staging_changes_nothing_and_a_later_state_deploys(fleet: Fleet) -> None:
    f = fleet
    v1, big, v3 = f.models["disk/1.0.0"], f.models["disk/2.0.0"], f.models["disk/3.0.0"]
    assert big.size < TMPFS_BYTES < 2 * big.size
    agent = f.fleet.start_agent("disk-dev", data_tmpfs_bytes=TMPFS_BYTES)
    try:
        assert Path(agent.data_dir).exists(), "the agent's private tmpfs is not reachable through /proc"
        assert _deploy(f, "disk/1.0.0", ["disk-dev"])["disk-dev"]["status"] == "succeeded"

        failed = _deploy(f, "disk/2.0.0", ["disk-dev"])["disk-dev"]
        assert failed["status"] == "failed_no_change", failed
        assert "No space left on device" in failed["message"], "it failed, but not for lack of space"
        _assert_serves(agent, v1)
        stored = _assert_installed(agent, v1, {v1.slot})
        assert stored.failed == {"disk": big.digest}  # (and _assert_installed: its download no longer fills the disk)
        reported = f.client.device("disk-dev")["reported"]
        assert [(m["version"], m["state"]) for m in reported["models"]] == [(v1.version, "serving")]

        # A failed deployment never blocks a later desired state.
        assert _deploy(f, "disk/3.0.0", ["disk-dev"])["disk-dev"]["status"] == "succeeded"
        _assert_serves(agent, v3)
        _assert_installed(agent, v3, {v1.slot, v3.slot})
    finally:
        agent.process.stop()


# -- a model that crashes the runtime ------------------------------------------------------------


def _restart_crashing(fleet: LocalFleet, device_id: str, env: dict[str, str]) -> AgentProcess:
    """Restart an agent that may die of its fault before its API answers."""
    try:
        return fleet.start_agent(device_id, env=env, timeout_s=60)
    except FleetError:
        agent = fleet.agents[device_id]
        if agent.process.popen.poll() != -signal.SIGSEGV:
            raise
        return agent


@pytest.mark.parametrize("state", RETRIED_STATES)
def test_a_bundle_that_crashes_the_runtime_ends_runtime_crashed_without_a_crash_loop(
    fleet: Fleet, state: str
) -> None:
    """The agent dies of SIGSEGV in ``state`` on every attempt; each restart is what a supervisor does."""
    f, device = fleet, f"segv-{state.replace('_', '-')}"
    v1, v2 = f.models["segv/1.0.0"], f.models["segv/2.0.0"]
    agent = f.fleet.start_agent(device)
    f.fleet.wait_for_devices(f.client, [device])
    assert _deploy(f, "segv/1.0.0", [device])[device]["status"] == "succeeded"
    agent.process.stop()
    crash = {"EDGEFLEET_FAULT_SIGNAL_AT": state}
    agent = f.fleet.start_agent(device, env=crash)
    created = f.client.deploy(v2.name, v2.version, devices=[device])[0]
    for death in range(1, MAX_INTERRUPTED_ATTEMPTS + 1):
        assert agent.process.popen.wait(timeout=60) == -signal.SIGSEGV, f"attempt {death} did not crash"
        assert f.client.deployment(created["id"])["status"] == "pending", "an outcome before the retries ran out"
        agent = _restart_crashing(f.fleet, device, crash)
    # This start found the last death: it gives the bundle up instead of trying it again.
    try:
        done = f.client.wait_for_deployments([created["id"]], timeout_s=60)[0]
        assert (done["status"], done["error_code"]) == ("failed_rolled_back", "runtime_crashed"), done
        assert "1.0.0 restored" in done["message"]
        time.sleep(1.0)  # a retry after the verdict would crash the agent now
        assert agent.process.alive, "the agent died again after the bundle was given up"
        _assert_serves(agent, v1)
        stored = _assert_installed(agent, v1, {v1.slot})
        assert stored.failed == {"segv": v2.digest} and stored.interrupted == {}
        reported = f.client.device(device)["reported"]
        assert [(m["version"], m["state"]) for m in reported["models"]] == [(v1.version, "serving")]
    finally:
        agent.process.stop()


# -- disk full when a desired state arrives ------------------------------------------------------


def _fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system is full; return it."""
    filler = directory / "filler"
    block = b"\0" * (64 * 1024)
    with filler.open("wb", buffering=0) as out:
        while True:
            try:
                out.write(block)
            except OSError:
                break
    with filler.open("ab", buffering=0) as out:  # the last, partial block
        try:
            while True:
                out.write(b"\0" * 512)
        except OSError:
            pass
    return filler


def test_a_desired_state_that_arrives_while_the_disk_is_full_is_applied_once_space_returns(fleet: Fleet) -> None:
    f, device = fleet, "full-dev"
    v2 = f.models["full/2.0.0"]
    agent = f.fleet.start_agent(device, data_tmpfs_bytes=4 * 1024 * 1024)
    try:
        f.fleet.wait_for_devices(f.client, [device])
        assert _deploy(f, "full/1.0.0", [device])[device]["status"] == "succeeded"
        accepted = _state(agent).accepted_sequence
        filler = _fill(agent.data_dir)
        created = f.client.deploy(v2.name, v2.version, devices=[device])[0]

        def health() -> str:
            return str(f.client.device(device)["agent"].get("health", ""))

        _wait("the device to report that it cannot persist", lambda: health().startswith("state_not_persisted"))
        assert "No space left on device" in health()
        assert _state(agent).accepted_sequence == accepted, "written to a full disk?"
        assert "not persisted" in agent.process.log_path.read_text(errors="replace")
        assert f.client.deployment(created["id"])["status"] == "pending"

        filler.unlink()  # space returns; no desired state is sent again
        done = f.client.wait_for_deployments([created["id"]], timeout_s=60)[0]
        assert done["status"] == "succeeded", done
        assert _state(agent).accepted_sequence > accepted
        _assert_serves(agent, v2)
        _wait("the device to report it is healthy again", lambda: health() == "ok")
    finally:
        agent.process.stop()


# -- the network between agent and broker --------------------------------------------------------


def _have(agent: AgentProcess, model: Model, chunk_size: int = CHUNK_BYTES) -> set[int]:
    """The chunk indices the agent has verified and stored (its ``.have`` file)."""
    path = agent.data_dir / "downloads" / f"{model.digest[7:]}.have"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return set()
    assert struct.unpack_from(">I", raw)[0] == chunk_size
    return {struct.unpack_from(">I", raw, offset)[0] for offset in range(4, len(raw) - 3, 4)}


@dataclass
class Proxied:
    """An agent that reaches the broker only through a TCP proxy the test controls."""

    agent: AgentProcess
    proxy: TcpProxy


@pytest.fixture(scope="module")
def proxied(fleet: Fleet) -> Iterator[Proxied]:
    with TcpProxy(fleet.broker.host, fleet.broker.port) as proxy:
        agent = fleet.fleet.start_agent(
            "net-dev",
            config={
                "broker_port": proxy.port,
                "transfer": {"chunk_size_bytes": CHUNK_BYTES, "chunk_timeout_s": 1.0},
            },
        )
        try:
            fleet.fleet.wait_for_devices(fleet.client, ["net-dev"])
            yield Proxied(agent, proxy)
        finally:
            agent.process.stop()


def test_a_transfer_cut_mid_way_resumes_from_the_verified_chunks(fleet: Fleet, proxied: Proxied) -> None:
    """Two outages in one transfer: the agent rides out the first; the second also kills it.

    After each, the agent must ask only for chunks it has not stored: the first time from memory,
    the second time from its ``.have`` file.
    """
    f, proxy = fleet, proxied.proxy
    model = f.models["net/1.0.0"]
    total = chunk_count(model.size, CHUNK_BYTES)
    accepted_before = proxy.accepted
    proxy.down_bytes_per_s = 1.5e6  # the transfer takes ~2 s: long enough to cut in the middle
    try:
        mark = f.requests.mark()
        created = f.client.deploy(model.name, model.version, devices=["net-dev"])

        def cut_at(fraction: float) -> tuple[set[int], int]:
            """Cut once ``fraction`` of the chunks is stored; return what is stored and the requests so far."""
            agent = proxied.agent
            _wait(f"{fraction:.0%} of the chunks", lambda: len(_have(agent, model)) >= total * fraction, poll_s=0.01)
            assert proxy.cut() >= 1
            time.sleep(0.5)  # whatever was already in the agent's socket buffer lands now
            stored = _have(agent, model)
            asked = len(f.requests.since(mark, "net-dev", model.digest))
            assert 0 in stored and len(stored) < total, f"cut too late: {len(stored)} of {total} chunks stored"
            return stored, asked

        stored_1, asked_1 = cut_at(0.25)
        time.sleep(0.3)
        assert len(f.requests.since(mark, "net-dev", model.digest)) == asked_1, "requests got through a cut network"
        proxy.restore()

        stored_2, asked_2 = cut_at(0.5)
        assert stored_2 > stored_1, "nothing arrived after the first outage"
        proxied.agent.process.signal(signal.SIGKILL)
        assert proxied.agent.process.popen.wait(timeout=10) == -signal.SIGKILL
        stored_2 = _have(proxied.agent, model)  # final: nothing writes any more
        proxied.agent = f.fleet.start_agent("net-dev")  # comes up while the network is still down
        proxy.restore()

        done = f.client.wait_for_deployments([created[0]["id"]], timeout_s=60)
    finally:
        proxy.restore()
        proxy.down_bytes_per_s = None
    assert done[0]["status"] == "succeeded", done
    requests = f.requests.since(mark, "net-dev", model.digest)
    after_1 = {i for r in requests[asked_1:asked_2] for i in r.indices}
    after_2 = {i for r in requests[asked_2:] for i in r.indices}
    assert after_1 and after_2, "a transfer that was not cut mid-way"
    assert after_1.isdisjoint(stored_1), f"asked again after the outage: {sorted(after_1 & stored_1)}"
    assert after_2.isdisjoint(stored_2), f"asked again after the restart: {sorted(after_2 & stored_2)}"
    assert proxy.accepted >= accepted_before + 2, "the agent did not reconnect through the proxy"
    _assert_serves(proxied.agent, model)
    _assert_installed(proxied.agent, model, {model.slot})


def test_a_stuck_transfer_is_superseded_by_a_newer_desired_state(fleet: Fleet, proxied: Proxied) -> None:
    f, agent, proxy = fleet, proxied.agent, proxied.proxy
    v1, v2, v3 = f.models["stuck/1.0.0"], f.models["stuck/2.0.0"], f.models["stuck/3.0.0"]
    assert _deploy(f, "stuck/1.0.0", ["net-dev"])["net-dev"]["status"] == "succeeded"
    mark = f.requests.mark()

    def in_progress() -> Any:
        return _state(agent).in_progress

    # Agent -> broker goes silent: desired states still arrive, chunk requests never leave.
    proxy.pause("up")
    try:
        stuck = f.client.deploy(v2.name, v2.version, devices=["net-dev"])[0]
        _wait("the v2 download to start", lambda: in_progress() is not None and in_progress().version == v2.version)
        time.sleep(1.0)
        assert f.requests.since(mark, "net-dev") == [], "the stall let a chunk request through"
        assert (in_progress().state, in_progress().version) == ("downloading", v2.version)

        newer = f.client.deploy(v3.name, v3.version, devices=["net-dev"])[0]
        # Still stalled: the stuck download gives way at once, not after its chunk timeouts.
        _wait(
            "v3 to replace the stuck v2",
            lambda: in_progress() is not None and in_progress().version == v3.version,
            timeout_s=10,  # v2's chunk timeouts alone would take 20 s (1 s x 20 attempts)
        )
    finally:
        proxy.resume("up")

    done = f.client.wait_for_deployments([newer["id"]], timeout_s=60)
    assert done[0]["status"] == "succeeded", done
    assert f.client.deployment(stuck["id"])["status"] == "superseded"
    assert f.requests.since(mark, "net-dev", v3.digest), "v3 arrived without chunk requests?"
    _assert_serves(agent, v3)
    # The abandoned v2 transfer keeps its (sparse, near-empty) resume files: the transfer owns
    # them, and v2 may be desired again.
    _assert_installed(agent, v3, {v1.slot, v3.slot}, check_downloads=False)
