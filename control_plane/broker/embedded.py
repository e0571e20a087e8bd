"""An MQTT broker for a single machine: used by ``edgefleet server`` when no broker is configured,
by the demo, and by the tests.

Two implementations, both run as a *child process* so that they can be stopped, killed and restarted
like a real broker, and never share the control plane's GIL:

* **Mosquitto** (preferred): the installed ``mosquitto`` binary with a generated config file.
  Retained messages, persistent sessions (``clean_session=False``) and their queued QoS 1/2 messages
  survive :meth:`BrokerHandle.restart` because persistence is on and SIGTERM makes mosquitto save
  its database. ``max_packet_size_bytes`` is enforced (a client that sends a bigger packet is
  disconnected).
* **amqtt** (fallback when mosquitto is not installed): ``python -m control_plane.embedded_broker
  --amqtt``. Retained messages and persistent sessions work while the process lives (we patch two
  amqtt 0.12.1 deviations, see :func:`_amqtt_broker_class`, and admit clients without marking them
  anonymous, see :func:`_build_open_auth_plugin`), but everything is in memory: a restart loses
  retained messages, sessions and queued messages. amqtt enforces no packet size limit (any message is
  read and forwarded whole), and it has no mosquitto password/ACL file support (asking for one is a
  :class:`~shared.errors.ConfigError`, never a silently open broker). It also upgrades a QoS 0 publish
  to the subscriber's QoS.

Every foreign failure is translated into :class:`~shared.errors.BrokerError` (or
:class:`~shared.errors.ConfigError` for settings that cannot work), with the tail of the broker's log.

Usage::

    with start_embedded_broker(BrokerSettings()) as broker:
        client.connect(broker.host, broker.port)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.control_plane.broker.mosquitto_conf import DeliveryLimits, Listener, render_mosquitto_conf
from edgefleet.shared.errors import BrokerError, ConfigError

__all__ = [
    "AmqttBroker",
    "BrokerHandle",
    "BrokerSettings",
    "MosquittoBroker",
    "enable_tcp_nodelay",
    "find_mosquitto",
    "free_port",
    "start_amqtt",
    "start_embedded_broker",
    "start_mosquitto",
]

log = logging.getLogger(__name__)

BrokerKind = Literal["mosquitto", "amqtt"]

_LOG_TAIL_BYTES = 4_000
_PROBE_INTERVAL_S = 0.02
_PORT_RETRIES = 3  # when port=0, how often to pick another port if the chosen one was taken meanwhile
_AMQTT_READY_LINE = "edgefleet-amqtt: listening"


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """How to start the embedded broker. Mosquitto honours every field; see the module docstring for amqtt."""

    host: str = "127.0.0.1"
    """Address the listener binds to (and clients connect to)."""
    port: int = 0
    """TCP port; 0 = pick a free port at start (the handle's ``port`` tells which, and keeps it on restart)."""
    data_dir: Path | None = None
    """Directory for the persistence database, the generated config and the broker log.
    None = a temporary directory owned by the handle and deleted by :meth:`BrokerHandle.stop`."""
    max_packet_size_bytes: int = DeliveryLimits.max_packet_size_bytes
    """Largest MQTT packet (header + topic + payload) a client may send; bigger ones get it disconnected."""
    max_queued_messages: int = DeliveryLimits.max_queued_messages
    """QoS 1/2 messages queued per client beyond those in flight, at least 1000 (the same rule and default as
    the production broker: see :mod:`~edgefleet.control_plane.broker.mosquitto_conf`)."""
    max_inflight_messages: int = DeliveryLimits.max_inflight_messages
    """QoS 1/2 messages in flight (sent, not yet acknowledged) per client."""
    autosave_interval_s: int = 2
    """Seconds between saves of mosquitto's in-memory database (it also saves on SIGTERM); bounds what a
    SIGKILL or power loss can lose."""
    password_file: Path | None = None
    """Optional mosquitto password file (``mosquitto_passwd``); when given, anonymous clients are refused."""
    acl_file: Path | None = None
    """Optional mosquitto ACL file."""
    extra_config: tuple[str, ...] = field(default=())
    """Raw extra ``mosquitto.conf`` lines, appended last (mosquitto only)."""
    config_file: Path | None = None
    """A complete ``mosquitto.conf`` to run as it is (mosquitto only), e.g. one written by
    :mod:`control_plane.broker_config`. ``host``/``port`` must name a plaintext listener in it (the
    readiness probe connects there; a broker that refuses the anonymous probe still counts as up), and
    the other fields are not used: that file decides."""

    def delivery_limits(self) -> DeliveryLimits:
        """These settings' delivery limits (checked: see :class:`DeliveryLimits`)."""
        return DeliveryLimits(
            max_queued_messages=self.max_queued_messages,
            max_inflight_messages=self.max_inflight_messages,
            max_packet_size_bytes=self.max_packet_size_bytes,
            autosave_interval_s=self.autosave_interval_s,
        )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise ConfigError(f"broker port must be 0..65535, got {self.port}")
        self.delivery_limits()  # the same rules as the production broker's
        if not self.host:
            raise ConfigError("broker host must not be empty")
        if self.config_file is not None and self.port == 0:
            raise ConfigError("with config_file, port must name its plaintext listener (0 cannot be used)")
        if not isinstance(self.extra_config, tuple):
            # a list would make the frozen dataclass unhashable and mutable behind our back
            object.__setattr__(self, "extra_config", tuple(self.extra_config))
        for value in (
            self.host,
            str(self.data_dir or ""),
            str(self.password_file or ""),
            str(self.acl_file or ""),
            *self.extra_config,
        ):
            if "\n" in value or "\r" in value:
                raise ConfigError(f"broker setting contains a line break: {value!r}")


# --------------------------------------------------------------------------------------------- helpers


def find_mosquitto() -> str | None:
    """Return the path of the mosquitto binary, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (another process may still take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _set_tcp_nodelay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError, ValueError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def enable_tcp_nodelay(client: mqtt.Client) -> None:
    """Make ``client`` set TCP_NODELAY on every socket it opens (paho leaves Nagle on).

    Chains any ``on_socket_open`` callback already set; set yours *before* calling this.
    """
    previous: Callable[[mqtt.Client, Any, Any], None] | None = client.on_socket_open

    def on_socket_open(c: mqtt.Client, userdata: Any, sock: Any) -> None:
        _set_tcp_nodelay(sock)
        if previous is not None:
            previous(c, userdata, sock)

    client.on_socket_open = on_socket_open


def _mqtt_handshake(host: str, port: int, timeout_s: float) -> bool:
    """Return True once a broker on host:port answered an MQTT CONNECT with a CONNACK (of any reason code:
    a broker that refuses anonymous clients is still up)."""
    answered: list[object] = []
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edgefleet-probe-{uuid.uuid4().hex[:12]}",
        clean_session=True,
    )
    enable_tcp_nodelay(client)
    client.on_connect = lambda _c, _u, _flags, reason, _props: answered.append(reason)
    try:
        client.connect(host, port, keepalive=10)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + timeout_s
        while not answered and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break  # connection lost
        return bool(answered)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop(timeout=0.01)  # flush DISCONNECT; paho closes the socket after sending it
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def _check_port_free(host: str, port: int) -> None:
    """Refuse to start on a port someone already listens on: the readiness probe would otherwise talk to
    *their* broker while ours dies on EADDRINUSE."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve broker host {host!r}: {exc}") from exc
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # like the brokers themselves: SO_REUSEADDR, so TIME_WAIT leftovers of a previous run do not count
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise BrokerError(f"cannot start the MQTT broker on {host}:{port}: {exc.strerror or exc}") from exc


