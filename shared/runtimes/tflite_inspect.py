"""Reading a TFLite model's signature from its flatbuffer, without loading it in a runtime.

LiteRT trusts its input far enough that a valid 24-byte flatbuffer with no subgraphs crashes
the process (SIGSEGV) in ``allocate_tensors``. This module reads only what the manifest needs
(the first subgraph's input and output tensors) with every offset checked against the buffer,
so a hostile file can only make it raise :class:`RuntimeLoadError`. It also refuses the
structural defects known to crash the interpreter (no subgraph, tensor indices out of range)
before any runtime sees the file.

Table and field numbers are those of LiteRT's ``schema.fbs`` (the ``TFL3`` file identifier).
"""

from __future__ import annotations

import numpy as np

from edgefleet.shared.errors import RuntimeLoadError
from edgefleet.shared.runtimes.signature import ModelSignature
from edgefleet.shared.tensors import MAX_RANK, NUMPY_TO_V2, TensorSpec

FILE_IDENTIFIER = b"TFL3"
# Model, SubGraph and Tensor fields.
_MODEL_SUBGRAPHS = 2
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS = 0, 1, 2
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_SHAPE_SIGNATURE = 0, 1, 3, 7
# TensorType values the v2 protocol can carry.
_TENSOR_TYPES: dict[int, np.dtype] = {
    0: np.dtype(np.float32), 1: np.dtype(np.float16), 2: np.dtype(np.int32), 3: np.dtype(np.uint8),
    4: np.dtype(np.int64), 6: np.dtype(np.bool_), 7: np.dtype(np.int16), 9: np.dtype(np.int8),
    10: np.dtype(np.float64), 12: np.dtype(np.uint64), 15: np.dtype(np.uint32), 16: np.dtype(np.uint16),
}
_MAX_NAME_BYTES = 256  # what a manifest's tensor spec accepts


