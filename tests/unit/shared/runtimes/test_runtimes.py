"""The runtimes behind LoadedModel: provider choice, input validation, and agreement with the
runtimes called directly on the same file."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from onnx import TensorProto, helper, numpy_helper

from edgefleet.shared.errors import ConfigError, InferenceError, RuntimeLoadError
from edgefleet.shared.runtimes import LoadedModel, RuntimeOptions, load_model
from edgefleet.shared.runtimes.onnx_backend import choose_providers, onnx_type_to_v2
from edgefleet.shared.tensors import TensorSpec

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
AZURE = "AzureExecutionProvider"
COREML = "CoreMLExecutionProvider"

# Not a multiple of a simple pattern, so that a transposed or misplaced weight shows.
WEIGHTS = np.array(
    [[0.5, -1.0, 0.25], [1.5, 0.0, -0.5], [-0.75, 2.0, 1.0], [0.1, 0.3, -1.2]],
    dtype=np.float32,
)


def build_onnx(batch_dim: str | None = "batch", input_type: int = TensorProto.FLOAT) -> bytes:
    """input float32 [batch, 4] -> MatMul(WEIGHTS) -> Softmax -> probabilities [batch, 3]."""
    if input_type != TensorProto.FLOAT:
        node = helper.make_node("Identity", ["input"], ["probabilities"])
        out_type, initializers, nodes = input_type, [], [node]
    else:
        nodes = [
            helper.make_node("MatMul", ["input", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ]
        out_type, initializers = TensorProto.FLOAT, [numpy_helper.from_array(WEIGHTS, "weights")]
    graph = helper.make_graph(
        nodes,
        "tiny",
        inputs=[helper.make_tensor_value_info("input", input_type, [batch_dim, 4])],
        outputs=[helper.make_tensor_value_info("probabilities", out_type, [batch_dim, 3 if initializers else 4])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def softmax_reference(x: np.ndarray) -> np.ndarray:
    logits = x.astype(np.float64) @ WEIGHTS.astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def onnx_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    path.write_bytes(build_onnx())
    return path


@pytest.fixture
def tflite_path(tmp_path: Path) -> Path:
    # Imported here, not at module level: the ONNX tests must not depend on the TFLite builder.
    from edgefleet.control_plane.devtools.demo_models import build_tflite_mlp, make_mlp_weights

    path = tmp_path / "mlp.tflite"
    path.write_bytes(build_tflite_mlp(make_mlp_weights(n_inputs=8, hidden=(16,), n_outputs=3, seed=7)))
    return path


@pytest.fixture
def onnx_model(onnx_path: Path) -> Iterator[LoadedModel]:
    model = load_model("onnx", onnx_path, name="tiny", version="1")
    yield model
    model.close()


@pytest.fixture
def tflite_model(tflite_path: Path) -> Iterator[LoadedModel]:
    model = load_model("tflite", tflite_path, name="mlp", version="2")
    yield model
    model.close()


@pytest.fixture(params=["onnx", "tflite"])
def any_model(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(f"{request.param}_model")


def valid_inputs(model: LoadedModel, batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {
        spec.name: rng.standard_normal([batch if d == -1 else d for d in spec.shape]).astype(spec.numpy_dtype)
        for spec in model.inputs
    }


# --- choose_providers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("available", "preferred", "expected"),
    [
        # Automatic: best first, whatever order the build lists them in.
        ([CPU, OPENVINO, CUDA, TRT], None, [TRT, CUDA, OPENVINO, CPU]),
        ([AZURE, CPU], None, [CPU]),
        ([CUDA, AZURE, CPU], None, [CUDA, CPU]),
        ([OPENVINO, CPU], None, [OPENVINO, CPU]),
        # Not in the automatic list: only used when asked for.
        ([COREML, CPU], None, [CPU]),
        # CPU is appended even if a build did not list it.
        ([CUDA], None, [CUDA, CPU]),
        ([], None, [CPU]),
        # Explicit preference wins over the automatic order.
        ([TRT, CUDA, OPENVINO, CPU], [OPENVINO, CUDA], [OPENVINO, CUDA, CPU]),
        ([COREML, CPU], [COREML], [COREML, CPU]),
        # Unavailable and Azure providers are skipped; duplicates collapse.
        ([CPU], [TRT, CUDA], [CPU]),
        ([AZURE, CUDA, CPU], [AZURE, CUDA, CUDA], [CUDA, CPU]),
        # CPU takes every node, so nothing after it could ever run: the list ends there.
        ([CUDA, CPU], [CPU, CUDA], [CPU]),
        ([CUDA, CPU], [CUDA, CPU], [CUDA, CPU]),
        ([CUDA, CPU], [], [CPU]),
    ],
)
def test_choose_providers(available: list[str], preferred: list[str] | None, expected: list[str]) -> None:
    assert choose_providers(available, preferred) == expected


def test_session_uses_chosen_providers(onnx_path: Path) -> None:
    model = load_model("onnx", onnx_path, name="tiny", version="1", options=RuntimeOptions(providers=(TRT, CUDA)))
    # This build has neither accelerator: it must fall back to CPU instead of failing.
    assert model.providers == [CPU]  # type: ignore[attr-defined]


# --- loading and signatures -------------------------------------------------------------------


def test_onnx_signature(onnx_model: LoadedModel) -> None:
    assert onnx_model.runtime == "onnx"
    assert (onnx_model.name, onnx_model.version) == ("tiny", "1")
    assert onnx_model.inputs == (TensorSpec(name="input", datatype="FP32", shape=(-1, 4)),)
    assert onnx_model.outputs == (TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 3)),)


def test_onnx_unnamed_dynamic_dim_is_minus_one(tmp_path: Path) -> None:
    path = tmp_path / "anon.onnx"
    path.write_bytes(build_onnx(batch_dim=None))
    model = load_model("onnx", path, name="anon", version="1")
    assert model.inputs[0].shape == (-1, 4)


def test_tflite_signature(tflite_model: LoadedModel) -> None:
    assert tflite_model.runtime == "tflite"
    assert tflite_model.inputs == (TensorSpec(name="input", datatype="FP32", shape=(-1, 8)),)
    assert tflite_model.outputs == (TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 3)),)


@pytest.mark.parametrize(
    ("onnx_type", "v2"),
    [("tensor(float)", "FP32"), ("tensor(double)", "FP64"), ("tensor(float16)", "FP16"), ("tensor(int64)", "INT64"),
     ("tensor(uint8)", "UINT8"), ("tensor(bool)", "BOOL")],
)  # fmt: skip
def test_onnx_type_to_v2(onnx_type: str, v2: str) -> None:
    assert onnx_type_to_v2(onnx_type, "x") == v2


@pytest.mark.parametrize("onnx_type", ["tensor(string)", "tensor(bfloat16)", "seq(tensor(float))"])
def test_onnx_type_to_v2_rejects_what_v2_cannot_carry(onnx_type: str) -> None:
    with pytest.raises(RuntimeLoadError, match="unsupported ONNX type"):
        onnx_type_to_v2(onnx_type, "x")


def test_onnx_string_model_does_not_load(tmp_path: Path) -> None:
    path = tmp_path / "strings.onnx"
    path.write_bytes(build_onnx(input_type=TensorProto.STRING))
    with pytest.raises(RuntimeLoadError, match=r"tensor\(string\)"):
        load_model("onnx", path, name="s", version="1")


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_missing_file_is_a_load_error(runtime: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match="could not load"):
        load_model(runtime, tmp_path / "absent.model", name="m", version="1")


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_corrupt_file_is_a_load_error(runtime: str, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.model"
    path.write_bytes(b"\x00not a model\xff" * 10)
    with pytest.raises(RuntimeLoadError) as info:
        load_model(runtime, path, name="m", version="1")
    assert info.value.__cause__ is not None  # translated with `raise ... from`


def test_unknown_runtime(onnx_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match="unknown runtime 'tensorrt'"):
        load_model("tensorrt", onnx_path, name="m", version="1")


@pytest.mark.parametrize(
    "kwargs", [{"intra_op_threads": -1}, {"intra_op_threads": True}, {"providers": [CPU]}, {"providers": (1,)}]
)
def test_runtime_options_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RuntimeOptions(**kwargs)  # type: ignore[arg-type]


def test_runtimes_are_imported_lazily(onnx_path: Path, tflite_path: Path) -> None:
    # A fresh interpreter: this test process has imported both runtimes already.
    code = (
        "import sys\n"
        "from shared.runtimes import load_model\n"
        "assert 'onnxruntime' not in sys.modules and 'ai_edge_litert' not in sys.modules\n"
        f"load_model('tflite', {str(tflite_path)!r}, name='m', version='1')\n"
        "assert 'ai_edge_litert' in sys.modules and 'onnxruntime' not in sys.modules\n"
        f"load_model('onnx', {str(onnx_path)!r}, name='m', version='1')\n"
        "assert 'onnxruntime' in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[4]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- predict: agreement with the runtimes called directly -------------------------------------


@pytest.mark.parametrize("batch", [1, 8])
def test_onnx_matches_direct_session(onnx_model: LoadedModel, onnx_path: Path, batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=[CPU])
    (direct,) = session.run(["probabilities"], {"input": x})

    outputs = onnx_model.predict({"input": x})

    assert set(outputs) == {"probabilities"}
    got = outputs["probabilities"]
    assert got.dtype == np.float32 and got.shape == (batch, 3)
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-7)
    # And the file computes what it should, so agreement is not two wrong answers.
    np.testing.assert_allclose(got, softmax_reference(x), rtol=0, atol=1e-6)


def run_interpreter_directly(path: Path, x: np.ndarray) -> np.ndarray:
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    (input_detail,) = interpreter.get_input_details()
    (output_detail,) = interpreter.get_output_details()
    interpreter.resize_tensor_input(input_detail["index"], x.shape, strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_detail["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(output_detail["index"])


def test_tflite_matches_direct_interpreter_across_batch_sizes(tflite_model: LoadedModel, tflite_path: Path) -> None:
    from edgefleet.control_plane.devtools.demo_models import make_mlp_weights, reference_predict

    weights = make_mlp_weights(n_inputs=8, hidden=(16,), n_outputs=3, seed=7)
    rng = np.random.default_rng(0)
    # 1 -> 8 -> 1 -> 8: both directions of the resize, and back to an allocation used before.
    for batch in (1, 8, 1, 8, 3):
        x = rng.standard_normal((batch, 8)).astype(np.float32)
        got = tflite_model.predict({"input": x})["probabilities"]
        assert got.dtype == np.float32 and got.shape == (batch, 3)
        np.testing.assert_allclose(got, run_interpreter_directly(tflite_path, x), rtol=0, atol=1e-7)
        np.testing.assert_allclose(got, reference_predict(weights, x), rtol=0, atol=1e-5)


def test_tflite_resizes_only_when_the_batch_changes(tflite_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    interpreter = tflite_model._interpreter  # type: ignore[attr-defined]
    resizes: list[tuple[int, ...]] = []
    original = interpreter.resize_tensor_input

    def counting_resize(index: int, shape: tuple[int, ...], strict: bool = False) -> None:
        resizes.append(tuple(shape))
        original(index, shape, strict=strict)

    monkeypatch.setattr(interpreter, "resize_tensor_input", counting_resize)
    for batch in (1, 1, 8, 8, 8, 1):
        tflite_model.predict(valid_inputs(tflite_model, batch))
    # Loaded at batch 1: no resize until 8, none while it stays 8, one back to 1.
    assert resizes == [(8, 8), (1, 8)]


def test_tflite_outputs_are_not_overwritten_by_the_next_call(tflite_model: LoadedModel) -> None:
    first = tflite_model.predict(valid_inputs(tflite_model, 2))["probabilities"]
    kept = first.copy()
    tflite_model.predict(valid_inputs(tflite_model, 5))
    np.testing.assert_array_equal(first, kept)


def test_tflite_concurrent_predicts_are_serialised(tflite_model: LoadedModel) -> None:
    from edgefleet.control_plane.devtools.demo_models import make_mlp_weights, reference_predict

    weights = make_mlp_weights(n_inputs=8, hidden=(16,), n_outputs=3, seed=7)
    batches = (1, 2, 5, 8, 3, 13)
    start = threading.Barrier(len(batches))
    failures: list[str] = []

    def worker(batch: int) -> None:
        x = np.random.default_rng(batch).standard_normal((batch, 8)).astype(np.float32)
        expected = reference_predict(weights, x)
        start.wait()
        for _ in range(300):
            try:
                got = tflite_model.predict({"input": x})["probabilities"]
            except InferenceError as exc:  # an interleaved resize shows up as a runtime error
                failures.append(f"batch {batch}: {exc}")
                return
            if got.shape != expected.shape or not np.allclose(got, expected, rtol=0, atol=1e-5):
                failures.append(f"batch {batch}: wrong answer, shape {got.shape}")
                return

    threads = [threading.Thread(target=worker, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# --- predict: validation ------------------------------------------------------------------------


def test_valid_inputs_pass(any_model: LoadedModel) -> None:
    outputs = any_model.predict(valid_inputs(any_model, 3))
    assert [name for name in outputs] == [spec.name for spec in any_model.outputs]
    assert all(array.shape[0] == 3 for array in outputs.values())


def test_validate_checks_without_running_the_model(any_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[object] = []
    monkeypatch.setattr(any_model, "_run", runs.append)
    any_model.validate(valid_inputs(any_model, 2))
    (array,) = valid_inputs(any_model).values()
    with pytest.raises(InferenceError, match="missing input 'input'"):
        any_model.validate({})
    with pytest.raises(InferenceError, match="has datatype FP64"):
        any_model.validate({"input": array.astype(np.float64)})
    with pytest.raises(InferenceError, match="has shape"):
        any_model.validate({"input": array[:, :2]})
    assert runs == []


def test_missing_input(any_model: LoadedModel) -> None:
    with pytest.raises(InferenceError, match="missing input 'input'"):
        any_model.predict({})


def test_unknown_input(any_model: LoadedModel) -> None:
    inputs = valid_inputs(any_model)
    inputs["extra"] = np.zeros((1, 4), dtype=np.float32)
    with pytest.raises(InferenceError, match=r"unknown input\(s\) \['extra'\]"):
        any_model.predict(inputs)


def test_misnamed_input(any_model: LoadedModel) -> None:
    (array,) = valid_inputs(any_model).values()
    with pytest.raises(InferenceError, match=r"missing input 'input'; the model takes \['input'\], got \['inputs'\]"):
        any_model.predict({"inputs": array})


@pytest.mark.parametrize(("dtype", "v2"), [(np.float64, "FP64"), (np.float16, "FP16"), (np.int32, "INT32")])
def test_wrong_dtype_is_rejected_not_cast(any_model: LoadedModel, dtype: type, v2: str) -> None:
    (array,) = valid_inputs(any_model).values()
    with pytest.raises(InferenceError) as info:
        any_model.predict({"input": array.astype(dtype)})
    message = str(info.value)
    assert "'input'" in message and v2 in message and "expected FP32" in message


def test_non_native_byte_order_is_a_wrong_dtype(any_model: LoadedModel) -> None:
    (array,) = valid_inputs(any_model).values()
    with pytest.raises(InferenceError, match="datatype"):
        any_model.predict({"input": array.astype(array.dtype.newbyteorder())})


@pytest.mark.parametrize("shape_of", [lambda f: (f,), lambda f: (1, 1, f), lambda f: (1, f + 1), lambda f: (2, f - 1)])
def test_wrong_shape(any_model: LoadedModel, shape_of: object) -> None:
    features = any_model.inputs[0].shape[1]
    shape = shape_of(features)  # type: ignore[operator]
    with pytest.raises(InferenceError) as info:
        any_model.predict({"input": np.zeros(shape, dtype=np.float32)})
    assert f"shape {list(shape)}" in str(info.value) and f"expected [-1, {features}]" in str(info.value)


def test_not_an_array(any_model: LoadedModel) -> None:
    with pytest.raises(InferenceError, match="must be a numpy array, got list"):
        any_model.predict({"input": [[0.0] * any_model.inputs[0].shape[1]]})  # type: ignore[dict-item]


def test_predict_after_close(any_model: LoadedModel) -> None:
    any_model.close()
    with pytest.raises(InferenceError, match="closed"):
        any_model.predict(valid_inputs(any_model))


def test_non_contiguous_input_is_fine(any_model: LoadedModel) -> None:
    features = any_model.inputs[0].shape[1]
    wide = np.random.default_rng(1).standard_normal((4, features * 2)).astype(np.float32)
    view = wide[:, ::2]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(
        any_model.predict({"input": view})["probabilities"],
        any_model.predict({"input": np.ascontiguousarray(view)})["probabilities"],
    )
