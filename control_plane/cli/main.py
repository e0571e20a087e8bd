"""``edgefleet``: run the control plane, publish models, deploy them, and run the demo."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from edgefleet.control_plane.cli.broker import app as broker_app
from edgefleet.control_plane.cli.db import app as db_app
from edgefleet.control_plane.cli.output import ApiUrl, AsJson, ask, fail, print_result, print_rows
from edgefleet.control_plane.cli.tokens import app as tokens_app
from edgefleet.control_plane.cli.tokens import audit as audit_command
from edgefleet.control_plane.client import DEFAULT_API_URL, EdgefleetClient
from edgefleet.shared.errors import EdgefleetError

app = typer.Typer(
    help="edgefleet: signed ML model rollouts to edge devices over MQTT.", no_args_is_help=True, add_completion=False
)
models_app = typer.Typer(help="Publish and list models.", no_args_is_help=True)
devices_app = typer.Typer(help="List devices and write agent configs.", no_args_is_help=True)
deployments_app = typer.Typer(help="List deployments.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(devices_app, name="devices")
app.add_typer(deployments_app, name="deployments")
app.add_typer(broker_app, name="broker")
app.add_typer(db_app, name="db")
keys_app = typer.Typer(help="Publisher keys and keyring rotation.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(tokens_app, name="tokens")
app.command("audit")(audit_command)
console = Console()


def _client(api_url: str) -> EdgefleetClient:
    return EdgefleetClient(api_url)


def _fail(exc: EdgefleetError) -> typer.Exit:
    return fail(console, exc)


def _table(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    print_rows(rows, columns, as_json, console=console)


def _env(name: str) -> str:
    """The ``[env: EDGEFLEET_<NAME>]`` hint of an option, escaped: rich would read the brackets as markup."""
    return escape(f"[env: EDGEFLEET_{name}]")


@app.command()
def server(
    data_dir: Annotated[Path | None, typer.Option(help=f"State, keys, bundles. {_env('DATA_DIR')}")] = None,
    host: Annotated[
        str | None, typer.Option(help=f"API listen address (default 127.0.0.1). {_env('API_HOST')}")
    ] = None,
    port: Annotated[int | None, typer.Option(help=f"API port (default 8700). {_env('API_PORT')}")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help=f"SQLAlchemy URL; default SQLite in the data dir. {_env('DATABASE_URL')}"),
    ] = None,
    broker_host: Annotated[
        str | None,
        typer.Option(help=f"External MQTT broker; omit to start an embedded one. {_env('BROKER_HOST')}"),
    ] = None,
    broker_port: Annotated[
        int | None,
        typer.Option(
            help="Broker port (embedded: a free port chosen at the first start, then kept in the data dir). "
            f"{_env('BROKER_PORT')}"
        ),
    ] = None,
    embedded_broker: Annotated[
        str | None,
        typer.Option(
            help=f"auto (mosquitto if installed, else amqtt), mosquitto or amqtt. {_env('EMBEDDED_BROKER_KIND')}"
        ),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(
            help="URL devices reach this server at; desired states then name HTTP bundle URLs. "
            f"{_env('PUBLIC_URL')}"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run the control plane (REST API + MQTT bridge; embedded broker unless --broker-host).

    An option given wins over its environment variable, which wins over the default.
    """
    import logging

    import uvicorn

    from edgefleet.control_plane.app import create_app
    from edgefleet.control_plane.settings import ServerSettings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServerSettings.from_env(
            data_dir=data_dir.resolve() if data_dir else None,
            database_url=database_url,
            api_host=host,
            api_port=port,
            broker_host=broker_host,
            broker_port=broker_port,
            embedded_broker_kind=embedded_broker,
            public_url=public_url,
        )
    except EdgefleetError as exc:
        raise _fail(exc) from exc
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=log_level.lower(),
        access_log=False,
    )


