"""Small, real models for the demo, the tests and the benchmarks, built from numpy weights.

Nothing is downloaded and no training framework is needed: a multi-layer perceptron is drawn
from a seeded random generator, then written out twice, as an ONNX graph (``onnx.helper``) and
as a TFLite flatbuffer (``flatbuffers`` plus the generated schema code of the ``tflite``
package). Both files compute the same function as :func:`reference_predict`, so a device's
answer can be checked against numpy to within float32 rounding.

Both models take ``input`` (float32 ``[batch, n_inputs]``) and return ``probabilities``
(float32 ``[batch, n_outputs]``, rows summing to 1); the batch dimension is dynamic in both.

These builders need the ``models`` extra (``onnx``, ``flatbuffers``, ``tflite``); they are
imported lazily so that importing this module costs nothing on a device or the control plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefleet.shared.errors import ConfigError
from edgefleet.shared.files import atomic_write_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"

# ONNX: opset 17 has every op used here (Gemm, Relu, Softmax with an `axis` that means
# "this one axis", which changed in opset 13). IR version 9 is pinned rather than left to
# onnx's default, because a newer onnx stamps an IR version that older onnxruntime builds
# refuse to load; IR 9 loads in every onnxruntime >= 1.15, below the >= 1.17 the agent extra
# requires.
ONNX_OPSET = 17
ONNX_IR_VERSION = 9

# TFLite: schema version 3 is the only one current runtimes accept, and "TFL3" is the file
# identifier they check.
TFLITE_SCHEMA_VERSION = 3
_TFLITE_FILE_IDENTIFIER = b"TFL3"
# Constant buffers are aligned so that the runtime can use the weights in place (mmap) with
# vectorised loads; 16 bytes is what the TFLite converter uses.
_TFLITE_BUFFER_ALIGNMENT = 16


@dataclass(frozen=True, eq=False)
class MLPWeights:
    """The parameters of a fully connected network: ReLU between layers, softmax at the end.

    ``eq=False`` keeps identity equality and hashing: field-wise ``==`` on numpy arrays is
    ambiguous, and arrays are unhashable.

    Attributes:
        layers: One ``(W, b)`` pair per layer, first layer first. ``W`` is float32 of shape
            ``[in, out]`` (so a layer computes ``x @ W + b``) and ``b`` is float32 of shape
            ``[out]``. Each layer's ``out`` is the next layer's ``in``. The arrays are
            read-only copies, so the weights cannot change after the models are built.
    """

    layers: tuple[tuple[np.ndarray, np.ndarray], ...] = field()

    def __post_init__(self) -> None:
        """Validate the layer chain and freeze private float32 copies of the arrays.

        Raises:
            ValueError: If there are no layers, an array has the wrong rank or dtype, or the
                shapes of consecutive layers do not chain.
        """
        if not self.layers:
            raise ConfigError("an MLP needs at least one layer")
        frozen: list[tuple[np.ndarray, np.ndarray]] = []
        previous_out: int | None = None
        for index, (w, b) in enumerate(self.layers):
            w_arr = np.asarray(w)
            b_arr = np.asarray(b)
            if w_arr.dtype != np.float32 or b_arr.dtype != np.float32:
                raise ConfigError(f"layer {index}: weights and bias must be float32")
            if w_arr.ndim != 2 or b_arr.ndim != 1 or b_arr.shape[0] != w_arr.shape[1]:
                raise ConfigError(
                    f"layer {index}: expected W [in, out] and b [out], got {w_arr.shape} and {b_arr.shape}"
                )
            if min(w_arr.shape) < 1:
                raise ConfigError(f"layer {index}: empty weight matrix {w_arr.shape}")
            if previous_out is not None and w_arr.shape[0] != previous_out:
                raise ConfigError(
                    f"layer {index}: takes {w_arr.shape[0]} inputs but the previous layer "
                    f"gives {previous_out}"
                )
            previous_out = w_arr.shape[1]
            # Copy, then lock: a caller mutating its own arrays afterwards must not change a
            # "frozen" value, nor make the ONNX and TFLite files disagree.
            w_copy = np.array(w_arr, dtype=np.float32, order="C", copy=True)
            b_copy = np.array(b_arr, dtype=np.float32, order="C", copy=True)
            w_copy.setflags(write=False)
            b_copy.setflags(write=False)
            frozen.append((w_copy, b_copy))
        # The dataclass is frozen; object.__setattr__ is the sanctioned way to finish init.
        object.__setattr__(self, "layers", tuple(frozen))

    @property
    def n_inputs(self) -> int:
        """Number of input features (width of the first layer)."""
        return int(self.layers[0][0].shape[0])

    @property
    def n_outputs(self) -> int:
        """Number of classes (width of the last layer)."""
        return int(self.layers[-1][0].shape[1])


def make_mlp_weights(
    n_inputs: int = 32,
    hidden: tuple[int, ...] = (64, 64),
    n_outputs: int = 4,
    seed: int = 0,
) -> MLPWeights:
    """Draw the weights of an MLP deterministically from ``seed``.

    Args:
        n_inputs: Number of input features.
        hidden: Width of each hidden layer; ``()`` gives a single linear layer plus softmax.
        n_outputs: Number of classes.
        seed: Seed of the random generator; the same arguments always give the same weights.

    Returns:
        The weights, float32.

    Raises:
        ValueError: If any width is smaller than 1.
    """
    widths = (n_inputs, *hidden, n_outputs)
    if any(int(width) < 1 for width in widths):
        raise ConfigError(f"every layer width must be >= 1, got {widths}")
    rng = np.random.default_rng(seed)
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    last = len(widths) - 2
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        # He scaling keeps ReLU activations of order 1 at any depth; the last layer uses a
        # smaller (LeCun) scale so the softmax is confident but not saturated, which keeps
        # every class probability large enough for a numerical comparison to mean something.
        scale = np.sqrt((1.0 if index == last else 2.0) / fan_in)
        w = (rng.standard_normal((fan_in, fan_out)) * scale).astype(np.float32)
        # Non-zero biases, so that a runtime that dropped or misplaced them would be caught.
        b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        layers.append((w, b))
    return MLPWeights(layers=tuple(layers))


def reference_predict(weights: MLPWeights, x: np.ndarray) -> np.ndarray:
    """Compute the network's output with numpy: the ground truth the model files must match.

    Args:
        weights: The network.
        x: Inputs of shape ``[N, n_inputs]``.

    Returns:
        Class probabilities, float32 of shape ``[N, n_outputs]``; each row sums to 1.

    Raises:
        ValueError: If ``x`` is not of shape ``[N, n_inputs]``.
    """
    h = np.asarray(x)
    if h.ndim != 2 or h.shape[1] != weights.n_inputs:
        raise ConfigError(f"expected input of shape [N, {weights.n_inputs}], got {h.shape}")
    # float64 throughout: the reference should be closer to the exact answer than either
    # float32 runtime, so a mismatch is the runtime's rounding, not the reference's.
    h = h.astype(np.float64)
    for index, (w, b) in enumerate(weights.layers):
        h = h @ w.astype(np.float64) + b.astype(np.float64)
        if index < len(weights.layers) - 1:
            h = np.maximum(h, 0.0)
    # Subtracting the row maximum avoids overflow in exp without changing the result.
    h = h - h.max(axis=1, keepdims=True)
    e = np.exp(h)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def build_onnx_mlp(weights: MLPWeights) -> bytes:
    """Serialise the network as an ONNX model.

    The graph is ``Gemm`` (+ ``Relu`` for hidden layers) per layer, then ``Softmax(axis=-1)``.
    Input ``input`` is float32 ``["batch", n_inputs]`` and output ``probabilities`` is float32
    ``["batch", n_outputs]``, the batch being a symbolic (dynamic) dimension.

    Args:
        weights: The network.

    Returns:
        The bytes of a ``.onnx`` file (IR version :data:`ONNX_IR_VERSION`, default-domain opset
        :data:`ONNX_OPSET`) that passes ``onnx.checker`` with full checking.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = INPUT_NAME
    n_layers = len(weights.layers)
    for index, (w, b) in enumerate(weights.layers):
        w_name, b_name = f"dense_{index}/weight", f"dense_{index}/bias"
        initializers.append(numpy_helper.from_array(w, w_name))
        initializers.append(numpy_helper.from_array(b, b_name))
        gemm_out = f"dense_{index}/gemm" if index < n_layers - 1 else "logits"
        # W is stored [in, out], exactly Gemm's B without transB, so the initializer is the
        # numpy array as is and x @ W + b maps 1:1 onto Gemm(A=x, B=W, C=b).
        nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [gemm_out], name=f"dense_{index}"))
        current = gemm_out
        if index < n_layers - 1:
            relu_out = f"dense_{index}/relu"
            nodes.append(helper.make_node("Relu", [current], [relu_out], name=f"dense_{index}_relu"))
            current = relu_out
    nodes.append(helper.make_node("Softmax", [current], [OUTPUT_NAME], name="softmax", axis=-1))

    graph = helper.make_graph(
        nodes,
        "edgefleet_demo_mlp",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", weights.n_inputs])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", weights.n_outputs])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="edgefleet.demo_models",
        ir_version=ONNX_IR_VERSION,
    )
    # full_check also runs shape inference, so a wrong weight orientation fails here, at build
    # time, rather than on a device.
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def build_tflite_mlp(weights: MLPWeights) -> bytes:
    """Serialise the network as a TFLite flatbuffer.

    One ``FULLY_CONNECTED`` per layer (fused ``RELU`` for hidden layers, ``NONE`` for the last),
    then ``SOFTMAX`` with ``beta=1``. Input ``input`` is float32 ``[1, n_inputs]`` with shape
    signature ``[-1, n_inputs]``, so the interpreter's batch can be resized; output
    ``probabilities`` likewise is ``[1, n_outputs]`` / ``[-1, n_outputs]``.

    Args:
        weights: The network.

    Returns:
        The bytes of a ``.tflite`` file (schema version 3, identifier ``TFL3``).
    """
    import flatbuffers

    # The package star-imports every generated module into itself, so ``tflite.Buffer`` is the
    # reader *class*, not the module; the builder functions are used through their unique,
    # table-prefixed top-level names (``tflite.BufferStart``) instead.
    import tflite
    from tflite import ActivationFunctionType, BuiltinOperator, BuiltinOptions, TensorType

    builder = flatbuffers.Builder(1024)

    # --- What the graph is, as plain Python, before any of it is serialised. -----------------
    # Buffer 0 is by convention the empty sentinel; every activation tensor points at it, which
    # tells the runtime "no constant data: allocate me in the arena".
    buffers: list[bytes] = [b""]
    # Each tensor: (name, shape, shape_signature or None, buffer index).
    tensors: list[tuple[str, list[int], list[int] | None, int]] = []

    def add_tensor(name: str, shape: list[int], signature: list[int] | None, data: bytes = b"") -> int:
        buffer_index = 0
        if data:
            buffers.append(data)
            buffer_index = len(buffers) - 1
        tensors.append((name, shape, signature, buffer_index))
        return len(tensors) - 1

    opcode_fc, opcode_softmax = 0, 1
    # Each operator: (opcode index, inputs, outputs, fused activation or None for softmax).
    operators: list[tuple[int, list[int], list[int], int | None]] = []

    current = add_tensor(INPUT_NAME, [1, weights.n_inputs], [-1, weights.n_inputs])
    n_layers = len(weights.layers)
    for index, (w, b) in enumerate(weights.layers):
        fan_in, fan_out = w.shape
        # FULLY_CONNECTED wants weights as [out, in] (one row per output unit), the transpose
        # of the [in, out] layout that makes x @ W natural in numpy. ascontiguousarray so that
        # tobytes() is the row-major layout the runtime reads.
        w_t = np.ascontiguousarray(w.T, dtype="<f4")
        w_idx = add_tensor(f"dense_{index}/weight", [fan_out, fan_in], None, w_t.tobytes())
        b_idx = add_tensor(f"dense_{index}/bias", [fan_out], None, b.astype("<f4").tobytes())
        hidden = index < n_layers - 1
        out_name = f"dense_{index}/relu" if hidden else "logits"
        out_idx = add_tensor(out_name, [1, fan_out], [-1, fan_out])
        activation = ActivationFunctionType.RELU if hidden else ActivationFunctionType.NONE
        operators.append((opcode_fc, [current, w_idx, b_idx], [out_idx], activation))
        current = out_idx
    output = add_tensor(OUTPUT_NAME, [1, weights.n_outputs], [-1, weights.n_outputs])
    operators.append((opcode_softmax, [current], [output], None))

    # --- Serialisation. Flatbuffers are built bottom-up: children (strings, vectors, tables)
    # must be finished before the table that refers to them is started, and no two objects may
    # be under construction at once.

    def int32_vector(start_vector, values: list[int]) -> int:
        start_vector(builder, len(values))
        # Vectors are written back to front.
        for value in reversed(values):
            builder.PrependInt32(value)
        return builder.EndVector()

    def offset_vector(start_vector, offsets: list[int]) -> int:
        start_vector(builder, len(offsets))
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        return builder.EndVector()

    buffer_offsets: list[int] = []
    for data in buffers:
        if data:
            # Not tflite.BufferStartDataVector: it aligns to 1 byte only, and misaligned float
            # weights would have to be copied (or, on some targets, fault) when mmapped.
            builder.StartVector(1, len(data), _TFLITE_BUFFER_ALIGNMENT)
            builder.head -= len(data)
            builder.Bytes[builder.head : builder.head + len(data)] = data
            data_offset = builder.EndVector()
            tflite.BufferStart(builder)
            tflite.BufferAddData(builder, data_offset)
        else:
            # The empty buffer has no data vector at all, as the converter writes it.
            tflite.BufferStart(builder)
        buffer_offsets.append(tflite.BufferEnd(builder))

    tensor_offsets: list[int] = []
    for name, shape, signature, buffer_index in tensors:
        name_offset = builder.CreateString(name)
        shape_offset = int32_vector(tflite.TensorStartShapeVector, shape)
        signature_offset = (
            int32_vector(tflite.TensorStartShapeSignatureVector, signature) if signature else None
        )
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, shape_offset)
        tflite.TensorAddType(builder, TensorType.FLOAT32)
        tflite.TensorAddBuffer(builder, buffer_index)
        tflite.TensorAddName(builder, name_offset)
        if signature_offset is not None:
            # The static shape says batch 1 (what the interpreter allocates first); the -1 in
            # the signature is what allows resize_tensor_input to change it (strict mode
            # refuses to resize dimensions not marked -1 here).
            tflite.TensorAddShapeSignature(builder, signature_offset)
        tensor_offsets.append(tflite.TensorEnd(builder))

    operator_offsets: list[int] = []
    for opcode_index, inputs, outputs, activation in operators:
        if activation is not None:
            tflite.FullyConnectedOptionsStart(builder)
            tflite.FullyConnectedOptionsAddFusedActivationFunction(builder, activation)
            # keep_num_dims=False (the default): the output is [batch, out], as wanted.
            options_offset = tflite.FullyConnectedOptionsEnd(builder)
            options_type = BuiltinOptions.FullyConnectedOptions
        else:
            tflite.SoftmaxOptionsStart(builder)
            tflite.SoftmaxOptionsAddBeta(builder, 1.0)
            options_offset = tflite.SoftmaxOptionsEnd(builder)
            options_type = BuiltinOptions.SoftmaxOptions
        inputs_offset = int32_vector(tflite.OperatorStartInputsVector, inputs)
        outputs_offset = int32_vector(tflite.OperatorStartOutputsVector, outputs)
        tflite.OperatorStart(builder)
        tflite.OperatorAddOpcodeIndex(builder, opcode_index)
        tflite.OperatorAddInputs(builder, inputs_offset)
        tflite.OperatorAddOutputs(builder, outputs_offset)
        tflite.OperatorAddBuiltinOptionsType(builder, options_type)
        tflite.OperatorAddBuiltinOptions(builder, options_offset)
        operator_offsets.append(tflite.OperatorEnd(builder))

    subgraph_name = builder.CreateString("main")
    sg_tensors = offset_vector(tflite.SubGraphStartTensorsVector, tensor_offsets)
    sg_inputs = int32_vector(tflite.SubGraphStartInputsVector, [0])
    sg_outputs = int32_vector(tflite.SubGraphStartOutputsVector, [output])
    sg_operators = offset_vector(tflite.SubGraphStartOperatorsVector, operator_offsets)
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, sg_tensors)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, sg_operators)
    tflite.SubGraphAddName(builder, subgraph_name)
    subgraph_offset = tflite.SubGraphEnd(builder)

    opcode_offsets: list[int] = []
    for code in (BuiltinOperator.FULLY_CONNECTED, BuiltinOperator.SOFTMAX):
        tflite.OperatorCodeStart(builder)
        # Both fields: builtin_code (int32) is what current runtimes read, while older ones
        # only know the int8 deprecated_builtin_code. Codes below 127 fit in both, and the
        # runtime takes the larger of the two, so they must agree.
        tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, code)
        tflite.OperatorCodeAddBuiltinCode(builder, code)
        # Version 1 of both kernels is the float32 one.
        tflite.OperatorCodeAddVersion(builder, 1)
        opcode_offsets.append(tflite.OperatorCodeEnd(builder))

    description = builder.CreateString("edgefleet demo MLP classifier")
    model_opcodes = offset_vector(tflite.ModelStartOperatorCodesVector, opcode_offsets)
    model_subgraphs = offset_vector(tflite.ModelStartSubgraphsVector, [subgraph_offset])
    model_buffers = offset_vector(tflite.ModelStartBuffersVector, buffer_offsets)
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, TFLITE_SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(builder, model_opcodes)
    tflite.ModelAddSubgraphs(builder, model_subgraphs)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, model_buffers)
    model_offset = tflite.ModelEnd(builder)
    builder.Finish(model_offset, file_identifier=_TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


def write_demo_models(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``classifier.onnx`` and ``classifier.tflite``, built from the same weights.

    Args:
        directory: Where to write; created if missing. Existing files are replaced atomically.
        seed: Seed for :func:`make_mlp_weights` (default architecture).

    Returns:
        ``{"onnx": path, "tflite": path}``.
    """
    directory = Path(directory)
    weights = make_mlp_weights(seed=seed)
    paths = {"onnx": directory / "classifier.onnx", "tflite": directory / "classifier.tflite"}
    atomic_write_bytes(paths["onnx"], build_onnx_mlp(weights))
    atomic_write_bytes(paths["tflite"], build_tflite_mlp(weights))
    return paths
