"""ONNX models served by ONNX Runtime.

``onnxruntime`` is imported when the first ONNX model is loaded, not when this module is, so a
TFLite-only device does not need it installed and :func:`choose_providers` stays importable
(and testable) anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.shared.errors import InferenceError, RuntimeLoadError
from edgefleet.shared.runtimes.base import LoadedModel, RuntimeOptions
from edgefleet.shared.tensors import TensorSpec

if TYPE_CHECKING:
    import onnxruntime

CPU_PROVIDER = "CPUExecutionProvider"
# Best first. Only these are picked automatically: they are the ones that run any model
# correctly with default options; others (e.g. CoreML, DirectML) can still be asked for.
AUTO_PROVIDER_ORDER: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    CPU_PROVIDER,
)
# Listed as "available" by stock onnxruntime wheels, but it calls a remote endpoint rather than
# running the model here, which an edge device must never do silently.
_SKIPPED_PROVIDERS = frozenset({"AzureExecutionProvider"})

# ONNX Runtime's type strings for the tensor element types the v2 protocol can carry.
ONNX_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


def choose_providers(available: Sequence[str], preferred: Sequence[str] | None) -> list[str]:
    """Pick the execution providers to ask ONNX Runtime for, best first.

    Pure: the caller passes ``onnxruntime.get_available_providers()``.

    Args:
        available: Providers this onnxruntime build has.
        preferred: Providers wanted, best first; ``None`` means TensorRT > CUDA > OpenVINO >
            CPU, as available. Preferred providers the build lacks are skipped, so one
            configuration can serve a mixed fleet.

    Returns:
        Distinct provider names ending with ``CPUExecutionProvider``, which is always present so
        that nodes no accelerator supports still run. Anything listed after the CPU provider is
        dropped: the CPU provider takes every node, so later providers would never run one.
        ``AzureExecutionProvider`` is never chosen.
    """
    wanted = AUTO_PROVIDER_ORDER if preferred is None else preferred
    have = set(available)
    chosen: list[str] = []
    for provider in wanted:
        if provider == CPU_PROVIDER:
            break
        if provider in have and provider not in _SKIPPED_PROVIDERS and provider not in chosen:
            chosen.append(provider)
    chosen.append(CPU_PROVIDER)
    return chosen


def onnx_type_to_v2(onnx_type: str, where: str) -> str:
    """Map an ONNX Runtime type string such as ``"tensor(float)"`` to a v2 datatype.

    Raises:
        RuntimeLoadError: For types the v2 protocol cannot carry (strings, bfloat16,
            sequences, maps, optionals).
    """
    try:
        return ONNX_TO_V2[onnx_type]
    except KeyError:
        raise RuntimeLoadError(f"{where}: unsupported ONNX type {onnx_type!r}") from None


def _spec_from_node(node: Any, where: str) -> TensorSpec:
    # Symbolic ("batch") and unknown (None) dimensions are dynamic: -1 in a TensorSpec.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
    return TensorSpec(name=node.name, datatype=onnx_type_to_v2(node.type, f"{where} {node.name!r}"), shape=shape)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeLoadError(
            "onnxruntime is not installed; install it with `pip install 'edgefleet[agent]'` "
            "(or `pip install onnxruntime`)"
        ) from exc
    return onnxruntime


class OnnxModel(LoadedModel):
    """An ONNX model in an ``onnxruntime.InferenceSession``.

    ``InferenceSession.run`` is thread-safe, so concurrent :meth:`predict` calls need no lock.
    """

    runtime = "onnx"

    def __init__(self, model_path: Path, *, name: str, version: str, options: RuntimeOptions) -> None:
        """Open ``model_path`` in a new session.

        Raises:
            RuntimeLoadError: If onnxruntime is missing, the file does not load, or its
                signature uses a type the v2 protocol cannot carry.
        """
        ort = _import_onnxruntime()
        where = f"model {name!r} version {version!r}"
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        # One request runs one graph; parallelism across requests comes from the server's
        # threads, so branches of a graph are not run concurrently.
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = choose_providers(ort.get_available_providers(), options.providers)
        try:
            session: onnxruntime.InferenceSession = ort.InferenceSession(
                str(model_path), sess_options=session_options, providers=providers
            )
        # onnxruntime's exceptions (Fail, NoSuchFile, InvalidProtobuf, ...) derive directly
        # from Exception, with no common base to catch instead.
        except Exception as exc:
            raise RuntimeLoadError(f"{where}: onnxruntime could not load {model_path}: {exc}") from exc
        inputs = tuple(_spec_from_node(node, f"{where} input") for node in session.get_inputs())
        outputs = tuple(_spec_from_node(node, f"{where} output") for node in session.get_outputs())
        super().__init__(name=name, version=version, inputs=inputs, outputs=outputs)
        self._session: onnxruntime.InferenceSession | None = session
        self._output_names = [spec.name for spec in outputs]
        self.providers: list[str] = list(session.get_providers())

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise InferenceError(f"{self._label()}: model is closed")
        # The binding converts only a real dict; the common caller passes one already.
        feed = inputs if type(inputs) is dict else dict(inputs)
        try:
            results = session.run(self._output_names, feed)
        except Exception as exc:  # see __init__: no narrower base class exists
            raise InferenceError(f"{self._label()}: onnxruntime failed: {exc}") from exc
        # session.run returns fresh arrays, so they are handed over without copying.
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Drop the session; onnxruntime frees it when the last reference goes."""
        self._session = None
