"""Inference runtimes behind one interface: :class:`LoadedModel`.

:func:`load_model` imports a runtime's backend only when a model of that runtime is loaded, so
a device needs only the runtimes it actually serves.

Untrusted files are looked at without a runtime first: :mod:`.inspection` reads the signature
from the file's own format (:mod:`.onnx_inspect` over :mod:`.protobuf`, :mod:`.tflite_inspect`)
in pure Python, and :mod:`.probe` is the child process that loads a file in its runtime under
resource limits, so that a file that crashes the runtime takes only that child down.
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.shared.errors import RuntimeLoadError
from edgefleet.shared.runtimes.base import LoadedModel, RuntimeOptions

__all__ = ["RUNTIMES", "LoadedModel", "RuntimeOptions", "load_model"]

RUNTIMES: tuple[str, ...] = ("onnx", "tflite")

_DEFAULT_OPTIONS = RuntimeOptions()


def load_model(
    runtime: str,
    model_path: Path,
    *,
    name: str,
    version: str,
    options: RuntimeOptions = _DEFAULT_OPTIONS,
) -> LoadedModel:
    """Open a model file in its runtime.

    Args:
        runtime: ``"onnx"`` or ``"tflite"``.
        model_path: The model file.
        name: Model name, as deployed.
        version: Model version, as deployed.
        options: Threads and (ONNX only) execution providers.

    Returns:
        The loaded model, ready for :meth:`LoadedModel.predict`.

    Raises:
        RuntimeLoadError: If the runtime is unknown or not installed, or the file does not
            load in it.
    """
    if runtime == "onnx":
        from edgefleet.shared.runtimes.onnx_backend import OnnxModel

        return OnnxModel(Path(model_path), name=name, version=version, options=options)
    if runtime == "tflite":
        from edgefleet.shared.runtimes.litert_backend import TFLiteModel

        return TFLiteModel(Path(model_path), name=name, version=version, options=options)
    raise RuntimeLoadError(
        f"model {name!r} version {version!r}: unknown runtime {runtime!r}, expected one of {RUNTIMES}"
    )
