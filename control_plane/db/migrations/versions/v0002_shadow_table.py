"""Shadows as one ``shadow`` row per (device, model), with the candidate's digest and removal time.

``shadowassignment`` existed only because ``create_all`` could not add columns. Its rows move
to ``shadow`` with the candidate's ``bundle_digest`` (from ``modelversion``) and ``removed_at``
null. A row whose version is not published (none should exist: versions are never deleted)
has no digest to copy and is dropped, with a warning.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

log = logging.getLogger(__name__)


def upgrade() -> None:
    op.create_table(
        "shadow",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("device_id", sa.String(128), sa.ForeignKey("device.id"), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("bundle_digest", sa.String(71), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("removed_at", sa.DateTime(), nullable=True),
    )
    bind = op.get_bind()
    orphans = bind.execute(
        sa.text(
            "SELECT count(*) FROM shadowassignment s LEFT JOIN modelversion m"
            " ON m.name = s.model_name AND m.version = s.version WHERE m.id IS NULL"
        )
    ).scalar_one()
    if orphans:
        log.warning("dropping %d shadow assignment(s) of unpublished versions", orphans)
    op.execute(
        "INSERT INTO shadow (device_id, model_name, version, bundle_digest, sample_rate, created_at, removed_at)"
        " SELECT s.device_id, s.model_name, s.version, m.bundle_digest, s.sample_rate, s.created_at, NULL"
        " FROM shadowassignment s JOIN modelversion m ON m.name = s.model_name AND m.version = s.version"
    )
    op.drop_table("shadowassignment")  # with its index and uq_shadow_device_model, freeing the name
    op.create_index("uq_shadow_device_model", "shadow", ["device_id", "model_name"], unique=True)


def downgrade() -> None:
    op.create_table(
        "shadowassignment",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("device_id", sa.String(128), sa.ForeignKey("device.id"), nullable=False, index=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    # Removed shadows have no place in the old table: only the active ones go back.
    op.execute(
        "INSERT INTO shadowassignment (device_id, model_name, version, sample_rate, created_at)"
        " SELECT device_id, model_name, version, sample_rate, created_at FROM shadow WHERE removed_at IS NULL"
    )
    op.drop_table("shadow")
    # Batch mode: SQLite adds a constraint only by copying the table.
    with op.batch_alter_table("shadowassignment") as batch:
        batch.create_unique_constraint("uq_shadow_device_model", ["device_id", "model_name"])
