"""Agents on shared machinery over the in-memory broker: what each publishes, and the host's rules."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.memory_link import MemoryBroker

from edgefleet.agent.config import AgentConfig, ApiConfig, BrokerConfig
from edgefleet.agent.fleet_host import AgentHost
from edgefleet.agent.service import Agent
from edgefleet.shared.errors import ConfigError
from edgefleet.shared.wire.messages import DeviceStatus, ReportedState
from edgefleet.shared.wire.topics import Leaf, device_topic


def _config(tmp_path: Path, device_id: str) -> AgentConfig:
    return AgentConfig(
        device_id=device_id,
        data_dir=tmp_path / device_id,
        broker=BrokerConfig(host="memory", port=1883),
        api=ApiConfig(enabled=False),
        heartbeat_interval_s=3600.0,
    )


def _wait(predicate: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_an_agent_on_the_fake_broker_says_online_reports_and_says_offline(tmp_path: Path) -> None:
    broker = MemoryBroker(autodeliver=True)
    agent = Agent(_config(tmp_path, "dev-1"), link_factory=broker)
    agent.start()
    try:
        status_topic = device_topic("dev-1", Leaf.STATUS)
        reported_topic = device_topic("dev-1", Leaf.REPORTED)
        assert _wait(lambda: reported_topic in broker.retained)
        assert DeviceStatus.decode(broker.retained[status_topic]).online is True
        report = ReportedState.decode(broker.retained[reported_topic])
        assert report.device_id == "dev-1" and report.models == ()
    finally:
        agent.stop()
    assert DeviceStatus.decode(broker.retained[status_topic]).online is False


def test_a_host_refuses_the_same_device_twice(tmp_path: Path) -> None:
    host = AgentHost([_config(tmp_path, "dev-1")])
    with pytest.raises(ConfigError):
        host.add(_config(tmp_path, "dev-1"))
    assert list(host.agents) == ["dev-1"]
    host.resources.stop()
