"""Shadow candidates: a second version of a model that sees sampled live inputs but is never served.

Theory of operation::

    caller ──▶ ShadowedModel.predict ──▶ serving model ──▶ outputs ──▶ caller   (unchanged)
                        │ sampled (one random draw)
                        └─ put((stats, inputs, outputs, serving latency)) ─▶ bounded queue
                                                                                  │
                               ShadowRunner worker thread ◀──────────────────────┘
                               candidate.predict(inputs) ─▶ compare ─▶ ShadowStats

- The request path pays, when a shadow is attached, one random draw (~0.1 us) and, for a
  sampled request, two clock reads and a queue put of references, no copies (~0.3 us; measured
  on the 2-core dev VM). With no shadow attached, :class:`agent.model_host.ModelHost` hands
  out the serving model itself: no cost at all. The candidate's own inference and the
  comparison run on the worker thread; on a small device they still compete with serving for
  CPU (and the GIL), which is what ``sample_rate`` is for.
- The queue is bounded (:attr:`ShadowConfig.queue_max_samples`): when the worker falls behind,
  samples are dropped and counted, never waited for.
- Whatever the candidate does (raise, return garbage, run slowly) is counted in its stats and
  never reaches the caller: the serving outputs were returned before the candidate ran.
- :class:`ShadowStats` is the pure accumulator (no threads, no clocks): top-1 agreement on the
  first output's argmax along its last axis, per row; mean and max absolute difference over
  its elements; p50 latencies from bounded reservoirs. :func:`compare_outputs` is the math.
  The serving latency is the serving model's ``predict`` as the caller's path timed it; the
  candidate's is timed by the worker.

The queue holds references: a caller that reuses and overwrites its input arrays (or the
returned outputs) in place right after ``predict`` returns may make the candidate see the new
contents. The HTTP API never does; an in-process caller that recycles buffers should pass
copies while a shadow runs.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.agent.config import ShadowConfig
from edgefleet.shared.errors import ConfigError, InferenceError
from edgefleet.shared.runtimes.base import LoadedModel
from edgefleet.shared.wire.messages import ShadowReport
from edgefleet.shared.wire.messages import ShadowState as ReportedShadowState

log = logging.getLogger(__name__)

_MAX_MESSAGE_CHARS = 500  # characters of the last error kept for the report


@dataclass(frozen=True, slots=True)
class Comparison:
    """How one candidate output compares with the serving output of the same request."""

    rows: int  # argmax rows compared
    agreements: int  # rows whose argmax is the same
    elements: int  # elements compared numerically
    abs_diff_sum: float
    max_abs_diff: float


class OutputMismatchError(InferenceError):
    """The candidate's output cannot be compared with the serving one (shape, non-finite values)."""

    code = "output_mismatch"


