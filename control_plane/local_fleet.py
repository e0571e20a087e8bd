"""A control plane and agents as real processes on loopback: for the demo, tests and benchmarks.

Each process runs in its own session so a stop can reach its children too (the embedded
broker is a child of the control plane); nothing is left behind, even after a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agent.config import AgentConfig, ApiConfig, BrokerConfig, TransferConfig, TrustConfig, render_config
from control_plane.client import EdgefleetClient
from control_plane.embedded_broker import free_port
from shared.errors import EdgefleetError


class FleetError(EdgefleetError):
    code = "local_fleet_failed"


@dataclass
class ManagedProcess:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the process's output (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process (e.g. SIGKILL in crash tests)."""
        if self.alive:
            self.popen.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, wait, then SIGKILL the whole process group; return the exit code."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        try:  # anything the process started and left behind
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.popen.returncode


def spawn(name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> ManagedProcess:
    """Start ``python -m ...`` style ``args`` in a new session, output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


@dataclass
class AgentProcess:
    """An agent process and where to reach its local API."""

    device_id: str
    process: ManagedProcess
    config_path: Path
    api_url: str


@dataclass
class LocalFleet:
    """Start/stop a control plane and agents under ``workdir``."""

    workdir: Path
    broker_host: str | None = None  # None: the control plane starts its embedded broker
    broker_port: int = 0
    embedded_broker: str = "auto"  # with broker_host None: auto | mosquitto | amqtt
    control_plane: ManagedProcess | None = None
    api_url: str = ""
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # type: ignore[type-arg]

    def start_control_plane(self, timeout_s: float = 30.0) -> EdgefleetClient:
        """Start ``edgefleet server`` and wait until it answers; return a client for it."""
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "control_plane",
            "server",
            "--data-dir",
            str(self.workdir / "control-plane"),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        if self.broker_host is not None:
            args += ["--broker-host", self.broker_host, "--broker-port", str(self.broker_port)]
        else:
            args += ["--embedded-broker", self.embedded_broker]
        self.control_plane = spawn("control-plane", args, self.workdir / "logs" / "control-plane.log")
        self.api_url = f"http://127.0.0.1:{port}"
        client = EdgefleetClient(self.api_url)
        deadline = time.monotonic() + timeout_s
        while not client.healthy():
            if not self.control_plane.alive or time.monotonic() > deadline:
                raise FleetError(f"control plane did not start:\n{self.control_plane.log_tail()}")
            time.sleep(0.1)
        self.info = client.info()
        return client

    def write_agent_config(self, device_id: str, *, chunk_size_bytes: int = 64 * 1024) -> tuple[Path, int]:
        """An agent config pinned to this control plane's keys; returns (path, api port)."""
        api_port = free_port()
        config = AgentConfig(
            device_id=device_id,
            data_dir=Path("data"),
            broker=BrokerConfig(
                host=self.info["broker"]["host"], port=self.info["broker"]["port"], reconnect_min_s=1, reconnect_max_s=2
            ),
            trust=TrustConfig(
                publisher_keys=tuple(self.info["keys"]["publisher"]), online_keys=tuple(self.info["keys"]["online"])
            ),
            api=ApiConfig(port=api_port),
            transfer=TransferConfig(chunk_size_bytes=chunk_size_bytes),
            heartbeat_interval_s=5.0,
        )
        path = self.workdir / "agents" / device_id / "agent.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_config(config))
        return path, api_port

    def start_agent(self, device_id: str, timeout_s: float = 30.0) -> AgentProcess:
        """Start (or restart, reusing its config and data) ``edgefleet-agent run`` for ``device_id``."""
        existing = self.agents.get(device_id)
        if existing is not None:
            path, api_url = existing.config_path, existing.api_url
        else:
            path, api_port = self.write_agent_config(device_id)
            api_url = f"http://127.0.0.1:{api_port}"
        process = spawn(
            f"agent-{device_id}",
            [sys.executable, "-m", "agent", "run", "--config", str(path)],
            self.workdir / "logs" / f"agent-{device_id}.log",
        )
        agent = AgentProcess(device_id=device_id, process=process, config_path=path, api_url=api_url)
        self.agents[device_id] = agent
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{api_url}/v2/health/live", timeout=1.0).status_code == 200:
                    return agent
            except httpx.HTTPError:
                pass
            if not process.alive or time.monotonic() > deadline:
                raise FleetError(f"agent {device_id} did not start:\n{process.log_tail()}")
            time.sleep(0.1)

    def wait_for_devices(self, client: EdgefleetClient, device_ids: list[str], timeout_s: float = 30.0) -> None:
        """Wait until every device in ``device_ids`` has reported to the control plane."""
        deadline = time.monotonic() + timeout_s
        while True:
            known = {d["id"] for d in client.devices() if d.get("online")}
            if set(device_ids) <= known:
                return
            if time.monotonic() > deadline:
                raise FleetError(f"devices {sorted(set(device_ids) - known)} did not report within {timeout_s} s")
            time.sleep(0.1)

    def stop(self) -> dict[str, int]:
        """Stop every agent, then the control plane; return exit codes by process name."""
        codes = {a.process.name: a.process.stop() for a in self.agents.values()}
        if self.control_plane is not None:
            codes[self.control_plane.name] = self.control_plane.stop()
        return codes

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
