"""The database engine: SQLite by default, PostgreSQL (``postgresql+psycopg://``) for fleets.

SQLite is set up for a server that writes from several threads (API workers, the MQTT ingest
worker, the scheduler):

- WAL with ``synchronous=NORMAL``: readers never block the writer, and a commit costs no fsync
  (a power cut may lose the last commits, never corrupt the file).
- ``BEGIN IMMEDIATE`` for every transaction. With SQLite's default deferred ``BEGIN`` a
  transaction that reads and then writes fails at once with ``SQLITE_BUSY`` when another
  connection committed in between (a WAL snapshot cannot be upgraded), and ``busy_timeout``
  does not help. Taking the write lock up front turns that failure into a short wait.
- ``check_same_thread=False``: connections come from a pool and move between threads.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel, create_engine

from edgefleet.control_plane.db import tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from edgefleet.shared.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 10_000  # milliseconds a writer waits for the lock before failing


def create_db_engine(database_url: str) -> Engine:
    """Create the engine for ``database_url``, with the SQLite settings above where it applies.

    Args:
        database_url: A SQLAlchemy URL: ``sqlite:///path.db`` or ``postgresql+psycopg://...``.

    Returns:
        The engine; bring its schema up to date with
        :func:`edgefleet.control_plane.db.schema.upgrade_schema` before first use.

    Raises:
        ConfigError: The URL does not parse.
    """
    try:
        url = make_url(database_url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError, but also ValueError on odd input
        raise ConfigError(f"database_url does not parse: {exc}") from exc
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    # pool_pre_ping: a PostgreSQL restart or failover leaves dead pooled connections behind.
    return create_engine(url, pool_pre_ping=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Autocommit at the driver level, so that the "begin" hook below decides how a
        # transaction starts instead of pysqlite's implicit deferred BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_tables(engine: Engine) -> None:
    """Create the current tables directly, without migrations (existing ones are left as they are).

    For tests and throwaway databases only: a control plane's database is brought up to date
    by :func:`edgefleet.control_plane.db.schema.upgrade_schema`, which also records the revision.
    """
    SQLModel.metadata.create_all(engine)

