"""Fakes and fixtures for control-plane unit tests: a recording publisher and a fresh database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import SQLModel

from edgefleet.control_plane.db.engine import create_db_engine, create_tables


class FakePublisher:
    """Implements ``MessagePublisher`` by recording every publish as (topic, payload, retain)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self.sent.append((topic, payload, retain))


def fresh_engine(tmp_path: Path) -> Iterator[Engine]:
    """A database with the current tables, disposed afterwards (use as a pytest fixture body).

    A SQLite file by default; ``EDGEFLEET_TEST_DATABASE_URL`` runs the same tests on another
    database (e.g. ``postgresql+psycopg://...``), emptied first.
    """
    url = os.environ.get("EDGEFLEET_TEST_DATABASE_URL") or f"sqlite:///{tmp_path / 'cp.db'}"
    engine = create_db_engine(url)
    SQLModel.metadata.drop_all(engine)
    create_tables(engine)
    try:
        yield engine
    finally:
        engine.dispose()
