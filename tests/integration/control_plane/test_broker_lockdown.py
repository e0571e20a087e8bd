"""The broker lock-down against a real Mosquitto running the config ``broker_config`` generates.

Every claim is proved by what a client received or did not receive, never by a SUBACK or PUBACK:
Mosquitto 2.0 grants a denied subscription and acknowledges a denied publish without a word. A
"was not received" check is made safe by a barrier: after the forbidden message, an allowed one
from the same publisher to the same observer is sent; messages from one connection are routed in
order, so once the barrier has arrived the forbidden message would have arrived before it.

The isolation tests run twice: over the loopback plaintext listener with passwords (user name =
device id) and over the TLS listener with client certificates (identity = certificate CN).
"""

from __future__ import annotations

import os
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from edgefleet.control_plane.broker.config import (
    CONTROL_PLANE_USER,
    BrokerPaths,
    BrokerSpec,
    ClientAuth,
    IssuedCertificate,
    add_broker_client,
    issue_client_certificate,
    issue_server_certificate,
    load_or_create_ca,
    new_certificate_authority,
    write_broker_config,
)
from edgefleet.control_plane.broker.embedded import (
    BrokerSettings,
    MosquittoBroker,
    find_mosquitto,
    free_port,
    start_mosquitto,
)
from edgefleet.control_plane.cli.broker import app as broker_cli
from edgefleet.control_plane.client import EdgefleetClient
from edgefleet.control_plane.devtools.demo import direct_predict, v2_infer
from edgefleet.control_plane.devtools.demo_models import make_mlp_weights, write_demo_models
from edgefleet.control_plane.devtools.local_fleet import LocalFleet
from edgefleet.shared.files import atomic_write_bytes
from edgefleet.shared.link.paho import make_client
from edgefleet.shared.wire.topics import DEVICE_PUBLISHES, KEYRING_ROOT, Leaf, control_plane_subscriptions, device_topic

DEVICE_A = "dev-a"
DEVICE_B = "dev-b"
CONNECT_TIMEOUT_S = 5.0  # seconds for an accepted connection (TLS handshake included)
REFUSAL_TIMEOUT_S = 3.0  # seconds to wait for a refusal to show
DELIVERY_TIMEOUT_S = 5.0  # seconds for an expected message
GRACE_S = 0.2  # seconds after a barrier before concluding a message did not come


