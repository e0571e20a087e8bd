"""Reading an ONNX model's signature from its protobuf bytes, without loading it in a runtime.

A pure-Python walk of ``ModelProto`` (ir_version, opset_import, graph) and of the graph's
inputs, outputs and initializer names, and nothing else: node lists and weights are skipped by
their length prefix. The ``onnx`` package is not used on purpose: it is not installed on a
control plane (it is in the ``models`` extra), and its C++ parser would be one more native
decoder running on untrusted bytes inside the server process, which is what this module is for
avoiding. A hostile file can only make this code raise :class:`RuntimeLoadError`.

Field numbers are those of ``onnx/onnx.proto`` (stable since IR version 3).
"""

from __future__ import annotations

from edgefleet.shared.errors import RuntimeLoadError
from edgefleet.shared.runtimes.onnx_backend import onnx_type_to_v2
from edgefleet.shared.runtimes.protobuf import as_int, as_message, as_text, fields
from edgefleet.shared.runtimes.signature import ModelSignature
from edgefleet.shared.tensors import MAX_RANK, TensorSpec

# ModelProto
_MODEL_IR_VERSION, _MODEL_GRAPH, _MODEL_OPSET_IMPORT = 1, 7, 8
# OperatorSetIdProto
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
# GraphProto
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE_INITIALIZER = 5, 11, 12, 15
# TensorProto.name; SparseTensorProto.values (a TensorProto)
_TENSOR_NAME, _SPARSE_VALUES = 8, 1
# ValueInfoProto
_VALUE_NAME, _VALUE_TYPE = 1, 2
# TypeProto: the only member of its oneof the v2 protocol can carry
_TYPE_TENSOR = 1
_TYPE_OTHER = {4: "seq", 5: "map", 8: "sparse_tensor", 9: "optional"}
# TypeProto.Tensor, TensorShapeProto, TensorShapeProto.Dimension
_TENSOR_ELEM_TYPE, _TENSOR_SHAPE = 1, 2
_SHAPE_DIM = 1
_DIM_VALUE = 1

# TensorProto.DataType, as the type strings ONNX Runtime reports (see onnx_backend.ONNX_TO_V2).
_ELEM_TYPES = {
    1: "float", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
    9: "bool", 10: "float16", 11: "double", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128",
    16: "bfloat16",
}
_MAX_TENSORS = 4096  # inputs or outputs of one graph; far beyond any servable model


def inspect_onnx(data: bytes | memoryview, label: str) -> ModelSignature:
    """The inputs, outputs and opsets an ONNX model declares.

    Inputs that an initializer also names are left out, as ONNX Runtime leaves them out of
    ``get_inputs()`` (they are weights a caller may override, not inputs it must give).

    Args:
        data: The model file's bytes.
        label: How errors name the model (the user's file name).

    Raises:
        RuntimeLoadError: Not a well-formed ONNX model, no graph, no outputs, or a tensor type
            the v2 protocol cannot carry.
    """
    try:
        return _inspect(memoryview(data), label)
    except RuntimeLoadError:
        raise
    except ValueError as exc:  # the wire format's own errors (UnicodeDecodeError among them)
        raise RuntimeLoadError(f"{label} is not a valid ONNX model: {exc}") from exc