@models_app.command("push")
def models_push(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="An .onnx or .tflite model file.")],
    name: Annotated[str, typer.Option(help="Model name (lowercase, digits, . _ -).")],
    version: Annotated[str, typer.Option(help="Model version, e.g. 1.0.0.")],
    runtime: Annotated[str | None, typer.Option(help="onnx or tflite; default from the file extension.")] = None,
    description: Annotated[str, typer.Option()] = "",
    key: Annotated[
        Path | None,
        typer.Option(
            envvar="EDGEFLEET_PUBLISHER_KEY",
            help="Sign the bundle here with this publisher key (PEM file; or PEM text in $EDGEFLEET_PUBLISHER_KEY_PEM) "
            "and upload only the signed bundle: "
            "the control plane never holds the key. Without it, the control plane signs with its own key.",
        ),
    ] = None,
    min_version: Annotated[
        str | None,
        typer.Option(help="Devices that install this release refuse versions below this one."),
    ] = None,
    health_inputs: Annotated[
        Path | None,
        typer.Option(help=".npz of sample inputs (one array per input) for the device's health check."),
    ] = None,
    latency_budget_ms: Annotated[
        float | None, typer.Option(help="The health-check inference must finish within this.")
    ] = None,
    api_url: ApiUrl = DEFAULT_API_URL,
    as_json: AsJson = False,
) -> None:
    """Publish a model as a signed bundle (signed here with --key, or by the control plane)."""
    try:
        with _client(api_url) as client:
            if key is not None or os.environ.get("EDGEFLEET_PUBLISHER_KEY_PEM"):
                from edgefleet.control_plane.services.signing_local import build_signed_bundle

                bundle = build_signed_bundle(
                    file,
                    name=name,
                    version=version,
                    runtime=runtime,
                    description=description,
                    key_file=key,
                    min_version=min_version,
                    health_inputs=health_inputs,
                    latency_budget_ms=latency_budget_ms,
                )
                try:
                    result = client.push_bundle(bundle)
                finally:
                    bundle.unlink(missing_ok=True)
            else:
                result = _upload_model(
                    client,
                    file,
                    name=name,
                    version=version,
                    runtime=runtime,
                    description=description,
                    min_version=min_version,
                    health_inputs=health_inputs,
                    latency_budget_ms=latency_budget_ms,
                )
    except EdgefleetError as exc:
        raise _fail(exc) from exc
    print_result(
        result,
        as_json,
        console=console,
        summary=lambda r: (
            f"published [bold]{r['name']}:{r['version']}[/bold] ({r['runtime']}) "
            f"bundle {r['bundle_digest'][:19]}… {r['bundle_size']} bytes"
        ),
    )


def _upload_model(
    client: EdgefleetClient,
    file: Path,
    *,
    name: str,
    version: str,
    runtime: str | None,
    description: str,
    min_version: str | None,
    health_inputs: Path | None,
    latency_budget_ms: float | None,
) -> dict[str, Any]:
    """``POST /api/v1/models`` with every option of ``models push``, so none is dropped without --key."""
    data = {"name": name, "version": version, "description": description}
    if runtime:
        data["runtime"] = runtime
    if min_version is not None:
        data["min_version"] = min_version
    if latency_budget_ms is not None:
        data["latency_budget_ms"] = repr(latency_budget_ms)
    with contextlib.ExitStack() as stack:
        files = {"file": (file.name, stack.enter_context(file.open("rb")))}
        if health_inputs is not None:
            files["health_inputs"] = (health_inputs.name, stack.enter_context(health_inputs.open("rb")))
        # EdgefleetClient.push_model takes none of the health-check options yet: the request is
        # built here, through the client's one error mapping.
        result: dict[str, Any] = client._call("POST", "/api/v1/models", data=data, files=files)
    return result


@models_app.command("list")
def models_list(api_url: ApiUrl = DEFAULT_API_URL, as_json: AsJson = False) -> None:
    """List published model versions."""
    rows = ask(api_url, lambda client: client.models(), _fail)
    _table(rows, ["name", "version", "runtime", "bundle_size", "created_at"], as_json)


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    device: Annotated[list[str], typer.Option("--device", "-d", help="Target device id; repeatable.")],
    wait: Annotated[bool, typer.Option(help="Wait until every device reports an outcome.")] = False,
    timeout_s: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 120.0,
    api_url: ApiUrl = DEFAULT_API_URL,
    as_json: AsJson = False,
) -> None:
    """Deploy a published model version to devices."""

    def deploy_and_wait(client: EdgefleetClient) -> list[dict[str, Any]]:
        rows = client.deploy(name, version, devices=device)
        if wait:
            rows = client.wait_for_deployments([r["id"] for r in rows], timeout_s=timeout_s)
        return rows

    rows = ask(api_url, deploy_and_wait, _fail)
    _table(rows, ["id", "device_id", "model_name", "version", "status", "message"], as_json)
    if wait and any(r["status"] != "succeeded" for r in rows):
        raise typer.Exit(1)


@app.command()
def shadow(
    name: Annotated[str, typer.Argument(help="Model name (already deployed to the devices).")],
    version: Annotated[str, typer.Argument(help="Candidate version: same inputs, never served.")],
    device: Annotated[list[str], typer.Option("--device", "-d", help="Target device id; repeatable.")],
    sample_rate: Annotated[float, typer.Option(help="Fraction of requests mirrored, in (0, 1].")] = 0.1,
    api_url: ApiUrl = DEFAULT_API_URL,
    as_json: AsJson = False,
) -> None:
    """Run a candidate version beside the serving one on sampled inputs; compare, never serve."""
    rows = ask(api_url, lambda client: client.shadow(name, version, devices=device, sample_rate=sample_rate), _fail)
    _table(rows, ["device_id", "model_name", "serving_version", "version", "sample_rate", "agreement"], as_json)


