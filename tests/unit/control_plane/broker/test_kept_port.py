"""The embedded broker's port file: read, written, refused when it holds no port."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.control_plane.broker.kept_port import embedded_port, keep_port, port_file, read_kept_port
from edgefleet.shared.errors import ConfigError


def test_a_first_start_picks_a_port_and_later_starts_keep_it(tmp_path: Path) -> None:
    assert read_kept_port(tmp_path) is None
    assert embedded_port(tmp_path, None) == 0  # pick a free one
    keep_port(tmp_path, 41883)
    assert port_file(tmp_path).read_text() == "41883\n"
    assert embedded_port(tmp_path, None) == 41883
    assert embedded_port(tmp_path, 0) == 41883


def test_a_configured_port_wins_and_is_kept_from_then_on(tmp_path: Path) -> None:
    keep_port(tmp_path, 41883)
    assert embedded_port(tmp_path, 42000) == 42000
    keep_port(tmp_path, 42000)
    assert embedded_port(tmp_path, None) == 42000


@pytest.mark.parametrize("content", [b"", b"abc\n", b"0\n", b"65536\n", b"-1\n", b"1" * 40, b"\xff\xfe"])
def test_a_port_file_that_holds_no_port_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    port_file(tmp_path).write_bytes(content)
    with pytest.raises(ConfigError, match="port"):
        read_kept_port(tmp_path)