class _Buffer:
    """Bounds-checked flatbuffer primitives over the file's bytes; ``ValueError`` where an offset
    or length points outside them."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._buf = memoryview(data)
        self._size = len(self._buf)

    def _uint(self, pos: int, width: int, signed: bool = False) -> int:
        if pos < 0 or pos + width > self._size:
            raise ValueError(f"read of {width} bytes at {pos} past the end ({self._size} bytes)")
        return int.from_bytes(self._buf[pos : pos + width], "little", signed=signed)

    def root(self) -> int:
        return self._indirect(0)

    def _indirect(self, pos: int) -> int:
        return pos + self._uint(pos, 4)

    def _field_pos(self, table: int, field: int) -> int | None:
        vtable = table - self._uint(table, 4, signed=True)
        vtable_size = self._uint(vtable, 2)
        slot = 4 + 2 * field
        if slot + 2 > vtable_size:
            return None
        offset = self._uint(vtable + slot, 2)
        return table + offset if offset else None

    def scalar(self, table: int, field: int, width: int, default: int = 0) -> int:
        pos = self._field_pos(table, field)
        return default if pos is None else self._uint(pos, width)

    def _vector(self, table: int, field: int) -> tuple[int, int] | None:
        pos = self._field_pos(table, field)
        if pos is None:
            return None
        start = self._indirect(pos)
        length = self._uint(start, 4)
        return start + 4, length

    def _bounded_vector(self, table: int, field: int, limit: int, kind: str, unit: str) -> tuple[int, int] | None:
        """:meth:`_vector`, refused when it holds more than ``limit`` elements."""
        found = self._vector(table, field)
        if found is not None and found[1] > limit:
            raise ValueError(f"a {kind} of {found[1]} {unit}, over {limit}")
        return found

    def int32_vector(self, table: int, field: int, limit: int) -> list[int] | None:
        found = self._bounded_vector(table, field, limit, "vector", "ints")
        if found is None:
            return None
        start, length = found
        return [self._uint(start + 4 * i, 4, signed=True) for i in range(length)]

    def table_vector(self, table: int, field: int) -> tuple[int, int]:
        """``(first element position, length)`` of a vector of tables; ``(0, 0)`` when absent."""
        found = self._vector(table, field)
        if found is None:
            return 0, 0
        start, length = found
        if length > (self._size - start) // 4:
            raise ValueError(f"a vector of {length} tables does not fit the file")
        return start, length

    def element(self, start: int, index: int) -> int:
        return self._indirect(start + 4 * index)

    def string(self, table: int, field: int, limit: int) -> str | None:
        found = self._bounded_vector(table, field, limit, "string", "bytes")
        if found is None:
            return None
        start, length = found
        if start + length > self._size:
            raise ValueError(f"a string of {length} bytes at {start} runs past the end")
        return bytes(self._buf[start : start + length]).decode("utf-8")


def inspect_tflite(data: bytes | memoryview, label: str) -> ModelSignature:
    """The inputs and outputs of a TFLite model's first subgraph (what the interpreter serves).

    Args:
        data: The model file's bytes.
        label: How errors name the model (the user's file name).

    Raises:
        RuntimeLoadError: Not a TFLite flatbuffer, no subgraph, an input or output index out
            of range, or a tensor type the v2 protocol cannot carry.
    """
    if len(data) < 8 or bytes(data[4:8]) != FILE_IDENTIFIER:
        raise RuntimeLoadError(f"{label} is not a TFLite model: no {FILE_IDENTIFIER.decode()} file identifier")
    buf = _Buffer(data)
    try:
        return _inspect(buf, label)
    except RuntimeLoadError:
        raise
    except ValueError as exc:  # an offset or length outside the file, or a name that is not UTF-8
        raise RuntimeLoadError(f"{label} is not a valid TFLite model: {exc}") from exc


def _inspect(buf: _Buffer, label: str) -> ModelSignature:
    model = buf.root()
    subgraphs, n_subgraphs = buf.table_vector(model, _MODEL_SUBGRAPHS)
    if n_subgraphs == 0:
        raise RuntimeLoadError(f"{label} is not a valid TFLite model: it has no subgraph")
    subgraph = buf.element(subgraphs, 0)
    tensors, n_tensors = buf.table_vector(subgraph, _SUBGRAPH_TENSORS)
    specs = []
    for field, what in ((_SUBGRAPH_INPUTS, "input"), (_SUBGRAPH_OUTPUTS, "output")):
        indices = buf.int32_vector(subgraph, field, limit=max(n_tensors, 1)) or []
        if what == "output" and not indices:
            raise RuntimeLoadError(f"{label} is not a valid TFLite model: its subgraph has no outputs")
        side = []
        for index in indices:
            if not 0 <= index < n_tensors:
                raise RuntimeLoadError(
                    f"{label} is not a valid TFLite model: {what} tensor index {index} is not one of its "
                    f"{n_tensors} tensors"
                )
            side.append(_tensor(buf, buf.element(tensors, index), label, what))
        specs.append(tuple(side))
    return ModelSignature(runtime="tflite", inputs=specs[0], outputs=specs[1])


def _tensor(buf: _Buffer, tensor: int, label: str, what: str) -> TensorSpec:
    name = buf.string(tensor, _TENSOR_NAME, limit=_MAX_NAME_BYTES) or ""
    where = f"{label}: {what} {name!r}"
    if not name:
        raise RuntimeLoadError(f"{label}: an {what} tensor has no name")
    type_code = buf.scalar(tensor, _TENSOR_TYPE, 1)
    dtype = _TENSOR_TYPES.get(type_code)
    if dtype is None:
        raise RuntimeLoadError(f"{where}: unsupported TFLite tensor type {type_code}")
    shape = buf.int32_vector(tensor, _TENSOR_SHAPE, limit=MAX_RANK) or []
    # shape_signature keeps the -1 of dynamic dimensions, as the interpreter's shape_signature does.
    signature = buf.int32_vector(tensor, _TENSOR_SHAPE_SIGNATURE, limit=MAX_RANK)
    dims = signature if signature else shape
    if any(d < -1 for d in dims):
        raise RuntimeLoadError(f"{where}: negative dimension in {dims}")
    return TensorSpec(name=name, datatype=NUMPY_TO_V2[dtype], shape=tuple(dims))
