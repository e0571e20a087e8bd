"""Baseline: the schema as ``SQLModel.metadata.create_all`` made it before migrations existed.

The tables are written out here as plain SQLAlchemy (not imported from ``db.tables``), so this
revision stays what it was however the application's classes change. ``BASELINE`` is also what
a database made before migrations holds, or a subset of it for an older one: see
:func:`edgefleet.control_plane.db.schema.upgrade_schema`.

Revision ID: 0001
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BASELINE = sa.MetaData()

sa.Table(
    "device",
    BASELINE,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("last_seen_at", sa.DateTime(), nullable=True),
    sa.Column("online", sa.Boolean(), nullable=False),
    sa.Column("desired_sequence", sa.Integer(), nullable=False),
    sa.Column("desired_issued_at", sa.Float(), nullable=True),
    sa.Column("desired_expires_at", sa.Float(), nullable=True),
    sa.Column("desired_envelope", sa.Text(), nullable=False),
    sa.Column("applied_sequence", sa.Integer(), nullable=False),
    sa.Column("reported_ts", sa.Float(), nullable=True),
    sa.Column("reported_json", sa.Text(), nullable=False),
    sa.Column("agent_json", sa.Text(), nullable=False),
    sa.Column("broker_password_hash", sa.String(256), nullable=False),
)
sa.Table(
    "modelversion",
    BASELINE,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, index=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("runtime", sa.String(32), nullable=False),
    sa.Column("bundle_digest", sa.String(71), nullable=False, index=True),
    sa.Column("bundle_size", sa.Integer(), nullable=False),
    sa.Column("manifest_json", sa.Text(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.UniqueConstraint("name", "version", name="uq_model_version"),
)
sa.Table(
    "assignment",
    BASELINE,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("device_id", sa.String(128), sa.ForeignKey("device.id"), nullable=False, index=True),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.UniqueConstraint("device_id", "model_name", name="uq_assignment_device_model"),
)
sa.Table(
    "shadowassignment",
    BASELINE,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("device_id", sa.String(128), sa.ForeignKey("device.id"), nullable=False, index=True),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("sample_rate", sa.Float(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.UniqueConstraint("device_id", "model_name", name="uq_shadow_device_model"),
)
sa.Table(
    "deployment",
    BASELINE,
    sa.Column("device_id", sa.String(128), nullable=False),
    sa.Column("model_name", sa.String(64), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("bundle_digest", sa.String(71), nullable=False),
    sa.Column("sequence", sa.Integer(), nullable=False),
    sa.Column("error_code", sa.String(), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("updated_at", sa.DateTime(), nullable=False),
    sa.Index("ix_deployment_device_model_status", "device_id", "model_name", "status"),
)
sa.Table(
    "deviceevent",
    BASELINE,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("event_id", sa.String(64), nullable=False, unique=True),
    sa.Column("device_id", sa.String(128), nullable=False, index=True),
    sa.Column("ts", sa.Float(), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("payload_json", sa.Text(), nullable=False),
    sa.Column("received_at", sa.DateTime(), nullable=False),
)
sa.Table(
    "enrollment",
    BASELINE,
    sa.Column("token_sha256", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(128), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("expires_at", sa.DateTime(), nullable=False),
    sa.Column("used_at", sa.DateTime(), nullable=True),
)


def upgrade() -> None:
    BASELINE.create_all(op.get_bind())


def downgrade() -> None:
    BASELINE.drop_all(op.get_bind())
