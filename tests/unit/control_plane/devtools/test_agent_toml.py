"""The control plane writes agent configs as text, and the agent reads them as a user's file."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig
from edgefleet.control_plane.devtools.agent_toml import agent_toml

REPO = Path(__file__).resolve().parents[4]


def test_what_the_control_plane_writes_the_agent_reads() -> None:
    text = agent_toml(
        {
            "device_id": "pi-1",
            "data_dir": "data",
            "heartbeat_interval_s": 5.0,
            "broker": {"host": "127.0.0.1", "port": 1883, "password": 'a"b\\c\n', "username": None},
            "trust": {"online_keys": ["ab" * 32], "publisher_keys": ()},
            "api": {"enabled": False, "port": 8701},
        }
    )
    config = AgentConfig.from_dict(tomllib.loads(text), base_dir=Path("/etc/agent"))
    assert config.data_dir == Path("/etc/agent/data")
    assert (config.broker.port, config.broker.password, config.broker.username) == (1883, 'a"b\\c\n', None)
    assert config.trust.online_keys == ("ab" * 32,) and config.trust.publisher_keys == ()
    assert config.api.enabled is False and config.heartbeat_interval_s == 5.0


def test_values_toml_cannot_hold_are_refused() -> None:
    with pytest.raises(TypeError, match="set"):
        agent_toml({"broker": {"hosts": {"a", "b"}}})


@pytest.mark.parametrize("folder", ["control_plane/devtools", "control_plane/cli", "control_plane/broker"])
def test_control_plane_tooling_never_imports_the_agent(folder: str) -> None:
    for path in sorted((REPO / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n == "edgefleet.agent" or n.startswith("edgefleet.agent.")], path
