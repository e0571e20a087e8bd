"""publish_model accepts only PEP 440 versions, so every floor a device keeps can be compared."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session, select

from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.engine import create_db_engine, create_tables
from edgefleet.control_plane.db.tables import ModelVersion
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, make_mlp_weights
from edgefleet.control_plane.services.keys import load_or_create_keys
from edgefleet.control_plane.services.publishing import publish_model
from edgefleet.shared.errors import MessageError


@pytest.mark.parametrize("version", ["legacy", "v2-final"])
def test_a_version_outside_pep440_is_refused_at_publish_time(tmp_path: Path, version: str) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    create_tables(engine)
    store = BundleStore(tmp_path / "bundles", cache_bytes=1 << 20)
    model = tmp_path / "m.onnx"
    model.write_bytes(build_onnx_mlp(make_mlp_weights()))
    try:
        with Session(engine) as session:
            with pytest.raises(MessageError, match="PEP 440"):
                publish_model(session, store, load_or_create_keys(tmp_path / "keys"), model_path=model, name="m",
                              version=version)
            assert session.exec(select(ModelVersion)).all() == []
    finally:
        store.close()
        engine.dispose()
