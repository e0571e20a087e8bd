"""Bring a database's schema to this release's: the alembic migrations in ``db/migrations/``.

The control plane calls :func:`upgrade_schema` at every start (``edgefleet db upgrade`` does the
same by hand, ``edgefleet db current`` tells where a database stands). Three cases::

    empty database                  -> every revision from the baseline up
    made before migrations existed  -> missing baseline tables created (what create_all did at
      (tables, no alembic_version)     each start), stamped at the baseline, then upgraded
    migrated before                 -> the revisions it lacks

All of it runs in one transaction on one connection, so a failure leaves the schema as it was
(SQLite and PostgreSQL both have transactional DDL). Control planes starting together against
one PostgreSQL database take turns on an advisory lock; on SQLite ``BEGIN IMMEDIATE`` (see
:mod:`edgefleet.control_plane.db.engine`) does the same.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, MetaData, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from edgefleet.shared.errors import ConfigError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BASELINE_REVISION = "0001"
VERSION_TABLE = "alembic_version"
_PG_LOCK_KEY = 0x6564_6765_666C  # "edgefl": any constant both replicas agree on


@dataclass(frozen=True, kw_only=True)
class SchemaUpgrade:
    """What :func:`upgrade_schema` did."""

    before: str | None  # revision found; None for an empty database or one made before migrations
    after: str
    stamped: bool  # the database predates migrations and was stamped at the baseline first


def alembic_config(connection: Connection | None = None) -> Config:
    """An alembic configuration for the packaged migrations (no ``alembic.ini`` needed).

    Args:
        connection: The connection ``env.py`` migrates; None for commands that touch no
            database (``revision``, ``history``).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this release knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None  # the baseline exists
    return head


def baseline_metadata() -> MetaData:
    """The baseline revision's tables (what ``create_all`` made before migrations existed)."""
    module = importlib.import_module(f"{__package__}.migrations.versions.v0001_baseline")
    baseline: MetaData = module.BASELINE
    return baseline


def current_revision(engine: Engine) -> str | None:
    """The database's revision; None if it has none (empty, or made before migrations).

    Raises:
        ConfigError: The database cannot be reached or read.
    """
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the schema revision: {exc}") from exc


def upgrade_schema(engine: Engine, revision: str = "head") -> SchemaUpgrade:
    """Upgrade the database to ``revision`` (default: this release's newest), in one transaction.

    Args:
        engine: From :func:`edgefleet.control_plane.db.engine.create_db_engine`.
        revision: An alembic revision id, or "head".

    Returns:
        Where the database was and where it is now.

    Raises:
        ConfigError: The database cannot be reached, holds a revision this release does not
            know (it was migrated by a newer one), or a migration failed (nothing changed).
    """
    try:
        with engine.connect() as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            before = MigrationContext.configure(connection).get_current_revision()
            config = alembic_config(connection)
            stamped = before is None and _predates_migrations(connection)
            if stamped:
                baseline_metadata().create_all(connection)  # an older database may lack a table
                command.stamp(config, BASELINE_REVISION)
            command.upgrade(config, revision)
            after = MigrationContext.configure(connection).get_current_revision()
    except CommandError as exc:
        raise ConfigError(f"cannot migrate the database (was it migrated by a newer edgefleet?): {exc}") from exc
    except SQLAlchemyError as exc:
        raise ConfigError(f"migrating the database failed, nothing was changed: {exc}") from exc
    assert after is not None
    if after != before:
        log.info("database schema %s -> %s%s", before or "none", after, " (stamped at the baseline)" if stamped else "")
    return SchemaUpgrade(before=before, after=after, stamped=stamped)


def _predates_migrations(connection: Connection) -> bool:
    """Whether the database holds edgefleet tables but no revision (made by ``create_all``)."""
    existing = set(inspect(connection).get_table_names())
    return VERSION_TABLE not in existing and bool(existing & set(baseline_metadata().tables))