@devices_app.command("list")
def devices_list(api_url: ApiUrl = DEFAULT_API_URL, as_json: AsJson = False) -> None:
    """List devices with their online status."""
    rows = ask(api_url, lambda client: client.devices(), _fail)
    _table(rows, ["id", "online", "applied_sequence", "desired_sequence", "last_seen_at"], as_json)


@devices_app.command("agent-config")
def devices_agent_config(
    device_id: Annotated[str, typer.Argument(help="The new device's id.")],
    out: Annotated[Path, typer.Option(help="Where to write the agent's TOML config.")],
    data_dir: Annotated[str, typer.Option(help="The agent's data dir (relative to the config file).")] = "agent-data",
    api_port: Annotated[int, typer.Option(help="The agent's local inference API port.")] = 8701,
    api_url: ApiUrl = DEFAULT_API_URL,
) -> None:
    """Write an agent config that pins this control plane's keys and points at its broker."""
    from edgefleet.control_plane.devtools.agent_toml import agent_toml

    info = ask(api_url, lambda client: client.info(), _fail)
    text = agent_toml(
        {
            "device_id": device_id,
            "data_dir": data_dir,
            "broker": {"host": info["broker"]["host"], "port": info["broker"]["port"]},
            "trust": {"publisher_keys": info["keys"]["publisher"], "online_keys": info["keys"]["online"]},
            "api": {"port": api_port},
        }
    )
    out.write_text(text)
    console.print(f"wrote {out}; start the agent with: edgefleet-agent run --config {out}")


@devices_app.command("enroll")
def devices_enroll(
    device_id: Annotated[str, typer.Argument(help="The new device's id.")],
    ttl_s: Annotated[int, typer.Option(help="Seconds the token stays valid.")] = 3600,
    api_url: ApiUrl = DEFAULT_API_URL,
) -> None:
    """Issue a one-time enrollment token for a device."""
    token = ask(api_url, lambda client: client.create_enrollment(device_id, ttl_s=ttl_s), _fail)
    console.print(f"token for [bold]{device_id}[/bold] (valid until {token['expires_at']}, usable once):")
    typer.echo(token["token"])
    console.print(
        f"on the device: edgefleet-agent enroll --server {api_url} --token {token['token']} --config agent.toml"
    )


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="Where to write the new private key (PEM, mode 0600).")],
) -> None:
    """Create a publisher key (keep it in CI's secrets); prints its public key for `keys rotate`."""
    from edgefleet.shared.trust.signing import SigningKey

    if out.exists():
        raise _fail(EdgefleetError(f"{out} exists; refusing to overwrite a key"))
    key = SigningKey.load_or_create(out)
    typer.echo(key.public_hex)


@keys_app.command("rotate")
def keys_rotate(
    publisher_key: Annotated[
        list[str] | None, typer.Option(help="Hex public key trusted to sign bundles (repeatable; replaces all).")
    ] = None,
    publisher_threshold: Annotated[int | None, typer.Option(help="Signatures a bundle needs.")] = None,
    rotate_online: Annotated[bool, typer.Option(help="New online key; desired states are re-signed.")] = False,
    rotate_root: Annotated[bool, typer.Option(help="New root key, signed by the old and the new one.")] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    as_json: AsJson = False,
) -> None:
    """Issue the next keyring version and publish it to every device."""
    result = ask(
        api_url,
        lambda client: client.rotate_keyring(
            publisher_keys=publisher_key or None,
            publisher_threshold=publisher_threshold,
            rotate_online=rotate_online,
            rotate_root=rotate_root,
        ),
        _fail,
    )
    print_result(
        result,
        as_json,
        console=console,
        summary=lambda r: (
            f"keyring v{r['version']}: publishers {[k[:12] for k in r['publisher_keys']]}, "
            f"online {[k[:12] for k in r['online_keys']]}"
        ),
    )


@deployments_app.command("list")
def deployments_list(
    device: Annotated[str | None, typer.Option(help="Only this device.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    api_url: ApiUrl = DEFAULT_API_URL,
    as_json: AsJson = False,
) -> None:
    """List deployments and their outcomes."""
    rows = ask(api_url, lambda client: client.deployments(device=device, model=model), _fail)
    _table(rows, ["id", "device_id", "model_name", "version", "status", "updated_at"], as_json)


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Keep everything here instead of a temp dir.")] = None,
    agents: Annotated[int, typer.Option(min=1, max=8, help="How many agents to start.")] = 2,
    embedded_broker: Annotated[str, typer.Option(help="auto, mosquitto or amqtt.")] = "auto",
) -> None:
    """End to end on one machine: broker, control plane, agents, two real models, inference checks."""
    from edgefleet.control_plane.devtools.demo import run_demo

    raise typer.Exit(run_demo(workdir=workdir, n_agents=agents, console=console, embedded_broker=embedded_broker))


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
