"""``edgefleet-agent``: run an edge agent."""

from __future__ import annotations

import logging
import signal
import threading
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.agent.config import AgentConfig, ApiConfig, BrokerConfig, TrustConfig, render_config
from edgefleet.shared.errors import ConfigError, EdgefleetError

app = typer.Typer(
    help="The edgefleet agent: receives signed model bundles over MQTT and serves them locally.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Agent config file (TOML).")],
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = AgentConfig.load(config)
    except EdgefleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    from edgefleet.agent.service import Agent  # imported late: `--help` should not pay for runtimes

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        agent = Agent(cfg)
    except EdgefleetError as exc:  # e.g. unreadable TLS files or keyring
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    agent.run_until(stop)


@app.command("init-config")
def init_config(
    path: Annotated[Path, typer.Argument(help="Where to write the config.")],
    device_id: Annotated[str, typer.Option(help="This device's id.")],
    data_dir: Annotated[str, typer.Option(help="Where the agent keeps state and models.")] = "./agent-data",
    broker_host: Annotated[str, typer.Option()] = "127.0.0.1",
    broker_port: Annotated[int, typer.Option()] = 1883,
    api_port: Annotated[int, typer.Option(help="Local inference API port (127.0.0.1).")] = 8701,
    publisher_key: Annotated[
        list[str] | None, typer.Option(help="Trusted publisher public key (hex); repeatable.")
    ] = None,
    online_key: Annotated[
        list[str] | None, typer.Option(help="Trusted control-plane online key (hex); repeatable.")
    ] = None,
) -> None:
    """Write an agent config file."""
    cfg = AgentConfig.from_dict({"device_id": device_id, "data_dir": data_dir}, base_dir=path.parent)
    cfg = cfg.replace(
        broker=BrokerConfig(host=broker_host, port=broker_port),
        trust=TrustConfig(publisher_keys=tuple(publisher_key or ()), online_keys=tuple(online_key or ())),
        api=ApiConfig(port=api_port),
    )
    path.write_text(render_config(cfg))
    typer.echo(f"wrote {path}")


@app.command()
def enroll(
    server: Annotated[str, typer.Option(help="Control plane URL, e.g. https://cp.example.com.")],
    token: Annotated[
        str, typer.Option(envvar="EDGEFLEET_ENROLL_TOKEN", help="One-time token from `edgefleet devices enroll`.")
    ],
    config: Annotated[Path, typer.Option("--config", "-c", help="Where to write the agent config (TOML).")],
    template: Annotated[
        Path | None,
        typer.Option(
            help="An agent config (TOML) to start from: every key but the broker's address and credentials "
            "and the trust pin, which enrollment decides; device_id and data_dir may be left out."
        ),
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="Agent state dir, relative to the config file [default: agent-data].")
    ] = None,
    api_port: Annotated[int | None, typer.Option(help="Local inference API port (127.0.0.1) [default: 8701].")] = None,
    broker_host: Annotated[str | None, typer.Option(help="Override the broker host the control plane reports.")] = None,
    broker_port: Annotated[int | None, typer.Option(help="Override the broker port the control plane reports.")] = None,
) -> None:
    """Enroll this device: consume a one-time token, pin the keyring, write the agent config."""
    from edgefleet.agent.enrollment import enroll_device, write_enrolled_config

    try:
        raw = _read_template(template)
        raw["data_dir"] = data_dir or raw.get("data_dir", "agent-data")
        if api_port is not None:
            api = raw.get("api", {})
            raw["api"] = {**api, "port": api_port} if isinstance(api, dict) else api
        # checked before the token is spent; enrollment decides the device id (relative paths stay
        # relative: the agent reads them next to its config)
        base = AgentConfig(**{"device_id": "unenrolled", **raw})
        enrolled = enroll_device(server, token)
    except EdgefleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    enrolled = replace(
        enrolled, broker_host=broker_host or enrolled.broker_host, broker_port=broker_port or enrolled.broker_port
    )
    write_enrolled_config(enrolled, config, base)
    typer.echo(
        f"enrolled {enrolled.device_id}: keyring v{enrolled.keyring.version} pinned; "
        f"start with: edgefleet-agent run --config {config}"
    )


def _read_template(path: Path | None) -> dict[str, Any]:
    """The template's TOML table (empty without one).

    Raises:
        ConfigError: The file cannot be read or is not TOML.
    """
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read template {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def main() -> None:
    """Console entry point."""
    app()
