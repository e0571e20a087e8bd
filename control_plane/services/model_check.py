"""Checking an uploaded model in its real runtime, in a short-lived child process with limits.

The server never hands untrusted model bytes to a native runtime in its own process: a file
that crashes LiteRT or ONNX Runtime (a 24-byte TFLite flatbuffer with no subgraph is enough
for a SIGSEGV) would take the whole control plane down. First the file's own format is parsed
in pure Python (:func:`edgefleet.shared.runtimes.inspection.inspect_model`), which refuses
most malformed files without any runtime; then :mod:`edgefleet.shared.runtimes.probe` loads it
in a child under an address-space and CPU limit, with a wall-clock timeout. Whatever happens
there (a refusal, a crash, a limit, a hang) is a :class:`RuntimeLoadError` (HTTP 400) that
names the user's file, never a path on the server.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.shared.errors import MessageError, RuntimeLoadError
from edgefleet.shared.runtimes.inspection import inspect_model
from edgefleet.shared.runtimes.probe import LOAD_REFUSED_EXIT
from edgefleet.shared.runtimes.signature import ModelSignature
from edgefleet.shared.tensors import TensorSpec

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True, kw_only=True)
class CheckLimits:
    """Bounds of one runtime check.

    Attributes:
        timeout_s: Wall-clock seconds before the child is killed (start-up included).
        cpu_s: CPU seconds the child may use (RLIMIT_CPU).
        memory_bytes: Address space the child may map beyond ``memory_per_model_byte`` times the
            file size (RLIMIT_AS). Measured: the demo models load under 0.5 GiB, a 210 MB ONNX
            model under 1 GiB; the default leaves room and still stops a file that asks for
            tens of gigabytes.
        memory_per_model_byte: Address space allowed per byte of the model file.
    """

    timeout_s: float = 60.0  # seconds
    cpu_s: int = 60  # seconds
    memory_bytes: int = 2 * GIB  # bytes
    memory_per_model_byte: int = 4

    def address_space_for(self, model_bytes: int) -> int:
        """The RLIMIT_AS for a model file of ``model_bytes``."""
        return self.memory_bytes + self.memory_per_model_byte * model_bytes


DEFAULT_LIMITS = CheckLimits()
# Checks running at once: each child holds a runtime and its model in memory, so a burst of
# uploads waits here rather than starting one child per request thread.
MAX_CONCURRENT_CHECKS = 2
_check_slots = threading.BoundedSemaphore(MAX_CONCURRENT_CHECKS)
_OUTPUT_LIMIT = 64 * 1024  # bytes of the child's stdout that are parsed


def check_model(
    runtime: str,
    path: Path,
    *,
    label: str,
    name: str = "",
    version: str = "",
    limits: CheckLimits = DEFAULT_LIMITS,
) -> ModelSignature:
    """Inspect ``path`` without running it, then load it in ``runtime`` in a sandboxed child.

    Args:
        runtime: ``"onnx"`` or ``"tflite"``.
        path: The model file (on the server; never named in errors).
        label: The user's name for the file, used in every error message.
        name: The model's name, for the runtime's messages.
        version: The model's version, likewise.
        limits: Time and memory bounds of the child.

    Returns:
        The signature the runtime reports (what a device will serve).

    Raises:
        RuntimeLoadError: The file is malformed, the runtime refuses it, crashes on it, or
            runs past a limit.
    """
    declared = inspect_model(runtime, path, label=label)
    loaded = load_in_sandbox(runtime, path, label=label, name=name, version=version, limits=limits)
    if (loaded.inputs, loaded.outputs) != (declared.inputs, declared.outputs):
        # The runtime's view is what devices serve; a difference means the file's declared
        # signature is not the whole story (e.g. shapes the runtime inferred), worth a look.
        log.warning("%s: the runtime reports signature %s, the file declares %s", label, loaded, declared)
    return ModelSignature(runtime=runtime, inputs=loaded.inputs, outputs=loaded.outputs, opsets=declared.opsets)


def load_in_sandbox(
    runtime: str, path: Path, *, label: str, name: str = "", version: str = "", limits: CheckLimits = DEFAULT_LIMITS
) -> ModelSignature:
    """Load ``path`` in ``runtime`` in a child process under ``limits``: the runtime half of :func:`check_model`.

    Returns:
        The signature the runtime reports.

    Raises:
        RuntimeLoadError: The runtime refuses the file, crashes on it, or runs past a limit.
    """
    address_space = limits.address_space_for(path.stat().st_size)
    command = [
        sys.executable,
        "-m",
        "edgefleet.shared.runtimes.probe",
        runtime,
        str(path),
        str(address_space),
        str(limits.cpu_s),
        name,
        version,
    ]
    try:
        with _check_slots:
            done = subprocess.run(
                command, capture_output=True, timeout=limits.timeout_s, stdin=subprocess.DEVNULL, check=False
            )
    except subprocess.TimeoutExpired:
        raise RuntimeLoadError(
            f"{label}: the {runtime} runtime did not finish loading it within {limits.timeout_s:g} s"
        ) from None
    stderr_tail = _scrub(done.stderr[-2000:].decode("utf-8", "replace"), path, label)
    if done.returncode < 0:
        signal_name = _signal_name(-done.returncode)
        log.warning(
            "%s: the %s runtime crashed with %s loading it; stderr: %s", label, runtime, signal_name, stderr_tail
        )
        # RLIMIT_CPU ends the child with SIGXCPU.
        what = "ran out of CPU time" if signal_name == "SIGXCPU" else f"crashed ({signal_name})"
        raise RuntimeLoadError(f"{label}: the {runtime} runtime {what} loading it; the file is refused")
    result = _parse(done.stdout[-_OUTPUT_LIMIT:])
    if done.returncode == LOAD_REFUSED_EXIT and isinstance(result.get("error"), str):
        raise RuntimeLoadError(_scrub(str(result["error"]), path, label))
    if done.returncode != 0 or "inputs" not in result:
        log.warning("%s: the %s check exited %d; stderr: %s", label, runtime, done.returncode, stderr_tail)
        # A MemoryError or a failed allocation under RLIMIT_AS ends here, as does any bug.
        raise RuntimeLoadError(
            f"{label}: the {runtime} runtime failed loading it (exit {done.returncode}, perhaps out of memory); "
            "the file is refused"
        )
    try:
        inputs = tuple(TensorSpec.from_dict(raw) for raw in result["inputs"])
        outputs = tuple(TensorSpec.from_dict(raw) for raw in result["outputs"])
    except (MessageError, TypeError, KeyError) as exc:
        raise RuntimeLoadError(
            f"{label}: the {runtime} runtime reports a signature that cannot be served: {exc}"
        ) from exc
    return ModelSignature(runtime=runtime, inputs=inputs, outputs=outputs)


def _parse(stdout: bytes) -> dict[str, Any]:
    lines = stdout.decode("utf-8", "replace").strip().splitlines()
    if not lines:
        return {}
    try:
        parsed = json.loads(lines[-1])
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _scrub(text: str, path: Path, label: str) -> str:
    """``text`` with the server's path of the file (and its temp name) replaced by the user's name."""
    for server_name in (str(path.resolve()), str(path), path.name):
        text = text.replace(server_name, label)
    return text


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
