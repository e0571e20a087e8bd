"""What the control plane refuses at publish time: versions outside PEP 440, and bundles whose tar
headers are not the plain ustar a bundle is made of (refused at once, before any signature)."""

from __future__ import annotations

import dataclasses
import tarfile
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.tables import ModelVersion
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, make_mlp_weights
from edgefleet.control_plane.services.keys import load_or_create_keys
from edgefleet.control_plane.services.publishing import publish_model, register_bundle
from edgefleet.shared.bundle import ustar
from edgefleet.shared.bundle.format import make_manifest, write_bundle
from edgefleet.shared.errors import BundleIntegrityError, MessageError, UnsafeArchiveError
from edgefleet.shared.trust.signing import SigningKey


@pytest.mark.parametrize("version", ["legacy", "v2-final"])
def test_a_version_outside_pep440_is_refused_at_publish_time(
    engine: Engine, store: BundleStore, tmp_path: Path, version: str
) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_onnx_mlp(make_mlp_weights()))
    with Session(engine) as session:
        with pytest.raises(MessageError, match="PEP 440"):
            publish_model(session, store, load_or_create_keys(tmp_path / "keys"), model_path=model, name="m",
                          version=version)
        assert session.exec(select(ModelVersion)).all() == []


def test_a_signed_bundle_with_a_version_outside_pep440_is_refused(
    engine: Engine, store: BundleStore, tmp_path: Path
) -> None:
    key = SigningKey.generate()
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    manifest = make_manifest(name="m", version="1.0", runtime="onnx", model_file="model.onnx",
                             files={"model.onnx": model}, inputs=[], outputs=[])
    legacy = dataclasses.replace(manifest, version="legacy")  # signed outside, past our checks
    bundle = tmp_path / "legacy.bundle"
    with bundle.open("wb") as out:
        write_bundle(out, legacy, {"model.onnx": model}, [key])
    with Session(engine) as session, pytest.raises(BundleIntegrityError, match="PEP 440"):
        register_bundle(session, store, bundle_path=bundle, trusted_keys={key.key_id: key.public_key}, threshold=1)


def test_a_pax_header_redos_upload_is_refused_at_once(engine: Engine, store: BundleStore, tmp_path: Path) -> None:
    # CVE-2024-6232: 45 KB held the control plane for 6.4 s through the upload endpoint.
    payload = b"0" * 45_000
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(payload)
    bundle = tmp_path / "hostile.bundle"
    bundle.write_bytes(info.tobuf(tarfile.USTAR_FORMAT) + payload + ustar.padding(len(payload)) + bytes(1024))
    key = SigningKey.generate()
    started = time.perf_counter()
    with Session(engine) as session, pytest.raises(UnsafeArchiveError, match="PAX extended header"):
        register_bundle(session, store, bundle_path=bundle, trusted_keys={key.key_id: key.public_key}, threshold=1)
    assert time.perf_counter() - started < 1.0
