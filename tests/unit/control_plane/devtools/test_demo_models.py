"""The demo models compute what numpy says they compute, in onnxruntime and in LiteRT."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tflite
from ai_edge_litert import interpreter as litert_interpreter

from edgefleet.control_plane.devtools.demo_models import (
    ONNX_IR_VERSION,
    ONNX_OPSET,
    MLPWeights,
    build_onnx_mlp,
    build_tflite_mlp,
    make_mlp_weights,
    reference_predict,
    write_demo_models,
)
from edgefleet.shared.errors import ConfigError

# Both runtimes compute in float32; the reference in float64. Observed differences are ~1e-7.
RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def weights() -> MLPWeights:
    return make_mlp_weights(seed=0)


@pytest.fixture(scope="module")
def onnx_bytes(weights: MLPWeights) -> bytes:
    return build_onnx_mlp(weights)


@pytest.fixture(scope="module")
def tflite_bytes(weights: MLPWeights) -> bytes:
    return build_tflite_mlp(weights)


def _inputs(batch: int, n_inputs: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, n_inputs)).astype(np.float32)


def run_onnx(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (out,) = session.run(["probabilities"], {"input": x})
    return out


def run_tflite(model: bytes, x: np.ndarray) -> np.ndarray:
    interpreter = litert_interpreter.Interpreter(model_content=model)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert inp["name"] == "input" and out["name"] == "probabilities"
    if tuple(inp["shape"]) != x.shape:
        # strict=True: only dimensions marked -1 in shape_signature may change, so this also
        # proves the signature is what makes the batch resizable.
        interpreter.resize_tensor_input(inp["index"], list(x.shape), strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def assert_matches_reference(actual: np.ndarray, weights: MLPWeights, x: np.ndarray) -> None:
    expected = reference_predict(weights, x)
    assert actual.dtype == np.float32
    assert actual.shape == (x.shape[0], weights.n_outputs)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(actual.sum(axis=1), np.ones(x.shape[0]), rtol=0, atol=ATOL)


# --- The claim: both files compute reference_predict. ------------------------------------------


@pytest.mark.parametrize("batch", [1, 8])
def test_onnx_matches_reference(weights: MLPWeights, onnx_bytes: bytes, batch: int) -> None:
    x = _inputs(batch, weights.n_inputs)
    assert_matches_reference(run_onnx(onnx_bytes, x), weights, x)


@pytest.mark.parametrize("batch", [1, 8])
def test_tflite_matches_reference(weights: MLPWeights, tflite_bytes: bytes, batch: int) -> None:
    x = _inputs(batch, weights.n_inputs)
    assert_matches_reference(run_tflite(tflite_bytes, x), weights, x)


@pytest.mark.parametrize(
    ("n_inputs", "hidden", "n_outputs"),
    [(5, (), 3), (7, (16,), 2), (3, (9, 11, 6), 10)],
    ids=["no-hidden", "one-hidden", "three-hidden"],
)
def test_other_architectures_match_reference(n_inputs: int, hidden: tuple[int, ...], n_outputs: int) -> None:
    # Non-square layers: a weight matrix written in the wrong orientation cannot hide here.
    w = make_mlp_weights(n_inputs, hidden, n_outputs, seed=3)
    x = _inputs(3, n_inputs, seed=4)
    assert_matches_reference(run_onnx(build_onnx_mlp(w), x), w, x)
    assert_matches_reference(run_tflite(build_tflite_mlp(w), x), w, x)


# --- The comparison above can fail. -----------------------------------------------------------


def test_outputs_are_not_trivial(weights: MLPWeights) -> None:
    # Uniform or one-hot outputs would make "matches within 1e-5" and "sums to 1" near-vacuous.
    probs = reference_predict(weights, _inputs(64, weights.n_inputs))
    assert probs.min() > 1e-4
    assert probs.max(axis=1).min() < 0.9
    assert len(set(probs.argmax(axis=1).tolist())) >= 2
    assert probs.std(axis=0).min() > 1e-2


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_a_small_weight_change_is_detected(weights: MLPWeights, runtime: str) -> None:
    # One hidden weight moved by 1e-2 must push the runtime's answer outside the tolerance
    # against the unmodified reference; otherwise the matching tests prove little.
    layers = [(w.copy(), b.copy()) for w, b in weights.layers]
    layers[1][0][3, 5] += 1e-2
    layers[-1][1][0] += 1e-3
    perturbed = MLPWeights(layers=tuple(layers))
    x = _inputs(8, weights.n_inputs)
    build, run = (build_onnx_mlp, run_onnx) if runtime == "onnx" else (build_tflite_mlp, run_tflite)
    actual = run(build(perturbed), x)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(actual, reference_predict(weights, x), rtol=RTOL, atol=ATOL)
    # ...and it is still exactly what the perturbed reference says.
    np.testing.assert_allclose(actual, reference_predict(perturbed, x), rtol=RTOL, atol=ATOL)


# --- File format details. ---------------------------------------------------------------------


def test_onnx_batch_dimension_is_dynamic(weights: MLPWeights, onnx_bytes: bytes) -> None:
    model = onnx.load_from_string(onnx_bytes)
    assert model.ir_version == ONNX_IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", ONNX_OPSET)]
    for value_info, width in (
        (model.graph.input[0], weights.n_inputs),
        (model.graph.output[0], weights.n_outputs),
    ):
        batch_dim, width_dim = value_info.type.tensor_type.shape.dim
        assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")
        assert width_dim.dim_value == width
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["probabilities"]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", weights.n_inputs]
    assert session.get_outputs()[0].shape == ["batch", weights.n_outputs]


def test_tflite_flatbuffer_layout(weights: MLPWeights, tflite_bytes: bytes) -> None:
    assert tflite_bytes[4:8] == b"TFL3"
    model = tflite.Model.GetRootAs(tflite_bytes, 0)
    assert model.Version() == 3
    assert model.Buffers(0).DataLength() == 0

    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    assert [(c.BuiltinCode(), c.DeprecatedBuiltinCode()) for c in codes] == [
        (tflite.BuiltinOperator.FULLY_CONNECTED, tflite.BuiltinOperator.FULLY_CONNECTED),
        (tflite.BuiltinOperator.SOFTMAX, tflite.BuiltinOperator.SOFTMAX),
    ]

    assert model.SubgraphsLength() == 1
    graph = model.Subgraphs(0)
    inp = graph.Tensors(graph.Inputs(0))
    out = graph.Tensors(graph.Outputs(0))
    assert inp.Name() == b"input" and out.Name() == b"probabilities"
    assert inp.ShapeAsNumpy().tolist() == [1, weights.n_inputs]
    assert inp.ShapeSignatureAsNumpy().tolist() == [-1, weights.n_inputs]
    assert out.ShapeAsNumpy().tolist() == [1, weights.n_outputs]
    assert out.ShapeSignatureAsNumpy().tolist() == [-1, weights.n_outputs]
    assert inp.Type() == out.Type() == tflite.TensorType.FLOAT32

    ops = [graph.Operators(i) for i in range(graph.OperatorsLength())]
    assert [codes[op.OpcodeIndex()].BuiltinCode() for op in ops] == [
        tflite.BuiltinOperator.FULLY_CONNECTED
    ] * len(weights.layers) + [tflite.BuiltinOperator.SOFTMAX]
    for index, (op, (w, b)) in enumerate(zip(ops, weights.layers, strict=False)):
        assert op.BuiltinOptionsType() == tflite.BuiltinOptions.FullyConnectedOptions
        options = tflite.FullyConnectedOptions()
        options.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        last = index == len(weights.layers) - 1
        expected_activation = (
            tflite.ActivationFunctionType.NONE if last else tflite.ActivationFunctionType.RELU
        )
        assert options.FusedActivationFunction() == expected_activation
        w_tensor, b_tensor = graph.Tensors(op.Inputs(1)), graph.Tensors(op.Inputs(2))
        assert w_tensor.ShapeAsNumpy().tolist() == [w.shape[1], w.shape[0]]
        w_buffer = model.Buffers(w_tensor.Buffer())
        stored = w_buffer.DataAsNumpy().view("<f4").reshape(w.shape[1], w.shape[0])
        np.testing.assert_array_equal(stored, w.T)
        np.testing.assert_array_equal(model.Buffers(b_tensor.Buffer()).DataAsNumpy().view("<f4"), b)
        # Weights are aligned so the runtime can use them in place from an mmapped file.
        assert w_buffer._tab.Vector(w_buffer._tab.Offset(4)) % 16 == 0
    softmax = ops[-1]
    assert softmax.BuiltinOptionsType() == tflite.BuiltinOptions.SoftmaxOptions
    options = tflite.SoftmaxOptions()
    options.Init(softmax.BuiltinOptions().Bytes, softmax.BuiltinOptions().Pos)
    assert options.Beta() == 1.0


# --- Weights, reference and writer. -----------------------------------------------------------


def test_weights_are_deterministic_and_shaped() -> None:
    a, b = make_mlp_weights(seed=7), make_mlp_weights(seed=7)
    assert a.n_inputs == 32 and a.n_outputs == 4
    assert [w.shape for w, _ in a.layers] == [(32, 64), (64, 64), (64, 4)]
    assert [bias.shape for _, bias in a.layers] == [(64,), (64,), (4,)]
    for (wa, ba), (wb, bb) in zip(a.layers, b.layers, strict=True):
        assert wa.dtype == ba.dtype == np.float32
        np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(ba, bb)
    assert not np.array_equal(a.layers[0][0], make_mlp_weights(seed=8).layers[0][0])


def test_weights_are_immutable_copies() -> None:
    w = np.ones((2, 3), np.float32)
    b = np.zeros(3, np.float32)
    weights = MLPWeights(layers=((w, b),))
    w[0, 0] = 5.0
    assert weights.layers[0][0][0, 0] == 1.0
    with pytest.raises(ValueError, match="read-only"):  # numpy's own refusal of a frozen array
        weights.layers[0][0][0, 0] = 2.0


@pytest.mark.parametrize(
    "layers",
    [
        (),
        ((np.ones((2, 3), np.float64), np.zeros(3, np.float32)),),
        ((np.ones((2, 3), np.float32), np.zeros(2, np.float32)),),
        (
            (np.ones((2, 3), np.float32), np.zeros(3, np.float32)),
            (np.ones((4, 2), np.float32), np.zeros(2, np.float32)),
        ),
    ],
    ids=["empty", "float64", "bias-shape", "chain-mismatch"],
)
def test_invalid_weights_are_rejected(layers: tuple) -> None:
    with pytest.raises(ConfigError):
        MLPWeights(layers=layers)


def test_invalid_widths_are_rejected() -> None:
    with pytest.raises(ConfigError):
        make_mlp_weights(n_inputs=0)
    with pytest.raises(ConfigError):
        make_mlp_weights(hidden=(8, 0))


def test_reference_rejects_wrong_input_shape(weights: MLPWeights) -> None:
    with pytest.raises(ConfigError):
        reference_predict(weights, np.zeros((2, weights.n_inputs + 1), np.float32))
    with pytest.raises(ConfigError):
        reference_predict(weights, np.zeros(weights.n_inputs, np.float32))


def test_reference_matches_a_hand_computed_network() -> None:
    # Independent of make_mlp_weights: relu between layers, softmax at the end, x @ W + b.
    w1 = np.array([[1.0, -1.0]], np.float32)  # [in=1, out=2]
    b1 = np.array([0.0, 0.5], np.float32)
    w2 = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
    b2 = np.array([0.0, 0.0], np.float32)
    weights = MLPWeights(layers=((w1, b1), (w2, b2)))
    # x=1: hidden = relu([1, -0.5]) = [1, 0]; logits = [2, 0].
    # x=-1: hidden = relu([-1, 1.5]) = [0, 1.5]; logits = [0, 1.5].
    logits = np.array([[2.0, 0.0], [0.0, 1.5]])
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = reference_predict(weights, np.array([[1.0], [-1.0]], np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_write_demo_models(tmp_path) -> None:
    paths = write_demo_models(tmp_path / "models", seed=5)
    assert paths == {
        "onnx": tmp_path / "models" / "classifier.onnx",
        "tflite": tmp_path / "models" / "classifier.tflite",
    }
    weights = make_mlp_weights(seed=5)
    assert paths["onnx"].read_bytes() == build_onnx_mlp(weights)
    assert paths["tflite"].read_bytes() == build_tflite_mlp(weights)
    # The two files are the same function.
    x = _inputs(8, weights.n_inputs, seed=6)
    from_onnx = run_onnx(paths["onnx"].read_bytes(), x)
    from_tflite = run_tflite(paths["tflite"].read_bytes(), x)
    np.testing.assert_allclose(from_onnx, from_tflite, rtol=RTOL, atol=ATOL)
    assert_matches_reference(from_onnx, weights, x)
    # A different seed gives a different model.
    other = write_demo_models(tmp_path / "other", seed=6)
    assert other["tflite"].read_bytes() != paths["tflite"].read_bytes()
