"""``edgefleet broker``: generate a locked-down Mosquitto configuration and issue device credentials.

The files are built by :mod:`control_plane.broker_config`; this module only gathers the inputs
(device ids from options, the control plane's API, or its database) and reports what it did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from edgefleet.control_plane.broker.config import (
    CONTROL_PLANE_USER,
    BrokerSpec,
    ClientAuth,
    WriteResult,
    add_broker_client,
    load_or_create_ca,
    write_broker_config,
)
from edgefleet.control_plane.broker.mosquitto_conf import DeliveryLimits
from edgefleet.control_plane.client import DEFAULT_API_URL, resolve_token
from edgefleet.shared.errors import ConfigError, EdgefleetError, TransferError

app = typer.Typer(
    help=(
        "Lock the MQTT broker down: a Mosquitto config with a TLS listener, per-device passwords and/or "
        "client certificates, and ACLs that let each device reach only its own topics."
    ),
    no_args_is_help=True,
)
console = Console()

API_PAGE_SIZE = 1000  # devices per GET /api/v1/devices request
API_TIMEOUT_S = 30.0  # seconds

DataDir = Annotated[
    Path,
    typer.Option(
        envvar="EDGEFLEET_DATA_DIR",
        help="The control plane's data dir; the broker CA is kept (and created once) in <data-dir>/pki/.",
    ),
]
OutDir = Annotated[
    Path,
    typer.Option(
        "--out", help="Folder for mosquitto.conf, passwd, acl, ca.crt, server.crt/key and clients/<id>/ credentials."
    ),
]


_CONFIG_HELP = (
    "Write mosquitto.conf, passwd, acl and certificates for a list of devices.\n\n"
    "passwd ends up with exactly the devices given (--device, --from-api, --from-db) plus the control-plane "
    "user(s). Rerunning keeps existing passwords and still-valid client certificates, and drops devices no "
    "longer listed.\n\n"
    "Each clients/<id>/ folder holds what to hand to that device: ca.crt, client.crt + client.key (mode 0600), "
    "and broker.toml, a \\[broker] table for its agent.toml (control-plane.env for the control plane). "
    "Reload a running mosquitto with SIGHUP."
)
_ADD_DEVICE_HELP = (
    "Add one device to a config written by 'broker config', or replace its credentials.\n\n"
    "Appends or replaces its passwd entry and/or issues a client certificate signed by the same CA, and "
    "writes clients/<id>/. A running mosquitto picks up passwd changes on SIGHUP; a new certificate needs "
    "no reload."
)


@app.command("config", help=_CONFIG_HELP)
def config(
    out: OutDir,
    device: Annotated[
        list[str] | None, typer.Option("--device", "-d", help="A device id to admit (repeat for several).")
    ] = None,
    from_api: Annotated[
        bool, typer.Option("--from-api", help="Also admit every device the control plane knows (GET /api/v1/devices).")
    ] = False,
    from_db: Annotated[
        bool,
        typer.Option(
            "--from-db",
            help="Also admit every device in the control plane's database, with the broker password it was "
            "issued at enrollment (run on the control-plane host; uses --data-dir / EDGEFLEET_DATABASE_URL).",
        ),
    ] = False,
    api_url: Annotated[str, typer.Option(envvar="EDGEFLEET_API_URL", help="Control plane URL.")] = DEFAULT_API_URL,
    data_dir: DataDir = Path(".edgefleet"),
    client_auth: Annotated[
        ClientAuth,
        typer.Option(
            help="What the TLS listener asks of a client: 'certificate' (client cert, its CN is the identity), "
            "'certificate+password' (client cert from our CA plus user name and password), or 'password'."
        ),
    ] = ClientAuth.CERTIFICATE_AND_PASSWORD,
    hostname: Annotated[
        list[str] | None,
        typer.Option("--hostname", help="DNS name for the server certificate (repeat). Default: localhost."),
    ] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="IP address for the server certificate (repeat). Default: 127.0.0.1."),
    ] = None,
    public_host: Annotated[
        str, typer.Option(help="Host agents connect to (in their config snippets). Default: the first name/IP.")
    ] = "",
    tls_port: Annotated[int, typer.Option(help="Port of the TLS listener.")] = 8883,
    bind: Annotated[str, typer.Option(help="Address the TLS listener binds to; empty = all addresses.")] = "",
    local_port: Annotated[
        int, typer.Option(help="Port of the plaintext listener on 127.0.0.1 for local tools; 0 = none.")
    ] = 1883,
    control_plane_user: Annotated[
        list[str] | None,
        typer.Option(
            "--control-plane-user",
            help=f"User with access to every device (repeat, e.g. one per replica). Default: {CONTROL_PLANE_USER}.",
        ),
    ] = None,
    install_dir: Annotated[
        str,
        typer.Option(help="Where these files will live on the broker host (paths in mosquitto.conf). Default: --out."),
    ] = "",
    device_dir: Annotated[
        str, typer.Option(help="Where a device keeps ca.crt/client.crt/client.key (paths in its broker.toml).")
    ] = "/etc/edgefleet-agent/broker",
    persistence_dir: Annotated[str, typer.Option(help="Mosquitto's database directory.")] = "/var/lib/mosquitto",
    max_queued_messages: Annotated[
        int, typer.Option(help="QoS 1 messages queued per client (mosquitto's default 1000 drops silently).")
    ] = DeliveryLimits.max_queued_messages,
    max_packet_size: Annotated[
        int, typer.Option(help="Largest MQTT packet in bytes; above the control plane's max chunk size.")
    ] = DeliveryLimits.max_packet_size_bytes,
    run_as_user: Annotated[str | None, typer.Option(help="Mosquitto's 'user' option (default: its own).")] = None,
    rotate_passwords: Annotated[
        bool, typer.Option(help="New passwords for listed identities (default: keep the entries already in passwd).")
    ] = False,
) -> None:
    """Write the broker configuration (the command's help is ``_CONFIG_HELP``)."""
    try:
        spec = BrokerSpec(
            client_auth=client_auth,
            tls_port=tls_port,
            tls_bind=bind,
            local_port=local_port or None,
            control_plane_users=tuple(control_plane_user or (CONTROL_PLANE_USER,)),
            server_hostnames=tuple(hostname if hostname is not None else ("localhost",)),
            server_ips=tuple(ip if ip is not None else ("127.0.0.1",)),
            public_host=public_host,
            install_dir=install_dir,
            device_dir=device_dir,
            persistence_dir=persistence_dir,
            max_queued_messages=max_queued_messages,
            max_packet_size_bytes=max_packet_size,
            run_as_user=run_as_user,
        )
        devices = set(device or ())
        known_hashes: dict[str, str] = {}
        if from_api:
            devices |= set(fetch_device_ids(api_url))
        if from_db:
            known_hashes = read_enrolled_devices(data_dir)
            devices |= set(known_hashes)
            known_hashes = {d: h for d, h in known_hashes.items() if h}
        if not devices:
            console.print("[yellow]warning:[/yellow] no devices given: only the control plane will be admitted")
        ca = load_or_create_ca(data_dir / "pki")
        result = write_broker_config(
            out, ca, spec, sorted(devices), known_hashes=known_hashes, rotate_passwords=rotate_passwords
        )
    except EdgefleetError as exc:
        raise _fail(exc) from exc
    except OSError as exc:
        raise _fail(ConfigError(f"cannot write the broker config: {exc}")) from exc
    _report(result, spec)


@app.command("add-device", help=_ADD_DEVICE_HELP)
def add_device(
    device_id: Annotated[str, typer.Argument(help="The device id (also its MQTT user name / certificate CN).")],
    out: OutDir,
    password: Annotated[
        bool | None,
        typer.Option(
            "--password/--no-password",
            help="Give it a new password (replaces its passwd entry). Default: if the config gives devices passwords.",
        ),
    ] = None,
    cert: Annotated[
        bool | None,
        typer.Option(
            "--cert/--no-cert",
            help="Issue it a new client certificate. Default: when the config's client auth uses certificates.",
        ),
    ] = None,
    data_dir: DataDir = Path(".edgefleet"),
) -> None:
    """Add or replace one device's credentials (the command's help is ``_ADD_DEVICE_HELP``)."""
    try:
        spec = BrokerSpec.from_json((out / "edgefleet-broker.json").read_text())
        wants_password = bool(spec.device_passwords) if password is None else password
        wants_cert = bool(spec.device_certificates) if cert is None else cert
        ca = load_or_create_ca(data_dir / "pki")
        result = add_broker_client(out, ca, device_id, password=wants_password, certificate=wants_cert)
    except EdgefleetError as exc:
        raise _fail(exc) from exc
    except OSError as exc:
        raise _fail(ConfigError(f"{out} holds no usable broker config: {exc}")) from exc
    _report(result, spec)


# --------------------------------------------------------------------------------------------- inputs


def fetch_device_ids(api_url: str) -> list[str]:
    """Every device id the control plane knows, page by page (``GET /api/v1/devices``, with the
    API token of :func:`edgefleet.control_plane.client.resolve_token`).

    Raises:
        TransferError: The control plane cannot be reached or answered with an error.
    """
    ids: list[str] = []
    token = resolve_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=api_url.rstrip("/"), timeout=API_TIMEOUT_S, headers=headers) as http:
        while True:
            try:
                response = http.get("/api/v1/devices", params={"limit": API_PAGE_SIZE, "offset": len(ids)})
                response.raise_for_status()
                page = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise TransferError(f"cannot list devices at {api_url}: {exc}") from exc
            if not isinstance(page, list):
                raise TransferError(f"{api_url}/api/v1/devices did not answer with a list")
            ids += [str(d["id"]) for d in page if isinstance(d, dict) and "id" in d]
            if len(page) < API_PAGE_SIZE:
                return ids