# --------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Credentials:
    """How one client connects in one transport."""

    port: int
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class Peer:
    """A paho client (built by :func:`shared.mqtt.make_client`) that records what it receives."""

    def __init__(self, creds: Credentials, client_id: str | None = None) -> None:
        self.client_id = client_id or f"peer-{uuid.uuid4().hex[:10]}"
        self.client = make_client(
            self.client_id,
            clean_session=True,
            username=creds.username,
            password=creds.password,
            tls_ca_file=creds.ca_file,
            tls_cert_file=creds.cert_file,
            tls_key_file=creds.key_file,
        )
        self.port = creds.port
        self.received: list[tuple[str, bytes]] = []
        self.outcomes: list[str] = []  # "accepted", or why not
        self.disconnects = 0
        self._changed = threading.Condition()
        self._suback: dict[int, threading.Event] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # paho's thread
    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        with self._changed:
            self.outcomes.append("accepted" if not reason.is_failure else f"refused: {reason}")  # type: ignore[attr-defined]
            self._changed.notify_all()

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        with self._changed:
            self.disconnects += 1
            if not self.outcomes:
                self.outcomes.append(f"dropped: {reason}")
            self._changed.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.received.append((msg.topic, bytes(msg.payload)))
            self._changed.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, _r: object, _p: object) -> None:
        self._suback.setdefault(mid, threading.Event()).set()

    # the test's thread
    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
        """Connect once; return "accepted" or why not (the refusal, a dropped or failed handshake)."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            return f"failed: {exc!r}"
        self.client.loop_start()
        with self._changed:
            self._changed.wait_for(lambda: self.outcomes, timeout_s)
            return self.outcomes[0] if self.outcomes else "no answer"

    def subscribe(self, *topics: str) -> None:
        """Subscribe, one SUBSCRIBE per topic in this order, and wait until the broker has processed them.

        The SUBACK only says the broker got there, not what it granted (it grants denied ones too).
        """
        for topic in topics:
            result, mid = self.client.subscribe(topic, qos=1)
            assert result == mqtt.MQTT_ERR_SUCCESS
            assert self._suback.setdefault(mid, threading.Event()).wait(DELIVERY_TIMEOUT_S), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(DELIVERY_TIMEOUT_S)

    def wait_for(self, payload: bytes, timeout_s: float = DELIVERY_TIMEOUT_S) -> bool:
        """Whether a message with ``payload`` arrived (on any topic) within ``timeout_s``."""
        with self._changed:
            return self._changed.wait_for(lambda: payload in self.payloads(), timeout_s)

    def payloads(self) -> set[bytes]:
        return {payload for _, payload in self.received}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _nonce() -> str:
    return uuid.uuid4().hex[:12]


def _connected(creds: Credentials, client_id: str | None = None) -> Peer:
    peer = Peer(creds, client_id)
    outcome = peer.connect()
    assert outcome == "accepted", f"{creds.username or creds.cert_file} could not connect: {outcome}"
    return peer


def _outcome(creds: Credentials) -> str:
    """One connection attempt, driven by hand (no background reconnects): "accepted" or why not."""
    peer = Peer(creds)
    client = peer.client
    try:
        client.connect("127.0.0.1", creds.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        return f"failed: {exc!r}"
    try:
        deadline = time.monotonic() + REFUSAL_TIMEOUT_S
        while not peer.outcomes and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS and not peer.outcomes:
                peer.outcomes.append("dropped")  # the broker closed the connection (a TLS alert, say)
        return peer.outcomes[0] if peer.outcomes else "no answer"
    finally:
        client.disconnect()
        client.loop(timeout=0.01)
        sock = client.socket()
        if sock is not None:
            sock.close()


def _broker_spec(workdir: Path, client_auth: ClientAuth, **overrides: object) -> BrokerSpec:
    (workdir / "db").mkdir(parents=True, exist_ok=True)
    return BrokerSpec(
        client_auth=client_auth,
        tls_port=free_port(),
        local_port=free_port(),
        persistence_dir=str(workdir / "db"),
        autosave_interval_s=1,
        # mosquitto started as root switches to user "mosquitto", who cannot read our 0600 files
        run_as_user="root" if hasattr(os, "geteuid") and os.geteuid() == 0 else None,
        **overrides,  # type: ignore[arg-type]
    )


def _start(paths: BrokerPaths, spec: BrokerSpec, data_dir: Path) -> MosquittoBroker:
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("these tests need the mosquitto binary: apt-get install mosquitto", pytrace=False)
    assert spec.local_port is not None
    settings = BrokerSettings(port=spec.local_port, data_dir=data_dir, config_file=paths.config)
    return start_mosquitto(settings, binary=binary)


# --------------------------------------------------------------------------------------------- the broker


@dataclass
class Locked:
    """A broker in certificate mode, with a loopback password listener, and every identity's credentials."""

    broker: MosquittoBroker
    spec: BrokerSpec
    paths: BrokerPaths
    passwords: dict[str, str]
    workdir: Path

    def password_creds(self, identity: str, password: str | None = None) -> Credentials:
        assert self.spec.local_port is not None
        return Credentials(port=self.spec.local_port, username=identity, password=password or self.passwords[identity])

    def cert_creds(self, identity: str, username: str | None = None) -> Credentials:
        folder = self.paths.client_dir(identity)
        return Credentials(
            port=self.spec.tls_port,
            username=username,
            ca_file=str(self.paths.ca_cert),
            cert_file=str(folder / "client.crt"),
            key_file=str(folder / "client.key"),
        )

    def creds(self, transport: str, identity: str) -> Credentials:
        return self.password_creds(identity) if transport == "password" else self.cert_creds(identity)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    workdir = tmp_path_factory.mktemp("lockdown")
    ca = load_or_create_ca(workdir / "control-plane" / "pki")
    # certificate mode on TLS; passwords too, for the loopback listener, so both identities are tested
    spec = _broker_spec(workdir, ClientAuth.CERTIFICATE, device_passwords=True)
    result = write_broker_config(workdir / "broker", ca, spec, [DEVICE_A, DEVICE_B])
    broker = _start(result.paths, spec, workdir / "broker-run")
    try:
        yield Locked(broker, spec, result.paths, result.new_passwords, workdir)
    finally:
        broker.stop()


