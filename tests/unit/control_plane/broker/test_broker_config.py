"""The pure generators of ``control_plane.broker_config``: password hashes, ACL, mosquitto.conf, PKI,
and the writer's rerun rules. A real Mosquitto runs these files in
tests/integration/control_plane/test_broker_lockdown.py."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlmodel import Session
from typer.testing import CliRunner

from edgefleet.agent.config import AgentConfig, render_config
from edgefleet.control_plane.broker.config import (
    CONTROL_PLANE_USER,
    BrokerPaths,
    BrokerSpec,
    ClientAuth,
    acl_text,
    add_broker_client,
    certificate_identity,
    hash_password,
    is_usable_client_certificate,
    issue_client_certificate,
    issue_server_certificate,
    load_or_create_ca,
    mosquitto_conf_text,
    mosquitto_password_hash,
    new_certificate_authority,
    parse_password_file,
    password_file_text,
    verify_password,
    verify_password_hash_format,
    write_broker_config,
)
from edgefleet.control_plane.cli.broker import app as broker_cli
from edgefleet.control_plane.settings import ServerSettings
from edgefleet.shared.errors import ConfigError
from edgefleet.shared.link.paho import make_client
from edgefleet.shared.wire.topics import DEVICE_PUBLISHES, DEVICE_SUBSCRIBES, KEYRING_ROOT, Leaf

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

# Computed with the real `mosquitto_passwd` 2.0.11: `mosquitto_passwd -b -c pw alice secret` and
# `mosquitto_passwd -H sha512-pbkdf2 -I 1000 -b pw bob x`; salts copied from its output.
VECTORS = [
    (
        "secret",
        "GTYUk466st0Lxtad",
        101,
        "$7$101$GTYUk466st0Lxtad$B0otm27H69BRfsMEqFkMngj6AqWkP0BifaWUYl+EC4RRcGq1aYJjxg3afmP8OCeVb9wfLZOTg+aTNSgu/aRQ9g==",
    ),
    (
        "x",
        "0QCytXROo8vf6TS+",
        1000,
        "$7$1000$0QCytXROo8vf6TS+$Mc4jYt9nydVt1/kP6k1IHul77tedy8OWVBHxO/iuATlYP0sHHES4yupAi418Hu9oyWAVcHw8smLFKgoAswnHLg==",
    ),
]


# --------------------------------------------------------------------------------------------- passwords


@pytest.mark.parametrize(("password", "salt_b64", "iterations", "expected"), VECTORS)
def test_hash_matches_mosquitto_passwd_vectors(password: str, salt_b64: str, iterations: int, expected: str) -> None:
    assert hash_password(password, salt=base64.b64decode(salt_b64), iterations=iterations) == expected
    assert verify_password(password, expected)
    assert not verify_password(password + "!", expected)


def test_hash_agrees_with_the_installed_mosquitto_passwd(tmp_path: Path) -> None:
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        pytest.fail("mosquitto_passwd (part of mosquitto) is needed: apt-get install mosquitto", pytrace=False)
    path = tmp_path / "pw"
    subprocess.run([binary, "-b", "-c", str(path), "pi-01", "s3cret:with$odd chars"], check=True)
    (user, encoded) = parse_password_file(path.read_text()).popitem()
    assert user == "pi-01"
    assert verify_password("s3cret:with$odd chars", encoded)
    _, _, iterations, salt, _ = encoded.split("$")
    assert hash_password("s3cret:with$odd chars", salt=base64.b64decode(salt), iterations=int(iterations)) == encoded


def test_generated_hashes_are_salted_and_well_formed() -> None:
    first, second = hash_password("same"), mosquitto_password_hash("same")
    assert first != second  # fresh salt each time
    for encoded in (first, second):
        assert verify_password_hash_format(encoded) and verify_password("same", encoded)
        assert encoded.startswith("$7$101$")
    for bad in ("", "$6$abc$def", "$7$x$AAAA$AAAA", "$7$101$!!$AAAA", "$7$101$AAAA$AAAA", "plain"):
        assert not verify_password_hash_format(bad) and not verify_password("same", bad)
    with pytest.raises(ConfigError):
        hash_password("x", iterations=0)


def test_password_file_round_trip_and_rejections() -> None:
    entries = {"pi-02": hash_password("b"), "pi-01": hash_password("a")}
    text = password_file_text(entries)
    assert text.splitlines()[0].startswith("pi-01:$7$")  # sorted
    assert parse_password_file(text + "\n# comment\n") == entries
    with pytest.raises(ConfigError):
        password_file_text({"bad:user": hash_password("a")})
    with pytest.raises(ConfigError):
        password_file_text({"pi-01": "plaintext"})
    with pytest.raises(ConfigError):
        parse_password_file("pi-01:$7$a\npi-01:$7$b\n")
    with pytest.raises(ConfigError):
        parse_password_file("no-colon-here\n")


# --------------------------------------------------------------------------------------------- ACL


def test_acl_grants_devices_exactly_their_own_topics_and_the_control_plane_all() -> None:
    lines = [line for line in acl_text(("cp-1", "cp-2")).splitlines() if line and not line.startswith("#")]
    patterns = [line for line in lines if line.startswith("pattern ")]
    assert sorted(patterns) == sorted(
        [f"pattern read edgefleet/v1/devices/%u/{leaf}" for leaf in DEVICE_SUBSCRIBES]
        + [f"pattern write edgefleet/v1/devices/%u/{leaf}" for leaf in DEVICE_PUBLISHES]
        + [f"pattern read {KEYRING_ROOT}/+"]
    )
    # every leaf exactly once, in exactly one direction; nothing readwrite for devices
    per_device = [p for p in patterns if "%u" in p]
    assert sorted(p.rsplit("%u/", 1)[1] for p in per_device) == sorted(str(leaf) for leaf in Leaf)
    assert {p.split()[1] for p in per_device} == {"read", "write"}
    assert "pattern read edgefleet/v1/devices/%u/desired" in patterns
    assert not any(p.startswith("pattern write") and p.endswith(("desired", "chunks/data")) for p in patterns)
    # no topic line before the first user line (those would apply to anonymous clients)
    first_user = next(i for i, line in enumerate(lines) if line.startswith("user "))
    assert not any(line.startswith("topic ") for line in lines[:first_user])
    assert lines[first_user:] == [
        "user cp-1",
        "topic readwrite edgefleet/v1/devices/#",
        f"topic readwrite {KEYRING_ROOT}/#",
        "user cp-2",
        "topic readwrite edgefleet/v1/devices/#",
        f"topic readwrite {KEYRING_ROOT}/#",
    ]


def test_acl_refuses_bad_control_plane_users() -> None:
    for users in ((), ("a/b",), ("cp", "cp"), ("+",)):
        with pytest.raises(ConfigError):
            acl_text(users)


# --------------------------------------------------------------------------------------------- mosquitto.conf


def _listener_blocks(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """(global lines, {listener line: its lines}) of a mosquitto.conf, comments dropped."""
    head: list[str] = []
    blocks: dict[str, list[str]] = {}
    current = head
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("listener "):
            current = blocks.setdefault(line, [])
        else:
            current.append(line)
    return head, blocks


def test_config_text_for_certificate_and_password_mode(tmp_path: Path) -> None:
    spec = BrokerSpec(tls_port=8883, local_port=1883, persistence_dir="/var/lib/mosquitto")
    head, blocks = _listener_blocks(mosquitto_conf_text(spec, BrokerPaths(tmp_path)))
    for line in (
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {tmp_path / 'passwd'}",
        f"acl_file {tmp_path / 'acl'}",
        "set_tcp_nodelay true",
        "max_queued_messages 100000",
        "max_queued_bytes 0",
        "max_inflight_messages 20",
        f"max_packet_size {2 * 1024 * 1024}",
        "persistence true",
        "persistence_location /var/lib/mosquitto/",
        "autosave_interval 5",
    ):
        assert line in head, line
    assert not any(line.startswith("user ") for line in head)
    assert blocks["listener 8883"] == [
        f"cafile {tmp_path / 'ca.crt'}",
        f"certfile {tmp_path / 'server.crt'}",
        f"keyfile {tmp_path / 'server.key'}",
        "tls_version tlsv1.2",
        "use_username_as_clientid true",
        "require_certificate true",
    ]
    assert blocks["listener 1883 127.0.0.1"] == ["use_username_as_clientid true"]


def test_config_text_per_mode_and_without_local_listener(tmp_path: Path) -> None:
    cert = _listener_blocks(mosquitto_conf_text(BrokerSpec(client_auth="certificate"), BrokerPaths(tmp_path)))[1]
    assert {"require_certificate true", "use_identity_as_username true"} <= set(cert["listener 8883"])
    password = _listener_blocks(
        mosquitto_conf_text(BrokerSpec(client_auth="password", local_port=None), BrokerPaths(tmp_path))
    )[1]
    assert list(password) == ["listener 8883"]
    assert not {"require_certificate true", "use_identity_as_username true"} & set(password["listener 8883"])
    bound = mosquitto_conf_text(BrokerSpec(tls_bind="10.0.0.5", run_as_user="mosquitto"), BrokerPaths(tmp_path))
    assert "listener 8883 10.0.0.5" in bound.splitlines() and "user mosquitto" in bound.splitlines()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"local_bind": "0.0.0.0"},
        {"local_bind": "10.0.0.5"},
        {"local_port": 8883},
        {"tls_port": 0},
        {"max_queued_messages": 0},
        {"max_queued_messages": 999},
        {"max_inflight_messages": 0},
        {"max_packet_size_bytes": 1000},
        {"control_plane_users": ()},
        {"server_hostnames": (), "server_ips": ()},
        {"server_ips": ("not-an-ip",)},
        {"server_hostnames": ("a b",)},
        {"persistence_dir": "/tmp/x\nallow_anonymous true"},
        {"client_auth": "certificate", "device_certificates": False},
        {"client_auth": "password", "device_passwords": False},
        {"client_auth": "nope"},
    ],
)
def test_spec_refuses_settings_that_would_open_or_break_the_broker(kwargs: dict[str, object]) -> None:
    with pytest.raises((ConfigError, ValueError)):
        BrokerSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_defaults_and_json_round_trip() -> None:
    spec = BrokerSpec(client_auth="certificate", server_hostnames=("broker.example",), server_ips=())
    assert spec.client_auth is ClientAuth.CERTIFICATE
    assert (spec.device_passwords, spec.device_certificates) == (False, True)
    assert spec.public_host == "broker.example"
    assert BrokerSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ConfigError):
        BrokerSpec.from_json(spec.to_json().replace('"tls_port"', '"tls_prot"'))
    with pytest.raises(ConfigError):
        BrokerSpec.from_json('{"schema": "edgefleet.broker-spec/v2"}')


# --------------------------------------------------------------------------------------------- PKI


def test_ca_is_created_once_with_a_private_key(tmp_path: Path) -> None:
    ca = load_or_create_ca(tmp_path / "pki", now=NOW)
    key_path = tmp_path / "pki" / "ca" / "ca.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pki" / "ca").stat().st_mode) == 0o700
    again = load_or_create_ca(tmp_path / "pki")
    assert again.cert == ca.cert and again.key_pem() == ca.key_pem()
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert [p.name for p in (tmp_path / "pki").iterdir()] == ["ca"]  # no staging leftovers


def test_concurrent_first_use_yields_one_ca(tmp_path: Path) -> None:
    results: list[bytes] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        barrier.wait()
        results.append(load_or_create_ca(tmp_path / "pki").cert_pem())

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert results[0] == (tmp_path / "pki" / "ca" / "ca.crt").read_bytes()


def test_corrupt_or_mismatched_ca_is_refused(tmp_path: Path) -> None:
    load_or_create_ca(tmp_path / "pki")
    other = new_certificate_authority(now=NOW)
    (tmp_path / "pki" / "ca" / "ca.crt").write_bytes(other.cert_pem())
    with pytest.raises(ConfigError, match="does not match"):
        load_or_create_ca(tmp_path / "pki")
    (tmp_path / "pki" / "ca" / "ca.key").write_bytes(b"garbage")
    with pytest.raises(ConfigError):
        load_or_create_ca(tmp_path / "pki")


def test_server_and_client_certificates() -> None:
    ca = new_certificate_authority(now=NOW)
    server = issue_server_certificate(ca, hostnames=["broker.example"], ip_addresses=["127.0.0.1", "::1"], now=NOW)
    server.cert.verify_directly_issued_by(ca.cert)
    san = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert list(server.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]

    client = issue_client_certificate(ca, "pi-01", now=NOW)
    client.cert.verify_directly_issued_by(ca.cert)
    assert certificate_identity(client.cert) == "pi-01"
    assert client.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-01"
    assert list(client.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert not client.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert is_usable_client_certificate(client.cert, ca, "pi-01", NOW)
    assert not is_usable_client_certificate(client.cert, ca, "pi-02", NOW)
    assert not is_usable_client_certificate(client.cert, new_certificate_authority(now=NOW), "pi-01", NOW)
    assert not is_usable_client_certificate(client.cert, ca, "pi-01", NOW + timedelta(days=5 * 365 - 10))
    with pytest.raises(ConfigError):
        issue_client_certificate(ca, "pi/01", now=NOW)


# --------------------------------------------------------------------------------------------- writer


def _spec(**kwargs: object) -> BrokerSpec:
    return BrokerSpec(persistence_dir="/tmp/unused", **kwargs)  # type: ignore[arg-type]


def test_writer_produces_every_file_with_private_modes(tmp_path: Path) -> None:
    ca = new_certificate_authority(now=NOW)
    result = write_broker_config(tmp_path / "out", ca, _spec(), ["pi-01", "pi-02"], now=NOW)
    paths = result.paths
    assert set(result.new_passwords) == {CONTROL_PLANE_USER, "pi-01", "pi-02"}
    entries = parse_password_file(paths.password_file.read_text())
    assert set(entries) == {CONTROL_PLANE_USER, "pi-01", "pi-02"}
    for user, password in result.new_passwords.items():
        assert verify_password(password, entries[user])
        assert (paths.client_dir(user) / "password").read_text().strip() == password
    assert paths.acl_file.read_text() == acl_text()
    assert paths.config.read_text() == mosquitto_conf_text(_spec(), paths)
    for secret in (
        paths.server_key,
        paths.client_dir("pi-01") / "client.key",
        paths.client_dir("pi-01") / "broker.toml",
        paths.client_dir(CONTROL_PLANE_USER) / "control-plane.env",
    ):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(paths.client_dir("pi-01").stat().st_mode) == 0o700
    snippet = (paths.client_dir("pi-01") / "broker.toml").read_text()
    assert f'password = "{result.new_passwords["pi-01"]}"' in snippet
    assert 'tls_cert_file = "/etc/edgefleet-agent/broker/client.crt"' in snippet
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca.cert)


def test_rerun_keeps_credentials_drops_unlisted_and_rotates_on_request(tmp_path: Path) -> None:
    ca = new_certificate_authority(now=NOW)
    out = tmp_path / "out"
    first = write_broker_config(out, ca, _spec(), ["pi-01", "pi-02"], now=NOW)
    cert_before = (first.paths.client_dir("pi-01") / "client.crt").read_bytes()
    second = write_broker_config(out, ca, _spec(), ["pi-01", "pi-03"], now=NOW)
    assert second.kept_passwords == (CONTROL_PLANE_USER, "pi-01")
    assert set(second.new_passwords) == {"pi-03"}
    assert second.removed == ("pi-02",)
    assert "pi-01" in second.kept_certificates and (first.paths.client_dir("pi-01") / "client.crt").read_bytes() == (
        cert_before
    )
    entries = parse_password_file(second.paths.password_file.read_text())
    assert set(entries) == {CONTROL_PLANE_USER, "pi-01", "pi-03"}
    assert verify_password(first.new_passwords["pi-01"], entries["pi-01"])

    rotated = write_broker_config(out, ca, _spec(), ["pi-01"], rotate_passwords=True, now=NOW)
    entries = parse_password_file(rotated.paths.password_file.read_text())
    assert not verify_password(first.new_passwords["pi-01"], entries["pi-01"])
    assert verify_password(rotated.new_passwords["pi-01"], entries["pi-01"])

    # a new CA: kept certificates no longer verify, so they are issued again
    renewed = write_broker_config(out, new_certificate_authority(now=NOW), _spec(), ["pi-01"], now=NOW)
    assert "pi-01" in renewed.issued_certificates


def test_known_hashes_from_enrollment_win(tmp_path: Path) -> None:
    ca = new_certificate_authority(now=NOW)
    enrolled = hash_password("from-enrollment")
    result = write_broker_config(
        tmp_path / "out", ca, _spec(), ["pi-01"], known_hashes={"pi-01": enrolled}, rotate_passwords=True, now=NOW
    )
    assert parse_password_file(result.paths.password_file.read_text())["pi-01"] == enrolled
    assert "pi-01" not in result.new_passwords
    with pytest.raises(ConfigError):
        write_broker_config(tmp_path / "bad", ca, _spec(), ["pi-01"], known_hashes={"pi-01": "plain"}, now=NOW)


def test_certificate_mode_gives_devices_certificates_only(tmp_path: Path) -> None:
    ca = new_certificate_authority(now=NOW)
    result = write_broker_config(tmp_path / "out", ca, _spec(client_auth="certificate"), ["pi-01"], now=NOW)
    assert set(result.new_passwords) == {CONTROL_PLANE_USER}  # for the loopback listener
    folder = result.paths.client_dir("pi-01")
    assert (folder / "client.crt").exists() and not (folder / "password").exists()
    assert "password" not in (folder / "broker.toml").read_text()


def test_device_ids_are_checked_and_the_control_plane_user_is_reserved(tmp_path: Path) -> None:
    ca = new_certificate_authority(now=NOW)
    for bad in ([CONTROL_PLANE_USER], ["pi/01"], ["+"], ["#"], [""]):
        with pytest.raises(ConfigError):
            write_broker_config(tmp_path / "out", ca, _spec(), bad, now=NOW)


def test_add_device_replaces_one_entry_and_keeps_the_rest(tmp_path: Path) -> None:
    ca = new_certificate_authority(now=NOW)
    out = tmp_path / "out"
    first = write_broker_config(out, ca, _spec(), ["pi-01", "pi-02"], now=NOW)
    old_cert = (first.paths.client_dir("pi-01") / "client.crt").read_bytes()
    added = add_broker_client(out, ca, "pi-01", password=True, certificate=True, now=NOW)
    entries = parse_password_file(first.paths.password_file.read_text())
    assert verify_password(added.new_passwords["pi-01"], entries["pi-01"])
    assert verify_password(first.new_passwords["pi-02"], entries["pi-02"])
    assert (first.paths.client_dir("pi-01") / "client.crt").read_bytes() != old_cert
    add_broker_client(out, ca, "pi-09", password=False, certificate=True, now=NOW)
    assert "pi-09" not in parse_password_file(first.paths.password_file.read_text())
    with pytest.raises(ConfigError):
        add_broker_client(out, ca, CONTROL_PLANE_USER, password=True, certificate=False, now=NOW)
    with pytest.raises(ConfigError):
        add_broker_client(tmp_path / "empty", ca, "pi-01", password=True, certificate=False, now=NOW)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_config_and_add_device(tmp_path: Path) -> None:
    runner = CliRunner()
    out, data = tmp_path / "out", tmp_path / "cp"
    result = runner.invoke(
        broker_cli,
        ["config", "--out", str(out), "--data-dir", str(data), "-d", "pi-01", "--hostname", "b.example", "--ip", "::1"],
    )
    assert result.exit_code == 0, result.output
    assert (data / "pki" / "ca" / "ca.key").exists()
    assert set(parse_password_file((out / "passwd").read_text())) == {CONTROL_PLANE_USER, "pi-01"}
    assert 'host = "b.example"' in (out / "clients" / "pi-01" / "broker.toml").read_text()
    result = runner.invoke(broker_cli, ["add-device", "pi-02", "--out", str(out), "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    assert "pi-02" in parse_password_file((out / "passwd").read_text())
    assert (out / "clients" / "pi-02" / "client.crt").exists()
    result = runner.invoke(broker_cli, ["add-device", "bad/id", "--out", str(out), "--data-dir", str(data)])
    assert result.exit_code == 1 and "error" in result.output


def test_cli_from_db_uses_the_enrollment_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefleet.control_plane.db.engine import create_db_engine, create_tables
    from edgefleet.control_plane.db.tables import Device

    for name in list(os.environ):
        if name.startswith("EDGEFLEET_"):
            monkeypatch.delenv(name)
    data = tmp_path / "cp"
    data.mkdir()
    engine = create_db_engine(f"sqlite:///{data / 'edgefleet.db'}")
    create_tables(engine)
    enrolled = hash_password("issued-at-enrollment")
    with Session(engine) as session:
        session.add(Device(id="pi-enrolled", created_at=NOW, broker_password_hash=enrolled))
        session.add(Device(id="pi-registered", created_at=NOW))
        session.commit()
    engine.dispose()
    out = tmp_path / "out"
    result = CliRunner().invoke(broker_cli, ["config", "--out", str(out), "--data-dir", str(data), "--from-db"])
    assert result.exit_code == 0, result.output
    entries = parse_password_file((out / "passwd").read_text())
    assert entries["pi-enrolled"] == enrolled
    assert set(entries) == {CONTROL_PLANE_USER, "pi-enrolled", "pi-registered"}
    missing = CliRunner().invoke(
        broker_cli, ["config", "--out", str(out), "--data-dir", str(tmp_path / "nothing"), "--from-db"]
    )
    assert missing.exit_code == 1 and "no control-plane database" in missing.output


# --------------------------------------------------------------------------------------------- client settings


def test_control_plane_settings_take_tls_files_from_the_environment() -> None:
    settings = ServerSettings.from_env(
        {
            "EDGEFLEET_BROKER_HOST": "broker.example",
            "EDGEFLEET_BROKER_TLS_CA_FILE": "/etc/edgefleet/ca.crt",
            "EDGEFLEET_BROKER_TLS_CERT_FILE": "/etc/edgefleet/client.crt",
            "EDGEFLEET_BROKER_TLS_KEY_FILE": "/etc/edgefleet/client.key",
        }
    )
    assert (settings.broker_tls_ca_file, settings.broker_tls_cert_file, settings.broker_tls_key_file) == (
        "/etc/edgefleet/ca.crt",
        "/etc/edgefleet/client.crt",
        "/etc/edgefleet/client.key",
    )
    with pytest.raises(ConfigError, match="go together"):
        ServerSettings(broker_host="b", broker_tls_cert_file="/c.crt")
    with pytest.raises(ConfigError, match="embedded broker"):
        ServerSettings(broker_tls_ca_file="/ca.crt")


def test_agent_broker_config_takes_a_client_certificate(tmp_path: Path) -> None:
    raw = {"device_id": "pi-01", "data_dir": "data", "broker": {"tls_cert_file": "/c.crt", "tls_key_file": "/c.key"}}
    config = AgentConfig.from_dict(raw, base_dir=tmp_path)
    assert (config.broker.tls_cert_file, config.broker.tls_key_file) == ("/c.crt", "/c.key")
    assert 'tls_key_file = "/c.key"' in render_config(config)
    with pytest.raises(ConfigError, match="go together"):
        AgentConfig.from_dict({**raw, "broker": {"tls_cert_file": "/c.crt"}}, base_dir=tmp_path)


def test_make_client_loads_client_certificates_and_refuses_bad_ones(tmp_path: Path) -> None:
    ca = new_certificate_authority(now=NOW)
    issued = issue_client_certificate(ca, "pi-01", now=NOW)
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem())
    (tmp_path / "c.crt").write_bytes(issued.cert_pem())
    (tmp_path / "c.key").write_bytes(issued.key_pem())
    other = issue_client_certificate(ca, "pi-02", now=NOW)
    (tmp_path / "other.key").write_bytes(other.key_pem())
    files = {"tls_ca_file": str(tmp_path / "ca.crt"), "tls_cert_file": str(tmp_path / "c.crt")}
    make_client("pi-01", **files, tls_key_file=str(tmp_path / "c.key"))  # loads
    with pytest.raises(ConfigError):
        make_client("pi-01", **files, tls_key_file=str(tmp_path / "other.key"))  # key of another cert
    with pytest.raises(ConfigError):
        make_client("pi-01", **files)  # cert without key
    with pytest.raises(ConfigError):
        make_client("pi-01", tls_ca_file=str(tmp_path / "missing.crt"))