def read_enrolled_devices(data_dir: Path) -> dict[str, str]:
    """Device id -> broker password hash ("" if none was issued) from the control plane's database.

    Raises:
        ConfigError: No database there, or it cannot be read.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlmodel import Session, select

    from edgefleet.control_plane.db.engine import create_db_engine
    from edgefleet.control_plane.db.tables import Device
    from edgefleet.control_plane.settings import ServerSettings

    settings = ServerSettings.from_env(data_dir=data_dir)
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).is_file()):
        raise ConfigError(f"no control-plane database at {url.database} (set --data-dir or EDGEFLEET_DATABASE_URL)")
    engine = create_db_engine(settings.database_url)
    try:
        with Session(engine) as session:
            rows = session.exec(select(Device.id, Device.broker_password_hash)).all()
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read devices from the control-plane database: {exc}") from exc
    finally:
        engine.dispose()
    return {device_id: password_hash or "" for device_id, password_hash in rows}


# --------------------------------------------------------------------------------------------- output


def _report(result: WriteResult, spec: BrokerSpec) -> None:
    paths = result.paths
    console.print(f"wrote broker config to [bold]{paths.directory}[/bold] (client auth: {spec.client_auth})")
    if result.new_passwords:
        console.print(f"  new passwords: {', '.join(sorted(result.new_passwords))} (in clients/<id>/password)")
    if result.kept_passwords:
        console.print(f"  kept passwords: {', '.join(result.kept_passwords)}")
    if result.issued_certificates:
        console.print(f"  new client certificates: {', '.join(result.issued_certificates)}")
    if result.kept_certificates:
        console.print(f"  kept client certificates: {', '.join(result.kept_certificates)}")
    if result.removed:
        console.print(
            f"[yellow]  removed from passwd: {', '.join(result.removed)}[/yellow]"
            + (
                " (their client certificates stay valid until they expire)"
                if spec.client_auth.uses_certificates
                else ""
            )
        )
    console.print(
        f"  run: mosquitto -c {paths.config}   (or reload a running one: kill -HUP <pid>)\n"
        f"  hand each device its {paths.directory / 'clients'}/<id>/ folder; keep it secret"
    )


def _fail(exc: EdgefleetError) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)
