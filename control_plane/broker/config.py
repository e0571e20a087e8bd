"""A locked-down Mosquitto 2.0 for production: TLS, per-device credentials, per-device ACLs.

Theory of operation
-------------------
The broker is the last line that keeps devices apart: a device must read only its own desired
state and chunks, and write only its own reported state, events, status and chunk requests
(:mod:`shared.topics`). Mosquitto enforces that with three files this module generates:

* ``mosquitto.conf``: a TLS listener (server certificate signed by a CA the control plane
  keeps under ``<data_dir>/pki/``), optionally a plaintext listener bound to loopback for local
  tools, ``allow_anonymous false``, and the delivery settings edgefleet needs (TCP_NODELAY, a
  high queue limit, 20 in flight, a packet size limit, persistence).
* ``passwd``: Mosquitto 2.0's ``user:$7$<iterations>$<salt b64>$<hash b64>`` (PBKDF2-SHA512),
  computed here so no ``mosquitto_passwd`` binary is needed.
* ``acl``: ``pattern`` lines with ``%u`` that give every user exactly its own device subtree
  and read access to the fleet-wide keyring topics, and ``topic readwrite`` on all of them for
  the control-plane user(s).

How a client proves who it is on the TLS listener depends on :class:`ClientAuth`:

* ``certificate``: a client certificate from our CA; its CN *is* the identity the ACL's ``%u``
  stands for (``use_identity_as_username``), whatever user name the client sends.
* ``certificate+password`` (the default): a client certificate from our CA *and* a user name and
  password from ``passwd``; the user name is the identity. A stolen key or a stolen password
  alone is not enough, and deleting the ``passwd`` line revokes the device.
* ``password``: TLS with server authentication only, plus user name and password.

The loopback plaintext listener always takes user name and password.

Every listener sets ``use_username_as_clientid``: a client's session is named after its
identity, so no device can take over another client's session (the control plane's included)
by connecting with its client id. A device id may never equal a control-plane user name.

Revocation: removing a device's line from ``passwd`` (and sending mosquitto SIGHUP) locks it
out in the two password modes. In ``certificate`` mode a certificate stays valid until it
expires, because no CRL is generated yet.

The pure functions (hashing, ACL/config text, certificate building) take values and return
values; :func:`write_broker_config` and :func:`add_broker_client` do the file I/O, atomically.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.control_plane.broker.mosquitto_conf import (
    DeliveryLimits,
    Listener,
    check_conf_value,
    render_mosquitto_conf,
)
from edgefleet.shared.errors import ConfigError
from edgefleet.shared.files import atomic_write_bytes, fsync_dir
from edgefleet.shared.wire.strict import DEVICE_ID_RE
from edgefleet.shared.wire.topics import DEVICE_PUBLISHES, DEVICE_SUBSCRIBES, KEYRING_ROOT, KEYRING_SUBSCRIPTION, ROOT

__all__ = [
    "CONTROL_PLANE_USER",
    "BrokerPaths",
    "BrokerSpec",
    "CertificateAuthority",
    "ClientAuth",
    "IssuedCertificate",
    "WriteResult",
    "acl_text",
    "add_broker_client",
    "certificate_identity",
    "hash_password",
    "issue_client_certificate",
    "issue_server_certificate",
    "is_usable_client_certificate",
    "load_or_create_ca",
    "mosquitto_password_hash",
    "mosquitto_conf_text",
    "new_certificate_authority",
    "new_password",
    "parse_password_file",
    "password_file_text",
    "verify_password",
    "verify_password_hash_format",
    "write_broker_config",
]

CONTROL_PLANE_USER = "edgefleet-control-plane"  # = the bridge's client id, which the broker renames it to anyway

# mosquitto_passwd 2.0 defaults. The passwords we generate are 256-bit random tokens, so stretching
# adds no strength; more iterations would only cost CPU on every CONNECT of a reconnect storm.
PASSWORD_ITERATIONS = 101  # count
PASSWORD_SALT_BYTES = 12  # bytes
PASSWORD_TOKEN_BYTES = 32  # bytes of randomness in a generated password
_PBKDF2_HASH_BYTES = 64  # bytes: SHA-512's output, what mosquitto stores and compares
_MAX_ITERATIONS = 10_000_000  # count: a sanity bound when parsing hashes

CA_VALID_DAYS = 20 * 365  # days
SERVER_CERT_VALID_DAYS = 825  # days
CLIENT_CERT_VALID_DAYS = 5 * 365  # days
CERT_RENEW_BEFORE_DAYS = 30  # days: `config` re-issues a kept client certificate this close to expiry
_BACKDATE = timedelta(minutes=5)  # certificates start a little in the past: clocks of devices drift

SPEC_FILE = "edgefleet-broker.json"
_SPEC_SCHEMA = "edgefleet.broker-spec/v1"
CLIENTS_DIR = "clients"
_CA_DIR = "ca"
_CA_KEY = "ca.key"
_CA_CERT = "ca.crt"


class ClientAuth(StrEnum):
    """What the TLS listener asks of a client (see the module docstring's table)."""

    CERTIFICATE = "certificate"
    CERTIFICATE_AND_PASSWORD = "certificate+password"
    PASSWORD = "password"

    @property
    def uses_certificates(self) -> bool:
        """Whether clients need a certificate from our CA."""
        return self is not ClientAuth.PASSWORD

    @property
    def uses_passwords(self) -> bool:
        """Whether clients on the TLS listener need a password."""
        return self is not ClientAuth.CERTIFICATE


# --------------------------------------------------------------------------------------------- passwords


def new_password() -> str:
    """A random password (URL-safe, no characters that need quoting in TOML or shell)."""
    return secrets.token_urlsafe(PASSWORD_TOKEN_BYTES)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PASSWORD_ITERATIONS) -> str:
    """Hash ``password`` the way ``mosquitto_passwd`` 2.0 does (``-H sha512-pbkdf2``).

    Args:
        password: The clear-text password (UTF-8 encoded before hashing).
        salt: The salt; None = :data:`PASSWORD_SALT_BYTES` random bytes. Pass one only in tests.
        iterations: PBKDF2 iterations.

    Returns:
        ``$7$<iterations>$<salt, base64>$<PBKDF2-HMAC-SHA512, base64>``: the part after ``user:``.
    """
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ConfigError(f"password hash iterations must be 1..{_MAX_ITERATIONS}, got {iterations}")
    salt = secrets.token_bytes(PASSWORD_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_password_hash(password: str) -> str:
    """:func:`hash_password` with a fresh salt: what enrollment stores for ``broker config --from-db``."""
    return hash_password(password)


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (as mosquitto would decide)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if not 1 <= iterations <= _MAX_ITERATIONS or len(expected) != _PBKDF2_HASH_BYTES:
        return False
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations), expected)


