"""Alembic's environment: migrate the connection :mod:`edgefleet.control_plane.db.schema` hands over.

Online only (no SQL-script mode): the caller opens the connection, so the engine's own set-up
(SQLite's WAL and ``BEGIN IMMEDIATE``, PostgreSQL's pool) applies to migrations too.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection
from sqlmodel import SQLModel

from edgefleet.control_plane.db import tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from edgefleet.shared.errors import ConfigError


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table where needed.
        render_as_batch=connection.dialect.name == "sqlite",
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise ConfigError("run migrations through edgefleet.control_plane.db.schema (it passes the connection)")
_run(connection)
