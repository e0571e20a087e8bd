"""Inspecting a model file without running it: the safe first look at untrusted bytes.

:func:`inspect_model` parses the file's own format (ONNX protobuf, TFLite flatbuffer) in pure
Python and returns its signature; it never hands the bytes to a runtime, so it is safe inside
a server process. Whether the file really loads is a separate question, answered by
:mod:`.probe` in a child process.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from edgefleet.shared.errors import RuntimeLoadError
from edgefleet.shared.runtimes.onnx_inspect import inspect_onnx
from edgefleet.shared.runtimes.signature import ModelSignature
from edgefleet.shared.runtimes.tflite_inspect import inspect_tflite

__all__ = ["ModelSignature", "inspect_bytes", "inspect_model"]


def inspect_bytes(runtime: str, data: bytes | memoryview, *, label: str) -> ModelSignature:
    """The signature a model file's bytes declare.

    Args:
        runtime: ``"onnx"`` or ``"tflite"``.
        data: The whole file.
        label: How errors name the file (the user's file name, never a server path).

    Raises:
        RuntimeLoadError: Unknown runtime, or not a well-formed model of that runtime.
    """
    if runtime == "onnx":
        return inspect_onnx(data, label)
    if runtime == "tflite":
        return inspect_tflite(data, label)
    raise RuntimeLoadError(f"{label}: unknown runtime {runtime!r:.40}, expected onnx or tflite")


def inspect_model(runtime: str, path: Path, *, label: str) -> ModelSignature:
    """:func:`inspect_bytes` of the file at ``path``, mapped rather than read (models can be large).

    Raises:
        RuntimeLoadError: As :func:`inspect_bytes`; also an empty or unreadable file.
    """
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise RuntimeLoadError(f"{label} is empty")
            # Not closed here: an error's traceback still holds views of the mapping, which
            # would make close() fail; the mapping goes when the last view does.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise RuntimeLoadError(f"{label} cannot be read: {exc.strerror}") from exc
    return inspect_bytes(runtime, memoryview(mapped), label=label)
