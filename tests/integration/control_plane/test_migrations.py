"""Schema migrations: a populated baseline database upgraded to head keeps every row, and the
shadow assignments move to the ``shadow`` table; a database made before migrations (by
``create_all`` of the baseline tables) is stamped and upgraded; the head schema is exactly
what ``db/tables.py`` declares.

Every test runs on SQLite, and on PostgreSQL when one answers at 127.0.0.1:5432 (trust auth,
user postgres): each run creates a database of its own with a random name and drops it after.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel, select

from edgefleet.control_plane.db.engine import create_db_engine
from edgefleet.control_plane.db.schema import (
    BASELINE_REVISION,
    baseline_metadata,
    current_revision,
    head_revision,
    upgrade_schema,
)
from edgefleet.control_plane.db.tables import (
    Assignment,
    Deployment,
    Device,
    DeviceEvent,
    Enrollment,
    ModelVersion,
    Shadow,
    active_shadow,
    shadow_version,
)
from edgefleet.shared.errors import ConfigError

POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
T = datetime(2026, 11, 30, 12, 0, 0)  # naive UTC, as the baseline's DateTime columns hold it


def _postgres_reason() -> str | None:
    """Why PostgreSQL tests are skipped, or None if they can run."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'edgefleet[postgres]')"
    engine = create_engine(f"{POSTGRES_SERVER}/test", connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            return None
    except OperationalError as exc:
        return f"no PostgreSQL at 127.0.0.1:5432: {str(exc).splitlines()[0]}"
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cp.db'}"
        return
    reason = _postgres_reason()
    if reason is not None:
        pytest.skip(reason)
    name = "edgefleet_migrations_" + secrets.token_hex(6)
    admin = create_engine(f"{POSTGRES_SERVER}/test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield f"{POSTGRES_SERVER}/{name}"
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_db_engine(database_url)
    yield engine
    engine.dispose()


def _digest(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def _populate_baseline(engine: Engine) -> dict[str, int]:
    """Rows in every baseline table, written with plain SQL as the baseline schema holds them."""
    rows: dict[str, list[dict[str, Any]]] = {
        "device": [
            {
                "id": f"dev-{i}", "created_at": T, "last_seen_at": T if i else None, "online": i % 2 == 0,
                "desired_sequence": 3 + i, "desired_issued_at": 1.5, "desired_expires_at": 2.5,
                "desired_envelope": "{}", "applied_sequence": 2, "reported_ts": 1.25,
                "reported_json": json.dumps({"device_id": f"dev-{i}"}), "agent_json": "{}", "broker_password_hash": "",
            }
            for i in range(3)
        ],
        "modelversion": [
            {
                "name": "clf", "version": v, "runtime": "onnx", "bundle_digest": _digest(n), "bundle_size": 100 + n,
                "manifest_json": "{}", "created_at": T,
            }
            for n, v in enumerate(["1.0.0", "2.0.0", "3.0.0"], start=1)
        ],
        "assignment": [{"device_id": f"dev-{i}", "model_name": "clf", "version": "1.0.0"} for i in range(3)],
        "shadowassignment": [
            {"device_id": "dev-0", "model_name": "clf", "version": "2.0.0", "sample_rate": 0.25, "created_at": T},
            {"device_id": "dev-1", "model_name": "clf", "version": "3.0.0", "sample_rate": 1.0, "created_at": T},
        ],
        "deployment": [
            {
                "device_id": f"dev-{i}", "model_name": "clf", "version": "1.0.0", "bundle_digest": _digest(1),
                "sequence": 1, "error_code": "", "status": "succeeded", "message": "ok", "created_at": T,
                "updated_at": T,
            }
            for i in range(3)
        ],
        "deviceevent": [
            {
                "event_id": f"e-{i}", "device_id": "dev-0", "ts": 1.0 + i, "kind": "deployment",
                "payload_json": "{}", "received_at": T,
            }
            for i in range(4)
        ],
        "enrollment": [
            {"token_sha256": "a" * 64, "device_id": "dev-2", "created_at": T, "expires_at": T, "used_at": None}
        ],
    }
    tables = baseline_metadata().tables
    with engine.begin() as connection:
        for name, values in rows.items():
            connection.execute(tables[name].insert(), values)
    return {name: len(values) for name, values in rows.items()}


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def _check_upgraded(engine: Engine, counts: dict[str, int]) -> None:
    """Every baseline row is there at head, and the shadow assignments are ``shadow`` rows."""
    assert current_revision(engine) == head_revision()
    for table, count in counts.items():
        if table != "shadowassignment":
            assert _count(engine, table) == count, table
    assert "shadowassignment" not in inspect(engine).get_table_names()
    with Session(engine) as session:
        shadows = session.exec(select(Shadow).order_by(Shadow.device_id)).all()
        assert [(s.device_id, s.model_name, s.version, s.bundle_digest, s.sample_rate) for s in shadows] == [
            ("dev-0", "clf", "2.0.0", _digest(2), 0.25),
            ("dev-1", "clf", "3.0.0", _digest(3), 1.0),
        ]
        assert all(s.removed_at is None and s.created_at == T.replace(tzinfo=UTC) for s in shadows)
        # The moved rows work with the queries the services and ingest run on them.
        joined = session.exec(
            select(Shadow.device_id, ModelVersion.bundle_digest).join(ModelVersion, shadow_version())
        ).all()
        assert sorted(joined) == [("dev-0", _digest(2)), ("dev-1", _digest(3))]
        assert len(session.exec(select(Device)).all()) == counts["device"]
        device = session.get(Device, "dev-1")
        assert device is not None and device.desired_sequence == 4 and device.last_seen_at == T.replace(tzinfo=UTC)
        assert len(session.exec(select(Assignment)).all()) == counts["assignment"]
        assert {d.status for d in session.exec(select(Deployment)).all()} == {"succeeded"}
        assert len(session.exec(select(DeviceEvent)).all()) == counts["deviceevent"]
        assert session.get(Enrollment, "a" * 64) is not None
        # One shadow per (device, model), as before.
        session.add(
            Shadow(
                device_id="dev-0", model_name="clf", version="3.0.0", bundle_digest=_digest(3), sample_rate=0.5,
                created_at=datetime.now(UTC),
            )
        )
        with pytest.raises(Exception, match="(?i)unique"):
            session.commit()


def test_a_populated_baseline_database_upgrades_to_head_with_every_row(engine: Engine) -> None:
    assert upgrade_schema(engine, BASELINE_REVISION).after == BASELINE_REVISION
    counts = _populate_baseline(engine)
    done = upgrade_schema(engine)
    assert (done.before, done.after, done.stamped) == (BASELINE_REVISION, head_revision(), False)
    _check_upgraded(engine, counts)
    assert upgrade_schema(engine).before == head_revision()  # a second start changes nothing


def test_a_database_made_before_migrations_is_stamped_and_upgraded(engine: Engine) -> None:
    baseline_metadata().create_all(engine)  # what create_all did at every start before migrations
    counts = _populate_baseline(engine)
    assert current_revision(engine) is None
    done = upgrade_schema(engine)
    assert (done.before, done.after, done.stamped) == (None, head_revision(), True)
    _check_upgraded(engine, counts)


def test_an_older_database_without_the_shadow_table_gets_it_first(engine: Engine) -> None:
    # Before shadows existed, create_all had made every table but shadowassignment.
    tables = baseline_metadata()
    tables.create_all(engine, tables=[t for name, t in tables.tables.items() if name != "shadowassignment"])
    assert upgrade_schema(engine).stamped
    assert current_revision(engine) == head_revision() and _count(engine, "shadow") == 0


def test_an_empty_database_gets_exactly_the_declared_tables(engine: Engine) -> None:
    assert upgrade_schema(engine).before is None
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert differences == [], "db/tables.py and the migrations differ: write a migration"


def test_downgrading_to_the_baseline_puts_the_active_shadows_back(engine: Engine) -> None:
    upgrade_schema(engine, BASELINE_REVISION)
    _populate_baseline(engine)
    upgrade_schema(engine)
    with Session(engine) as session:
        removed = session.exec(select(Shadow).where(Shadow.device_id == "dev-1")).one()
        removed.removed_at = datetime.now(UTC)
        session.add(removed)
        session.commit()
        assert len(session.exec(select(Shadow).where(active_shadow())).all()) == 1
    from alembic import command

    from edgefleet.control_plane.db.schema import alembic_config

    with engine.connect() as connection, connection.begin():
        command.downgrade(alembic_config(connection), BASELINE_REVISION)
    assert current_revision(engine) == BASELINE_REVISION
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT device_id, version, sample_rate FROM shadowassignment")).all()
    assert [tuple(r) for r in rows] == [("dev-0", "2.0.0", 0.25)]


def test_a_database_from_a_newer_release_is_refused(engine: Engine) -> None:
    upgrade_schema(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(ConfigError, match="newer"):
        upgrade_schema(engine)
