"""The agent's TOML configuration and its durable state file."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.config import (
    AgentConfig,
    ApiConfig,
    BrokerConfig,
    RuntimeConfig,
    ShadowConfig,
    TransferConfig,
    TrustConfig,
    render_config,
)
from edgefleet.agent.deployment.state_store import (
    STATE_FILE,
    STATE_SCHEMA,
    ActiveModel,
    AgentState,
    InProgress,
    StateStore,
)
from edgefleet.shared.errors import ConfigError

KEY = "ab" * 32


def minimal(**extra: Any) -> dict[str, Any]:
    return {"device_id": "pi-kitchen-01", "data_dir": "/var/lib/edgefleet-agent", **extra}


def full_config(tmp_path: Path) -> AgentConfig:
    """Every section with non-default values, so a round trip cannot pass by falling back to defaults."""
    return AgentConfig(
        device_id="pi-kitchen-01",
        data_dir=tmp_path / "data",
        broker=BrokerConfig(host="broker.local", port=8883, username="pi", password='s3cr"et\\', keepalive_s=10,
                            reconnect_min_s=0.25, reconnect_max_s=12.5, tls_ca_file="/etc/ca.pem"),
        trust=TrustConfig(publisher_keys=(KEY, "cd" * 32), publisher_threshold=2, online_keys=("ef" * 32,)),
        api=ApiConfig(enabled=False, host="0.0.0.0", port=9000, max_request_bytes=1024),
        transfer=TransferConfig(chunk_size_bytes=4096, window_chunks=4, chunk_timeout_s=1.5, max_attempts_per_chunk=3,
                                max_bundle_bytes=10**6),
        runtime=RuntimeConfig(intra_op_threads=4, onnx_providers=("CPUExecutionProvider",)),
        heartbeat_interval_s=15.0,
        health_check_timeout_s=5.5,
        slots_kept_per_model=3,
    )


# --- AgentConfig -------------------------------------------------------------------------------


def test_minimal_config_takes_the_defaults() -> None:
    config = AgentConfig.from_dict(minimal())
    assert config == AgentConfig(device_id="pi-kitchen-01", data_dir=Path("/var/lib/edgefleet-agent"))


def test_full_config_round_trips_through_render_config(tmp_path: Path) -> None:
    config = full_config(tmp_path)
    text = render_config(config)
    assert AgentConfig.from_dict(tomllib.loads(text)) == config


def test_default_config_round_trips_through_render_config(tmp_path: Path) -> None:
    config = AgentConfig(device_id="d1", data_dir=tmp_path)
    assert AgentConfig.from_dict(tomllib.loads(render_config(config))) == config


def test_load_reads_a_file_and_resolves_data_dir_next_to_it(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    path.write_text('device_id = "pi-1"\ndata_dir = "state"\n\n[broker]\nport = 1884\n')
    config = AgentConfig.load(path)
    assert config.data_dir == (tmp_path / "etc" / "state").resolve()
    assert config.broker.port == 1884
    assert config.device_id == "pi-1"


def test_load_round_trips_a_rendered_file(tmp_path: Path) -> None:
    config = full_config(tmp_path)
    path = tmp_path / "agent.toml"
    path.write_text(render_config(config))
    assert AgentConfig.load(path) == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (minimal(colour="blue"), "unknown config key 'colour'"),
        (minimal(broker={"hots": "x"}), r"unknown key 'hots' in \[broker\]"),
        (minimal(trust={"publisher_key": [KEY]}), r"unknown key 'publisher_key' in \[trust\]"),
        (minimal(broker="localhost"), r"\[broker\] must be a table"),
        (minimal(broker={"port": "1883"}), "broker.port must be a non-negative integer"),
        (minimal(broker={"port": True}), "broker.port must be a non-negative integer"),
        (minimal(broker={"port": 1883.0}), "broker.port must be a non-negative integer"),
        (minimal(broker={"keepalive_s": -1}), "broker.keepalive_s must be a non-negative integer"),
        (minimal(broker={"host": 127}), "broker.host must be a string"),
        (minimal(broker={"password": 1234}), "broker.password must be a string"),
        (minimal(broker={"reconnect_min_s": "fast"}), "broker.reconnect_min_s must be a non-negative number"),
        (minimal(broker={"reconnect_min_s": -0.5}), "broker.reconnect_min_s must be a non-negative number"),
        (minimal(api={"enabled": "yes"}), "api.enabled must be true or false"),
        (minimal(api={"enabled": 1}), "api.enabled must be true or false"),
        (minimal(trust={"publisher_keys": KEY}), "trust.publisher_keys must be a list of strings"),
        (minimal(trust={"online_keys": [1]}), "trust.online_keys must be a list of strings"),
        (minimal(runtime={"onnx_providers": "CPU"}), "runtime.onnx_providers must be a list of strings"),
        (minimal(heartbeat_interval_s="60"), "heartbeat_interval_s must be a non-negative number"),
        (minimal(slots_kept_per_model=False), "slots_kept_per_model must be a non-negative integer"),
        (minimal(transfer={"chunk_size_bytes": 512}), "transfer.chunk_size_bytes must be between 1 KiB and 8 MiB"),
        (minimal(transfer={"chunk_size_bytes": 8 * 1024 * 1024 + 1}), "transfer.chunk_size_bytes"),
        ({"data_dir": "/x"}, "device_id must match"),
        (minimal(device_id="a/b"), "device_id must match .*got 'a/b'"),
        (minimal(device_id="+"), r"device_id must match .*got '\+'"),
        (minimal(device_id=""), "device_id must match"),
        (minimal(device_id=7), "device_id must match .*got 7"),
        ({"device_id": "pi"}, "data_dir must be a path string"),
        (minimal(data_dir=["/x"]), "data_dir must be a path string"),
    ],
)
def test_invalid_config_names_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_dict(raw)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        # A threshold of 0 would let bundles install with no valid publisher signature at all.
        (minimal(trust={"publisher_threshold": 0}), "publisher_threshold"),
        # No window: the fetcher never requests a chunk and never gives up.
        (minimal(transfer={"window_chunks": 0}), "window_chunks"),
        # TOML has nan; Event.wait(nan) returns at once, so the heartbeat loop (service.py) would spin.
        (minimal(heartbeat_interval_s=float("nan")), "heartbeat_interval_s"),
        (minimal(broker={"port": 70000}), "broker.port"),
        # DEVICE_ID_RE ends in `$`, which also matches before a trailing newline.
        (minimal(device_id="pi-kitchen-01\n"), "device_id"),
    ],
    ids=["publisher_threshold-0", "window_chunks-0", "nan-interval", "port-70000", "device_id-newline"],
)
def test_values_of_the_right_type_but_no_meaning_are_refused(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        AgentConfig.from_dict(raw)


def test_load_refuses_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi"\n[broker\nport = 1\n')
    with pytest.raises(ConfigError, match="agent.toml: not valid TOML"):
        AgentConfig.load(path)


def test_load_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read agent config .*missing.toml"):
        AgentConfig.load(tmp_path / "missing.toml")


def test_render_config_escapes_control_characters(tmp_path: Path) -> None:
    config = AgentConfig(device_id="d1", data_dir=tmp_path, broker=BrokerConfig(password="line1\nline2\x01"))
    assert AgentConfig.from_dict(tomllib.loads(render_config(config))) == config


# --- StateStore --------------------------------------------------------------------------------

PREVIOUS = ActiveModel(name="detector", version="1.0.0", bundle_digest="sha256:" + "ab" * 32, runtime="onnx",
                       slot="slot-1", model_file="model.onnx")
PROGRESS = InProgress(sequence=8, name="detector", version="1.1.0", bundle_digest="sha256:" + "cd" * 32,
                      bundle_size=1234, runtime="onnx", state="downloading", started_at=1_700_000_000.5,
                      previous=PREVIOUS)


def test_a_new_store_starts_empty_and_writes_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.state == AgentState()
    assert list(tmp_path.iterdir()) == []


def test_update_persists_and_reloads_equal(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    new = store.update(
        desired_envelope='{"payloadType": "x"}',
        accepted_sequence=8,
        applied_sequence=7,
        active={"detector": PREVIOUS},
        in_progress=PROGRESS,
        failed={"classifier": "sha256:" + "ef" * 32},
    )

    assert store.state == new
    assert new.in_progress == PROGRESS
    assert StateStore(tmp_path).state == new
    on_disk = json.loads((tmp_path / STATE_FILE).read_text())
    assert on_disk["schema"] == STATE_SCHEMA
    assert on_disk["in_progress"]["previous"]["slot"] == "slot-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temp file left


def test_update_with_no_previous_model_round_trips(tmp_path: Path) -> None:
    progress = InProgress(**{**PROGRESS.to_dict(), "previous": None})
    StateStore(tmp_path).update(in_progress=progress)
    assert StateStore(tmp_path).state.in_progress == progress


def test_successive_updates_keep_earlier_fields(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.update(accepted_sequence=3)
    store.update(applied_sequence=3)
    assert StateStore(tmp_path).state == AgentState(accepted_sequence=3, applied_sequence=3)


def test_a_failed_write_leaves_the_old_state_in_memory_and_on_disk(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    store.update(accepted_sequence=1)
    before = (tmp_path / STATE_FILE).read_bytes()

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        store.update(accepted_sequence=2)
    monkeypatch.undo()

    assert store.state.accepted_sequence == 1
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


def test_update_refuses_unknown_fields(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with pytest.raises(TypeError, match="sequence"):
        store.update(sequence=1)
    assert not (tmp_path / STATE_FILE).exists()


def _valid_state_file() -> dict[str, Any]:
    return AgentState(accepted_sequence=2, active={"detector": PREVIOUS}, in_progress=PROGRESS).to_dict()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "unreadable"),
        (b"\xff\xfe\x00", "unreadable"),
        (b"", "unreadable"),
        (json.dumps({**_valid_state_file(), "schema": "edgefleet.agent-state/v0"}).encode(),
         "schema 'edgefleet.agent-state/v0'"),
        (json.dumps({k: v for k, v in _valid_state_file().items() if k != "applied_sequence"}).encode(),
         "unreadable.*applied_sequence"),
        (json.dumps({**_valid_state_file(), "accepted_sequence": "many"}).encode(), "unreadable"),
        (json.dumps({**_valid_state_file(), "active": {"detector": {"name": "detector"}}}).encode(), "unreadable"),
        (json.dumps({**_valid_state_file(), "in_progress": "downloading"}).encode(), "unreadable"),
        (b"[]", "unreadable"),
        (b"null", "unreadable"),
    ],
    ids=["not-json", "not-utf8", "empty", "old-schema", "missing-key", "bad-int", "bad-active",
         "bad-in-progress", "json-array", "json-null"],
)
def test_an_unreadable_state_file_is_a_config_error(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        StateStore(tmp_path)


def test_a_state_path_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).mkdir()  # e.g. a botched restore; reading it raises IsADirectoryError
    with pytest.raises(ConfigError, match="unreadable"):
        StateStore(tmp_path)


def test_shadow_limits_are_a_config_section() -> None:
    config = AgentConfig.from_dict({"device_id": "pi", "data_dir": "d", "shadow": {"queue_max_samples": 8}})
    assert config.shadow == ShadowConfig(queue_max_samples=8)
    assert AgentConfig.from_dict(tomllib.loads(render_config(config))).shadow.queue_max_samples == 8
    with pytest.raises(ConfigError, match="shadow.queue_max_samples"):
        AgentConfig.from_dict({"device_id": "pi", "data_dir": "d", "shadow": {"queue_max_samples": 0}})


# --- environment overrides, limits, copies ----------------------------------------------------


def test_environment_variables_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\ndata_dir = "state"\n\n[broker]\nhost = "mqtt.lan"\nport = 1883\n')
    monkeypatch.setenv("EDGEFLEET_AGENT_BROKER__PORT", "8883")
    monkeypatch.setenv("EDGEFLEET_AGENT_HEARTBEAT_INTERVAL_S", "7.5")
    monkeypatch.setenv("EDGEFLEET_AGENT_TRUST__ONLINE_KEYS", f'["{KEY}"]')
    monkeypatch.setenv("EDGEFLEET_AGENT_TRANSFER__PREFER_HTTP", "")  # empty = unset
    config = AgentConfig.load(path)
    assert (config.broker.host, config.broker.port) == ("mqtt.lan", 8883)  # the rest of [broker] stays
    assert config.heartbeat_interval_s == 7.5
    assert config.trust.online_keys == (KEY,)
    assert config.transfer.prefer_http is False


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("EDGEFLEET_AGENT_BROKER__PORT", "eighty", "broker.port must be a non-negative integer"),
        ("EDGEFLEET_AGENT_BROKER__PORT", "70000", "broker.port must be 1..65535"),
        ("EDGEFLEET_AGENT_API__ENABLED", "maybe", "api.enabled must be true or false"),
        ("EDGEFLEET_AGENT_BROKER__COLOUR", "blue", r"unknown key 'colour' in \[broker\]"),
    ],
)
def test_a_bad_environment_value_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_dict(minimal())


def test_limits_are_fields_with_units_and_the_former_constants_as_defaults() -> None:
    config = AgentConfig.from_dict(minimal())
    assert (config.retry_delay_s, config.retire_grace_s) == (5.0, 5.0)
    assert config.broker.max_inflight_count == 20
    assert config.trust.max_pending_versions_count == 64
    assert (config.transfer.bandwidth_burst_s, config.transfer.poll_s, config.transfer.reconnect_grace_s) == (
        0.25, 0.25, 0.5
    )
    tuned = AgentConfig.from_dict(
        minimal(retry_delay_s=1, transfer={"poll_s": 0.05}, trust={"max_pending_versions_count": 8})
    )
    assert (tuned.retry_delay_s, tuned.transfer.poll_s, tuned.trust.max_pending_versions_count) == (1.0, 0.05, 8)
    assert AgentConfig.from_dict(tomllib.loads(render_config(tuned))) == tuned
    with pytest.raises(ConfigError, match="retry_delay_s must be positive"):
        AgentConfig.from_dict(minimal(retry_delay_s=0))


def test_section_defaults_read_on_the_class_as_with_dataclasses() -> None:
    assert ShadowConfig.latency_reservoir_size == ShadowConfig().latency_reservoir_size == 512
    assert TransferConfig(window_chunks=4).window_chunks == 4 and TransferConfig.window_chunks == 32


def test_configs_are_frozen_and_replace_validates(tmp_path: Path) -> None:
    config = full_config(tmp_path)
    with pytest.raises(ValueError, match="frozen"):
        config.broker.port = 1  # type: ignore[misc]
    moved = config.replace(broker=config.broker.replace(port=1884))
    assert (moved.broker.port, moved.broker.host, config.broker.port) == (1884, "broker.local", 8883)
    with pytest.raises(ConfigError, match="broker.port must be a non-negative integer"):
        config.broker.replace(port="1884")
    with pytest.raises(ConfigError, match=r"\[broker\] tls_cert_file and tls_key_file go together"):
        BrokerConfig(tls_cert_file="/c.pem")
