"""Inspecting model files without a runtime: the signature the runtimes report, and nothing but
RuntimeLoadError for any malformed bytes (the 24-byte TFLite file that crashes LiteRT included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from support.hostile_models import empty_tflite

from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, build_tflite_mlp, make_mlp_weights
from edgefleet.shared.errors import RuntimeLoadError
from edgefleet.shared.runtimes.inspection import inspect_bytes, inspect_model
from edgefleet.shared.runtimes.onnx_backend import ONNX_TO_V2
from edgefleet.shared.runtimes.protobuf import fields, read_varint
from edgefleet.shared.tensors import NUMPY_TO_V2, TensorSpec

ONNX_MLP = build_onnx_mlp(make_mlp_weights(n_inputs=8, hidden=(16,), n_outputs=3, seed=7))
TFLITE_MLP = build_tflite_mlp(make_mlp_weights(n_inputs=8, hidden=(16,), n_outputs=3, seed=7))


def onnx_model(
    *,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] | None = None,
    opset: int | None = 17,
) -> bytes:
    nodes = [helper.make_node("Identity", [inputs[0].name], [outputs[0].name])]
    graph = helper.make_graph(nodes, "g", inputs=inputs, outputs=outputs, initializer=initializers or [])
    opsets = [helper.make_opsetid("", opset)] if opset is not None else []
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def ort_signature(data: bytes) -> tuple[list[tuple[str, str, tuple[int, ...]]], list[tuple[str, str, tuple[int, ...]]]]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

    def specs(nodes: list[ort.NodeArg]) -> list[tuple[str, str, tuple[int, ...]]]:
        return [
            (n.name, ONNX_TO_V2[n.type], tuple(d if isinstance(d, int) and d >= 0 else -1 for d in n.shape))
            for n in nodes
        ]

    return specs(session.get_inputs()), specs(session.get_outputs())


def as_tuples(specs: tuple[TensorSpec, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(s.name, s.datatype, s.shape) for s in specs]


# --- what well-formed files declare ------------------------------------------------------------


def test_the_onnx_signature_is_the_one_onnxruntime_reports() -> None:
    signature = inspect_bytes("onnx", ONNX_MLP, label="mlp.onnx")

    assert (as_tuples(signature.inputs), as_tuples(signature.outputs)) == ort_signature(ONNX_MLP)
    assert as_tuples(signature.inputs) == [("input", "FP32", (-1, 8))]
    assert ("", 17) in signature.opsets


def test_the_tflite_signature_is_the_one_litert_reports(tmp_path: Path) -> None:
    path = tmp_path / "mlp.tflite"
    path.write_bytes(TFLITE_MLP)
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()

    def specs(details: list[dict]) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(d["name"], NUMPY_TO_V2[np.dtype(d["dtype"])], tuple(int(x) for x in d["shape_signature"]))
                for d in details]

    signature = inspect_model("tflite", path, label="mlp.tflite")

    assert as_tuples(signature.inputs) == specs(interpreter.get_input_details())
    assert as_tuples(signature.outputs) == specs(interpreter.get_output_details())
    assert signature.opsets == ()


def test_onnx_inputs_that_an_initializer_names_are_weights_not_inputs() -> None:
    weights = numpy_helper.from_array(np.ones((4,), np.float32), "w")
    data = onnx_model(
        inputs=[helper.make_tensor_value_info("x", TensorProto.INT64, ["n", 4]),
                helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.INT64, [None, 4])],
        initializers=[weights],
    )

    signature = inspect_bytes("onnx", data, label="m.onnx")

    assert as_tuples(signature.inputs) == [("x", "INT64", (-1, 4))] == ort_signature(data)[0]
    assert as_tuples(signature.outputs) == [("y", "INT64", (-1, 4))]


@pytest.mark.parametrize(("elem_type", "shown"), [(TensorProto.STRING, "string"), (TensorProto.BFLOAT16, "bfloat16")])
def test_onnx_types_v2_cannot_carry_are_refused(elem_type: int, shown: str) -> None:
    data = onnx_model(
        inputs=[helper.make_tensor_value_info("x", elem_type, [1])],
        outputs=[helper.make_tensor_value_info("y", elem_type, [1])],
    )
    with pytest.raises(RuntimeLoadError, match=rf"m.onnx.*unsupported ONNX type 'tensor\({shown}\)'"):
        inspect_bytes("onnx", data, label="m.onnx")


def test_an_onnx_sequence_input_is_refused() -> None:
    seq = helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, [1])
    data = onnx_model(inputs=[seq], outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(RuntimeLoadError, match=r"unsupported ONNX type seq"):
        inspect_bytes("onnx", data, label="m.onnx")


# --- malformed files: refused by name, without a runtime ---------------------------------------


def test_the_24_byte_tflite_file_without_subgraphs_is_refused() -> None:
    data = empty_tflite()
    assert len(data) == 24
    with pytest.raises(RuntimeLoadError, match="tiny.tflite is not a valid TFLite model: it has no subgraph"):
        inspect_bytes("tflite", data, label="tiny.tflite")


@pytest.mark.parametrize(
    ("runtime", "data", "match"),
    [
        ("onnx", b"", "no IR version"),
        ("onnx", b"this is not an onnx graph", "not a valid ONNX model"),
        ("onnx", b"\x08\x09", "no graph"),
        ("onnx", b"\x08\x09\x3a\x00", "imports no opset"),
        ("onnx", b"\x08\x09\x3a\x05", "runs past the end"),
        ("onnx", b"\x08" + b"\xff" * 11, "varint longer than 10 bytes"),
        ("tflite", b"", "no TFL3 file identifier"),
        ("tflite", ONNX_MLP, "no TFL3 file identifier"),
        ("tflite", b"\xff\xff\xff\x7fTFL3", "past the end"),
        ("tflite", TFLITE_MLP[: len(TFLITE_MLP) // 3], "not a valid TFLite model"),
        ("tensorrt", b"", "unknown runtime"),
    ],
    ids=["onnx-empty", "onnx-text", "onnx-no-graph", "onnx-no-opset", "onnx-truncated", "onnx-long-varint",
         "tflite-empty", "tflite-onnx-bytes", "tflite-root-past-end", "tflite-truncated", "unknown-runtime"],
)
def test_malformed_files_are_refused_naming_the_users_file(runtime: str, data: bytes, match: str) -> None:
    with pytest.raises(RuntimeLoadError, match=match) as info:
        inspect_bytes(runtime, data, label="user-file.bin")
    assert "user-file.bin" in str(info.value)


def test_an_onnx_model_without_an_opset_is_refused() -> None:
    data = onnx_model(
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        opset=None,
    )
    with pytest.raises(RuntimeLoadError, match="imports no opset"):
        inspect_bytes("onnx", data, label="m.onnx")


def test_an_empty_or_missing_file_is_refused_without_its_server_path(tmp_path: Path) -> None:
    empty = tmp_path / "tmpabc.upload"
    empty.write_bytes(b"")
    for path in (empty, tmp_path / "absent.upload"):
        with pytest.raises(RuntimeLoadError) as info:
            inspect_model("onnx", path, label="model.onnx")
        assert "model.onnx" in str(info.value)
        assert str(tmp_path) not in str(info.value)


def test_the_protobuf_reader_checks_every_length() -> None:
    assert read_varint(memoryview(b"\xac\x02"), 0, 2) == (300, 2)
    assert list(fields(memoryview(b"\x08\x96\x01\x12\x02hi"))) == [(1, 0, 150), (2, 2, memoryview(b"hi"))]
    for bad in (b"\x00", b"\x0b", b"\x12\x05ab", b"\x0d\x01\x02", b"\x08"):
        with pytest.raises(ValueError):
            list(fields(memoryview(bad)))


# --- any bytes: RuntimeLoadError or a signature, never anything else ---------------------------


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    mutated = bytearray(data)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    return bytes(mutated[:cut] if cut is not None else mutated)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    runtime=st.sampled_from(["onnx", "tflite"]),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
    cut=st.none() | st.integers(min_value=0, max_value=4096),
)
def test_mutated_models_give_a_signature_or_a_load_error(runtime: str, edits: list[tuple[int, int]],
                                                          cut: int | None) -> None:
    data = _mutate(ONNX_MLP if runtime == "onnx" else TFLITE_MLP, edits, cut)
    try:
        signature = inspect_bytes(runtime, data, label="fuzz.model")
    except RuntimeLoadError as exc:
        assert "fuzz.model" in str(exc)
    else:
        assert signature.outputs


@settings(max_examples=300, deadline=None)
@given(runtime=st.sampled_from(["onnx", "tflite"]), data=st.binary(max_size=512))
def test_random_bytes_give_a_signature_or_a_load_error(runtime: str, data: bytes) -> None:
    prefix = data[:4] + b"TFL3" + data[4:] if runtime == "tflite" else data
    try:
        inspect_bytes(runtime, prefix, label="fuzz.model")
    except RuntimeLoadError:
        pass
