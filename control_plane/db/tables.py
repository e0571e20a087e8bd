"""The control plane's database tables (SQLModel ``table=True`` classes); the API's shapes are in
:mod:`edgefleet.control_plane.api.schemas`.

Every change to these classes needs a migration in :mod:`edgefleet.control_plane.db.migrations`
(``tests/integration/control_plane/test_migrations.py`` fails while the two differ).

- :class:`Device`: one row per device, created when it first reports (or by ``POST /devices``).
- :class:`ModelVersion`: one published bundle per (name, version); the bundle file itself is in
  the :class:`~control_plane.bundle_store.BundleStore`, addressed by ``bundle_digest``.
- :class:`Assignment`: what a device should run, one version per model name: the rows the
  desired state is computed from.
- :class:`Shadow`: a candidate version a device runs beside its assigned one, on sampled
  inputs, never serving it (one row per device and model, kept once removed: see the class).
- :class:`Deployment`: one request to put a version on a device, and how it ended.
- :class:`DeviceEvent`: events as received, unique by ``event_id`` so ingest is idempotent.
- :class:`ApiToken`: an API token (only its sha256 is stored) with its role, expiry, revocation.
- :class:`AuditEntry`: one change asked of the API: who, what, when, and how it ended.

Times the wire carries (desired-state issue/expiry, device timestamps) are unix seconds as
floats, like the wire; bookkeeping times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import ColumnElement, DateTime, Index, String, Text, UniqueConstraint, and_
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel, col

from edgefleet.shared.errors import ConfigError
from edgefleet.shared.wire.messages import Outcome


class UTCDateTime(TypeDecorator[datetime]):
    """A datetime stored as naive UTC and always read back as aware UTC.

    SQLite keeps no offset, PostgreSQL converts to the session time zone; storing UTC and
    re-attaching it on read gives the same aware values on both.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ConfigError("naive datetimes are ambiguous; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, aware UTC (bookkeeping only: decisions take time as a parameter)."""
    return datetime.now(UTC)


class DeploymentStatus(StrEnum):
    """Where a deployment stands: pending, one of the device's outcomes, or superseded.

    ``superseded`` is the control plane's own: a newer deployment of the same model to the same
    device (or an unassignment) replaced this one before the device reported an outcome.
    """

    PENDING = "pending"
    SUCCEEDED = Outcome.SUCCEEDED.value
    FAILED_NO_CHANGE = Outcome.FAILED_NO_CHANGE.value
    FAILED_ROLLED_BACK = Outcome.FAILED_ROLLED_BACK.value
    FAILED_UNABLE_TO_ROLL_BACK = Outcome.FAILED_UNABLE_TO_ROLL_BACK.value
    REJECTED = Outcome.REJECTED.value
    SUPERSEDED = "superseded"


# --- devices -------------------------------------------------------------------------------


class Device(SQLModel, table=True):
    """A device known to the control plane."""

    id: str = Field(primary_key=True, max_length=128)
    created_at: datetime = Field(sa_type=UTCDateTime)
    last_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    online: bool = False
    # The sequence of the last desired state signed for this device (0: none yet).
    desired_sequence: int = 0
    desired_issued_at: float | None = None  # unix seconds
    desired_expires_at: float | None = None  # unix seconds
    # The signed envelope last published (retained) on the device's desired topic, kept so it
    # can be published again to a broker that lost its retained messages.
    desired_envelope: str = Field(default="", sa_type=Text)
    # From the device's reported state.
    applied_sequence: int = 0
    reported_ts: float | None = None  # unix seconds, the device's clock
    reported_json: str = Field(default="", sa_type=Text)
    agent_json: str = Field(default="{}", sa_type=Text)
    # Mosquitto password-file hash of the broker password issued at enrollment ("" = none issued).
    broker_password_hash: str = Field(default="", max_length=256)








# --- models --------------------------------------------------------------------------------


class ModelVersion(SQLModel, table=True):
    """A published, signed bundle of one model version."""

    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=64)
    version: str = Field(max_length=64)
    runtime: str = Field(max_length=32)
    bundle_digest: str = Field(index=True, max_length=71)
    bundle_size: int
    manifest_json: str = Field(sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)






# --- assignments and deployments -----------------------------------------------------------


