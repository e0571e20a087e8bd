"""The model catalog: reading published model versions (publishing them is :mod:`.publishing`)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, col, select

from edgefleet.control_plane.db.tables import ModelVersion
from edgefleet.shared.errors import NotFoundError


def list_model_versions(session: Session, *, name: str | None = None) -> Sequence[ModelVersion]:
    """Every published version (of one model, if ``name`` is given), by name then age."""
    query = select(ModelVersion).order_by(col(ModelVersion.name), col(ModelVersion.created_at))
    if name is not None:
        query = query.where(ModelVersion.name == name)
    return session.exec(query).all()


def get_model_version(session: Session, name: str, version: str) -> ModelVersion:
    """One published version.

    Raises:
        NotFoundError: Not published.
    """
    row = session.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    if row is None:
        raise NotFoundError(f"model {name!r} version {version!r} is not published")
    return row