def _inspect(buf: memoryview, label: str) -> ModelSignature:
    ir_version = 0
    graph: memoryview | None = None
    opsets: dict[str, int] = {}
    for number, _, value in fields(buf):
        if number == _MODEL_IR_VERSION:
            ir_version = as_int(value, "ir_version")
        elif number == _MODEL_GRAPH:
            graph = as_message(value, "graph")
        elif number == _MODEL_OPSET_IMPORT:
            domain, version = _opset(as_message(value, "opset_import"))
            opsets[domain] = version
    if ir_version <= 0:
        raise RuntimeLoadError(f"{label} is not a valid ONNX model: no IR version")
    if graph is None:
        raise RuntimeLoadError(f"{label} is not a valid ONNX model: no graph")
    if not opsets:
        # ONNX Runtime refuses such a model too: the opsets say what every operator means.
        raise RuntimeLoadError(f"{label} is not a valid ONNX model: it imports no opset")

    initializers: set[str] = set()
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for number, _, value in fields(graph):
        if number == _GRAPH_INITIALIZER:
            initializers.add(_field_text(as_message(value, "initializer"), _TENSOR_NAME, "initializer name"))
        elif number == _GRAPH_SPARSE_INITIALIZER:
            values = _field_message(as_message(value, "sparse_initializer"), _SPARSE_VALUES)
            if values is not None:
                initializers.add(_field_text(values, _TENSOR_NAME, "sparse initializer name"))
        elif number in (_GRAPH_INPUT, _GRAPH_OUTPUT):
            specs = inputs if number == _GRAPH_INPUT else outputs
            if len(specs) >= _MAX_TENSORS:
                raise RuntimeLoadError(f"{label}: more than {_MAX_TENSORS} graph inputs or outputs")
            specs.append(_value_info(as_message(value, "value_info"), label))
    if not outputs:
        raise RuntimeLoadError(f"{label} is not a valid ONNX model: its graph has no outputs")
    required = tuple(spec for spec in inputs if spec.name not in initializers)
    return ModelSignature(
        runtime="onnx", inputs=required, outputs=tuple(outputs), opsets=tuple(sorted(opsets.items()))
    )


def _opset(buf: memoryview) -> tuple[str, int]:
    domain, version = "", 0
    for number, _, value in fields(buf):
        if number == _OPSET_DOMAIN:
            domain = as_text(value, "opset domain")
        elif number == _OPSET_VERSION:
            version = as_int(value, "opset version")
    return domain, version


def _value_info(buf: memoryview, label: str) -> TensorSpec:
    name = ""
    type_proto: memoryview | None = None
    for number, _, value in fields(buf):
        if number == _VALUE_NAME:
            name = as_text(value, "input/output name")
        elif number == _VALUE_TYPE:
            type_proto = as_message(value, "type")
    where = f"{label}: tensor {name!r:.80}"
    if not name:
        raise RuntimeLoadError(f"{label}: a graph input or output has no name")
    if type_proto is None:
        raise RuntimeLoadError(f"{where} has no type")
    tensor: memoryview | None = None
    for number, _, value in fields(type_proto):
        if number == _TYPE_TENSOR:
            tensor = as_message(value, "tensor_type")
        elif number in _TYPE_OTHER:
            raise RuntimeLoadError(f"{where}: unsupported ONNX type {_TYPE_OTHER[number]}(...)")
    if tensor is None:
        raise RuntimeLoadError(f"{where} has no tensor type")
    elem_type = 0
    shape: list[int] | None = None
    for number, _, value in fields(tensor):
        if number == _TENSOR_ELEM_TYPE:
            elem_type = as_int(value, "elem_type")
        elif number == _TENSOR_SHAPE:
            shape = _shape(as_message(value, "shape"), where)
    type_name = f"tensor({_ELEM_TYPES.get(elem_type, f'type {elem_type}')})"
    return TensorSpec(name=name, datatype=onnx_type_to_v2(type_name, where), shape=tuple(shape or ()))


def _shape(buf: memoryview, where: str) -> list[int]:
    dims: list[int] = []
    for number, _, value in fields(buf):
        if number != _SHAPE_DIM:
            continue
        if len(dims) >= MAX_RANK:
            raise RuntimeLoadError(f"{where}: rank over {MAX_RANK}")
        size = -1  # a symbolic (dim_param) or unknown dimension is dynamic
        for dim_number, _, dim_value in fields(as_message(value, "dim")):
            if dim_number == _DIM_VALUE:
                size = as_int(dim_value, "dim_value")
        dims.append(size if size >= 0 else -1)
    return dims


def _field_message(buf: memoryview, wanted: int) -> memoryview | None:
    found = None
    for number, _, value in fields(buf):
        if number == wanted:
            found = as_message(value, f"field {wanted}")
    return found


def _field_text(buf: memoryview, wanted: int, what: str) -> str:
    found = ""
    for number, _, value in fields(buf):
        if number == wanted:
            found = as_text(value, what)
    return found
