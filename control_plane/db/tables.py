"""The control plane's database tables and their API shapes (SQLModel).

Per resource, in the full-stack-fastapi-template style: a ``Base`` with the shared fields, the
``table=True`` class, and ``Public`` / ``Create`` variants for API bodies.

- :class:`Device`: one row per device, created when it first reports (or by ``POST /devices``).
- :class:`ModelVersion`: one published bundle per (name, version); the bundle file itself is in
  the :class:`~control_plane.bundle_store.BundleStore`, addressed by ``bundle_digest``.
- :class:`Assignment`: what a device should run, one version per model name: the rows the
  desired state is computed from.
- :class:`ShadowAssignment`: a candidate version a device runs beside its assigned one, on
  sampled inputs, never serving it (at most one per device and model).
- :class:`Deployment`: one request to put a version on a device, and how it ended.
- :class:`DeviceEvent`: events as received, unique by ``event_id`` so ingest is idempotent.

Times the wire carries (desired-state issue/expiry, device timestamps) are unix seconds as
floats, like the wire; bookkeeping times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, DateTime, Index, String, Text, UniqueConstraint, and_
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel, col

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
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
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


class DeviceCreate(SQLModel):
    """``POST /api/v1/devices``: register a device before its agent first reports."""

    id: str = Field(max_length=128, schema_extra={"pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"})


class AssignmentPublic(SQLModel):
    """A model version a device should run."""

    model_name: str
    version: str


class DevicePublic(SQLModel):
    """A device as the API shows it."""

    id: str
    created_at: datetime
    last_seen_at: datetime | None
    online: bool
    desired_sequence: int
    applied_sequence: int
    reported: dict[str, Any] | None = Field(description="The device's last reported state, as it sent it.")
    agent: dict[str, str]
    assignments: list[AssignmentPublic]


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


class TensorSpecPublic(SQLModel):
    """A model input or output (Open Inference Protocol datatype; ``-1`` = any size)."""

    name: str
    datatype: str
    shape: list[int]


class ModelVersionPublic(SQLModel):
    """A model version as the API shows it."""

    name: str
    version: str
    runtime: str
    bundle_digest: str
    bundle_size: int
    inputs: list[TensorSpecPublic]
    outputs: list[TensorSpecPublic]
    description: str
    labels: dict[str, str]
    created_at: datetime


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


class ShadowAssignment(SQLModel, table=True):
    """A candidate version of ``model_name`` that ``device_id`` runs beside its assigned version.

    A table of its own rather than columns on :class:`Assignment`: :func:`create_tables` adds a
    missing table to an existing database, never a missing column to an existing table.
    """

    __table_args__ = (UniqueConstraint("device_id", "model_name", name="uq_shadow_device_model"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    model_name: str = Field(max_length=64)
    version: str = Field(max_length=64)
    sample_rate: float  # fraction of requests mirrored, (0, 1]
    created_at: datetime = Field(sa_type=UTCDateTime)


def shadow_version() -> ColumnElement[bool]:
    """Join condition: the :class:`ModelVersion` a :class:`ShadowAssignment` names."""
    return and_(
        col(ShadowAssignment.model_name) == col(ModelVersion.name),
        col(ShadowAssignment.version) == col(ModelVersion.version),
    )


class ShadowCreate(SQLModel):
    """``POST /api/v1/shadows``: run a candidate version beside the serving one on some devices."""

    model: str = Field(max_length=64, description="Model name; every device must already run it.")
    version: str = Field(max_length=64, description="The candidate: a published version with the same inputs.")
    devices: list[str] = Field(min_length=1, max_length=1000, description="Device ids.")
    sample_rate: float = Field(description="Fraction of requests mirrored to the candidate, in (0, 1].")


class ShadowReportPublic(SQLModel):
    """A device's last report of a shadow (``shared.messages.ShadowReport``), as it sent it."""

    serving_version: str
    version: str
    bundle_digest: str
    state: str = Field(description='"running" or "failed".')
    samples: int = Field(description="Rows compared (a request of batch B adds B).")
    agreements: int = Field(description="Rows whose top-1 (argmax of the first output) agreed.")
    errors: int = Field(description="Mirrored requests the candidate failed on.")
    mean_abs_diff: float
    max_abs_diff: float
    latency_p50_ms: float
    serving_latency_p50_ms: float
    message: str


class ShadowPublic(SQLModel):
    """A shadow on one device: what the control plane asks for and what the device last reported."""

    device_id: str
    model_name: str
    serving_version: str | None = Field(description="The version assigned to the device.")
    version: str | None = Field(description="The candidate asked for; null once removed but still reported.")
    sample_rate: float | None
    agreement: float | None = Field(description="report.agreements / report.samples; null before any sample.")
    report: ShadowReportPublic | None = Field(description="The device's last report of this model's shadow.")
    reported_ts: float | None = Field(description="Unix seconds (device clock) of that report.")


class DeploymentCreate(SQLModel):
    """``POST /api/v1/deployments``: put one model version on some devices."""

    model: str = Field(max_length=64, description="Model name.")
    version: str = Field(max_length=64)
    devices: list[str] = Field(min_length=1, max_length=1000, description="Device ids.")


class DeploymentBase(SQLModel):
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


class DeploymentPublic(DeploymentBase):
    """A deployment as the API shows it."""

    id: int
    created_at: datetime
    updated_at: datetime


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
