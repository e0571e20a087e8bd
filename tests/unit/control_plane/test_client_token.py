"""Where the SDK and the CLI find their API token: first found wins, in a documented order."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.control_plane.client import ADMIN_TOKEN_FILE, resolve_token, token_sources


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    named = tmp_path / "named-token"
    named.write_text("from-token-file\n")
    config = tmp_path / "config" / "edgefleet" / "token"
    config.parent.mkdir(parents=True)
    config.write_text("from-config\n")
    admin = tmp_path / "data" / ADMIN_TOKEN_FILE
    admin.parent.mkdir()
    admin.write_text("from-admin-file\n")
    return {"named": named, "config": config, "admin": admin}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"XDG_CONFIG_HOME": str(tmp_path / "config"), "EDGEFLEET_DATA_DIR": str(tmp_path / "data"), **extra}


def test_the_argument_wins_then_the_variable_then_each_file_in_turn(tmp_path: Path, files: dict[str, Path]) -> None:
    env = _env(tmp_path, EDGEFLEET_TOKEN="from-env", EDGEFLEET_TOKEN_FILE=str(files["named"]))
    assert resolve_token("given", env=env) == "given"
    assert resolve_token(None, env=env) == "from-env"
    del env["EDGEFLEET_TOKEN"]
    assert resolve_token(None, env=env) == "from-token-file"
    del env["EDGEFLEET_TOKEN_FILE"]
    assert resolve_token(None, env=env) == "from-config"
    files["config"].unlink()
    assert resolve_token(None, env=env) == "from-admin-file"
    files["admin"].write_text("\n")  # empty files are skipped
    assert resolve_token(None, env=env) is None


def test_the_admin_file_of_the_servers_default_data_dir_is_the_last_resort(tmp_path: Path) -> None:
    sources = token_sources({"XDG_CONFIG_HOME": str(tmp_path)})
    assert sources == [tmp_path / "edgefleet" / "token", Path(".edgefleet") / ADMIN_TOKEN_FILE]
