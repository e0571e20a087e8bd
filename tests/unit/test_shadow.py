"""Shadow candidates: the comparison math, the bounded queue, errors, and the serving path's answers."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from agent.model_host import ModelHost
from agent.runtimes.base import LoadedModel
from agent.shadow import (
    LatencyReservoir,
    OutputMismatchError,
    ShadowedModel,
    ShadowLimits,
    ShadowRunner,
    ShadowStats,
    compare_outputs,
)
from agent.state_store import AgentState, ShadowModel, StateStore
from shared.errors import InferenceError
from shared.messages import ReportedState
from shared.tensors import TensorSpec

DIGEST = "sha256:" + "ab" * 32
SPEC_IN = (TensorSpec(name="x", datatype="FP32", shape=(-1, 3)),)
SPEC_OUT = (TensorSpec(name="y", datatype="FP32", shape=(-1, 3)),)


class StubModel(LoadedModel):
    """A model whose answer is a function of its input; counts calls and closes."""

    runtime = "onnx"

    def __init__(self, version: str, fn: Callable[[np.ndarray], np.ndarray], name: str = "m") -> None:
        super().__init__(name=name, version=version, inputs=SPEC_IN, outputs=SPEC_OUT)
        self.fn = fn
        self.calls = 0
        self.closed = False

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"y": self.fn(inputs["x"])}

    def close(self) -> None:
        self.closed = True


class GatedModel(StubModel):
    """A candidate that blocks in predict until released (a slow shadow)."""

    def __init__(self, version: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__(version, fn)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.release.wait(10), "the test never released the gated shadow"
        return super()._run(inputs)


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3)).astype(np.float32)


@pytest.fixture
def runners() -> Iterator[list[ShadowRunner]]:
    made: list[ShadowRunner] = []
    yield made
    for runner in made:
        runner.close()


def _runner(made: list[ShadowRunner], model: LoadedModel, **kwargs: object) -> ShadowRunner:
    runner = ShadowRunner(model, bundle_digest=DIGEST, **kwargs)  # type: ignore[arg-type]
    made.append(runner)
    return runner


# --- the math -------------------------------------------------------------------------------


def test_compare_outputs_agreement_and_differences_on_known_arrays() -> None:
    serving = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    candidate = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    c = compare_outputs(serving, candidate)
    # Row 0: argmax 2 on both; row 1: 0 vs 2. |diff| = [0,0,1],[2,0,2].
    assert (c.rows, c.agreements, c.elements) == (2, 1, 6)
    assert c.abs_diff_sum == pytest.approx(5.0)
    assert c.max_abs_diff == pytest.approx(2.0)


def test_compare_outputs_rows_are_every_slice_along_the_last_axis() -> None:
    a = np.zeros((2, 3, 4), dtype=np.float32)
    a[..., 1] = 1.0
    b = a.copy()
    b[0, 0, 3] = 5.0  # one of six rows disagrees
    c = compare_outputs(a, b)
    assert (c.rows, c.agreements, c.elements, c.max_abs_diff) == (6, 5, 24, 5.0)
    assert compare_outputs(np.float32(2.0), np.float32(2.0)).agreements == 1
    assert compare_outputs(np.array([0.1, 0.9]), np.array([0.8, 0.2])).agreements == 0


@pytest.mark.parametrize(
    ("candidate", "match"),
    [(np.zeros((2, 2), dtype=np.float32), "shape"), (np.array([[np.nan, 0, 0], [0, 0, 0]]), "non-finite")],
)
def test_compare_outputs_refuses_incomparable_outputs(candidate: np.ndarray, match: str) -> None:
    with pytest.raises(OutputMismatchError, match=match):
        compare_outputs(np.zeros((2, 3), dtype=np.float32), candidate)


def test_stats_accumulate_over_requests_and_count_mismatches_as_errors() -> None:
    stats = ShadowStats(seed=1)
    stats.record(
        np.array([[1.0, 0.0], [0.0, 1.0]]),
        np.array([[0.5, 0.0], [1.0, 0.0]]),
        serving_latency_s=0.002,
        candidate_latency_s=0.004,
    )
    stats.record(np.array([[0.0, 3.0]]), np.array([[0.0, 3.0]]), serving_latency_s=0.004, candidate_latency_s=0.008)
    stats.record(np.zeros((1, 2)), np.zeros((1, 3)), serving_latency_s=1.0, candidate_latency_s=1.0)
    assert (stats.requests, stats.samples, stats.agreements, stats.errors) == (2, 3, 2, 1)
    assert "shape" in stats.last_error
    # |diff| elements: 0.5, 0, 1, 1 and 0, 0: sum 2.5 over 6 elements.
    assert stats.mean_abs_diff == pytest.approx(2.5 / 6)
    assert stats.max_abs_diff == pytest.approx(1.0)
    assert stats.agreement == pytest.approx(2 / 3)
    # The mismatched request's latencies are not counted.
    assert stats.serving_latency_p50_ms() == pytest.approx(3.0)
    assert stats.latency_p50_ms() == pytest.approx(6.0)


def test_latency_reservoir_stays_bounded_and_keeps_the_median() -> None:
    reservoir = LatencyReservoir(200, random.Random(7))
    values = np.random.default_rng(3).permutation(np.arange(10_000, dtype=float))
    for v in values:
        reservoir.add(float(v))
    assert len(reservoir._values) == 200
    assert abs(reservoir.median() - 5000) < 1000  # a uniform sample of 200: within ~4 standard errors
    assert LatencyReservoir(5, random.Random(0)).median() == 0.0


# --- the runner and the serving path --------------------------------------------------------


def test_serving_answer_is_returned_unchanged_before_a_slow_shadow_runs(runners: list[ShadowRunner]) -> None:
    serving = StubModel("1", lambda x: x * 2)
    candidate = GatedModel("2", lambda x: x * 2)
    runner = _runner(runners, candidate, sample_rate=1.0)
    runner.bind(serving)
    wrapped = ShadowedModel(serving, runner)
    x = _x(4)
    started = time.perf_counter()
    out = wrapped.predict({"x": x})
    elapsed = time.perf_counter() - started
    np.testing.assert_array_equal(out["y"], x * 2)
    assert candidate.entered.wait(5)  # the shadow got the request ...
    assert candidate.calls == 0  # ... and was still running when the answer came back
    assert elapsed < 0.5
    assert runner.report().samples == 0
    candidate.release.set()
    assert runner.wait_idle(5)
    report = runner.report()
    assert (report.samples, report.agreements, report.errors, report.max_abs_diff) == (4, 4, 0, 0.0)
    assert report.serving_version == "1" and report.version == "2" and report.state == "running"


def test_full_queue_drops_and_counts_without_blocking(runners: list[ShadowRunner]) -> None:
    serving = StubModel("1", lambda x: x)
    candidate = GatedModel("2", lambda x: x)
    runner = _runner(runners, candidate, sample_rate=1.0, limits=ShadowLimits(queue_max_samples=2))
    runner.bind(serving)
    wrapped = ShadowedModel(serving, runner)
    wrapped.predict({"x": _x(1)})
    assert candidate.entered.wait(5)  # the worker holds the first sample
    started = time.perf_counter()
    for i in range(10):
        wrapped.predict({"x": _x(1, seed=i)})
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, "a full queue slowed the serving path"
    assert serving.calls == 11
    assert runner.dropped == 8  # 2 queued, 8 dropped
    assert "8 samples dropped" in runner.report().message
    candidate.release.set()
    assert runner.wait_idle(5)
    assert runner.report().samples == 3


def test_a_raising_shadow_counts_errors_and_never_reaches_the_caller(runners: list[ShadowRunner]) -> None:
    def boom(x: np.ndarray) -> np.ndarray:
        raise InferenceError("candidate exploded")

    serving = StubModel("1", lambda x: x + 1)
    runner = _runner(runners, StubModel("2", boom), sample_rate=1.0)
    runner.bind(serving)
    wrapped = ShadowedModel(serving, runner)
    for i in range(5):
        np.testing.assert_array_equal(wrapped.predict({"x": _x(2, i)})["y"], _x(2, i) + 1)
    assert runner.wait_idle(5)
    report = runner.report()
    assert (report.samples, report.errors) == (0, 5)
    assert "candidate exploded" in report.message


def test_a_request_the_serving_model_refuses_is_not_mirrored(runners: list[ShadowRunner]) -> None:
    serving = StubModel("1", lambda x: x)
    candidate = StubModel("2", lambda x: x)
    runner = _runner(runners, candidate, sample_rate=1.0)
    runner.bind(serving)
    with pytest.raises(InferenceError):
        ShadowedModel(serving, runner).predict({"x": np.zeros((1, 4), dtype=np.float32)})
    assert runner.wait_idle(5)
    assert candidate.calls == 0 and runner.report().errors == 0


def test_sample_rate_mirrors_the_drawn_fraction(runners: list[ShadowRunner]) -> None:
    serving = StubModel("1", lambda x: x)
    candidate = StubModel("2", lambda x: x)
    runner = _runner(runners, candidate, sample_rate=0.25, seed=42)
    runner.bind(serving)
    wrapped = ShadowedModel(serving, runner)
    for _ in range(400):
        wrapped.predict({"x": _x(1)})
    assert runner.wait_idle(5)
    draw = random.Random(42).random
    expected = sum(draw() < 0.25 for _ in range(400))
    assert candidate.calls == expected == runner.report().samples
    assert 60 < expected < 140


def test_close_stops_the_worker_and_closes_the_candidate() -> None:
    candidate = StubModel("2", lambda x: x)
    runner = ShadowRunner(candidate, bundle_digest=DIGEST, sample_rate=1.0)
    runner.close()
    assert candidate.closed
    runner.offer({"x": _x(1)}, {"y": _x(1)}, 0.001)  # after close: ignored, not queued forever
    assert runner.wait_idle(1)


# --- the model host -------------------------------------------------------------------------


def test_host_hands_out_the_serving_model_itself_without_a_shadow(runners: list[ShadowRunner]) -> None:
    host = ModelHost()
    v1 = StubModel("1", lambda x: x)
    host.swap("m", v1)
    assert host.get("m") is v1
    runner = _runner(runners, StubModel("2", lambda x: x * 0), sample_rate=1.0)
    assert host.attach_shadow("m", runner) is None
    wrapped = host.get("m")
    assert isinstance(wrapped, ShadowedModel) and wrapped.inner is v1
    assert (wrapped.name, wrapped.version, wrapped.runtime, wrapped.inputs, wrapped.outputs) == (
        "m",
        "1",
        "onnx",
        SPEC_IN,
        SPEC_OUT,
    )
    assert host.get("m", "1") is wrapped and host.get("m", "2") is None and host.models() == [wrapped]
    assert host.detach_shadow("m") is runner
    assert host.get("m") is v1


def test_host_rebinds_the_shadow_when_the_serving_version_changes(runners: list[ShadowRunner]) -> None:
    host = ModelHost()
    host.swap("m", StubModel("1", lambda x: x))
    runner = _runner(runners, StubModel("3", lambda x: x), sample_rate=1.0)
    host.attach_shadow("m", runner)
    model = host.get("m")
    assert model is not None
    model.predict({"x": _x(3)})
    assert runner.wait_idle(5) and runner.report().samples == 3
    host.swap("m", StubModel("2", lambda x: -x))
    assert runner.report().serving_version == "2" and runner.report().samples == 0  # fresh stats
    model = host.get("m")
    assert isinstance(model, ShadowedModel) and model.version == "2"
    model.predict({"x": _x(2)})
    assert runner.wait_idle(5) and runner.report().samples == 2


def test_attach_needs_a_serving_model_and_close_all_stops_shadows() -> None:
    host = ModelHost()
    candidate = StubModel("2", lambda x: x)
    runner = ShadowRunner(candidate, bundle_digest=DIGEST, sample_rate=1.0)
    with pytest.raises(KeyError):
        host.attach_shadow("m", runner)
    serving = StubModel("1", lambda x: x)
    host.swap("m", serving)
    host.attach_shadow("m", runner)
    host.close_all()
    assert candidate.closed and serving.closed and host.get("m") is None


# --- persisted and reported ------------------------------------------------------------------


def test_shadows_persist_in_the_agent_state_and_old_files_still_load(tmp_path: Path) -> None:
    entry = ShadowModel(
        name="m",
        version="2",
        bundle_digest=DIGEST,
        runtime="onnx",
        sample_rate=0.5,
        serving_version="1",
        state="running",
        slot="2-abababababab",
        model_file="model.onnx",
    )
    StateStore(tmp_path).update(shadows={"m": entry})
    assert StateStore(tmp_path).state.shadows == {"m": entry}
    raw = AgentState().to_dict()
    del raw["shadows"]  # a state file written before shadows existed
    assert AgentState.from_dict(raw).shadows == {}


def test_runner_report_survives_the_wire(runners: list[ShadowRunner]) -> None:
    runner = _runner(runners, StubModel("2", lambda x: x + 0.5), sample_rate=1.0)
    runner.bind(StubModel("1", lambda x: x))
    runner.offer({"x": _x(2)}, {"y": _x(2)}, 0.001)
    assert runner.wait_idle(5)
    report = ReportedState(device_id="d", ts=1.0, applied_sequence=1, shadows=(runner.report(),))
    decoded = ReportedState.decode(report.encode()).shadows[0]
    assert decoded == runner.report()
    assert (decoded.samples, decoded.agreements) == (2, 2)
    assert decoded.mean_abs_diff == pytest.approx(0.5) and decoded.max_abs_diff == pytest.approx(0.5)