class Assignment(SQLModel, table=True):
    """The version of ``model_name`` that ``device_id`` should run."""

    __table_args__ = (UniqueConstraint("device_id", "model_name", name="uq_assignment_device_model"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    model_name: str = Field(max_length=64)
    version: str = Field(max_length=64)


def assigned_version() -> ColumnElement[bool]:
    """Join condition: the :class:`ModelVersion` an :class:`Assignment` names."""
    return and_(
        col(Assignment.model_name) == col(ModelVersion.name), col(Assignment.version) == col(ModelVersion.version)
    )


class Shadow(SQLModel, table=True):
    """The candidate version of ``model_name`` that ``device_id`` runs beside its assigned one.

    One row per (device, model). Removing a shadow (``DELETE /shadows``, promotion, unassigning
    the model) sets ``removed_at`` and keeps the row: the device goes on reporting the shadow
    until it applies the new desired state, and the API lists it (with ``version`` null) from
    this row until then. ``bundle_digest`` is the candidate's, copied at creation, so chunk
    grants need no join; a published version's digest never changes.
    """

    # A unique index rather than a constraint: SQLite can add one to an existing table.
    __table_args__ = (Index("uq_shadow_device_model", "device_id", "model_name", unique=True),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", max_length=128)
    model_name: str = Field(max_length=64)
    version: str = Field(max_length=64)
    bundle_digest: str = Field(max_length=71)
    sample_rate: float  # fraction of requests mirrored, (0, 1]
    created_at: datetime = Field(sa_type=UTCDateTime)
    removed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


# The name messaging/ingest.py still imports; the tables and services use Shadow.
ShadowAssignment = Shadow


def active_shadow() -> ColumnElement[bool]:
    """Filter: the :class:`Shadow` rows still asked for (not removed)."""
    return col(Shadow.removed_at).is_(None)


def shadow_version() -> ColumnElement[bool]:
    """Join condition: the :class:`ModelVersion` an active (not removed) :class:`Shadow` names."""
    return and_(
        col(Shadow.model_name) == col(ModelVersion.name),
        col(Shadow.version) == col(ModelVersion.version),
        active_shadow(),
    )


class DeploymentBase(SQLModel):
    """The fields a deployment row and its API shape share."""

    device_id: str = Field(max_length=128)
    model_name: str = Field(max_length=64)
    version: str = Field(max_length=64)
    bundle_digest: str = Field(max_length=71)
    sequence: int = Field(description="The desired-state sequence that first carried this deployment.")
    status: DeploymentStatus = DeploymentStatus.PENDING
    error_code: str = ""
    message: str = ""


class Deployment(DeploymentBase, table=True):
    """One model version requested on one device, and its outcome."""

    __table_args__ = (Index("ix_deployment_device_model_status", "device_id", "model_name", "status"),)

    id: int | None = Field(default=None, primary_key=True)
    # A plain string column (not a database enum): new statuses need no migration.
    status: DeploymentStatus = Field(default=DeploymentStatus.PENDING, sa_type=String(32))
    message: str = Field(default="", sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


# --- events --------------------------------------------------------------------------------


class DeviceEvent(SQLModel, table=True):
    """An event as a device sent it; a second copy (same ``event_id``) is ignored."""

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(unique=True, max_length=64)
    device_id: str = Field(index=True, max_length=128)
    ts: float  # unix seconds, the device's clock
    kind: str = Field(max_length=32)
    payload_json: str = Field(sa_type=Text)
    received_at: datetime = Field(sa_type=UTCDateTime)


class Enrollment(SQLModel, table=True):
    """A one-time enrollment token (only its sha256 is stored) for one device id."""

    token_sha256: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(index=True, max_length=128)
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


# --- authentication and audit --------------------------------------------------------------


class ApiToken(SQLModel, table=True):
    """An API token: its sha256 (the clear text is shown once, at creation), role and lifetime."""

    id: int | None = Field(default=None, primary_key=True)
    token_sha256: str = Field(unique=True, max_length=64)
    name: str = Field(max_length=64)
    role: str = Field(max_length=16)  # a Role value; a plain string so new roles need no migration
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # None: never
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class AuditEntry(SQLModel, table=True):
    """One change asked of the API (allowed or refused), as the audit log keeps it."""

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_type=UTCDateTime, index=True)
    token_id: int | None = Field(default=None, index=True)  # None: no valid token (a device, or refused)
    actor: str = Field(max_length=160)  # "token 3 (ci)", "device pi-01", "anonymous"
    operation: str = Field(max_length=64)  # the route's operation, e.g. "create_deployments"
    target: str = Field(default="", sa_type=Text)  # the object it acts on, e.g. "device=pi-01"
    status_code: int  # the HTTP status it was answered with: the outcome
