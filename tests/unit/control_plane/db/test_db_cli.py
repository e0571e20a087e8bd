"""``edgefleet db current`` and ``edgefleet db upgrade`` on a data dir's SQLite database."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from edgefleet.control_plane.cli.main import app
from edgefleet.control_plane.db.schema import BASELINE_REVISION, head_revision


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["db", *args], env={"EDGEFLEET_DATABASE_URL": ""})
    return result.exit_code, result.output


def test_current_needs_a_database_and_upgrade_makes_one(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "cp")
    code, output = _run("current", "--data-dir", data_dir)
    assert code == 1 and "no control-plane database" in output
    assert _run("upgrade", "--data-dir", data_dir, "--revision", BASELINE_REVISION) == (
        0, f"upgraded none -> {BASELINE_REVISION}\n"
    )
    code, output = _run("current", "--data-dir", data_dir)
    assert code == 0 and output.startswith(f"{BASELINE_REVISION} (head is {head_revision()}")
    assert _run("upgrade", "--data-dir", data_dir) == (0, f"upgraded {BASELINE_REVISION} -> {head_revision()}\n")
    assert _run("upgrade", "--data-dir", data_dir) == (0, f"already at {head_revision()}\n")
    assert _run("current", "--data-dir", data_dir) == (0, f"{head_revision()} (head)\n")