def compare_outputs(serving: np.ndarray, candidate: np.ndarray) -> Comparison:
    """Compare one request's first outputs: top-1 agreement per row and absolute differences.

    A row is one slice along the last axis (a ``(B, C)`` output has ``B`` rows; a rank-1 output
    is one row; a scalar is one row that agrees when the values are equal).

    Raises:
        OutputMismatchError: The shapes differ, or a difference is not finite (NaN, inf).
    """
    if serving.shape != candidate.shape:
        raise OutputMismatchError(
            f"candidate output has shape {list(candidate.shape)}, the serving one {list(serving.shape)}"
        )
    try:
        a = np.asarray(serving, dtype=np.float64)
        b = np.asarray(candidate, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # BYTES outputs, objects
        raise OutputMismatchError(f"outputs are not numeric: {exc}") from exc
    diff = np.abs(a - b)
    if diff.size and not np.isfinite(diff).all():
        raise OutputMismatchError("non-finite values in the outputs")
    if a.ndim == 0:
        rows, agreements = 1, int(a == b)
    elif a.size == 0:
        rows, agreements = 0, 0
    else:
        top_a = a.reshape(-1, a.shape[-1]).argmax(axis=-1)
        top_b = b.reshape(-1, b.shape[-1]).argmax(axis=-1)
        rows, agreements = int(top_a.size), int(np.count_nonzero(top_a == top_b))
    return Comparison(
        rows=rows,
        agreements=agreements,
        elements=int(diff.size),
        abs_diff_sum=float(diff.sum()),
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
    )


class LatencyReservoir:
    """A uniform sample of at most ``size`` values (Vitter's algorithm R), for a bounded median."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self._size = size
        self._rng = rng
        self._values: list[float] = []
        self._seen = 0

    def add(self, value: float) -> None:
        """Offer one value; kept with probability ``size / seen``."""
        self._seen += 1
        if len(self._values) < self._size:
            self._values.append(value)
            return
        slot = self._rng.randrange(self._seen)
        if slot < self._size:
            self._values[slot] = value

    def median(self) -> float:
        """The median of the kept values (0.0 when empty)."""
        return float(np.median(self._values)) if self._values else 0.0


class ShadowStats:
    """Running comparison of a candidate with the serving model (pure: no threads, no clock).

    ``samples`` counts rows compared (a request of batch ``B`` adds ``B``), so the agreement
    rate ``agreements / samples`` means the same however requests are batched; ``requests``
    counts mirrored requests that completed on both models; ``errors`` counts mirrored
    requests the candidate raised on or answered incomparably.
    """

    def __init__(self, *, reservoir_size: int = ShadowConfig.latency_reservoir_size, seed: int | None = None) -> None:
        rng = random.Random(seed)
        self.requests = 0
        self.samples = 0
        self.agreements = 0
        self.errors = 0
        self.elements = 0
        self.abs_diff_sum = 0.0
        self.max_abs_diff = 0.0
        self.last_error = ""
        self._latency = LatencyReservoir(reservoir_size, rng)
        self._serving_latency = LatencyReservoir(reservoir_size, rng)

    def record(
        self, serving: np.ndarray, candidate: np.ndarray, *, serving_latency_s: float, candidate_latency_s: float
    ) -> None:
        """Add one mirrored request's first outputs and both latencies; a mismatch counts as an error."""
        try:
            comparison = compare_outputs(serving, candidate)
        except OutputMismatchError as exc:
            self.record_error(str(exc))
            return
        self.requests += 1
        self.samples += comparison.rows
        self.agreements += comparison.agreements
        self.elements += comparison.elements
        self.abs_diff_sum += comparison.abs_diff_sum
        self.max_abs_diff = max(self.max_abs_diff, comparison.max_abs_diff)
        self._latency.add(candidate_latency_s)
        self._serving_latency.add(serving_latency_s)

    def record_error(self, message: str) -> None:
        """Count one mirrored request the candidate failed on."""
        self.errors += 1
        self.last_error = message[:_MAX_MESSAGE_CHARS]

    @property
    def mean_abs_diff(self) -> float:
        """Mean absolute difference over every compared element (0.0 before any)."""
        return self.abs_diff_sum / self.elements if self.elements else 0.0

    @property
    def agreement(self) -> float | None:
        """``agreements / samples``, or None before any sample."""
        return self.agreements / self.samples if self.samples else None

    def latency_p50_ms(self) -> float:
        """Median candidate latency, milliseconds."""
        return self._latency.median() * 1000.0

    def serving_latency_p50_ms(self) -> float:
        """Median serving latency of the mirrored requests, milliseconds."""
        return self._serving_latency.median() * 1000.0


_STOP = object()


class ShadowRunner:
    """Runs one candidate model on a worker thread, fed by :meth:`offer` from the serving path.

    Created with the candidate loaded; :class:`agent.model_host.ModelHost` binds it to the
    serving version (:meth:`bind`) when it is attached. :meth:`close` stops the worker, which
    closes the candidate model when its current inference (if any) ends.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        bundle_digest: str,
        sample_rate: float,
        limits: ShadowConfig | None = None,
        seed: int | None = None,
    ) -> None:
        """Start the worker.

        Args:
            model: The loaded candidate; owned by the runner from now on.
            bundle_digest: The candidate's bundle (reported).
            sample_rate: Fraction of serving requests mirrored, in (0, 1].
            limits: Queue and reservoir bounds.
            seed: Seed of the sampling and reservoir draws (tests).
        """
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.model = model
        self.bundle_digest = bundle_digest
        self.sample_rate = sample_rate
        self.serving_version = ""
        self._serving_output = ""  # the serving model's first output, compared with the candidate's
        self._limits = limits or ShadowConfig()
        self._seed = seed
        self._random = random.Random(seed).random
        # A SimpleQueue (C, lock-free for the caller) bounded by a qsize() check: queue.Queue's
        # put_nowait takes a Python-level lock and condition, several times the cost. Producers
        # racing past the check overshoot the bound by at most one sample each.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_queued = self._limits.queue_max_samples
        self._stats_lock = threading.Lock()
        self._stats = self._new_stats()
        self._dropped = 0
        self._drop_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"shadow-{model.name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def dropped(self) -> int:
        """Samples dropped because the queue was full (since the last :meth:`bind` to a new version)."""
        return self._dropped

    def _new_stats(self) -> ShadowStats:
        return ShadowStats(reservoir_size=self._limits.latency_reservoir_size, seed=self._seed)

    # -- serving path (must stay cheap and never block) ---------------------------------------

    def sampled(self) -> bool:
        """Draw whether this request is mirrored."""
        return self.sample_rate >= 1.0 or self._random() < self.sample_rate

    def offer(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], latency_s: float) -> None:
        """Queue one served request for the candidate; drop it (counted) if the queue is full."""
        if self._closed:
            return
        if self._queue.qsize() >= self._max_queued:
            with self._drop_lock:
                self._dropped += 1
            return
        # The stats object goes with the sample: one offered before a rebind to another serving
        # version is counted in the stats that were current then (and discarded with them).
        self._queue.put((self._stats, inputs, outputs, latency_s))

    # -- control ------------------------------------------------------------------------------

    def bind(self, serving: LoadedModel) -> None:
        """Compare against ``serving`` from now on; stats start afresh when its version changes."""
        self._serving_output = serving.outputs[0].name if serving.outputs else ""
        if serving.version == self.serving_version:
            return
        with self._stats_lock:
            self.serving_version = serving.version
            self._stats = self._new_stats()
        with self._drop_lock:
            self._dropped = 0

    def set_sample_rate(self, sample_rate: float) -> None:
        """Change the fraction mirrored (a float store: the serving path reads it unlocked)."""
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = sample_rate

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every sample queued so far is processed (tests); True if so in time."""
        if self._closed:
            return True
        marker = threading.Event()
        self._queue.put(marker)  # FIFO: the worker reaches it after every earlier sample
        return marker.wait(timeout_s)

    def close(self) -> None:
        """Stop the worker; queued samples are discarded and the candidate model is closed."""
        if self._closed:
            return
        self._closed = True
        while True:  # what is queued no longer matters
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, threading.Event):
                item.set()
        self._queue.put(_STOP)
        self._thread.join(timeout=self._limits.stop_timeout_s)
        if self._thread.is_alive():
            log.warning("shadow %s:%s is still inferring; it closes when done", self.name, self.version)

    # -- reporting ----------------------------------------------------------------------------

    def report(self) -> ShadowReport:
        """A consistent snapshot as the wire's :class:`ShadowReport` (state RUNNING)."""
        with self._stats_lock:
            s = self._stats
            parts = []
            if self._dropped:
                parts.append(f"{self._dropped} samples dropped (queue full)")
            if s.last_error:
                parts.append(f"last error: {s.last_error}")
            return ShadowReport(
                name=self.name,
                serving_version=self.serving_version or self.version,
                version=self.version,
                bundle_digest=self.bundle_digest,
                state=ReportedShadowState.RUNNING,
                samples=s.samples,
                agreements=s.agreements,
                errors=s.errors,
                mean_abs_diff=s.mean_abs_diff,
                max_abs_diff=s.max_abs_diff,
                latency_p50_ms=s.latency_p50_ms(),
                serving_latency_p50_ms=s.serving_latency_p50_ms(),
                message="; ".join(parts),
            )

    # -- worker thread ------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                if isinstance(item, threading.Event):
                    item.set()
                    continue
                try:
                    self._run_one(*item)
                except Exception:  # a bug here must not stop the worker; serving never sees it
                    log.exception("shadow %s:%s: comparing a sample failed", self.name, self.version)
        finally:
            self.model.close()

    def _run_one(
        self,
        stats: ShadowStats,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        serving_latency_s: float,
    ) -> None:
        started = time.perf_counter()
        try:
            candidate = self.model.predict(inputs)
            elapsed = time.perf_counter() - started
            serving_first = outputs[self._serving_output]
            candidate_first = candidate[self.model.outputs[0].name]
        except Exception as exc:  # noqa: BLE001 - whatever the candidate does is counted, never raised
            with self._stats_lock:
                stats.record_error(f"{type(exc).__name__}: {exc}")
            return
        with self._stats_lock:
            stats.record(
                serving_first,
                np.asarray(candidate_first),
                serving_latency_s=serving_latency_s,
                candidate_latency_s=elapsed,
            )


