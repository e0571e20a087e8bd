"""publish_model with the real runtimes: ONNX and TFLite bundles that verify, idempotency, conflicts."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.tables import ModelVersion
from edgefleet.control_plane.devtools.demo_models import MLPWeights, build_onnx_mlp, build_tflite_mlp, make_mlp_weights
from edgefleet.control_plane.services.keys import ControlPlaneKeys
from edgefleet.control_plane.services.publishing import infer_runtime, publish_model
from edgefleet.shared.bundle.format import sha256_file, verify_bundle
from edgefleet.shared.errors import ConflictError, MessageError, RuntimeLoadError


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("filename", "build", "runtime"), [
    ("m.onnx", build_onnx_mlp, "onnx"),
    ("m.tflite", build_tflite_mlp, "tflite"),
])
def test_published_bundles_verify_with_the_publisher_key(
    engine: Engine,
    store: BundleStore,
    keys: ControlPlaneKeys,
    tmp_path: Path,
    filename: str,
    build: Callable[[MLPWeights], bytes],
    runtime: str,
) -> None:
    model = _write(tmp_path, filename, build(make_mlp_weights(seed=3)))

    with Session(engine) as session:
        row = publish_model(session, store, keys, model_path=model, name="mlp", version="1.0", labels={"k": "v"})
        digest, size = row.bundle_digest, row.bundle_size

    bundle = store.path_for(digest)
    assert sha256_file(bundle) == digest
    assert bundle.stat().st_size == size
    manifest = verify_bundle(bundle, trusted_keys={keys.publisher.key_id: keys.publisher.public_key})
    assert (manifest.name, manifest.version, manifest.runtime) == ("mlp", "1.0", runtime)
    assert manifest.model_file == f"model.{'onnx' if runtime == 'onnx' else 'tflite'}"
    assert manifest.file(manifest.model_file).sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("input", "FP32", (-1, 32))]
    assert manifest.labels == {"k": "v"}
    assert model.exists()  # the caller's file is left alone
    assert list(store.tmp_dir.iterdir()) == []


def test_same_bytes_again_return_the_same_version_other_bytes_conflict(
    engine: Engine, store: BundleStore, keys: ControlPlaneKeys, tmp_path: Path
) -> None:
    first = _write(tmp_path, "a.onnx", build_onnx_mlp(make_mlp_weights(seed=1)))
    copy = _write(tmp_path, "copy.onnx", first.read_bytes())
    other = _write(tmp_path, "b.onnx", build_onnx_mlp(make_mlp_weights(seed=2)))

    with Session(engine) as session:
        original = publish_model(session, store, keys, model_path=first, name="m", version="1")
        digest = original.bundle_digest
        again = publish_model(session, store, keys, model_path=copy, name="m", version="1")
        assert again.bundle_digest == digest
        with pytest.raises(ConflictError, match="model file"):
            publish_model(session, store, keys, model_path=other, name="m", version="1")
        with pytest.raises(ConflictError, match="runtime"):
            publish_model(session, store, keys, model_path=copy, name="m", version="1", runtime="tflite")
        assert len(session.exec(select(ModelVersion)).all()) == 1


def test_a_file_that_does_not_load_is_refused_and_nothing_is_stored(
    engine: Engine, store: BundleStore, keys: ControlPlaneKeys, tmp_path: Path
) -> None:
    garbage = _write(tmp_path, "bad.onnx", b"not a model")
    tflite_as_onnx = _write(tmp_path, "x.onnx", build_tflite_mlp(make_mlp_weights()))

    with Session(engine) as session:
        with pytest.raises(RuntimeLoadError):
            publish_model(session, store, keys, model_path=garbage, name="m", version="1")
        with pytest.raises(RuntimeLoadError):
            publish_model(session, store, keys, model_path=tflite_as_onnx, name="m", version="1")
        assert session.exec(select(ModelVersion)).all() == []
    assert list((store.root / "sha256").iterdir()) == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "Upper"}, "model name"),
    ({"version": "1 0"}, "version"),
    ({"runtime": "pytorch"}, "runtime"),
    ({"description": "x" * 5000}, "description"),
])
def test_invalid_metadata_is_refused(
    engine: Engine, store: BundleStore, keys: ControlPlaneKeys, tmp_path: Path, kwargs: dict[str, str], match: str
) -> None:
    model = _write(tmp_path, "m.onnx", build_onnx_mlp(make_mlp_weights()))
    args: dict[str, str] = {"name": "m", "version": "1", **kwargs}
    with Session(engine) as session, pytest.raises(MessageError, match=match):
        publish_model(
            session,
            store,
            keys,
            model_path=model,
            name=args["name"],
            version=args["version"],
            runtime=args.get("runtime"),
            description=args.get("description", ""),
        )


def test_infer_runtime() -> None:
    assert infer_runtime("a/b/Model.ONNX") == "onnx"
    assert infer_runtime("m.tflite") == "tflite"
    with pytest.raises(MessageError):
        infer_runtime("m.pt")