def _format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# PR_SET_PDEATHSIG, resolved in the parent: after fork(), the child must not dlopen anything.
_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _child_setup(parent_pid: int) -> Callable[[], None] | None:
    """preexec_fn: ask Linux to SIGTERM the broker when its parent dies (best effort).

    The kernel sends that signal when the *thread* that forked the broker exits, not the process: a broker
    started from a short-lived worker thread would die with the thread. So only a broker started from the
    main thread gets it; the others rely on the handle's finalizer (garbage collection, interpreter exit).
    """
    prctl = _prctl
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None

    def preexec() -> None:
        with contextlib.suppress(Exception):
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _ProcState:
    """What the finalizer needs to clean up; holds no reference to the handle."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.owned_dir: Path | None = None


def _finalize(state: _ProcState) -> None:
    """Last resort at garbage collection or interpreter exit: no broker outlives its handle."""
    proc = state.proc
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(Exception):
            proc.terminate()
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3.0)
    if state.owned_dir is not None:
        shutil.rmtree(state.owned_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------- handles


class BrokerHandle:
    """A running broker child process. Use as a context manager, or call :meth:`stop`."""

    kind: BrokerKind

    def __init__(self, settings: BrokerSettings, *, ready_timeout_s: float) -> None:
        self.settings = settings
        self.host = settings.host
        self.port = settings.port
        self.ready_timeout_s = ready_timeout_s
        self._state = _ProcState()
        self._finalizer = weakref.finalize(self, _finalize, self._state)
        if settings.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix=f"edgefleet-{self.kind}-"))
            self._state.owned_dir = self.data_dir
        else:
            self.data_dir = Path(settings.data_dir).resolve()
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BrokerError(f"cannot create broker data dir {self.data_dir}: {exc}") from exc
        self.log_path = self.data_dir / f"{self.kind}.log"
        self._log_offset = 0
        self._stopped = False

    # -- public ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{_format_hostport(self.host, self.port)}"

    @property
    def pid(self) -> int | None:
        """The broker process id, or None when it is not running."""
        proc = self._state.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def is_running(self) -> bool:
        return self.pid is not None

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The last ``max_bytes`` of the broker's output since it was last (re)started."""
        try:
            with self.log_path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(self._log_offset, size - max_bytes))
                return fh.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout_s``) and delete its temporary data dir.

        Idempotent. The handle cannot be restarted afterwards.
        """
        if self._stopped:
            return
        try:
            self._terminate(timeout_s)
        finally:
            self._stopped = True
            self._finalizer()  # removes the owned temp dir; the process is already gone

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would: nothing is saved. :meth:`restart` brings it back."""
        proc = self._state.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5.0)

    def restart(self, timeout_s: float = 5.0) -> None:
        """Stop the broker (if running) and start it again on the same host, port and data dir.

        Mosquitto keeps retained messages, persistent sessions and their queued messages (saved on
        SIGTERM, and every ``autosave_interval_s`` before a :meth:`kill`). amqtt keeps nothing.
        """
        if self._stopped:
            raise BrokerError(f"{self.kind} broker on {self.url} was stopped; start a new one")
        self._terminate(timeout_s)
        self._launch(allow_new_port=False)

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else ("stopped" if self._stopped else "not running")
        return f"<{type(self).__name__} {self.url} {state} data_dir={self.data_dir}>"

    # -- subclass hooks ----------------------------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write whatever the command needs (config file), for the current port."""

    def _env(self) -> dict[str, str] | None:
        return None

    # -- machinery ---------------------------------------------------------------------------------

    def _terminate(self, timeout_s: float) -> None:
        proc = self._state.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # mosquitto saves its database on SIGTERM
        try:
            proc.wait(timeout_s)
            return
        except subprocess.TimeoutExpired:
            log.warning("%s broker pid %s ignored SIGTERM for %.1fs; killing it", self.kind, proc.pid, timeout_s)
        proc.kill()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"{self.kind} broker pid {proc.pid} survived SIGKILL") from exc

    def _launch(self, *, allow_new_port: bool) -> None:
        """Start the process and wait until it answers MQTT; on failure leave nothing running."""
        deadline = time.monotonic() + self.ready_timeout_s
        attempts = 0
        while True:
            attempts += 1
            if self.port == 0 or (allow_new_port and attempts > 1):
                self.port = free_port(self.host)
            _check_port_free(self.host, self.port)
            self._prepare()
            try:
                self._spawn()
                self._wait_ready(deadline)
                log.info("%s broker ready on %s (pid %s)", self.kind, self.url, self.pid)
                return
            except BrokerError as exc:
                self._terminate(1.0)
                port_taken = "address already in use" in str(exc).lower()
                if not (allow_new_port and port_taken and attempts < _PORT_RETRIES):
                    raise

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log_file:
            self._log_offset = log_file.tell()
            try:
                self._state.proc = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    env=self._env(),
                    # own session: a Ctrl-C in the terminal must not kill the broker before the server drains
                    start_new_session=True,
                    preexec_fn=_child_setup(os.getpid()),
                )
            except OSError as exc:
                raise BrokerError(f"cannot start the {self.kind} broker: {exc}") from exc

    def _wait_ready(self, deadline: float) -> None:
        proc = self._state.proc
        assert proc is not None
        while True:
            code = proc.poll()
            if code is not None:
                raise BrokerError(
                    f"{self.kind} broker exited with status {code} while starting on {self.url}; "
                    f"its log ({self.log_path}):\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"{self.kind} broker did not answer MQTT on {self.url} within {self.ready_timeout_s:.1f}s; "
                    f"its log ({self.log_path}):\n{self.log_tail()}"
                )
            if self._ready_marker_seen() and _mqtt_handshake(self.host, self.port, min(2.0, remaining)):
                if proc.poll() is None:
                    return
                continue  # reports the exit above
            time.sleep(_PROBE_INTERVAL_S)

    def _ready_marker_seen(self) -> bool:
        return True


