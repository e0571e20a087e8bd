"""ServerSettings: defaults, derived values, environment parsing and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.control_plane.settings import MIB, ServerSettings
from edgefleet.shared.errors import ConfigError


def test_defaults() -> None:
    settings = ServerSettings()
    assert settings.data_dir == Path(".edgefleet")
    assert settings.database_url == "sqlite:///.edgefleet/edgefleet.db"
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8700)
    assert settings.embedded_broker and settings.broker_port is None
    assert settings.desired_state_ttl_s == 7 * 24 * 3600
    assert settings.resign_interval_s == 3600
    assert (settings.max_upload_bytes, settings.max_chunk_bytes, settings.bundle_cache_bytes) == (
        512 * MIB, MIB, 256 * MIB
    )
    assert settings.share_group is None


def test_the_database_defaults_to_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    assert ServerSettings(data_dir=tmp_path).database_url == f"sqlite:///{tmp_path}/edgefleet.db"
    assert ServerSettings(data_dir=tmp_path, database_url="postgresql+psycopg://u@h/db").database_url == (
        "postgresql+psycopg://u@h/db"
    )


def test_from_env_reads_edgefleet_variables(tmp_path: Path) -> None:
    settings = ServerSettings.from_env(
        {
            "EDGEFLEET_DATA_DIR": str(tmp_path),
            "EDGEFLEET_API_PORT": "9000",
            "EDGEFLEET_BROKER_HOST": "mqtt.example",
            "EDGEFLEET_BROKER_PORT": "8883",
            "EDGEFLEET_BROKER_USERNAME": "cp",
            "EDGEFLEET_DESIRED_STATE_TTL_S": "60.5",
            "EDGEFLEET_MAX_UPLOAD_BYTES": "1024",
            "EDGEFLEET_SHARE_GROUP": "cp",
            "EDGEFLEET_BROKER_PASSWORD": "",  # empty = unset
            "UNRELATED": "x",
        },
        api_host="0.0.0.0",
    )
    assert settings.data_dir == tmp_path
    assert settings.database_url == f"sqlite:///{tmp_path}/edgefleet.db"
    assert (settings.api_host, settings.api_port) == ("0.0.0.0", 9000)
    assert (settings.broker_host, settings.broker_port, settings.broker_username) == ("mqtt.example", 8883, "cp")
    assert settings.broker_password is None
    assert settings.desired_state_ttl_s == 60.5
    assert settings.max_upload_bytes == 1024
    assert settings.share_group == "cp"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"EDGEFLEET_API_PORT": "eighty"}, "EDGEFLEET_API_PORT"),
        ({"EDGEFLEET_API_PORT": "0"}, "api_port"),
        ({"EDGEFLEET_MAX_CHUNK_BYTES": "-1"}, "max_chunk_bytes"),
        ({"EDGEFLEET_RESIGN_INTERVAL_S": "0"}, "resign_interval_s"),
        ({"EDGEFLEET_SHARE_GROUP": "a/b"}, "share_group"),
        ({"EDGEFLEET_CLIENT_ID_SUFFIX": "#"}, "client_id_suffix"),
        ({"EDGEFLEET_BROKER_HOST": "h", "EDGEFLEET_BROKER_PORT": "0"}, "embedded"),
    ],
)
def test_invalid_values_are_config_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerSettings.from_env(env)


def test_limits_are_settings_with_the_former_constants_as_defaults() -> None:
    settings = ServerSettings()
    reconnect = (settings.broker_reconnect_min_delay_s, settings.broker_reconnect_max_delay_s)
    assert (settings.broker_keepalive_s, *reconnect) == (30, 1, 30)
    assert (settings.broker_max_inflight_count, settings.ingest_queue_max_count, settings.handler_attempts_count) == (
        20, 10_000, 3
    )
    assert (settings.chunk_grant_ttl_s, settings.max_chunk_grants_count) == (2.0, 10_000)
    assert (settings.bundle_max_open_files_count, settings.bundle_cache_window_divisor_count) == (32, 8)
    assert (settings.upload_max_field_bytes, settings.upload_max_parts_count, settings.upload_form_overhead_bytes) == (
        8 * 1024, 16, 256 * 1024
    )
    assert settings.resign_batch_count == 500


def test_limits_come_from_the_environment_and_are_checked() -> None:
    settings = ServerSettings.from_env({"EDGEFLEET_RESIGN_BATCH_COUNT": "50", "edgefleet_chunk_grant_ttl_s": "0.5"})
    assert (settings.resign_batch_count, settings.chunk_grant_ttl_s) == (50, 0.5)
    with pytest.raises(ConfigError, match="resign_batch_count must be > 0"):
        ServerSettings.from_env({"EDGEFLEET_RESIGN_BATCH_COUNT": "0"})
    with pytest.raises(ConfigError, match="broker_reconnect_max_delay_s must be at least"):
        ServerSettings(broker_reconnect_min_delay_s=10, broker_reconnect_max_delay_s=5)


def test_settings_are_frozen_and_unknown_ones_refused() -> None:
    settings = ServerSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.api_port = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="colour"):
        ServerSettings(colour="blue")  # type: ignore[call-arg]


def test_cli_options_win_over_the_environment() -> None:
    settings = ServerSettings.from_env({"EDGEFLEET_API_PORT": "9000"}, api_port=9100, broker_host=None)
    assert settings.api_port == 9100 and settings.broker_host is None
