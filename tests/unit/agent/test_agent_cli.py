"""``edgefleet-agent enroll --template``: a bad template is refused before the one-time token is spent."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.agent.cli import app


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('device_id = "pi"\n[broker\n', "not valid TOML"),
        ("colour = 'blue'\n", "unknown config key 'colour'"),
        ("[transfer]\nchunk_size_bytes = 10\n", "transfer.chunk_size_bytes must be between"),
        ("[api]\nport = 'x'\n", "api.port must be a non-negative integer"),
    ],
)
def test_a_bad_template_fails_before_enrolling(tmp_path: Path, template: str, message: str) -> None:
    path = tmp_path / "template.toml"
    path.write_text(template)
    # nothing listens on the discard port: reaching the server would fail with "cannot reach" instead
    args = ["enroll", "--server", "http://127.0.0.1:9", "--token", "t", "--config", str(tmp_path / "agent.toml")]
    result = CliRunner().invoke(app, [*args, "--template", str(path)])
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "agent.toml").exists()


def test_a_missing_template_is_named(tmp_path: Path) -> None:
    args = ["enroll", "--server", "http://127.0.0.1:9", "--token", "t", "--config", str(tmp_path / "agent.toml")]
    result = CliRunner().invoke(app, [*args, "--template", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1 and "cannot read template" in result.output