class MosquittoBroker(BrokerHandle):
    """A mosquitto child process with a generated config in its data dir."""

    kind: BrokerKind = "mosquitto"

    def __init__(self, settings: BrokerSettings, *, binary: str, ready_timeout_s: float) -> None:
        self.binary = binary
        super().__init__(settings, ready_timeout_s=ready_timeout_s)
        self.config_path = self.data_dir / "mosquitto.conf"

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def _prepare(self) -> None:
        if self.settings.config_file is not None:
            self.config_path = Path(self.settings.config_file).resolve()
            return
        try:
            self.config_path.write_text(mosquitto_config(self.settings, self.port, self.data_dir))
        except OSError as exc:
            raise BrokerError(f"cannot write mosquitto config {self.config_path}: {exc}") from exc


def mosquitto_config(settings: BrokerSettings, port: int, data_dir: Path) -> str:
    """Return the ``mosquitto.conf`` text for ``settings`` (mosquitto 2.0 syntax).

    The same renderer and delivery rules as the production broker; only the listener (plaintext,
    on ``settings.host``), the auth files and the paths are the embedded broker's own.
    """
    # mosquitto started as root switches to user "mosquitto", who cannot write our data dir
    run_as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    return render_mosquitto_conf(
        header=("Generated by edgefleet (control_plane/broker/embedded.py); rewritten at every start.",),
        listeners=[Listener(port=port, bind=settings.host, comment="the embedded broker's one listener")],
        limits=settings.delivery_limits(),
        persistence_dir=str(data_dir),
        password_file=None if settings.password_file is None else str(Path(settings.password_file).resolve()),
        acl_file=None if settings.acl_file is None else str(Path(settings.acl_file).resolve()),
        run_as_user="root" if run_as_root else None,
        extra_lines=settings.extra_config,
    )


