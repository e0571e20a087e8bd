"""The sandboxed runtime check of uploaded models: crashes, hangs and memory in a child process,
errors that name the user's file and never a server path, and publishing through it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlmodel import Session, select
from support.hostile_models import empty_tflite

from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.tables import ModelVersion
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, build_tflite_mlp, make_mlp_weights
from edgefleet.control_plane.services.keys import ControlPlaneKeys
from edgefleet.control_plane.services.model_check import CheckLimits, check_model, load_in_sandbox
from edgefleet.control_plane.services.publishing import HEALTH_INPUTS_FILE, publish_model
from edgefleet.shared.bundle.format import verify_bundle
from edgefleet.shared.errors import MessageError, RuntimeLoadError

WEIGHTS = make_mlp_weights(seed=5)
ONNX_MLP = build_onnx_mlp(WEIGHTS)
TFLITE_MLP = build_tflite_mlp(WEIGHTS)


def _upload(tmp_path: Path, data: bytes) -> Path:
    """Where the server keeps an upload: a temp name that must never reach the user."""
    path = tmp_path / "tmp" / "tmpk3x9q.upload"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def _assert_names_only_the_users_file(error: BaseException, tmp_path: Path, filename: str) -> None:
    message = str(error)
    assert filename in message
    assert str(tmp_path) not in message
    assert "tmpk3x9q" not in message


# --- the child process --------------------------------------------------------------------------


def test_a_runtime_crash_is_a_load_error_and_this_process_lives_on(tmp_path: Path) -> None:
    # Past the inspection on purpose: LiteRT itself gets the 24-byte file and dies with SIGSEGV.
    path = _upload(tmp_path, empty_tflite())

    with pytest.raises(RuntimeLoadError, match=r"tiny.tflite: the tflite runtime crashed \(SIGSEGV\)") as info:
        load_in_sandbox("tflite", path, label="tiny.tflite")

    _assert_names_only_the_users_file(info.value, tmp_path, "tiny.tflite")
    assert os.getpid() > 0  # still here


def test_a_check_past_its_time_limit_is_a_load_error(tmp_path: Path) -> None:
    path = _upload(tmp_path, ONNX_MLP)
    with pytest.raises(RuntimeLoadError, match=r"m.onnx: the onnx runtime did not finish loading it within 0.01 s"):
        load_in_sandbox("onnx", path, label="m.onnx", limits=CheckLimits(timeout_s=0.01))


def test_a_check_past_its_cpu_limit_is_a_load_error(tmp_path: Path) -> None:
    path = _upload(tmp_path, ONNX_MLP)
    with pytest.raises(RuntimeLoadError, match=r"m.onnx: the onnx runtime ran out of CPU time loading it"):
        load_in_sandbox("onnx", path, label="m.onnx", limits=CheckLimits(cpu_s=0))


def test_a_check_past_its_memory_limit_is_a_load_error(tmp_path: Path) -> None:
    path = _upload(tmp_path, ONNX_MLP)
    tight = CheckLimits(memory_bytes=64 * 1024 * 1024, memory_per_model_byte=0)
    with pytest.raises(RuntimeLoadError, match=r"m.onnx: the onnx runtime failed loading it") as info:
        load_in_sandbox("onnx", path, label="m.onnx", limits=tight)
    _assert_names_only_the_users_file(info.value, tmp_path, "m.onnx")


@pytest.mark.parametrize(("runtime", "data"), [("onnx", ONNX_MLP), ("tflite", TFLITE_MLP)])
def test_a_good_model_gives_the_runtimes_signature(tmp_path: Path, runtime: str, data: bytes) -> None:
    signature = check_model(runtime, _upload(tmp_path, data), label=f"m.{runtime}")
    assert [(t.name, t.datatype, t.shape) for t in signature.inputs] == [("input", "FP32", (-1, 32))]
    assert [t.name for t in signature.outputs] == ["probabilities"]


def test_a_runtime_refusal_names_the_users_file_not_the_temp_file(tmp_path: Path) -> None:
    # Well-formed protobuf that onnxruntime refuses: an opset from the future.
    data = ONNX_MLP.replace(b"\x10\x11", b"\x10\x7f", 1)
    path = _upload(tmp_path, data)
    with pytest.raises(RuntimeLoadError) as info:
        check_model("onnx", path, label="classifier.onnx", name="clf", version="1")
    _assert_names_only_the_users_file(info.value, tmp_path, "classifier.onnx")


# --- publishing ---------------------------------------------------------------------------------


def test_publishing_garbage_names_the_users_file_not_the_server_path(
    engine: Engine, store: BundleStore, keys: ControlPlaneKeys, tmp_path: Path
) -> None:
    path = _upload(tmp_path, b"\x08\x07\x3a\x04garbage-after-a-graph")
    with Session(engine) as session, pytest.raises(RuntimeLoadError) as info:
        publish_model(session, store, keys, model_path=path, name="m", version="1", runtime="onnx",
                      filename="model.onnx")
    _assert_names_only_the_users_file(info.value, tmp_path, "model.onnx")


def test_publishing_the_24_byte_tflite_file_is_refused(
    engine: Engine, store: BundleStore, keys: ControlPlaneKeys, tmp_path: Path
) -> None:
    path = _upload(tmp_path, empty_tflite())
    with Session(engine) as session:
        with pytest.raises(RuntimeLoadError, match="tiny.tflite.*no subgraph"):
            publish_model(session, store, keys, model_path=path, name="m", version="1", runtime="tflite",
                          filename="tiny.tflite")
        assert session.exec(select(ModelVersion)).all() == []


def test_health_inputs_floor_and_budget_go_into_the_signed_manifest(
    engine: Engine, store: BundleStore, keys: ControlPlaneKeys, tmp_path: Path
) -> None:
    model = _upload(tmp_path, ONNX_MLP)
    samples = tmp_path / "samples.npz"
    np.savez(samples, input=np.ones((2, 32), np.float32))

    with Session(engine) as session:
        row = publish_model(session, store, keys, model_path=model, name="m", version="2.0.0", runtime="onnx",
                            min_version="1.5.0", health_inputs=samples, latency_budget_ms=25.0)
        digest = row.bundle_digest

    manifest = verify_bundle(store.path_for(digest), trusted_keys={keys.publisher.key_id: keys.publisher.public_key})
    assert (manifest.min_version, manifest.latency_budget_ms, manifest.health_inputs) == (
        "1.5.0", 25.0, HEALTH_INPUTS_FILE
    )
    assert manifest.file(HEALTH_INPUTS_FILE).size == samples.stat().st_size


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_version": "3.0.0"}, "below its own floor"),
        ({"min_version": "bad floor"}, "min_version"),
        ({"latency_budget_ms": 0.0}, "latency_budget_ms"),
        ({"latency_budget_ms": float("nan")}, "latency_budget_ms"),
        ({"health_inputs": {"other": np.ones((1, 32), np.float32)}}, "the model's inputs are"),
        ({"health_inputs": {"input": np.ones((1, 32), np.float64)}}, "float64"),
        ({"health_inputs": {"input": np.ones((1, 31), np.float32)}}, r"\[1, 31\]"),
        ({"health_inputs": {"input": np.array([object()] * 32, dtype=object)}}, "pickles"),
        ({"health_inputs": b"not a zip"}, "not a readable .npz"),
    ],
    ids=["floor-above", "floor-grammar", "budget-zero", "budget-nan", "names", "dtype", "shape", "pickle",
         "not-npz"],
)
def test_release_options_that_would_fail_every_device_are_refused(
    engine: Engine, store: BundleStore, keys: ControlPlaneKeys, tmp_path: Path, kwargs: dict, match: str
) -> None:
    model = _upload(tmp_path, ONNX_MLP)
    if "health_inputs" in kwargs:
        samples = tmp_path / "samples.npz"
        if isinstance(kwargs["health_inputs"], bytes):
            samples.write_bytes(kwargs["health_inputs"])
        else:
            np.savez(samples, **kwargs["health_inputs"])
        kwargs = {"health_inputs": samples, "health_inputs_filename": "user-samples.npz"}
    with Session(engine) as session, pytest.raises(MessageError, match=match) as info:
        publish_model(session, store, keys, model_path=model, name="m", version="2.0.0", runtime="onnx", **kwargs)
    assert str(tmp_path) not in str(info.value)


# --- any bytes: a signature or a load error, through the inspection and the child ----------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    runtime=st.sampled_from(["onnx", "tflite"]),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(min_value=8, max_value=len(TFLITE_MLP)),
)
def test_mutated_models_never_take_the_checking_process_down(
    tmp_path: Path, runtime: str, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(ONNX_MLP if runtime == "onnx" else TFLITE_MLP)
    for position, value in edits:
        data[position % len(data)] = value
    path = _upload(tmp_path, bytes(data[:cut] if cut is not None else data))
    try:
        signature = check_model(runtime, path, label="fuzz.model", limits=CheckLimits(timeout_s=20))
    except RuntimeLoadError as exc:
        _assert_names_only_the_users_file(exc, tmp_path, "fuzz.model")
    else:
        assert signature.outputs
