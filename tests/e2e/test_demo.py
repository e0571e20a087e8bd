"""``edgefleet demo`` as a user runs it: a real process tree that must pass and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_passes_and_leaves_no_process_behind(tmp_path: Path, broker: str) -> None:
    """Both embedded brokers: Mosquitto when installed, amqtt on a machine without it."""
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet.control_plane",
            "demo",
            "--workdir",
            str(workdir),
            "--embedded-broker",
            broker,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "160"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "demo passed" in output
    assert f"{broker} broker on 127.0.0.1" in output
    # Both models on both agents were checked against the runtimes.
    assert output.count("ok") >= 4, output
    assert _processes_mentioning(str(workdir)) == []