class AmqttBroker(BrokerHandle):
    """amqtt in a child Python process (``python -m control_plane.embedded_broker --amqtt``)."""

    kind: BrokerKind = "amqtt"

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "edgefleet.control_plane.broker.embedded",
            "--amqtt",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _ready_marker_seen(self) -> bool:
        # our child prints it once amqtt bound its listener: only then is the answering broker ours
        return _AMQTT_READY_LINE in self.log_tail(max_bytes=1 << 20)


# --------------------------------------------------------------------------------------------- starters


_Handle = TypeVar("_Handle", bound=BrokerHandle)


def _started(handle: _Handle, settings: BrokerSettings) -> _Handle:
    """``handle`` once its broker answers; a broker that fails to start is stopped, not left running."""
    try:
        handle._launch(allow_new_port=settings.port == 0)
    except BaseException:
        handle.stop()
        raise
    return handle


def start_mosquitto(
    settings: BrokerSettings, binary: str | None = None, ready_timeout_s: float = 10.0
) -> MosquittoBroker:
    """Start mosquitto and return once it answers an MQTT CONNECT.

    Raises:
        BrokerError: mosquitto is not installed, exited while starting, or did not answer in time.
    """
    binary = binary or find_mosquitto()
    if binary is None:
        raise BrokerError("mosquitto is not installed; install mosquitto: apt-get install mosquitto")
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise BrokerError(f"mosquitto binary {binary!r} does not exist or is not executable")
    return _started(MosquittoBroker(settings, binary=binary, ready_timeout_s=ready_timeout_s), settings)