def verify_password_hash_format(encoded: str) -> bool:
    """Whether ``encoded`` is a well-formed mosquitto ``$7$`` (PBKDF2-SHA512) hash."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    return 1 <= int(parts[2]) <= _MAX_ITERATIONS and len(salt) > 0 and len(digest) == _PBKDF2_HASH_BYTES


def password_file_text(entries: Mapping[str, str]) -> str:
    """The ``passwd`` file for ``entries`` (user name -> ``$7$`` hash), sorted by user name."""
    lines = []
    for user in sorted(entries):
        _check_identity(user, "user name")
        encoded = entries[user]
        # $6$ (mosquitto 1.x, plain SHA-512) may come from a file edited by hand with mosquitto_passwd
        if not encoded.startswith(("$6$", "$7$")) or any(c.isspace() or c == ":" for c in encoded):
            raise ConfigError(f"password hash for {user!r} is not a mosquitto $6$/$7$ hash")
        lines.append(f"{user}:{encoded}")
    return "".join(line + "\n" for line in lines)


def parse_password_file(text: str) -> dict[str, str]:
    """Read a ``passwd`` file back into user name -> hash (blank lines and ``#`` comments skipped).

    Raises:
        ConfigError: A line that is not ``user:hash``, or a user listed twice.
    """
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user or not encoded:
            raise ConfigError(f"password file line {number}: expected user:hash")
        if user in entries:
            raise ConfigError(f"password file line {number}: user {user!r} listed twice")
        entries[user] = encoded
    return entries


# --------------------------------------------------------------------------------------------- ACL


def acl_text(control_plane_users: Sequence[str] = (CONTROL_PLANE_USER,)) -> str:
    """The mosquitto ``acl_file``: each user its own device subtree, the control plane all of them.

    Every client may also read the fleet-wide keyring topics; only the control plane writes them.

    Mosquitto denies whatever no line grants. ``pattern`` lines apply to every user with ``%u``
    replaced by its name (with certificate identities: the certificate's CN), so device ``pi-01``
    may read ``edgefleet/v1/devices/pi-01/desired`` and nothing of ``pi-02``. Mosquitto 2.0 refuses
    a ``%u`` match for names that contain ``+``, ``#`` or ``/``; device ids cannot contain them.
    """
    users = _check_control_plane_users(control_plane_users)
    lines = [
        "# Generated by edgefleet (control_plane/broker/config.py); regenerate rather than edit.",
        "# Anything not granted below is denied.",
        "",
        "# Every client, by its identity (%u = user name, or the certificate CN with use_identity_as_username):",
        "# read only its own desired state and chunks, write only its own reports.",
    ]
    lines += [f"pattern read {ROOT}/%u/{leaf}" for leaf in DEVICE_SUBSCRIBES]
    lines += [f"pattern write {ROOT}/%u/{leaf}" for leaf in DEVICE_PUBLISHES]
    lines += [
        "# and read the fleet-wide keyring versions (signed; only the control plane publishes them).",
        f"pattern read {KEYRING_SUBSCRIPTION}",
    ]
    for user in users:
        lines += [
            "",
            "# The control plane: every device's topics (publishes desired/chunks, ingests the rest), the keyring.",
            f"user {user}",
            f"topic readwrite {ROOT}/#",
            f"topic readwrite {KEYRING_ROOT}/#",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- mosquitto.conf


@dataclass(frozen=True, kw_only=True)
class BrokerSpec:
    """Everything that decides the generated broker files (saved as ``edgefleet-broker.json``)."""

    client_auth: ClientAuth = ClientAuth.CERTIFICATE_AND_PASSWORD
    """How clients on the TLS listener authenticate (module docstring)."""
    tls_port: int = 8883
    """Port of the TLS listener."""
    tls_bind: str = ""
    """Address the TLS listener binds to; empty = every address (IPv4 and IPv6)."""
    local_port: int | None = 1883
    """Port of the plaintext listener on loopback for local tools; None = no plaintext listener."""
    local_bind: str = "127.0.0.1"
    """Address of the plaintext listener; must be a loopback address."""
    control_plane_users: tuple[str, ...] = (CONTROL_PLANE_USER,)
    """User names with access to every device (one per control-plane replica, or one shared)."""
    server_hostnames: tuple[str, ...] = ("localhost",)
    """DNS names put in the server certificate (clients check the name they connect to)."""
    server_ips: tuple[str, ...] = ("127.0.0.1",)
    """IP addresses put in the server certificate."""
    public_host: str = ""
    """Host name agents connect to (written into their config snippets); empty = first name or IP."""
    install_dir: str = ""
    """Where these files will sit on the broker host (paths in mosquitto.conf); empty = the output dir."""
    device_dir: str = "/etc/edgefleet-agent/broker"
    """Where a device keeps its certificate files (paths in its config snippet)."""
    device_passwords: bool | None = None
    """Issue passwords to devices; None = when ``client_auth`` uses passwords."""
    device_certificates: bool | None = None
    """Issue client certificates to devices; None = when ``client_auth`` uses certificates."""
    persistence_dir: str = "/var/lib/mosquitto"
    """Mosquitto's database directory (retained messages, sessions, queued messages)."""
    autosave_interval_s: int = 5
    """Seconds between database saves (mosquitto also saves on SIGTERM): what a crash can lose."""
    max_queued_messages: int = DeliveryLimits.max_queued_messages
    """QoS 1 messages queued per client beyond those in flight. Mosquitto's default of 1000 drops
    silently, which stalls chunked transfers and loses reports while the control plane is away."""
    max_inflight_messages: int = DeliveryLimits.max_inflight_messages
    """QoS 1 messages sent and not yet acknowledged, per client (paho is slower with more)."""
    max_packet_size_bytes: int = DeliveryLimits.max_packet_size_bytes
    """Largest MQTT packet a client may send; must exceed the control plane's max chunk + headers."""
    run_as_user: str | None = None
    """Mosquitto's ``user`` option; None = its default (``mosquitto`` when started as root)."""
    log_dest: str = "stderr"
    """Mosquitto's ``log_dest`` (stderr suits systemd's journal)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_auth", ClientAuth(self.client_auth))
        for name in ("control_plane_users", "server_hostnames", "server_ips"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.device_passwords is None:
            object.__setattr__(self, "device_passwords", self.client_auth.uses_passwords)
        if self.device_certificates is None:
            object.__setattr__(self, "device_certificates", self.client_auth.uses_certificates)
        if self.client_auth.uses_passwords and not self.device_passwords:
            raise ConfigError(f"client_auth {self.client_auth} needs device passwords")
        if self.client_auth.uses_certificates and not self.device_certificates:
            raise ConfigError(f"client_auth {self.client_auth} needs device certificates")
        for name in ("tls_port", "local_port"):
            port = getattr(self, name)
            if port is not None and not 1 <= port <= 65535:
                raise ConfigError(f"{name} must be 1..65535, got {port}")
        if self.local_port == self.tls_port:
            raise ConfigError("local_port and tls_port must differ")
        if not _is_loopback(self.local_bind):
            raise ConfigError(f"the plaintext listener must bind to loopback, not {self.local_bind!r}")
        _check_control_plane_users(self.control_plane_users)
        if not self.server_hostnames and not self.server_ips:
            raise ConfigError("the server certificate needs at least one host name or IP address")
        for ip in self.server_ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError as exc:
                raise ConfigError(f"server IP {ip!r} is not an IP address") from exc
        for hostname in self.server_hostnames:
            if not hostname or any(c.isspace() or c in "/:" for c in hostname):
                raise ConfigError(f"server host name {hostname!r} is not a DNS name")
        if not self.public_host:
            object.__setattr__(self, "public_host", (self.server_hostnames or self.server_ips)[0])
        if not 64 * 1024 <= self.max_packet_size_bytes <= 268_435_455:
            raise ConfigError(f"max_packet_size_bytes must be 64 KiB..256 MiB, got {self.max_packet_size_bytes}")
        self.delivery_limits()  # the rules every edgefleet broker shares (mosquitto_conf.DeliveryLimits)
        for value in (
            self.tls_bind,
            self.local_bind,
            self.public_host,
            self.install_dir,
            self.device_dir,
            self.persistence_dir,
            self.run_as_user or "",
            self.log_dest,
        ):
            check_conf_value(value)

    def delivery_limits(self) -> DeliveryLimits:
        """The delivery limits of this spec, checked like the embedded broker's.

        Raises:
            ConfigError: A limit that would drop messages or that mosquitto refuses.
        """
        return DeliveryLimits(
            max_queued_messages=self.max_queued_messages,
            max_inflight_messages=self.max_inflight_messages,
            max_packet_size_bytes=self.max_packet_size_bytes,
            autosave_interval_s=self.autosave_interval_s,
        )

    def to_json(self) -> str:
        """The spec as JSON (written next to the generated files, read by ``add-device``)."""
        raw: dict[str, Any] = {"schema": _SPEC_SCHEMA, **dataclasses.asdict(self)}
        raw["client_auth"] = str(self.client_auth)
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BrokerSpec:
        """Read :meth:`to_json` output back.

        Raises:
            ConfigError: Not JSON, another schema, or unknown or invalid fields.
        """
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"broker spec: not JSON ({exc})") from exc
        if not isinstance(raw, dict) or raw.pop("schema", None) != _SPEC_SCHEMA:
            raise ConfigError(f"broker spec: expected schema {_SPEC_SCHEMA!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"broker spec: unknown field(s) {sorted(unknown)}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"broker spec: {exc}") from exc


@dataclass(frozen=True)
class BrokerPaths:
    """Where the broker's files are (in the output dir, or on the broker host)."""

    directory: Path

    @property
    def config(self) -> Path:
        """``mosquitto.conf``."""
        return self.directory / "mosquitto.conf"

    @property
    def password_file(self) -> Path:
        """``passwd``: user name -> ``$7$`` hash."""
        return self.directory / "passwd"

    @property
    def acl_file(self) -> Path:
        """``acl``."""
        return self.directory / "acl"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate clients and the broker verify against."""
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        """The broker's TLS certificate."""
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        """The broker's TLS key (mode 0600)."""
        return self.directory / "server.key"

    @property
    def spec(self) -> Path:
        """The :class:`BrokerSpec` the files were generated from (``add-device`` reads it)."""
        return self.directory / SPEC_FILE

    def client_dir(self, identity: str) -> Path:
        """The folder with one client's credentials (to hand to that device or service)."""
        _check_identity(identity, "client identity")
        return self.directory / CLIENTS_DIR / identity


def mosquitto_conf_text(spec: BrokerSpec, paths: BrokerPaths) -> str:
    """The ``mosquitto.conf`` (mosquitto 2.0) for ``spec``, naming the files under ``paths``.

    Args:
        spec: What to generate.
        paths: Where the files sit *on the broker host* (absolute paths are written).
    """
    directory = Path(os.path.abspath(paths.directory))
    paths = BrokerPaths(directory)
    check_conf_value(str(directory))
    tls_options = [
        f"cafile {paths.ca_cert}",
        f"certfile {paths.server_cert}",
        f"keyfile {paths.server_key}",
        "tls_version tlsv1.2",
        # the session is named after the identity: nobody can take over another client's session
        "use_username_as_clientid true",
    ]
    if spec.client_auth.uses_certificates:
        tls_options.append("require_certificate true")
    if spec.client_auth is ClientAuth.CERTIFICATE:
        tls_options.append("use_identity_as_username true")
    listeners = [
        Listener(
            port=spec.tls_port,
            bind=spec.tls_bind,
            comment=f"TLS for devices and remote control planes (client auth: {spec.client_auth})",
            options=tuple(tls_options),
        )
    ]
    if spec.local_port is not None:
        listeners.append(
            Listener(
                port=spec.local_port,
                bind=spec.local_bind,
                comment="plaintext on loopback only, for local tools; user name and password still required",
                options=("use_username_as_clientid true",),
            )
        )
    return render_mosquitto_conf(
        header=(
            "Generated by edgefleet (control_plane/broker/config.py); regenerate rather than edit.",
            "Reload passwd/acl after a change: kill -HUP <mosquitto pid>.",
        ),
        listeners=listeners,
        limits=spec.delivery_limits(),
        persistence_dir=spec.persistence_dir,
        password_file=str(paths.password_file),
        acl_file=str(paths.acl_file),
        log_dest=spec.log_dest,
        run_as_user=spec.run_as_user,
    )


# --------------------------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class IssuedCertificate:
    """A private key and the certificate that goes with it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def key_pem(self) -> bytes:
        """The private key, PKCS#8 PEM, unencrypted (files holding it are mode 0600)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def cert_pem(self) -> bytes:
        """The certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertificateAuthority(IssuedCertificate):
    """The control plane's broker CA: signs the server's and every client's certificate."""


def new_certificate_authority(
    *, now: datetime, common_name: str = "edgefleet broker CA", valid_days: int = CA_VALID_DAYS
) -> CertificateAuthority:
    """A new self-signed CA (ECDSA P-256), allowed to sign end-entity certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key(), now, valid_days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key=key, cert=cert)


def issue_server_certificate(
    ca: CertificateAuthority,
    *,
    hostnames: Iterable[str],
    ip_addresses: Iterable[str],
    now: datetime,
    valid_days: int = SERVER_CERT_VALID_DAYS,
) -> IssuedCertificate:
    """A TLS server certificate for the broker, valid for these names and addresses (SANs)."""
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if not names:
        raise ConfigError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))])
    cert = (
        _end_entity(ca, subject, key, now, valid_days, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedCertificate(key=key, cert=cert)


def issue_client_certificate(
    ca: CertificateAuthority, identity: str, *, now: datetime, valid_days: int = CLIENT_CERT_VALID_DAYS
) -> IssuedCertificate:
    """A TLS client certificate whose CN is ``identity`` (a device id or a control-plane user).

    With ``use_identity_as_username`` the CN *is* the MQTT user name the ACL applies to. The
    certificate is good for client authentication only (a server certificate cannot stand in).
    """
    _check_identity(identity, "client identity")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)])
    cert = _end_entity(ca, subject, key, now, valid_days, ExtendedKeyUsageOID.CLIENT_AUTH).sign(ca.key, hashes.SHA256())
    return IssuedCertificate(key=key, cert=cert)


def certificate_identity(cert: x509.Certificate) -> str | None:
    """The certificate's CN, or None if it has none."""
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attributes[0].value if attributes else None
    return value if isinstance(value, str) else None


def is_usable_client_certificate(
    cert: x509.Certificate, ca: CertificateAuthority, identity: str, now: datetime
) -> bool:
    """Whether ``cert`` was issued by ``ca`` to ``identity`` and is not close to expiry (kept on `config` reruns)."""
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return (
        certificate_identity(cert) == identity
        and cert.not_valid_before_utc <= now
        and cert.not_valid_after_utc - timedelta(days=CERT_RENEW_BEFORE_DAYS) > now
    )


def load_or_create_ca(pki_dir: Path, *, now: datetime | None = None) -> CertificateAuthority:
    """The CA under ``pki_dir/ca/`` (``ca.key`` mode 0600, ``ca.crt``), created on first use.

    Creation is atomic and happens once: the key and certificate are written into a fresh
    private folder that is then renamed into place, so a concurrent caller either wins or loads
    the winner's CA, and a crash leaves no half-written CA behind.

    Raises:
        ConfigError: The CA files exist but are unreadable, corrupt, or do not belong together.
    """
    ca_dir = pki_dir / _CA_DIR
    if not (ca_dir / _CA_CERT).exists():
        try:
            pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            ca = new_certificate_authority(now=now or datetime.now(UTC))
            staging = Path(tempfile.mkdtemp(dir=pki_dir, prefix=".ca-"))  # mode 0700
        except OSError as exc:
            raise ConfigError(f"cannot create the broker CA under {pki_dir}: {exc}") from exc
        try:
            atomic_write_bytes(staging / _CA_KEY, ca.key_pem(), mode=0o600)
            atomic_write_bytes(staging / _CA_CERT, ca.cert_pem(), mode=0o644)
            try:
                os.rename(staging, ca_dir)  # fails when another process created it first
                fsync_dir(pki_dir)
            except OSError:
                if not (ca_dir / _CA_CERT).exists():
                    raise
        except OSError as exc:
            raise ConfigError(f"cannot create the broker CA under {pki_dir}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _load_ca(ca_dir)


def _load_ca(ca_dir: Path) -> CertificateAuthority:
    try:
        key = serialization.load_pem_private_key((ca_dir / _CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((ca_dir / _CA_CERT).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the broker CA from {ca_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"the broker CA key in {ca_dir} does not match its certificate")
    return CertificateAuthority(key=key, cert=cert)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: Any, now: datetime, valid_days: int
) -> x509.CertificateBuilder:
    if valid_days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, got {valid_days}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=valid_days))
    )


def _end_entity(
    ca: CertificateAuthority,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    now: datetime,
    valid_days: int,
    purpose: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    return (
        _builder(subject, ca.cert.subject, key.public_key(), now, valid_days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# --------------------------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_broker_config` / :func:`add_broker_client` did."""

    paths: BrokerPaths
    new_passwords: dict[str, str] = field(default_factory=dict)
    """Identity -> clear-text password, for the passwords created by this call (also in its client folder)."""
    kept_passwords: tuple[str, ...] = ()
    """Identities whose existing password entry was kept."""
    issued_certificates: tuple[str, ...] = ()
    """Identities that got a new client certificate."""
    kept_certificates: tuple[str, ...] = ()
    """Identities whose existing, still valid client certificate was kept."""
    removed: tuple[str, ...] = ()
    """Identities whose password entry was dropped (no longer listed). Their certificates stay valid."""


def write_broker_config(
    out_dir: Path,
    ca: CertificateAuthority,
    spec: BrokerSpec,
    devices: Iterable[str],
    *,
    known_hashes: Mapping[str, str] | None = None,
    rotate_passwords: bool = False,
    now: datetime | None = None,
) -> WriteResult:
    """Write the whole broker configuration for ``devices`` into ``out_dir``.

    ``passwd`` ends up with exactly the listed devices (when they get passwords) and the
    control-plane users. A device's entry is, in this order: its hash from ``known_hashes``
    (the password it was issued at enrollment), else its existing entry unless
    ``rotate_passwords`` (so rerunning does not lock deployed devices out), else a new password.
    Entries of unlisted identities are dropped. Client certificates that are still good are
    kept; the server certificate is issued anew.

    Args:
        out_dir: Output folder (created). Everything secret in it is mode 0600.
        ca: The CA from :func:`load_or_create_ca`.
        spec: What to generate.
        devices: Device ids (``DEVICE_ID_RE``), none equal to a control-plane user.
        known_hashes: Device id -> ``$7$`` hash of a password the device already holds.
        rotate_passwords: New passwords for every listed identity without a known hash.
        now: The time (tests); default now.

    Raises:
        ConfigError: An invalid or reserved device id, or an unreadable existing ``passwd``.
    """
    now = now or datetime.now(UTC)
    device_ids = _check_devices(devices, spec)
    out_dir = Path(os.path.abspath(out_dir))  # the snippets name files by absolute path
    paths = BrokerPaths(out_dir)
    install = BrokerPaths(Path(spec.install_dir) if spec.install_dir else out_dir)
    existing = _read_password_file(paths.password_file)

    server = issue_server_certificate(ca, hostnames=spec.server_hostnames, ip_addresses=spec.server_ips, now=now)
    atomic_write_bytes(paths.ca_cert, ca.cert_pem(), mode=0o644)
    atomic_write_bytes(paths.server_cert, server.cert_pem(), mode=0o644)
    atomic_write_bytes(paths.server_key, server.key_pem(), mode=0o600)

    entries: dict[str, str] = {}
    new_passwords: dict[str, str] = {}
    kept_passwords: list[str] = []
    issued: list[str] = []
    kept_certs: list[str] = []
    identities = [(user, True) for user in spec.control_plane_users] + [(d, False) for d in device_ids]
    for identity, is_control_plane in identities:
        wants_password = is_control_plane or bool(spec.device_passwords)
        wants_cert = spec.client_auth.uses_certificates if is_control_plane else bool(spec.device_certificates)
        password: str | None = None
        known = None if is_control_plane else (known_hashes or {}).get(identity)
        if wants_password and known:
            if not verify_password_hash_format(known):
                raise ConfigError(f"the known password hash of {identity!r} is not a mosquitto $7$ hash")
            entries[identity] = known
            kept_passwords.append(identity)
        elif wants_password:
            if identity in existing and not rotate_passwords:
                entries[identity] = existing[identity]
                kept_passwords.append(identity)
            else:
                password = new_password()
                entries[identity] = hash_password(password)
                new_passwords[identity] = password
        if wants_cert:
            if _write_client_cert(paths, ca, identity, now, replace=False):
                issued.append(identity)
            else:
                kept_certs.append(identity)
        _write_client_files(
            paths, spec, ca, identity, password, has_password=wants_password, is_control_plane=is_control_plane
        )

    atomic_write_bytes(paths.password_file, password_file_text(entries).encode(), mode=0o640)
    atomic_write_bytes(paths.acl_file, acl_text(spec.control_plane_users).encode(), mode=0o644)
    atomic_write_bytes(paths.config, mosquitto_conf_text(spec, install).encode(), mode=0o644)
    atomic_write_bytes(paths.spec, spec.to_json().encode(), mode=0o644)
    return WriteResult(
        paths=paths,
        new_passwords=new_passwords,
        kept_passwords=tuple(kept_passwords),
        issued_certificates=tuple(issued),
        kept_certificates=tuple(kept_certs),
        removed=tuple(sorted(set(existing) - set(entries))),
    )


def add_broker_client(
    out_dir: Path,
    ca: CertificateAuthority,
    identity: str,
    *,
    password: bool,
    certificate: bool,
    now: datetime | None = None,
) -> WriteResult:
    """Add or replace one device's password entry and/or issue it a new client certificate.

    Reads the spec that :func:`write_broker_config` left in ``out_dir``; the broker picks up a
    changed ``passwd`` on SIGHUP (a new certificate needs nothing: it is signed by the same CA).

    Raises:
        ConfigError: ``out_dir`` holds no generated config, or the id is invalid or reserved.
    """
    now = now or datetime.now(UTC)
    paths = BrokerPaths(Path(os.path.abspath(out_dir)))
    try:
        spec = BrokerSpec.from_json(paths.spec.read_text())
    except OSError as exc:
        raise ConfigError(f"{out_dir} holds no generated broker config ({paths.spec.name}: {exc.strerror})") from exc
    (identity,) = _check_devices([identity], spec)
    if not (password or certificate):
        raise ConfigError("nothing to do: ask for a password, a certificate, or both")
    entries = _read_password_file(paths.password_file)
    new_passwords: dict[str, str] = {}
    clear: str | None = None
    if password:
        clear = new_password()
        entries[identity] = hash_password(clear)
        new_passwords[identity] = clear
        atomic_write_bytes(paths.password_file, password_file_text(entries).encode(), mode=0o640)
    if certificate:
        _write_client_cert(paths, ca, identity, now, replace=True)
    _write_client_files(paths, spec, ca, identity, clear, has_password=identity in entries, is_control_plane=False)
    return WriteResult(
        paths=paths,
        new_passwords=new_passwords,
        issued_certificates=(identity,) if certificate else (),
    )


def _write_client_cert(
    paths: BrokerPaths, ca: CertificateAuthority, identity: str, now: datetime, *, replace: bool
) -> bool:
    """Issue ``identity`` a certificate unless a usable one is there (or ``replace``); True if issued."""
    folder = paths.client_dir(identity)
    cert_path, key_path = folder / "client.crt", folder / "client.key"
    if not replace and cert_path.exists() and key_path.exists():
        try:
            if is_usable_client_certificate(x509.load_pem_x509_certificate(cert_path.read_bytes()), ca, identity, now):
                return False
        except (OSError, ValueError):
            pass  # unreadable: issue a new one
    _private_dir(folder)
    issued = issue_client_certificate(ca, identity, now=now)
    # key first: a certificate never points at a key that is not there yet
    atomic_write_bytes(key_path, issued.key_pem(), mode=0o600)
    atomic_write_bytes(cert_path, issued.cert_pem(), mode=0o644)
    return True


def _write_client_files(
    paths: BrokerPaths,
    spec: BrokerSpec,
    ca: CertificateAuthority,
    identity: str,
    password: str | None,
    *,
    has_password: bool,
    is_control_plane: bool,
) -> None:
    """The client folder: the CA certificate, the password (if new) and a ready-made config snippet.

    ``password`` is the new clear-text password, None when there is none or the old one was kept
    (``has_password``): then the snippet from the earlier run, which holds it, is left alone.
    """
    folder = paths.client_dir(identity)
    _private_dir(folder)
    atomic_write_bytes(folder / "ca.crt", ca.cert_pem(), mode=0o644)
    has_cert = (folder / "client.crt").exists()
    if has_password and password is None:
        return
    if password is not None:
        atomic_write_bytes(folder / "password", password.encode() + b"\n", mode=0o600)
    if is_control_plane:
        base = Path(spec.install_dir) if spec.install_dir else paths.directory
        client_dir = base / CLIENTS_DIR / identity
        env = {
            "EDGEFLEET_BROKER_HOST": spec.public_host,
            "EDGEFLEET_BROKER_PORT": str(spec.tls_port),
            "EDGEFLEET_BROKER_USERNAME": identity,
            "EDGEFLEET_BROKER_TLS_CA_FILE": str(client_dir / "ca.crt"),
        }
        if password is not None:
            env["EDGEFLEET_BROKER_PASSWORD"] = password
        if has_cert:
            env["EDGEFLEET_BROKER_TLS_CERT_FILE"] = str(client_dir / "client.crt")
            env["EDGEFLEET_BROKER_TLS_KEY_FILE"] = str(client_dir / "client.key")
        text = "# edgefleet control plane -> broker over TLS (or use the loopback listener: no TLS_* lines).\n"
        text += "".join(f"{k}={v}\n" for k, v in env.items())
        atomic_write_bytes(folder / "control-plane.env", text.encode(), mode=0o600)
        return
    lines = [
        f"# [broker] table for {identity}'s agent.toml; copy ca.crt"
        + (", client.crt, client.key" if has_cert else "")
        + f" to {spec.device_dir}/",
        "[broker]",
        f"host = {json.dumps(spec.public_host)}",
        f"port = {spec.tls_port}",
        f"username = {json.dumps(identity)}",
    ]
    if password is not None:
        lines.append(f"password = {json.dumps(password)}")
    lines += [
        f"tls_ca_file = {json.dumps(spec.device_dir.rstrip('/') + '/ca.crt')}",
    ]
    if has_cert:
        lines.append(f"tls_cert_file = {json.dumps(spec.device_dir.rstrip('/') + '/client.crt')}")
        lines.append(f"tls_key_file = {json.dumps(spec.device_dir.rstrip('/') + '/client.key')}")
    atomic_write_bytes(folder / "broker.toml", ("\n".join(lines) + "\n").encode(), mode=0o600)


def _private_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)


def _read_password_file(path: Path) -> dict[str, str]:
    try:
        return parse_password_file(path.read_text())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------- checks


def _check_identity(identity: str, what: str) -> None:
    if not isinstance(identity, str) or not DEVICE_ID_RE.match(identity):
        raise ConfigError(f"{what} {identity!r:.140} must match {DEVICE_ID_RE.pattern}")


def _check_control_plane_users(users: Sequence[str]) -> tuple[str, ...]:
    if not users:
        raise ConfigError("at least one control-plane user is needed")
    for user in users:
        _check_identity(user, "control-plane user")
    if len(set(users)) != len(users):
        raise ConfigError(f"control-plane users listed twice: {list(users)}")
    return tuple(users)


def _check_devices(devices: Iterable[str], spec: BrokerSpec) -> list[str]:
    """Valid, unique device ids; none may be a control-plane user (it would get every device's topics)."""
    result = sorted(set(devices))
    for device_id in result:
        _check_identity(device_id, "device id")
        if device_id in spec.control_plane_users:
            raise ConfigError(f"device id {device_id!r} is reserved for the control plane")
    return result



def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