@pytest.fixture(params=["password", "certificate"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------------------------- reading


def test_device_reads_its_own_desired_state_and_chunks_and_nothing_of_another_device(
    locked: Locked, transport: str
) -> None:
    n = _nonce()
    cp = _connected(locked.creds(transport, CONTROL_PLANE_USER))
    a = _connected(locked.creds(transport, DEVICE_A))
    b = _connected(locked.creds(transport, DEVICE_B))
    try:
        # retained before anyone subscribes: the retained copy must be filtered too
        cp.publish(device_topic(DEVICE_B, Leaf.DESIRED), f"b-retained-{n}".encode(), retain=True)
        cp.publish(device_topic(DEVICE_A, Leaf.DESIRED), f"a-retained-{n}".encode(), retain=True)
        b.subscribe(device_topic(DEVICE_B, Leaf.DESIRED), device_topic(DEVICE_B, Leaf.CHUNK_DATA))
        # A asks for B's topics outright and through wildcards, then for its own (the barrier)
        a.subscribe(
            device_topic(DEVICE_B, Leaf.DESIRED),
            device_topic(DEVICE_B, Leaf.CHUNK_DATA),
            "edgefleet/v1/devices/+/desired",
            "edgefleet/v1/devices/#",
            "#",
            device_topic(DEVICE_A, Leaf.DESIRED),
        )
        assert a.wait_for(f"a-retained-{n}".encode()), "A did not get its own retained desired state"
        assert b.wait_for(f"b-retained-{n}".encode()), "B did not get its own retained desired state"

        cp.publish(device_topic(DEVICE_B, Leaf.DESIRED), f"b-live-{n}".encode())
        cp.publish(device_topic(DEVICE_B, Leaf.CHUNK_DATA), f"b-chunk-{n}".encode())
        cp.publish(device_topic(DEVICE_A, Leaf.CHUNK_DATA), f"a-chunk-{n}".encode())  # barrier for A
        assert b.wait_for(f"b-live-{n}".encode()) and b.wait_for(f"b-chunk-{n}".encode())
        assert a.wait_for(f"a-chunk-{n}".encode()), "A did not get its own chunk"
        time.sleep(GRACE_S)

        forbidden = {f"b-retained-{n}".encode(), f"b-live-{n}".encode(), f"b-chunk-{n}".encode()}
        assert not forbidden & a.payloads(), f"A read B's messages: {forbidden & a.payloads()}"
        own = {device_topic(DEVICE_A, Leaf.DESIRED), device_topic(DEVICE_A, Leaf.CHUNK_DATA)}
        outside = {t for t, _ in a.received if t not in own and not t.startswith(KEYRING_ROOT + "/")}
        assert not outside, f"A received messages outside its own read topics: {outside}"
    finally:
        for peer in (a, b, cp):
            peer.close()


def test_certificate_identity_wins_over_the_user_name_a_client_claims(locked: Locked) -> None:
    n = _nonce()
    cp = _connected(locked.cert_creds(CONTROL_PLANE_USER))
    # A's certificate, claiming to be B (user name and client id): it is still A
    a_as_b = _connected(locked.cert_creds(DEVICE_A, username=DEVICE_B), client_id=DEVICE_B)
    try:
        a_as_b.subscribe(device_topic(DEVICE_B, Leaf.DESIRED), device_topic(DEVICE_A, Leaf.DESIRED))
        cp.publish(device_topic(DEVICE_B, Leaf.DESIRED), f"for-b-{n}".encode())
        cp.publish(device_topic(DEVICE_A, Leaf.DESIRED), f"for-a-{n}".encode())
        assert a_as_b.wait_for(f"for-a-{n}".encode()), "the certificate's own identity got nothing"
        time.sleep(GRACE_S)
        assert f"for-b-{n}".encode() not in a_as_b.payloads()
    finally:
        a_as_b.close()
        cp.close()


# --------------------------------------------------------------------------------------------- writing


def test_device_cannot_publish_as_another_device_or_as_the_control_plane(locked: Locked, transport: str) -> None:
    n = _nonce()
    cp = _connected(locked.creds(transport, CONTROL_PLANE_USER))
    a = _connected(locked.creds(transport, DEVICE_A))
    b = _connected(locked.creds(transport, DEVICE_B))
    try:
        cp.subscribe("edgefleet/#")
        b.subscribe(device_topic(DEVICE_B, Leaf.DESIRED), device_topic(DEVICE_B, Leaf.CHUNK_DATA), f"{KEYRING_ROOT}/+")
        forbidden = [device_topic(DEVICE_B, leaf) for leaf in Leaf]  # all of B's topics, both directions
        forbidden += [device_topic(DEVICE_A, Leaf.DESIRED), device_topic(DEVICE_A, Leaf.CHUNK_DATA)]  # as the CP
        forbidden += [f"{KEYRING_ROOT}/999999", "edgefleet/v1/devices/dev-a", "edgefleet/v1/other"]
        for topic in forbidden:
            a.publish(topic, f"forged-{n}:{topic}".encode(), retain=topic.endswith(("desired", "status")))
        barrier = f"a-reported-{n}".encode()
        a.publish(device_topic(DEVICE_A, Leaf.REPORTED), barrier)
        assert cp.wait_for(barrier), "the control plane did not get A's own reported state"
        time.sleep(GRACE_S)
        forged = {p for p in cp.payloads() | b.payloads() if p.startswith(f"forged-{n}".encode())}
        assert not forged, f"forged messages were delivered: {sorted(forged)}"
        # and nothing forged was kept as a retained message either (one connection per identity: close cp first)
        cp.close()
        late = _connected(locked.creds(transport, CONTROL_PLANE_USER))
        try:
            late.subscribe("edgefleet/#")
            late.subscribe(device_topic(DEVICE_A, Leaf.REPORTED))  # processed after the retained replay above
            time.sleep(GRACE_S)
            assert not {p for p in late.payloads() if p.startswith(f"forged-{n}".encode())}
        finally:
            late.close()
    finally:
        for peer in (a, b, cp):
            peer.close()


def test_device_and_control_plane_can_do_their_jobs(locked: Locked, transport: str) -> None:
    n = _nonce()
    cp = _connected(locked.creds(transport, CONTROL_PLANE_USER))
    a = _connected(locked.creds(transport, DEVICE_A))
    b = _connected(locked.creds(transport, DEVICE_B))
    try:
        # the control plane's real subscriptions, as a shared subscription like replicas use
        cp.subscribe(*control_plane_subscriptions("replicas"))
        a.subscribe(device_topic(DEVICE_A, Leaf.DESIRED), device_topic(DEVICE_A, Leaf.CHUNK_DATA), f"{KEYRING_ROOT}/+")
        for device, peer in ((DEVICE_A, a), (DEVICE_B, b)):
            for leaf in DEVICE_PUBLISHES:
                peer.publish(device_topic(device, leaf), f"{device}-{leaf}-{n}".encode())
        for device in (DEVICE_A, DEVICE_B):
            for leaf in DEVICE_PUBLISHES:
                assert cp.wait_for(f"{device}-{leaf}-{n}".encode()), f"control plane missed {device} {leaf}"
        cp.publish(device_topic(DEVICE_A, Leaf.DESIRED), f"desired-{n}".encode())
        cp.publish(device_topic(DEVICE_A, Leaf.CHUNK_DATA), f"chunk-{n}".encode())
        cp.publish(f"{KEYRING_ROOT}/1", f"keyring-{n}".encode())
        for payload in (f"desired-{n}", f"chunk-{n}", f"keyring-{n}"):
            assert a.wait_for(payload.encode()), f"A missed {payload}"
    finally:
        for peer in (a, b, cp):
            peer.close()


def test_device_cannot_take_over_the_control_plane_session(locked: Locked, transport: str) -> None:
    n = _nonce()
    cp = _connected(locked.creds(transport, CONTROL_PLANE_USER), client_id=CONTROL_PLANE_USER)
    try:
        cp.subscribe(*control_plane_subscriptions())
        # same client id as the control plane: the broker names the session after the user instead
        intruder = _connected(locked.creds(transport, DEVICE_A), client_id=CONTROL_PLANE_USER)
        try:
            intruder.publish(device_topic(DEVICE_A, Leaf.EVENTS), f"after-{n}".encode())
            assert cp.wait_for(f"after-{n}".encode()), "the control plane lost its connection or session"
            assert cp.disconnects == 0
            assert f"after-{n}".encode() not in intruder.payloads()
        finally:
            intruder.close()
    finally:
        cp.close()


# --------------------------------------------------------------------------------------------- connecting


def test_clients_without_valid_credentials_cannot_connect(locked: Locked) -> None:
    assert locked.spec.local_port is not None
    good = _outcome(locked.password_creds(DEVICE_A))
    assert good == "accepted", good  # the same path works with the right password
    refused = {
        "anonymous": Credentials(port=locked.spec.local_port),
        "wrong password": locked.password_creds(DEVICE_A, password="not-the-password"),
        "B's password for A": locked.password_creds(DEVICE_A, password=locked.passwords[DEVICE_B]),
        "unknown user": Credentials(port=locked.spec.local_port, username="dev-z", password="x"),
        "anonymous TLS": Credentials(port=locked.spec.tls_port, ca_file=str(locked.paths.ca_cert)),
        "TLS with a password only": Credentials(
            port=locked.spec.tls_port,
            ca_file=str(locked.paths.ca_cert),
            username=DEVICE_A,
            password=locked.passwords[DEVICE_A],
        ),
    }
    outcomes = {name: _outcome(creds) for name, creds in refused.items()}
    assert all(o != "accepted" for o in outcomes.values()), outcomes


def test_tls_listener_refuses_certificates_it_did_not_issue_for_client_use(locked: Locked, tmp_path: Path) -> None:
    assert _outcome(locked.cert_creds(DEVICE_A)) == "accepted"
    now = datetime.now(UTC)
    our_ca = load_or_create_ca(locked.workdir / "control-plane" / "pki")
    other_ca = new_certificate_authority(now=now, common_name="edgefleet broker CA")  # same name, other key
    candidates: dict[str, IssuedCertificate] = {
        "device cert from another CA": issue_client_certificate(other_ca, DEVICE_A, now=now),
        "expired device cert": issue_client_certificate(our_ca, DEVICE_A, now=now - timedelta(days=30), valid_days=1),
        "server cert used as a client cert": issue_server_certificate(
            our_ca, hostnames=[DEVICE_A], ip_addresses=[], now=now
        ),
    }
    outcomes = {}
    for name, issued in candidates.items():
        folder = tmp_path / name.replace(" ", "-")
        atomic_write_bytes(folder / "client.crt", issued.cert_pem())
        atomic_write_bytes(folder / "client.key", issued.key_pem(), mode=0o600)
        creds = Credentials(
            port=locked.spec.tls_port,
            ca_file=str(locked.paths.ca_cert),
            cert_file=str(folder / "client.crt"),
            key_file=str(folder / "client.key"),
        )
        outcomes[name] = _outcome(creds)
    assert all(o != "accepted" for o in outcomes.values()), outcomes


def test_password_mode_takes_tls_without_a_client_certificate_and_removal_revokes(tmp_path: Path) -> None:
    ca = load_or_create_ca(tmp_path / "pki")
    spec = _broker_spec(tmp_path, ClientAuth.PASSWORD)
    result = write_broker_config(tmp_path / "broker", ca, spec, [DEVICE_A, DEVICE_B])
    assert not (result.paths.client_dir(DEVICE_A) / "client.crt").exists()
    with _start(result.paths, spec, tmp_path / "run") as broker:
        base = Credentials(port=spec.tls_port, ca_file=str(result.paths.ca_cert), username=DEVICE_A)
        good = replace(base, password=result.new_passwords[DEVICE_A])
        assert _outcome(good) == "accepted"
        assert _outcome(replace(base, password="wrong")) != "accepted"
        assert _outcome(replace(base, username=None)) != "accepted"
        held = _connected(good)
        # the operator drops A (rerun without it) and reloads: A's password no longer opens the door,
        # and mosquitto disconnects A's open connection too
        rerun = write_broker_config(tmp_path / "broker", ca, spec, [DEVICE_B])
        assert rerun.removed == (DEVICE_A,)
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGHUP)
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while _outcome(good) == "accepted":
            assert time.monotonic() < deadline, "A still connects after it was removed and mosquitto reloaded"
            time.sleep(0.05)
        try:
            deadline = time.monotonic() + DELIVERY_TIMEOUT_S
            while held.disconnects == 0:
                assert time.monotonic() < deadline, "A's open connection survived its removal"
                time.sleep(0.05)
        finally:
            held.close()
        b = replace(base, username=DEVICE_B, password=result.new_passwords[DEVICE_B])
        assert _outcome(b) == "accepted"  # the others keep their passwords


# --------------------------------------------------------------------------------------------- end to end


def test_control_plane_and_agent_deploy_and_serve_over_tls_with_passwords_and_client_certs(tmp_path: Path) -> None:
    """Real processes: the control plane and an enrolled agent, both over TLS with a client
    certificate and a password, deploy a model; the agent serves it."""
    device = "edge-tls"
    cp_data = tmp_path / "control-plane"  # LocalFleet's data dir: the CA lives in its pki/
    ca = load_or_create_ca(cp_data / "pki")
    spec = _broker_spec(tmp_path, ClientAuth.CERTIFICATE_AND_PASSWORD)
    out = tmp_path / "broker"
    result = write_broker_config(out, ca, spec, [])  # no devices yet: only the control plane
    add_broker_client(out, ca, device, password=False, certificate=True)  # its cert now, its password at enrollment
    paths = result.paths
    cp_dir = paths.client_dir(CONTROL_PLANE_USER)
    fleet = LocalFleet(
        tmp_path,
        broker_host="127.0.0.1",
        broker_port=spec.tls_port,
        broker_username=CONTROL_PLANE_USER,
        broker_password=result.new_passwords[CONTROL_PLANE_USER],
        broker_tls_ca_file=str(cp_dir / "ca.crt"),
        broker_tls_cert_file=str(cp_dir / "client.crt"),
        broker_tls_key_file=str(cp_dir / "client.key"),
        agent_brokers={
            device: {
                "tls_ca_file": str(paths.client_dir(device) / "ca.crt"),
                "tls_cert_file": str(paths.client_dir(device) / "client.crt"),
                "tls_key_file": str(paths.client_dir(device) / "client.key"),
                "reconnect_min_s": 1.0,
                "reconnect_max_s": 1.0,
            }
        },
    )
    broker = _start(paths, spec, tmp_path / "run")
    client: EdgefleetClient | None = None
    try:
        client = fleet.start_control_plane()
        assert httpx.get(f"{fleet.api_url}/healthz").json()["broker_connected"] is True
        fleet.start_agent(device)  # enrolls (the control plane issues its password), then connects: refused
        # the operator admits enrolled devices: passwd from the control plane's database, then SIGHUP
        cli = CliRunner().invoke(
            broker_cli,
            [
                "config",
                "--out", str(out),
                "--data-dir", str(cp_data),
                "--from-api", "--api-url", fleet.api_url,
                "--from-db",
                "--client-auth", "certificate+password",
                "--tls-port", str(spec.tls_port),
                "--local-port", str(spec.local_port),
                "--persistence-dir", spec.persistence_dir,
                *(["--run-as-user", spec.run_as_user] if spec.run_as_user else []),
            ],
            env={"EDGEFLEET_TOKEN": fleet.api_token},
        )  # fmt: skip
        assert cli.exit_code == 0, cli.output
        assert "kept client certificates" in cli.output and device in cli.output
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGHUP)
        fleet.wait_for_devices(client, [device], timeout_s=20)

        models = write_demo_models(tmp_path / "models", seed=5)
        client.push_model(models["onnx"], name="locked-mlp", version="1.0.0")
        ids = [d["id"] for d in client.deploy("locked-mlp", "1.0.0", devices=[device])]
        (outcome,) = client.wait_for_deployments(ids, timeout_s=60)
        assert outcome["status"] == "succeeded", outcome
        x = np.random.default_rng(5).standard_normal((3, make_mlp_weights().n_inputs)).astype(np.float32)
        with httpx.Client(timeout=10) as http:
            got = v2_infer(http, fleet.agents[device].api_url, "locked-mlp", x)
        np.testing.assert_allclose(got, direct_predict("onnx", models["onnx"], x), rtol=0, atol=1e-6)
    finally:
        fleet.stop()
        broker.stop()
        if client is not None:
            client.close()
