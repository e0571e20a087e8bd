"""Shadow candidates: the comparison math, the bounded queue, errors, and the serving path's answers."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

import edgefleet.agent.deployment.steps as steps_module
from edgefleet.agent.config import AgentConfig, TrustConfig
from edgefleet.agent.deployment.reconciler import Reconciler
from edgefleet.agent.deployment.state_store import AgentState, ShadowModel, StateStore
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.serving.shadow import (
    LatencyReservoir,
    OutputMismatchError,
    ShadowConfig,
    ShadowedModel,
    ShadowRunner,
    ShadowStats,
    compare_outputs,
)
from edgefleet.control_plane.api.schemas import device_shadows_public
from edgefleet.control_plane.db.tables import Assignment, Device, ModelVersion, ShadowAssignment
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, make_mlp_weights
from edgefleet.control_plane.services.desired_states import desired_state_for
from edgefleet.shared.bundle.format import build_bundle, make_manifest
from edgefleet.shared.errors import InferenceError, NotFoundError, TransferError
from edgefleet.shared.runtimes import load_model
from edgefleet.shared.runtimes.base import LoadedModel
from edgefleet.shared.tensors import TensorSpec
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.messages import DesiredState, ModelDirective, ReportedState, ShadowDirective, ShadowReport

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
    runner = _runner(runners, candidate, sample_rate=1.0, limits=ShadowConfig(queue_max_samples=2))
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
    for i in range(400):
        wrapped.predict({"x": _x(1)})
        if i % 16 == 15:  # drain well before the queue could fill: no sample may be dropped here
            assert runner.wait_idle(5)
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
    with pytest.raises(InferenceError, match="shape"):  # the dynamic batcher validates before queueing
        wrapped.validate({"x": np.zeros((1, 4), dtype=np.float32)})
    wrapped.validate({"x": _x(2)})
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
    with pytest.raises(NotFoundError):
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


# --- the reconciler: deploy, fail, recover, unload ------------------------------------------------

PUBLISHER = SigningKey.generate()
ONLINE = SigningKey.generate()
STRANGER = SigningKey.generate()
DEVICE_ID = "unit-shadow"
NAME = "clf"


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@dataclass(frozen=True)
class Release:
    version: str
    bundle: Path
    digest: str
    size: int

    def directive(self, shadow: Release | None = None, rate: float = 1.0) -> ModelDirective:
        return ModelDirective(
            name=NAME,
            version=self.version,
            bundle_digest=self.digest,
            bundle_size=self.size,
            runtime="onnx",
            shadow=None
            if shadow is None
            else ShadowDirective(
                version=shadow.version,
                bundle_digest=shadow.digest,
                bundle_size=shadow.size,
                runtime="onnx",
                sample_rate=rate,
            ),
        )


def _release(directory: Path, version: str, seed: int, *, n_inputs: int = 8, key: SigningKey = PUBLISHER) -> Release:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{version}.onnx"
    path.write_bytes(build_onnx_mlp(make_mlp_weights(n_inputs=n_inputs, hidden=(8,), n_outputs=3, seed=seed)))
    loaded = load_model("onnx", path, name=NAME, version=version)
    manifest = make_manifest(
        name=NAME, version=version, runtime="onnx", model_file="model.onnx", files={"model.onnx": path},
        inputs=loaded.inputs, outputs=loaded.outputs,
    )
    loaded.close()
    bundle = directory / f"{version}.bundle"
    digest = build_bundle(bundle, manifest, {"model.onnx": path}, [key])
    return Release(version, bundle, digest, bundle.stat().st_size)


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Release]:
    d = tmp_path_factory.mktemp("shadow-releases")
    return {
        "v1": _release(d, "1.0.0", 1),
        "v2": _release(d, "2.0.0", 2),
        "v3": _release(d, "3.0.0", 3),
        "unsigned": _release(d, "2.0.0+stranger", 2, key=STRANGER),
        "narrow": _release(d, "2.0.0+narrow", 2, n_inputs=6),
    }


class Fetcher:
    def __init__(self, downloads: Path, releases: dict[str, Release]) -> None:
        downloads.mkdir(parents=True, exist_ok=True)
        self.downloads = downloads
        self.by_digest = {r.digest: r for r in releases.values()}
        self.calls: list[str] = []
        self.failures: dict[str, BaseException] = {}

    def fetch(self, digest: str, size: int, cancel: threading.Event) -> Path:
        self.calls.append(digest)
        if digest in self.failures:
            raise self.failures[digest]
        dest = self.downloads / f"{digest.removeprefix('sha256:')}.bundle"
        shutil.copyfile(self.by_digest[digest].bundle, dest)
        return dest


class Agent:
    """One boot: real store, host and runtimes; fake transfer; published messages kept."""

    def __init__(self, data_dir: Path, releases: dict[str, Release]) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir, self.releases = data_dir, releases
        config = AgentConfig(
            device_id=DEVICE_ID,
            data_dir=data_dir,
            trust=TrustConfig(publisher_keys=(PUBLISHER.public_hex,), online_keys=(ONLINE.public_hex,)),
        )
        self.store = StateStore(data_dir)
        self.host = ModelHost()
        self.fetcher = Fetcher(data_dir / "downloads", releases)
        self.published: list[bytes] = []
        self.reconciler = Reconciler(
            config, self.store, self.host, self.fetcher, lambda leaf, payload, retain: self.published.append(payload)
        )
        self.reconciler.recover()
        self.reconciler.load_active()

    def apply(self, sequence: int, *directives: ModelDirective) -> bool:
        state = DesiredState(
            device_id=DEVICE_ID, sequence=sequence, issued_at=time.time(), expires_at=time.time() + 3600,
            models=directives,
        )
        self.reconciler.offer_desired(state.seal(ONLINE))
        self.reconciler._wake.clear()
        return self.reconciler.reconcile_once()

    def shadow_report(self) -> ShadowReport | None:
        shadows = self.reconciler.reported_state().shadows
        return shadows[0] if shadows else None

    def infer(self, rows: int) -> None:
        model = self.host.get(NAME)
        assert model is not None
        model.predict({"input": np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)})


@pytest.fixture
def agent(tmp_path: Path, releases: dict[str, Release]) -> Iterator[Agent]:
    made = Agent(tmp_path / "agent", releases)
    yield made
    made.host.close_all()


def test_reconciler_stages_loads_and_reports_a_shadow(agent: Agent, releases: dict[str, Release]) -> None:
    v1, v2 = releases["v1"], releases["v2"]
    assert agent.apply(1, v1.directive(shadow=v2)) is False
    assert agent.host.get(NAME, "1.0.0") is not None and agent.host.get(NAME, "2.0.0") is None
    runner = agent.host.shadow(NAME)
    assert runner is not None and runner.version == "2.0.0"
    agent.infer(3)
    assert runner.wait_idle(5)
    report = agent.shadow_report()
    assert report is not None
    assert (report.state, report.serving_version, report.version, report.samples) == ("running", "1.0.0", "2.0.0", 3)
    assert ReportedState.decode(agent.published[-1]).shadows[0].version == "2.0.0"  # published with the state
    stored = StateStore(agent.data_dir).state.shadows[NAME]
    assert (stored.state, stored.bundle_digest, stored.sample_rate) == ("running", v2.digest, 1.0)
    # A new serving version keeps the shadow attached (fresh stats), and pruning keeps its slot.
    agent.apply(2, releases["v3"].directive(shadow=v2))
    agent.apply(3, v1.directive(shadow=v2))
    assert (agent.data_dir / "models" / NAME / stored.slot / "model.onnx").is_file()
    assert agent.host.shadow(NAME) is runner and runner.report().serving_version == "1.0.0"
    # The sample rate changes in place; removing the shadow unloads it.
    agent.apply(4, v1.directive(shadow=v2, rate=0.25))
    assert runner.sample_rate == 0.25 and StateStore(agent.data_dir).state.shadows[NAME].sample_rate == 0.25
    agent.apply(5, v1.directive())
    assert agent.host.shadow(NAME) is None and runner._closed and agent.shadow_report() is None
    assert StateStore(agent.data_dir).state.shadows == {}
    assert ReportedState.decode(agent.published[-1]).shadows == ()


def test_a_candidate_that_fails_verification_is_reported_failed_and_not_retried_under_that_state(
    agent: Agent, releases: dict[str, Release]
) -> None:
    v1, unsigned = releases["v1"], releases["unsigned"]
    agent.apply(1, v1.directive(shadow=unsigned))
    report = agent.shadow_report()
    assert report is not None and report.state == "failed" and report.version == "2.0.0+stranger"
    assert report.message.startswith("signature_invalid:")
    assert agent.host.get(NAME) is agent.host.get(NAME, "1.0.0")  # serving untouched
    assert not isinstance(agent.host.get(NAME), ShadowedModel)
    calls = len(agent.fetcher.calls)
    agent.reconciler._wake.clear()
    agent.reconciler.reconcile_once()  # same desired state: not fetched again
    assert len(agent.fetcher.calls) == calls
    agent.apply(2, v1.directive(shadow=unsigned))  # a new desired state tries again
    assert len(agent.fetcher.calls) == calls + 1


def test_a_candidate_with_other_inputs_is_refused(agent: Agent, releases: dict[str, Release]) -> None:
    agent.apply(1, releases["v1"].directive(shadow=releases["narrow"]))
    report = agent.shadow_report()
    assert report is not None and report.state == "failed"
    assert "bundle_incompatible" in report.message and "inputs" in report.message
    assert agent.host.shadow(NAME) is None


def test_a_retryable_download_failure_is_retried_and_records_nothing(
    agent: Agent, releases: dict[str, Release]
) -> None:
    agent.fetcher.failures[releases["v2"].digest] = TransferError("broker went away")
    assert agent.apply(1, releases["v1"].directive(shadow=releases["v2"])) is True
    assert agent.store.state.shadows == {} and agent.shadow_report() is None
    assert agent.store.state.applied_sequence == 0  # not fully applied yet
    del agent.fetcher.failures[releases["v2"].digest]
    agent.reconciler._wake.clear()
    assert agent.reconciler.reconcile_once() is False
    assert agent.host.shadow(NAME) is not None and agent.store.state.applied_sequence == 1


def test_boot_loads_a_running_shadow_from_its_slot_without_fetching(
    tmp_path: Path, releases: dict[str, Release]
) -> None:
    first = Agent(tmp_path / "agent", releases)
    first.apply(1, releases["v1"].directive(shadow=releases["v2"]))
    first.host.close_all()
    second = Agent(tmp_path / "agent", releases)
    try:
        second.reconciler._wake.clear()
        second.reconciler.reconcile_once()
        assert second.fetcher.calls == []
        assert second.host.shadow(NAME) is not None
        second.infer(2)
        assert second.host.shadow(NAME).wait_idle(5)  # type: ignore[union-attr]
        assert second.shadow_report().samples == 2  # type: ignore[union-attr]
    finally:
        second.host.close_all()


def test_an_agent_killed_while_loading_a_shadow_does_not_load_it_again_on_boot(
    tmp_path: Path, releases: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = steps_module.load_model

    def dies_on_the_candidate(runtime: str, path: Path, *, name: str, version: str, **kw: object) -> LoadedModel:
        if version == "2.0.0":
            raise Killed("SIGKILL while loading the shadow")
        return real_load(runtime, path, name=name, version=version, **kw)  # type: ignore[arg-type]

    first = Agent(tmp_path / "agent", releases)
    monkeypatch.setattr(steps_module, "load_model", dies_on_the_candidate)
    with pytest.raises(Killed):
        first.apply(1, releases["v1"].directive(shadow=releases["v2"]))
    first.host.close_all()
    assert StateStore(tmp_path / "agent").state.shadows[NAME].state == "loading"

    loads: list[str] = []

    def counting(runtime: str, path: Path, *, name: str, version: str, **kw: object) -> LoadedModel:
        loads.append(version)
        return real_load(runtime, path, name=name, version=version, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(steps_module, "load_model", counting)
    second = Agent(tmp_path / "agent", releases)
    try:
        second.reconciler._wake.clear()
        second.reconciler.reconcile_once()
        assert "2.0.0" not in loads and second.host.get(NAME, "1.0.0") is not None
        report = second.shadow_report()
        assert report is not None and report.state == "failed" and "loading" in report.message
    finally:
        second.host.close_all()


# --- the control plane's pure parts -----------------------------------------------------------------


def _row(version: str, n: int) -> ModelVersion:
    return ModelVersion(
        name=NAME, version=version, runtime="onnx", bundle_digest="sha256:" + f"{n:064x}", bundle_size=100 + n,
        manifest_json="{}", created_at=datetime.now(UTC),
    )


def test_desired_state_carries_the_shadow_beside_its_model_and_never_the_serving_version() -> None:
    v1, v2 = _row("1.0.0", 1), _row("2.0.0", 2)
    state = desired_state_for("d", 3, [v1], issued_at=10.0, ttl_s=5.0, shadows={NAME: (v2, 0.1)})
    shadow = state.models[0].shadow
    assert shadow == ShadowDirective(
        version="2.0.0", bundle_digest=v2.bundle_digest, bundle_size=v2.bundle_size, runtime="onnx", sample_rate=0.1
    )
    assert DesiredState.decode(state.encode()) == state
    promoted = desired_state_for("d", 4, [v2], issued_at=10.0, ttl_s=5.0, shadows={NAME: (v2, 0.1)})
    assert promoted.models[0].shadow is None
    assert desired_state_for("d", 5, [v1], issued_at=10.0, ttl_s=5.0).models[0].shadow is None


def test_device_shadows_merge_what_is_asked_for_with_what_is_reported() -> None:
    report = ShadowReport(
        name=NAME, serving_version="1.0.0", version="2.0.0", bundle_digest="sha256:" + "2" * 64, state="running",
        samples=8, agreements=6,
    )
    stale = ShadowReport(
        name="other", serving_version="1.0.0", version="9.0.0", bundle_digest="sha256:" + "9" * 64, state="failed",
        message="no",
    )
    reported = ReportedState(device_id="d", ts=42.0, applied_sequence=1, shadows=(report, stale))
    device = Device(id="d", created_at=datetime.now(UTC), reported_json=reported.encode().decode(), reported_ts=42.0)
    now = datetime.now(UTC)
    rows = device_shadows_public(
        device,
        [Assignment(device_id="d", model_name=NAME, version="1.0.0")],
        [
            ShadowAssignment(device_id="d", model_name=NAME, version="2.0.0", sample_rate=0.5, created_at=now),
            ShadowAssignment(device_id="d", model_name="new", version="1", sample_rate=1.0, created_at=now),
        ],
    )
    by_model = {r.model_name: r for r in rows}
    assert [r.model_name for r in rows] == ["clf", "new", "other"]
    assert by_model[NAME].agreement == 0.75 and by_model[NAME].report.samples == 8  # type: ignore[union-attr]
    clf = by_model[NAME]
    assert (clf.serving_version, clf.version, clf.sample_rate, clf.reported_ts) == ("1.0.0", "2.0.0", 0.5, 42.0)
    assert by_model["new"].report is None and by_model["new"].agreement is None
    assert by_model["other"].version is None and by_model["other"].report.state == "failed"  # type: ignore[union-attr]
    assert json.loads(by_model[NAME].model_dump_json())["report"]["agreements"] == 6
