"""500 agents in one process against a real Mosquitto, and one bundle deployed to all of them.

paho's own loop waits with ``select()``, which fails for file descriptors >= 1024: one process
tops out near 339 clients. The agents here share one network thread (``selectors``/epoll), one
timer and one step pool (:class:`~edgefleet.agent.fleet_host.AgentHost`). To prove the ceiling
is gone rather than merely not reached, the test first fills the descriptors below 1024, so
every agent's socket lands above it.

The path is the real one: a control-plane process, enrollment over HTTP, a model pushed and
deployed through the API, chunks over MQTT. One device enrolls over HTTP and the others pin
the keyring it got: enrollment hashes a password per device (about 150 ms of control-plane CPU
each, over a minute for 500) and has tests of its own; this broker is anonymous, so the issued
credentials play no part. The test asserts on what each agent stored and serves, never on
what was sent.
"""

from __future__ import annotations

import gc
import os
import resource
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.config import AgentConfig, ApiConfig, BrokerConfig
from edgefleet.agent.enrollment import Enrolled, enroll_device, write_enrolled_config
from edgefleet.agent.fleet_host import AgentHost
from edgefleet.control_plane.broker.embedded import find_mosquitto, free_port
from edgefleet.control_plane.devtools.demo import INPUT_NAME, direct_predict
from edgefleet.control_plane.devtools.demo_models import write_demo_models
from edgefleet.control_plane.devtools.local_fleet import LocalFleet

AGENTS = 500
SELECT_CEILING_FD = 1024  # select() cannot watch descriptors from here on
MODEL = "mlp"


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * AGENTS + SELECT_CEILING_FD:
        pytest.skip(f"the hard limit of open files ({hard}) is too low for {AGENTS} agents")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # mosquitto, our child, inherits it
    return hard


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A Mosquitto of this test's own, configured for many clients."""
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("the mosquitto binary is required by this test (apt-get install mosquitto)", pytrace=False)
    _raise_fd_limit()
    workdir = tmp_path_factory.mktemp("many-broker")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        "\n".join([
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "max_connections -1",
            "max_queued_messages 1000000",
            "max_inflight_messages 20",
            "set_tcp_nodelay true",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "",
        ])
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("mosquitto did not start", pytrace=False)
                time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _configure(enrolled: Enrolled, device_id: str, root: Path) -> AgentConfig:
    template = AgentConfig(
        device_id=device_id,
        data_dir=Path("data"),
        broker=BrokerConfig(reconnect_min_s=0.5, reconnect_max_s=5),
        api=ApiConfig(enabled=False),  # hundreds of agents: no port each
        heartbeat_interval_s=30.0,
    )
    path = root / device_id / "agent.toml"
    write_enrolled_config(replace(enrolled, device_id=device_id), path, template)
    return AgentConfig.load(path)


def _fill_low_descriptors() -> list[int]:
    """Open descriptors until the next one is >= 1024, so every socket opened after is above select()'s reach."""
    gc.collect()  # sockets and files earlier tests dropped would otherwise free low descriptors later
    held: list[int] = []
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        if fd >= SELECT_CEILING_FD:
            os.close(fd)
            return held
        held.append(fd)


def _sockets_at_or_above(lowest_fd: int) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if int(name) >= lowest_fd and os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue  # closed meanwhile
    return count


def test_500_agents_in_one_process_all_serve_the_deployed_bundle(
    broker: tuple[str, int], tmp_path: Path
) -> None:
    host, port = broker
    started = time.monotonic()
    fleet = LocalFleet(tmp_path / "fleet", broker_host=host, broker_port=port)
    client = fleet.start_control_plane()
    agents_host: AgentHost | None = None
    held: list[int] = []
    try:
        paths = write_demo_models(tmp_path / "models", seed=3)
        client.push_model(paths["onnx"], name=MODEL, version="1.0.0")
        device_ids = [f"sim-{i:04d}" for i in range(AGENTS)]
        enrolled = enroll_device(fleet.api_url, client.create_enrollment(device_ids[0])["token"])
        configs = [_configure(enrolled, d, tmp_path / "agents") for d in device_ids]
        configured_s = time.monotonic() - started

        held = _fill_low_descriptors()
        agents_host = AgentHost(configs)
        agents_host.start()
        deadline = time.monotonic() + 60
        while not all(a.link.connected.is_set() for a in agents_host.agents.values()):
            assert time.monotonic() < deadline, "not every agent connected to the broker"
            time.sleep(0.2)
        connected_s = time.monotonic() - started
        # The control plane registered each device from its reported state (ingest over MQTT).
        while len({d["id"] for d in client.devices()} & set(device_ids)) < AGENTS:
            assert time.monotonic() < deadline, "the control plane did not see every agent"
            time.sleep(0.5)
        # The agents' sockets are above select()'s reach (the descriptors below are taken; another
        # thread of the test process may free a few meanwhile, so allow for a handful below).
        assert _sockets_at_or_above(SELECT_CEILING_FD) >= AGENTS - 10

        ids = [d["id"] for d in client.deploy(MODEL, "1.0.0", devices=device_ids)]
        results = client.wait_for_deployments(ids, timeout_s=150, poll_s=1.0)
        deployed_s = time.monotonic() - started
        assert sorted(r["status"] for r in results) == ["succeeded"] * AGENTS, [
            (r["device_id"], r["status"], r.get("message")) for r in results if r["status"] != "succeeded"
        ][:5]

        # What each agent stored and serves.
        x = np.random.default_rng(7).standard_normal((2, 32)).astype(np.float32)
        expected = direct_predict("onnx", paths["onnx"], x)
        for device_id, agent in agents_host.agents.items():
            active = agent.store.state.active[MODEL]
            assert active.version == "1.0.0", device_id
            got = agent.predict(MODEL, {INPUT_NAME: x})
            np.testing.assert_allclose(next(iter(got.values())), expected, atol=1e-6)
        print(
            f"\n{AGENTS} agents: configured in {configured_s:.1f} s, all connected at {connected_s:.1f} s, "
            f"all serving at {deployed_s:.1f} s (one process, one network thread)"
        )
    finally:
        if agents_host is not None:
            stopping = time.monotonic()
            agents_host.stop()
            print(f"{len(agents_host.agents)} agents stopped in {time.monotonic() - stopping:.1f} s")
        for fd in held:
            os.close(fd)
        fleet.stop()
        client.close()
        shutil.rmtree(tmp_path / "agents", ignore_errors=True)