def start_amqtt(settings: BrokerSettings, ready_timeout_s: float = 10.0) -> AmqttBroker:
    """Start amqtt in a child process and return once it answers an MQTT CONNECT.

    Raises:
        ConfigError: settings amqtt cannot honour (password/ACL file, raw mosquitto config lines).
        BrokerError: amqtt is not installed, exited while starting, or did not answer in time.
    """
    unsupported = [
        name for name in ("password_file", "acl_file", "extra_config", "config_file") if getattr(settings, name)
    ]
    if unsupported:
        raise ConfigError(
            f"the amqtt fallback broker does not support {', '.join(unsupported)}; install mosquitto "
            "(apt-get install mosquitto) or configure an external broker"
        )
    if importlib.util.find_spec("amqtt") is None:
        raise BrokerError("amqtt is not installed; pip install 'edgefleet[server]' or install mosquitto")
    return _started(AmqttBroker(settings, ready_timeout_s=ready_timeout_s), settings)


def start_embedded_broker(settings: BrokerSettings, ready_timeout_s: float = 10.0, kind: str = "auto") -> BrokerHandle:
    """Start mosquitto if it is installed, else amqtt (``kind`` "mosquitto"/"amqtt" forces one)."""
    if kind == "amqtt":
        return start_amqtt(settings, ready_timeout_s=ready_timeout_s)
    binary = find_mosquitto()
    if kind == "mosquitto" and binary is None:
        raise BrokerError("mosquitto was asked for but is not installed (apt-get install mosquitto)")
    if binary is not None:
        return start_mosquitto(settings, binary=binary, ready_timeout_s=ready_timeout_s)
    log.warning("mosquitto not found; falling back to amqtt (in-memory: a restart loses retained messages)")
    return start_amqtt(settings, ready_timeout_s=ready_timeout_s)


# --------------------------------------------------------------------------------------------- amqtt child


def _build_open_auth_plugin() -> type:
    """An amqtt auth plugin that admits every client *without* marking it anonymous.

    amqtt's own AnonymousAuthPlugin flags sessions ``is_anonymous``, and amqtt then neither queues QoS 1/2
    messages for them while they are offline nor keeps their session: persistent sessions would not work.
    """
    from amqtt.plugins.base import BaseAuthPlugin

    class OpenAuthPlugin(BaseAuthPlugin):
        async def authenticate(self, *, session: Any) -> bool:
            return True

    OpenAuthPlugin.__module__ = __name__
    OpenAuthPlugin.__qualname__ = "_AmqttOpenAuthPlugin"
    return OpenAuthPlugin