class ShadowedModel(LoadedModel):
    """The serving model as handed out while a shadow is attached: same interface, same answers.

    :meth:`predict` runs the serving model, returns its outputs unchanged, and offers the
    request to the runner when sampled. Validation, errors and results are the serving
    model's own; a request that fails on the serving model is not mirrored.
    """

    def __init__(self, inner: LoadedModel, runner: ShadowRunner) -> None:  # noqa: D107
        # The same signature, so that every LoadedModel method works on the wrapper too.
        super().__init__(name=inner.name, version=inner.version, inputs=inner.inputs, outputs=inner.outputs)
        self.inner = inner
        self.runner = runner
        self.runtime = inner.runtime  # type: ignore[misc]  # per instance: it is the inner model's

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Answer from the serving model; mirror the request to the shadow when sampled."""
        runner = self.runner
        if not runner.sampled():
            return self.inner.predict(inputs)
        started = time.perf_counter()
        outputs = self.inner.predict(inputs)
        runner.offer(inputs, outputs, time.perf_counter() - started)
        return outputs

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        """The serving model's own check (the dynamic batcher calls it before queueing)."""
        self.inner.validate(inputs)

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.predict(inputs)

    def close(self) -> None:
        """Close the serving model (the runner is closed by whoever detaches it)."""
        self.inner.close()

    def __repr__(self) -> str:
        return f"<ShadowedModel {self.inner!r} shadow {self.runner.version}>"
