"""The post-activation health check: a warm-up inference on sample inputs within a time budget.

Inputs come from the bundle (``manifest.health_inputs``: an ``.npz`` with one array per model
input, loaded without pickle) or, if the publisher shipped none, zeros of the declared shapes.
The budget is ``manifest.latency_budget_ms`` if set, else the agent's ``health_check_timeout_s``.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgefleet.shared.bundle.manifest import Manifest
from edgefleet.shared.errors import InferenceError
from edgefleet.shared.runtimes import LoadedModel

# Said in the deployment outcome: a check on zeros proves less, and some valid models refuse zeros.
ZEROS_NOTE = "health check ran on zeros: the bundle has no sample inputs (health_inputs)"


def has_sample_inputs(slot: Path | None, manifest: Manifest | None) -> bool:
    """Whether the warm-up runs on the bundle's own sample inputs (else on zeros)."""
    return slot is not None and manifest is not None and manifest.health_inputs is not None


def sample_inputs(model: LoadedModel, slot: Path | None, manifest: Manifest | None) -> dict[str, np.ndarray]:
    """The warm-up inputs: the bundle's samples if it ships them, else zeros (dynamic dims = 1)."""
    if slot is not None and manifest is not None and manifest.health_inputs is not None:
        path = slot.joinpath(*manifest.health_inputs.split("/"))
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise InferenceError(f"health inputs {manifest.health_inputs!r} do not load: {exc}") from exc
    return {
        spec.name: np.zeros([1 if d == -1 else d for d in spec.shape], dtype=spec.numpy_dtype) for spec in model.inputs
    }


def run_health_check(
    model: LoadedModel,
    inputs: dict[str, np.ndarray],
    budget_s: float,
    *,
    timer: Callable[[], float] = time.monotonic,
) -> float:
    """Run the warm-up inference; return its duration in seconds.

    ``timer`` measures the duration (monotonic seconds: a wall clock may step under NTP).

    Raises:
        InferenceError: The model refused the inputs, failed, took longer than ``budget_s``, or
            returned outputs other than its signature declares.
    """
    started = timer()
    outputs = model.predict(inputs)
    elapsed = timer() - started
    if elapsed > budget_s:
        raise InferenceError(f"warm-up inference took {elapsed * 1e3:.1f} ms, over the {budget_s * 1e3:.1f} ms budget")
    if set(outputs) != {spec.name for spec in model.outputs}:
        raise InferenceError(f"outputs {sorted(outputs)} do not match the signature")
    return elapsed
