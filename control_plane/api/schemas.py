"""The REST API's shapes (request bodies and answers) and how database rows become them.

Per resource, in the full-stack-fastapi-template style: ``...Create`` is a request body,
``...Public`` an answer. The tables they come from are in :mod:`edgefleet.control_plane.db.tables`;
the functions at the bottom turn rows into answers and hold no business rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel
from pydantic import Field as PydanticField
from sqlmodel import Field, SQLModel

from edgefleet.control_plane.db.tables import (
    ApiToken,
    Assignment,
    AuditEntry,
    Deployment,
    DeploymentBase,
    Device,
    ModelVersion,
    Shadow,
)
from edgefleet.control_plane.services.auth import Role
from edgefleet.control_plane.services.publishing import manifest_of

MAX_ENROLLMENT_TTL_S = 7 * 24 * 3600  # seconds
MAX_PAGE = 10_000  # rows one list request may return
# Database integers are 64-bit: a larger id or offset is a 422 here, never an overflow (a 500) below.
MAX_INT64 = 2**63 - 1
RowId = Annotated[int, Path(ge=1, le=MAX_INT64)]
Offset = Annotated[int, Query(ge=0, le=MAX_INT64)]
MAX_TOKEN_TTL_S = 10 * 365 * 24 * 3600  # seconds: longer is "never", say so

# --- errors and health -----------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str
    message: str
    retryable: bool


class ErrorResponse(BaseModel):
    detail: ErrorDetail


class Health(BaseModel):
    status: str
    broker_connected: bool


class BrokerAddress(BaseModel):
    host: str
    port: int
    kind: str = PydanticField(
        description='"mosquitto" or "amqtt" (embedded, started by this process) or "external".'
    )


class PublicKeys(BaseModel):
    publisher: list[str]
    online: list[str]


class Info(BaseModel):
    version: str
    broker: BrokerAddress
    keys: PublicKeys
    keyring_version: int = 0


# --- devices ---------------------------------------------------------------------------------


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


# --- enrollment ------------------------------------------------------------------------------


class EnrollmentCreate(BaseModel):
    device_id: str
    ttl_s: int = PydanticField(default=3600, ge=60, le=MAX_ENROLLMENT_TTL_S)


class EnrollmentToken(BaseModel):
    device_id: str
    token: str
    expires_at: str


class EnrollRequest(BaseModel):
    token: str = PydanticField(min_length=16, max_length=128)


class BrokerCredentials(BaseModel):
    host: str
    port: int
    username: str
    password: str


class EnrollResponse(BaseModel):
    device_id: str
    broker: BrokerCredentials
    keyring: str = PydanticField(description="The current keyring (TUF root metadata JSON) for the agent to pin.")
    keyring_version: int


# --- keyring ---------------------------------------------------------------------------------


class KeyringRotation(BaseModel):
    """What changes in the next keyring version; omitted roles stay as they are."""

    publisher_keys: list[str] | None = PydanticField(
        default=None, description="Hex Ed25519 publisher keys (replace all)."
    )
    publisher_threshold: int | None = PydanticField(default=None, ge=1)
    rotate_online: bool = PydanticField(
        default=False, description="Issue a new online key and re-sign every desired state."
    )
    rotate_root: bool = PydanticField(default=False, description="Issue a new root key (signed by old and new).")


class KeyringSummary(BaseModel):
    version: int
    expires: str
    publisher_keys: list[str]
    publisher_threshold: int
    online_keys: list[str]


# --- models ----------------------------------------------------------------------------------


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


# --- shadows ---------------------------------------------------------------------------------


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


# --- deployments -----------------------------------------------------------------------------


class DeploymentCreate(SQLModel):
    """``POST /api/v1/deployments``: put one model version on some devices."""

    model: str = Field(max_length=64, description="Model name.")
    version: str = Field(max_length=64)
    devices: list[str] = Field(min_length=1, max_length=1000, description="Device ids.")


class DeploymentPublic(DeploymentBase):
    """A deployment as the API shows it."""

    id: int
    created_at: datetime
    updated_at: datetime


# --- rows to answers -------------------------------------------------------------------------


# --- tokens and audit ------------------------------------------------------------------------


class TokenCreate(BaseModel):
    name: str = PydanticField(min_length=1, max_length=64, description='What the token is for: "ci", "alice".')
    role: Role
    expires_in_s: int | None = PydanticField(
        default=None, gt=0, le=MAX_TOKEN_TTL_S, description="Seconds until it expires; null: never."
    )


class TokenPublic(BaseModel):
    id: int
    name: str
    role: Role
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = PydanticField(description="The token itself: shown this once, only its hash is kept.")


class AuditEntryPublic(BaseModel):
    id: int
    at: datetime
    token_id: int | None = PydanticField(description="The API token that asked; null for a device or no token.")
    actor: str
    operation: str = PydanticField(description="The route's operation id, e.g. create_deployments.")
    target: str = PydanticField(description="The object it acts on: path parameters, then body fields.")
    status_code: int = PydanticField(description="The HTTP status it was answered with (the outcome).")



def model_version_public(row: ModelVersion) -> ModelVersionPublic:
    """A model version with the signature and metadata from its signed manifest."""
    manifest = manifest_of(row)
    return ModelVersionPublic(
        name=row.name,
        version=row.version,
        runtime=row.runtime,
        bundle_digest=row.bundle_digest,
        bundle_size=row.bundle_size,
        inputs=[TensorSpecPublic(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in manifest.inputs],
        outputs=[TensorSpecPublic(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in manifest.outputs],
        description=manifest.description,
        labels=dict(manifest.labels),
        created_at=row.created_at,
    )


def device_public(device: Device, assignments: Iterable[Assignment]) -> DevicePublic:
    """A device with its last reported state and what it is assigned."""
    return DevicePublic(
        id=device.id,
        created_at=device.created_at,
        last_seen_at=device.last_seen_at,
        online=device.online,
        desired_sequence=device.desired_sequence,
        applied_sequence=device.applied_sequence,
        # Stored only after strict decoding, so it always parses.
        reported=json.loads(device.reported_json) if device.reported_json else None,
        agent=json.loads(device.agent_json) if device.agent_json else {},
        assignments=sorted(
            (AssignmentPublic(model_name=a.model_name, version=a.version) for a in assignments),
            key=lambda a: a.model_name,
        ),
    )


def deployment_public(row: Deployment) -> DeploymentPublic:
    """A deployment as stored."""
    return DeploymentPublic.model_validate(row, from_attributes=True)


def device_shadows_public(
    device: Device, assignments: Iterable[Assignment], shadows: Iterable[Shadow]
) -> list[ShadowPublic]:
    """The shadows of one device: each asked for, and each it reports, merged by model name.

    A shadow still reported after it was removed (the device has not caught up) is listed with
    ``version`` null; one asked for but not reported yet has ``report`` null; one removed and no
    longer reported is not listed.
    """
    serving = {a.model_name: a.version for a in assignments}
    desired = {s.model_name: s for s in shadows if s.removed_at is None}
    # Stored only after strict decoding, so it always parses.
    reported = json.loads(device.reported_json) if device.reported_json else {}
    reports = {r["name"]: r for r in reported.get("shadows", [])}
    rows = []
    for name in sorted(desired.keys() | reports.keys()):
        wanted, report = desired.get(name), reports.get(name)
        rows.append(
            ShadowPublic(
                device_id=device.id,
                model_name=name,
                serving_version=serving.get(name),
                version=wanted.version if wanted else None,
                sample_rate=wanted.sample_rate if wanted else None,
                agreement=report["agreements"] / report["samples"] if report and report["samples"] else None,
                report=ShadowReportPublic.model_validate({k: v for k, v in report.items() if k != "name"})
                if report
                else None,
                reported_ts=device.reported_ts if report else None,
            )
        )
    return rows


def token_public(row: ApiToken) -> TokenPublic:
    """A token row as the API shows it (never its hash)."""
    assert row.id is not None
    return TokenPublic(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def audit_entry_public(row: AuditEntry) -> AuditEntryPublic:
    """An audit row as the API shows it."""
    assert row.id is not None
    return AuditEntryPublic(
        id=row.id,
        at=row.at,
        token_id=row.token_id,
        actor=row.actor,
        operation=row.operation,
        target=row.target,
        status_code=row.status_code,
    )
