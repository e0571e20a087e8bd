"""A control plane and agents as real processes on loopback: for the demo, tests and benchmarks.

Each process runs in its own session so a stop can reach its children too (the embedded
broker is a child of the control plane); nothing is left behind, even after a failure.
The fleet calls the API with the admin token the control plane writes at its first start
(``<data dir>/admin-token``): :attr:`LocalFleet.api_token`, and :meth:`LocalFleet.client`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edgefleet.control_plane.broker.embedded import free_port
from edgefleet.control_plane.client import ADMIN_TOKEN_FILE, EdgefleetClient
from edgefleet.control_plane.devtools.agent_toml import agent_toml
from edgefleet.shared.errors import EdgefleetError

ENROLL_TIMEOUT_S = 60.0  # seconds `edgefleet-agent enroll` may take (a loaded CI machine starts Python slowly)


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
    with log_path.open("ab") as log:  # a restarted process appends to its log
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
    data_tmpfs_bytes: int | None = None  # set: the data dir is a tmpfs in the agent's own mount namespace

    @property
    def data_dir(self) -> Path:
        """The agent's data directory, as this process can read it.

        A data dir on a private tmpfs is visible only inside the agent's mount namespace, so it
        is reached through ``/proc/<pid>/root`` (root only, and only while the agent lives).
        """
        path = (self.config_path.parent / "data").resolve()
        if self.data_tmpfs_bytes is None:
            return path
        return Path(f"/proc/{self.process.popen.pid}/root") / path.relative_to(path.anchor)


@dataclass
class LocalFleet:
    """Start/stop a control plane and agents under ``workdir``."""

    workdir: Path
    broker_host: str | None = None  # None: the control plane starts its embedded broker
    broker_port: int = 0
    embedded_broker: str = "auto"  # with broker_host None: auto | mosquitto | amqtt
    # The control plane's broker credentials and TLS files (passed to it as EDGEFLEET_BROKER_* variables).
    broker_username: str | None = None
    broker_password: str | None = None
    broker_tls_ca_file: str | None = None
    broker_tls_cert_file: str | None = None
    broker_tls_key_file: str | None = None
    # Per device: the [broker] keys its config starts from (TLS files, say), as the agent's TOML
    # names them; enrollment then fills in the address and the user name and password it issued.
    agent_brokers: dict[str, dict[str, Any]] = field(default_factory=dict)
    bundle_urls: bool = False  # the control plane names its own HTTP bundle URLs in desired states
    control_plane: ManagedProcess | None = None
    api_url: str = ""
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # type: ignore[type-arg]
    api_token: str = ""  # the control plane's first-start admin token, read from its data dir

    @property
    def control_plane_dir(self) -> Path:
        """The control plane's data dir."""
        return self.workdir / "control-plane"

    def client(self) -> EdgefleetClient:
        """A new SDK client for the control plane, with the admin token (the caller closes it)."""
        return EdgefleetClient(self.api_url, token=self.api_token or None)

    def auth_headers(self) -> dict[str, str]:
        """The ``Authorization`` header for raw HTTP calls to the API (as admin)."""
        return {"Authorization": f"Bearer {self.api_token}"}

    def start_control_plane(self, timeout_s: float = 30.0) -> EdgefleetClient:
        """Start ``edgefleet server`` and wait until it answers; return a client for it."""
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "edgefleet.control_plane",
            "server",
            "--data-dir",
            str(self.control_plane_dir),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        if self.broker_host is not None:
            args += ["--broker-host", self.broker_host, "--broker-port", str(self.broker_port)]
        else:
            args += ["--embedded-broker", self.embedded_broker]
        if self.bundle_urls:
            args += ["--public-url", f"http://127.0.0.1:{port}"]
        credentials = {
            "EDGEFLEET_BROKER_USERNAME": self.broker_username,
            "EDGEFLEET_BROKER_PASSWORD": self.broker_password,
            "EDGEFLEET_BROKER_TLS_CA_FILE": self.broker_tls_ca_file,
            "EDGEFLEET_BROKER_TLS_CERT_FILE": self.broker_tls_cert_file,
            "EDGEFLEET_BROKER_TLS_KEY_FILE": self.broker_tls_key_file,
        }
        env = {name: value for name, value in credentials.items() if value is not None}
        self.control_plane = spawn("control-plane", args, self.workdir / "logs" / "control-plane.log", env=env)
        self.api_url = f"http://127.0.0.1:{port}"
        probe = EdgefleetClient(self.api_url)  # /healthz needs no token
        deadline = time.monotonic() + timeout_s
        try:
            while not probe.healthy():
                if not self.control_plane.alive or time.monotonic() > deadline:
                    raise FleetError(f"control plane did not start:\n{self.control_plane.log_tail()}")
                time.sleep(0.1)
        finally:
            probe.close()
        # Written before the API answers (the first start makes it before serving).
        self.api_token = (self.control_plane_dir / ADMIN_TOKEN_FILE).read_text().strip()
        client = self.client()
        self.info = client.info()
        return client

    def write_agent_config(
        self,
        device_id: str,
        *,
        chunk_size_bytes: int = 64 * 1024,
        transfer: Mapping[str, Any] | None = None,
        broker_port: int | None = None,
        heartbeat_interval_s: float = 5.0,
    ) -> tuple[Path, int]:
        """Enroll ``device_id`` the way a real device does and write its config; returns (path, api port).

        Runs ``edgefleet-agent enroll`` with a template config: the agent pins the control plane's
        current keyring and gets its own broker credentials.

        Args:
            device_id: The device to enroll.
            chunk_size_bytes: MQTT chunk size (ignored when ``transfer`` is given).
            transfer: The agent's whole ``[transfer]`` table (its TOML keys), for tests that tune
                timeouts or the bandwidth cap.
            broker_port: Connect to this port instead of the broker's (e.g. a test's TCP proxy).
            heartbeat_interval_s: Seconds between reported-state heartbeats.

        Raises:
            FleetError: The enrollment failed (its output is in the message).
        """
        api_port = free_port()
        client = self.client()
        try:
            token = client.create_enrollment(device_id)["token"]
        finally:
            client.close()
        transfer_table: dict[str, Any] = {"chunk_size_bytes": chunk_size_bytes} if transfer is None else dict(transfer)
        if self.bundle_urls:
            # The agent sends its credentials to the control plane's origin only (agent.transfer.http).
            transfer_table.setdefault("http_base_url", self.api_url)
        folder = self.workdir / "agents" / device_id
        folder.mkdir(parents=True, exist_ok=True)
        template = folder / "agent.template.toml"
        template.write_text(
            agent_toml(
                {
                    "device_id": device_id,
                    "data_dir": "data",
                    "heartbeat_interval_s": heartbeat_interval_s,
                    "broker": self.agent_brokers.get(device_id) or {"reconnect_min_s": 1.0, "reconnect_max_s": 2.0},
                    "api": {"port": api_port},
                    "transfer": transfer_table,
                }
            )
        )
        path = folder / "agent.toml"
        args = [sys.executable, "-m", "edgefleet.agent", "enroll", "--server", self.api_url, "--config", str(path)]
        args += ["--template", str(template)]
        if broker_port is not None:
            args += ["--broker-port", str(broker_port)]
        try:
            done = subprocess.run(
                args,
                env={**os.environ, "EDGEFLEET_ENROLL_TOKEN": token},  # not on the command line: ps shows those
                capture_output=True,
                text=True,
                timeout=ENROLL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise FleetError(f"enrolling {device_id} took over {ENROLL_TIMEOUT_S} s") from exc
        if done.returncode != 0:
            raise FleetError(f"enrolling {device_id} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return path, api_port

    def start_agent(
        self,
        device_id: str,
        timeout_s: float = 30.0,
        *,
        env: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        data_tmpfs_bytes: int | None = None,
    ) -> AgentProcess:
        """Start (or restart, reusing its config and data) ``edgefleet-agent run`` for ``device_id``.

        Args:
            device_id: The device; its first start enrolls it and writes its config.
            timeout_s: How long to wait for its local API to answer.
            env: Extra environment (e.g. the ``EDGEFLEET_FAULT_*`` variables of :mod:`agent.faults`).
            config: Keyword arguments for :meth:`write_agent_config` on the first start.
            data_tmpfs_bytes: Run the agent in a private mount namespace (``unshare -m``, root
                only) with its data dir on a tmpfs of this size: a small disk for disk-full
                tests that leaves the host's mounts alone. The data is gone when the agent exits.
        """
        existing = self.agents.get(device_id)
        if existing is not None:
            path, api_url = existing.config_path, existing.api_url
        else:
            path, api_port = self.write_agent_config(device_id, **(config or {}))
            api_url = f"http://127.0.0.1:{api_port}"
        args = [sys.executable, "-m", "edgefleet.agent", "run", "--config", str(path)]
        if data_tmpfs_bytes is not None:
            data_dir = path.parent / "data"
            data_dir.mkdir(parents=True, exist_ok=True)
            mount = f'mount -t tmpfs -o size={int(data_tmpfs_bytes)} edgefleet-data "$0" && exec "$@"'
            args = ["unshare", "--mount", "sh", "-c", mount, str(data_dir), *args]
        process = spawn(f"agent-{device_id}", args, self.workdir / "logs" / f"agent-{device_id}.log", dict(env or {}))
        agent = AgentProcess(
            device_id=device_id, process=process, config_path=path, api_url=api_url, data_tmpfs_bytes=data_tmpfs_bytes
        )
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