def __getattr__(name: str) -> Any:
    # amqtt loads plugins by dotted path; build this one lazily so importing this module never imports amqtt
    if name == "_AmqttOpenAuthPlugin":
        plugin = _build_open_auth_plugin()
        globals()[name] = plugin
        return plugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def amqtt_config(host: str, port: int) -> dict[str, Any]:
    """The amqtt 0.12 broker config: one TCP listener, open auth, no $SYS topics, no packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": _format_hostport(host, port), "max_connections": 0}},
        "timeout_disconnect_delay": 0,
        # an explicit plugin dict replaces amqtt's defaults (event/packet loggers, $SYS, anonymous auth)
        "plugins": {"edgefleet.control_plane.broker.embedded._AmqttOpenAuthPlugin": {}},
    }


_AMQTT_PATCHED_METHODS = (
    "_publish_session_retained_messages",
    "_publish_retained_messages_for_subscription",
    "_client_message_loop",
    "_get_handler",
)


def _amqtt_broker_class() -> type:
    """amqtt's Broker, with two MQTT 3.1.1 deviations of amqtt 0.12.1 fixed (private methods, hence the guard).

    1. Messages queued for an offline persistent session are delivered with RETAIN=1 (3.3.1.3 wants 0 for
       messages that match an established subscription).
    2. When any client connects, amqtt sends it the retained messages of *every* topic filter that *any*
       client subscribed to (at QoS 0), even if it subscribed to none of them: devices would see each
       other's retained state. Like mosquitto, we send retained messages only in answer to a SUBSCRIBE.
    """
    import asyncio
    import contextvars

    from amqtt.broker import Broker

    if not all(hasattr(Broker, name) for name in _AMQTT_PATCHED_METHODS):
        print("edgefleet-amqtt: unknown amqtt version, running it unpatched", file=sys.stderr, flush=True)
        return Broker

    connecting: contextvars.ContextVar[bool] = contextvars.ContextVar("edgefleet_amqtt_connecting", default=False)

    class EdgefleetAmqttBroker(Broker):  # type: ignore[misc]
        async def _publish_session_retained_messages(self, session: Any) -> None:
            handler = self._get_handler(session)
            tasks = []
            if handler:
                while not session.retained_messages.empty():
                    queued = await session.retained_messages.get()
                    tasks.append(
                        asyncio.ensure_future(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False))
                    )
            if tasks:
                await asyncio.wait(tasks)
            # amqtt calls this right after CONNACK, then replays retained messages (deviation 2) until the
            # client's message loop starts; the context variable is per connection task
            connecting.set(True)

        async def _publish_retained_messages_for_subscription(self, subscription: Any, session: Any) -> None:
            if connecting.get():
                return
            await super()._publish_retained_messages_for_subscription(subscription, session)

        async def _client_message_loop(self, client_session: Any, handler: Any) -> None:
            connecting.set(False)
            await super()._client_message_loop(client_session, handler)

    return EdgefleetAmqttBroker


def _run_amqtt(host: str, port: int) -> int:
    import asyncio
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(amqtt|transitions|passlib)(\.|$)")
    # make the plugin path resolve to this very module, not a second copy of it
    sys.modules.setdefault("edgefleet.control_plane.broker.embedded", sys.modules[__name__])
    broker_class = _amqtt_broker_class()

    async def serve() -> None:
        broker = broker_class(amqtt_config(host, port))
        await broker.start()
        print(f"{_AMQTT_READY_LINE} on {_format_hostport(host, port)}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await broker.shutdown()

    try:
        asyncio.run(serve())
    except Exception as exc:  # report any startup failure (e.g. address in use) in the log, exit non-zero
        print(f"edgefleet-amqtt: failed: {exc!r}", file=sys.stderr, flush=True)
        cause = exc.__cause__
        if cause is not None:
            print(f"edgefleet-amqtt: cause: {cause!r}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m control_plane.embedded_broker", description="Run the embedded MQTT broker."
    )
    parser.add_argument("--amqtt", action="store_true", help="run amqtt in this process (else: mosquitto)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.amqtt:
        return _run_amqtt(args.host, args.port)
    # mosquitto in the foreground, until Ctrl-C / SIGTERM
    handle = start_mosquitto(BrokerSettings(host=args.host, port=args.port))
    print(f"mosquitto on {handle.url}, data in {handle.data_dir}", file=sys.stderr, flush=True)
    stopped = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopped and handle.is_running():
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
