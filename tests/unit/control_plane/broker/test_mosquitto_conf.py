"""One mosquitto.conf renderer: the embedded and the production broker share its delivery rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.control_plane.broker.config import BrokerPaths, BrokerSpec, mosquitto_conf_text
from edgefleet.control_plane.broker.embedded import BrokerSettings, mosquitto_config
from edgefleet.control_plane.broker.mosquitto_conf import DeliveryLimits, Listener, render_mosquitto_conf
from edgefleet.shared.errors import ConfigError

SHARED_LINES = {
    "per_listener_settings false",
    "set_tcp_nodelay true",
    "max_queued_messages 100000",
    "max_queued_bytes 0",
    "max_inflight_messages 20",
    f"max_packet_size {2 * 1024 * 1024}",
    "persistence true",
    "persistence_file mosquitto.db",
    "log_dest stderr",
    "connection_messages true",
}


def _lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def test_both_brokers_get_the_same_delivery_and_persistence_rules(tmp_path: Path) -> None:
    embedded = _lines(mosquitto_config(BrokerSettings(), 1883, tmp_path / "broker"))
    production = _lines(mosquitto_conf_text(BrokerSpec(), BrokerPaths(tmp_path / "etc")))
    assert SHARED_LINES <= embedded
    assert SHARED_LINES <= production
    assert f"persistence_location {tmp_path / 'broker'}/" in embedded
    assert "autosave_interval 2" in embedded and "autosave_interval 5" in production


def test_both_brokers_have_the_same_default_limits() -> None:
    settings, spec, limits = BrokerSettings(), BrokerSpec(), DeliveryLimits()
    for name in ("max_queued_messages", "max_inflight_messages", "max_packet_size_bytes"):
        assert getattr(settings, name) == getattr(spec, name) == getattr(limits, name), name


def test_the_embedded_broker_admits_anonymous_clients_only_without_a_password_file(tmp_path: Path) -> None:
    open_conf = _lines(mosquitto_config(BrokerSettings(host="127.0.0.1"), 1884, tmp_path))
    assert "allow_anonymous true" in open_conf and "listener 1884 127.0.0.1" in open_conf
    locked = _lines(
        mosquitto_config(
            BrokerSettings(password_file=tmp_path / "passwd", acl_file=tmp_path / "acl"), 1884, tmp_path
        )
    )
    assert {"allow_anonymous false", f"password_file {tmp_path / 'passwd'}", f"acl_file {tmp_path / 'acl'}"} <= locked
    assert "allow_anonymous true" not in locked


def test_extra_lines_come_last(tmp_path: Path) -> None:
    text = mosquitto_config(BrokerSettings(extra_config=("sys_interval 10",)), 1883, tmp_path)
    assert text.splitlines()[-1] == "sys_interval 10"


@pytest.mark.parametrize(
    "kwargs",
    [
        # unlimited: one stuck persistent session could take the broker's memory
        {"max_queued_messages": 0},
        # under mosquitto's default: drops even sooner
        {"max_queued_messages": 999},
        {"max_inflight_messages": 0},
        {"max_inflight_messages": 65536},
        {"max_packet_size_bytes": 19},
        {"max_packet_size_bytes": 268_435_456},
        {"autosave_interval_s": 0},
    ],
)
def test_limits_that_drop_or_stall_are_refused_for_both_brokers(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        DeliveryLimits(**kwargs)
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        BrokerSettings(**kwargs)


def test_a_value_with_a_line_break_is_refused() -> None:
    listener = Listener(port=1883, bind="127.0.0.1\nallow_anonymous true")
    with pytest.raises(ConfigError, match="line break"):
        render_mosquitto_conf(
            header=(), listeners=[listener], limits=DeliveryLimits(), persistence_dir="/x", password_file=None,
            acl_file=None,
        )
    with pytest.raises(ConfigError, match="listener"):
        render_mosquitto_conf(
            header=(), listeners=[], limits=DeliveryLimits(), persistence_dir="/x", password_file=None, acl_file=None
        )
