"""Shared fixtures. Broker fixtures: a real Mosquitto on a free port, never the system one on 1883."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from support.control_plane import fresh_engine

from edgefleet.control_plane.broker.embedded import BrokerSettings, MosquittoBroker, find_mosquitto, start_mosquitto
from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.services.keys import ControlPlaneKeys, load_or_create_keys

_MISSING_MOSQUITTO = (
    "the mosquitto binary is required by these tests and was not found on PATH or in /usr/sbin; "
    "install mosquitto: apt-get install mosquitto"
)


def _start(data_dir: Path) -> MosquittoBroker:
    binary = find_mosquitto()
    if binary is None:
        pytest.fail(_MISSING_MOSQUITTO, pytrace=False)
    return start_mosquitto(BrokerSettings(data_dir=data_dir), binary=binary)


def _running(data_dir: Path) -> Iterator[MosquittoBroker]:
    handle = _start(data_dir)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A Mosquitto shared by the whole session. Do not stop, kill or restart it: use ``fresh_mosquitto``."""
    yield from _running(tmp_path_factory.mktemp("mosquitto"))


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto of this test's own, free to restart(), kill() or stop()."""
    yield from _running(tmp_path / "mosquitto")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A fresh control-plane database (see :func:`support.control_plane.fresh_engine`); a module may
    override it with a fixture of the same name that requests this one and seeds it."""
    yield from fresh_engine(tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BundleStore]:
    """A bundle store of this test's own with a 1 MiB chunk cache; a module may override it (another cache size)."""
    store = BundleStore(tmp_path / "bundles", cache_bytes=1 << 20)
    yield store
    store.close()


@pytest.fixture
def keys(tmp_path: Path) -> ControlPlaneKeys:
    """The control plane's signing keys, created in this test's own directory."""
    return load_or_create_keys(tmp_path / "keys")
