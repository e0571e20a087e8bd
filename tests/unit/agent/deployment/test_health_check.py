"""The post-activation health check: shipped sample inputs, zeros otherwise, and the latency budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.deployment.health_check import run_health_check, sample_inputs
from edgefleet.control_plane.devtools.demo_models import write_demo_models
from edgefleet.control_plane.services.publishing import HEALTH_INPUTS_FILE
from edgefleet.shared.bundle.format import build_bundle, extract_bundle, make_manifest
from edgefleet.shared.errors import InferenceError
from edgefleet.shared.runtimes import load_model
from edgefleet.shared.trust.signing import SigningKey


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_models(tmp_path_factory.mktemp("models"))["onnx"]


def _slot(tmp_path: Path, model_file: Path, samples: dict[str, np.ndarray] | None, budget_ms: float | None):
    """Build, sign and unpack a bundle the way a device stages it; return (slot, manifest, model)."""
    model = load_model("onnx", model_file, name="m", version="1")
    files = {"model.onnx": model_file}
    if samples is not None:
        np.savez(tmp_path / "inputs.npz", **samples)
        files[HEALTH_INPUTS_FILE] = tmp_path / "inputs.npz"
    manifest = make_manifest(
        name="m",
        version="1",
        runtime="onnx",
        model_file="model.onnx",
        files=files,
        inputs=model.inputs,
        outputs=model.outputs,
        health_inputs=HEALTH_INPUTS_FILE if samples is not None else None,
        latency_budget_ms=budget_ms,
    )
    key = SigningKey.generate()
    build_bundle(tmp_path / "b.bundle", manifest, files, [key])
    slot = tmp_path / "slot"
    extract_bundle(tmp_path / "b.bundle", slot, trusted_keys={key.key_id: key.public_key})
    return slot, manifest, model


def test_shipped_sample_inputs_are_what_the_warm_up_runs_on(tmp_path: Path, model_file: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    slot, manifest, model = _slot(tmp_path, model_file, {"input": x}, 1000.0)
    inputs = sample_inputs(model, slot, manifest)
    np.testing.assert_array_equal(inputs["input"], x)
    assert run_health_check(model, inputs, manifest.latency_budget_ms / 1000) > 0


def test_without_samples_the_warm_up_runs_on_zeros(tmp_path: Path, model_file: Path) -> None:
    slot, manifest, model = _slot(tmp_path, model_file, None, None)
    inputs = sample_inputs(model, slot, manifest)
    assert inputs["input"].shape == (1, 32) and not inputs["input"].any()


def test_samples_that_do_not_fit_the_model_fail_the_check(tmp_path: Path, model_file: Path) -> None:
    slot, manifest, model = _slot(tmp_path, model_file, {"input": np.zeros((2, 31), np.float32)}, None)
    with pytest.raises(InferenceError, match="shape"):
        run_health_check(model, sample_inputs(model, slot, manifest), 10.0)


def test_a_warm_up_over_the_latency_budget_fails(tmp_path: Path, model_file: Path) -> None:
    slot, manifest, model = _slot(tmp_path, model_file, {"input": np.zeros((64, 32), np.float32)}, 1e-6)
    with pytest.raises(InferenceError, match="over the"):
        run_health_check(model, sample_inputs(model, slot, manifest), manifest.latency_budget_ms / 1000)


def test_a_corrupt_samples_file_fails_the_check(tmp_path: Path, model_file: Path) -> None:
    slot, manifest, model = _slot(tmp_path, model_file, {"input": np.zeros((1, 32), np.float32)}, None)
    (slot / HEALTH_INPUTS_FILE).write_bytes(b"not a zip")
    with pytest.raises(InferenceError, match="do not load"):
        sample_inputs(model, slot, manifest)


def test_the_budget_is_judged_on_the_timer_passed_in(tmp_path: Path, model_file: Path) -> None:
    _, _, model = _slot(tmp_path, model_file, None, None)
    inputs = sample_inputs(model, None, None)
    ticks = iter([10.0, 10.5])  # the warm-up "took" 0.5 s, whatever it really took
    assert run_health_check(model, inputs, 1.0, timer=lambda: next(ticks)) == 0.5
    ticks = iter([10.0, 12.0])
    with pytest.raises(InferenceError, match="over the 1000.0 ms budget"):
        run_health_check(model, inputs, 1.0, timer=lambda: next(ticks))
