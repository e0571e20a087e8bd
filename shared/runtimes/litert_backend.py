"""TFLite models served by LiteRT (``ai_edge_litert``), or the older ``tflite_runtime``.

The interpreter is imported when the first TFLite model is loaded, so an ONNX-only device does
not need either package.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.shared.errors import InferenceError, RuntimeLoadError
from edgefleet.shared.runtimes.base import LoadedModel, RuntimeOptions
from edgefleet.shared.tensors import NUMPY_TO_V2, TensorSpec


def _import_interpreter() -> Any:
    """Return the ``Interpreter`` class of whichever TFLite runtime is installed.

    Raises:
        RuntimeLoadError: If neither ``ai_edge_litert`` nor ``tflite_runtime`` is installed.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            # The pre-2024 name of the same runtime, still what some device images ship.
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise RuntimeLoadError(
                "no TFLite runtime is installed; install one with `pip install ai-edge-litert` "
                "(or `pip install tflite-runtime` on platforms without LiteRT wheels)"
            ) from exc
    return Interpreter


def _spec_from_detail(detail: Mapping[str, Any], where: str) -> TensorSpec:
    dtype = np.dtype(detail["dtype"])
    datatype = NUMPY_TO_V2.get(dtype)
    if datatype is None:
        raise RuntimeLoadError(f"{where} {detail['name']!r}: unsupported TFLite dtype {dtype}")
    # shape_signature keeps the -1 of dynamic dimensions; shape is what is allocated now.
    signature = detail.get("shape_signature")
    if signature is None or len(signature) == 0:
        signature = detail["shape"]
    return TensorSpec(name=detail["name"], datatype=datatype, shape=tuple(int(d) for d in signature))


class TFLiteModel(LoadedModel):
    """A TFLite model in a LiteRT ``Interpreter``.

    The interpreter holds one set of input/output buffers, so :meth:`predict` serialises calls
    with a lock. Changing the batch size between calls re-allocates the tensors; the shape
    allocated last is remembered so that a steady batch size never re-allocates.
    """

    runtime = "tflite"

    def __init__(self, model_path: Path, *, name: str, version: str, options: RuntimeOptions) -> None:
        """Open ``model_path`` in a new interpreter and allocate its tensors.

        Raises:
            RuntimeLoadError: If no TFLite runtime is installed, the file does not load, or its
                signature uses a dtype the v2 protocol cannot carry.
        """
        interpreter_class = _import_interpreter()
        where = f"model {name!r} version {version!r}"
        # LiteRT's "let the runtime choose" is None, where onnxruntime's is 0.
        num_threads = options.intra_op_threads or None
        try:
            interpreter = interpreter_class(model_path=str(model_path), num_threads=num_threads)
            interpreter.allocate_tensors()
            input_details = interpreter.get_input_details()
            output_details = interpreter.get_output_details()
        # The interpreter reports a missing or corrupt file as ValueError, an unsupported op
        # as RuntimeError.
        except (ValueError, RuntimeError, OSError) as exc:
            raise RuntimeLoadError(f"{where}: TFLite could not load {model_path}: {exc}") from exc
        inputs = tuple(_spec_from_detail(detail, f"{where} input") for detail in input_details)
        outputs = tuple(_spec_from_detail(detail, f"{where} output") for detail in output_details)
        super().__init__(name=name, version=version, inputs=inputs, outputs=outputs)
        self._interpreter: Any | None = interpreter
        self._lock = threading.Lock()
        self._input_slots: tuple[tuple[str, int], ...] = tuple(
            (detail["name"], int(detail["index"])) for detail in input_details
        )
        self._output_slots: tuple[tuple[str, int], ...] = tuple(
            (detail["name"], int(detail["index"])) for detail in output_details
        )
        # The shape each input is allocated for now, by tensor index.
        self._allocated: dict[int, tuple[int, ...]] = {
            int(detail["index"]): tuple(int(d) for d in detail["shape"]) for detail in input_details
        }

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise InferenceError(f"{self._label()}: model is closed")
            try:
                resized = False
                for name, index in self._input_slots:
                    shape = inputs[name].shape
                    if shape != self._allocated[index]:
                        # strict: only dimensions the model marks -1 may change, which
                        # predict() has already checked, so this is a second safety net.
                        interpreter.resize_tensor_input(index, shape, strict=True)
                        self._allocated[index] = shape
                        resized = True
                if resized:
                    interpreter.allocate_tensors()
                for name, index in self._input_slots:
                    interpreter.set_tensor(index, inputs[name])
                interpreter.invoke()
                # get_tensor returns a copy, which the caller may keep after the next invoke.
                return {name: interpreter.get_tensor(index) for name, index in self._output_slots}
            except (ValueError, RuntimeError) as exc:
                # A failed resize leaves the allocation unknown: forget it, so that the next
                # call resizes again rather than trusting a stale shape.
                self._allocated = dict.fromkeys(self._allocated, ())
                raise InferenceError(f"{self._label()}: TFLite failed: {exc}") from exc

    def close(self) -> None:
        """Drop the interpreter; waits for a running :meth:`predict` to finish first."""
        with self._lock:
            self._interpreter = None
