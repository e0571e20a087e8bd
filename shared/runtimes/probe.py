"""The child side of a sandboxed runtime check: load one model file, print its signature, exit.

Run as ``python -m edgefleet.shared.runtimes.probe RUNTIME MODEL_PATH MEMORY_BYTES CPU_SECONDS NAME VERSION``
by a parent that must survive whatever the runtime does with the file (a crash, a hang, a
huge allocation). Before any runtime is imported the child caps its own address space and
CPU time and turns off core dumps, so the limits hold from the first byte the runtime reads.

Output: one JSON line on stdout, ``{"inputs": [...], "outputs": [...]}`` (exit 0) or
``{"error": "..."}`` (exit 2) when the runtime refuses the file. Anything else (a signal, a
limit, another exit code) means the runtime itself failed on the file.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

LOAD_REFUSED_EXIT = 2


def limit_self(memory_bytes: int, cpu_seconds: int) -> None:
    """Cap this process's address space and CPU time, and write no core file if it crashes."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # The hard limit a second later: SIGXCPU (which the parent reports) before SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def probe(runtime: str, model_path: Path, *, name: str, version: str) -> dict[str, object]:
    """Load ``model_path`` in ``runtime`` (allocating its tensors) and describe its signature.

    ``name`` and ``version`` are the model's, for the runtime's error messages.
    """
    # Imported after limit_self: the runtime's own start-up is bounded too.
    from edgefleet.shared.errors import RuntimeLoadError
    from edgefleet.shared.runtimes import RuntimeOptions, load_model
    from edgefleet.shared.runtimes.onnx_backend import CPU_PROVIDER

    # The CPU provider only: whether the file loads and what it declares do not depend on the
    # provider, and an accelerator's start-up reserves more address space than the limit allows.
    options = RuntimeOptions(intra_op_threads=1, providers=(CPU_PROVIDER,))
    try:
        model = load_model(runtime, model_path, name=name, version=version, options=options)
    except RuntimeLoadError as exc:
        return {"error": str(exc)}
    try:
        return {
            "inputs": [spec.to_dict() for spec in model.inputs],
            "outputs": [spec.to_dict() for spec in model.outputs],
        }
    finally:
        model.close()


def main(argv: list[str]) -> int:
    """Entry point; returns the exit code."""
    runtime, model_path, memory_bytes, cpu_seconds, name, version = argv
    limit_self(int(memory_bytes), int(cpu_seconds))
    result = probe(runtime, Path(model_path), name=name, version=version)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return LOAD_REFUSED_EXIT if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
