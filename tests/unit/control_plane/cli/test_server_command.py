"""``edgefleet server``: where its settings come from, and what its help says (nothing is started)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

import edgefleet.control_plane.app as app_module
from edgefleet.control_plane.cli.main import app
from edgefleet.control_plane.settings import ServerSettings


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What ``server`` would have run: the settings it built and uvicorn's bind address."""
    seen: dict[str, Any] = {}

    def create_app(settings: ServerSettings) -> str:
        seen["settings"] = settings
        return "app"

    def run(application: object, *, host: str, port: int, **_: object) -> None:
        seen["bind"] = (host, port)

    monkeypatch.setattr(app_module, "create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", run)
    return seen


def _server(tmp_path: Path, *args: str, **env: str) -> None:
    result = CliRunner().invoke(app, ["server", "--data-dir", str(tmp_path), *args], env=env)
    assert result.exit_code == 0, result.output


def test_the_api_address_comes_from_the_environment(tmp_path: Path, started: dict[str, Any]) -> None:
    _server(tmp_path, EDGEFLEET_API_HOST="0.0.0.0", EDGEFLEET_API_PORT="8799")
    assert started["bind"] == ("0.0.0.0", 8799)
    assert (started["settings"].api_host, started["settings"].api_port) == ("0.0.0.0", 8799)


def test_an_option_wins_over_the_environment_and_the_defaults_stay(tmp_path: Path, started: dict[str, Any]) -> None:
    _server(tmp_path, "--host", "127.0.0.2", EDGEFLEET_API_HOST="0.0.0.0")
    assert started["bind"] == ("127.0.0.2", 8700)
    _server(tmp_path)
    assert started["bind"] == ("127.0.0.1", 8700)


def test_the_help_names_every_environment_variable() -> None:
    result = CliRunner().invoke(app, ["server", "--help"], env={"COLUMNS": "240"})
    assert result.exit_code == 0
    for name in ("DATA_DIR", "API_HOST", "API_PORT", "DATABASE_URL", "BROKER_HOST", "BROKER_PORT",
                 "EMBEDDED_BROKER_KIND", "PUBLIC_URL"):
        assert f"[env: EDGEFLEET_{name}]" in result.output
