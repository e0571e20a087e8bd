"""DynamicBatcher and BatcherPool against a fake model that records every run.

The fake can hold its first run on a gate, so that the requests queued meanwhile make a
predictable batch once it opens: batching is asserted from what the model was called with, and
results from what each caller got back, never from timings.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.config import AgentConfig, BatchingConfig
from edgefleet.agent.serving.batching import BatcherPool, DynamicBatcher, is_batchable
from edgefleet.shared.errors import ConfigError, InferenceError
from edgefleet.shared.runtimes import LoadedModel
from edgefleet.shared.tensors import TensorSpec

WAIT_S = 10.0  # upper bound for anything that should happen at once; never reached when it works


class RowModel(LoadedModel):
    """``y = 2x + 1`` and ``s = row sums``: rows stay apart, as batching assumes.

    Records ``(rows, width)`` of every run. NaN in the input makes the run fail, like a bad
    index would in a real model. ``hold()`` makes the next run wait until ``release()``.
    """

    runtime = "fake"

    def __init__(self, width: int = 3, *, batch_dim: int = -1, total_sum: bool = False, name: str = "rows") -> None:
        super().__init__(
            name=name,
            version="1",
            inputs=(TensorSpec(name="x", datatype="FP32", shape=(batch_dim, width)),),
            outputs=(
                TensorSpec(name="y", datatype="FP32", shape=(batch_dim, width)),
                TensorSpec(name="s", datatype="FP32", shape=(batch_dim,)),
            ),
        )
        self.calls: list[tuple[int, int]] = []
        self.total_sum = total_sum  # a model that mixes rows: s is one number for the batch
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()

    def hold(self) -> None:
        self._gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self._gate.set()

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.calls.append((x.shape[0], x.shape[1]))
        self.entered.set()
        assert self._gate.wait(WAIT_S)
        if np.isnan(x).any():
            raise InferenceError("NaN in the input")
        s = np.array([x.sum()], dtype=np.float32) if self.total_sum else x.sum(axis=1)
        return {"y": x * 2 + 1, "s": s}


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": x * 2 + 1, "s": x.sum(axis=1)}


def rows(n: int, width: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)}


def assert_result(future: Future[dict[str, np.ndarray]], inputs: dict[str, np.ndarray]) -> None:
    got = future.result(timeout=WAIT_S)
    want = expected(inputs["x"])
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


@pytest.fixture
def model() -> RowModel:
    return RowModel()


@pytest.fixture
def make_batcher() -> Iterator[object]:
    made: list[DynamicBatcher] = []

    def make(model: LoadedModel, max_batch_size: int = 8, max_queue_delay_us: int = 0) -> DynamicBatcher:
        batcher = DynamicBatcher(model, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close()
        assert batcher.join(WAIT_S), "batcher thread did not exit"


def start_held_run(model: RowModel, batcher: DynamicBatcher) -> tuple[Future[dict[str, np.ndarray]], dict]:
    """Submit one request and wait until the model is running it, held at the gate."""
    model.hold()
    first = rows(1, model.inputs[0].shape[1], seed=99)
    future = batcher.submit(first)
    assert model.entered.wait(WAIT_S)
    return future, first


# --- batching ----------------------------------------------------------------------------------


def test_requests_queued_during_a_run_form_one_batch_and_get_their_own_rows(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model, max_batch_size=8, max_queue_delay_us=0)
    held, held_inputs = start_held_run(model, batcher)
    requests = [rows(2, seed=1), rows(1, seed=2), rows(3, seed=3)]
    futures = [batcher.submit(r) for r in requests]
    model.release()
    for future, request in zip(futures, requests, strict=True):
        assert_result(future, request)
    assert_result(held, held_inputs)
    assert model.calls == [(1, 3), (6, 3)]


def test_many_threads_each_get_exactly_their_rows(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model, max_batch_size=16, max_queue_delay_us=2000)
    requests = [rows(1 + i % 4, seed=i) for i in range(40)]
    results: dict[int, dict[str, np.ndarray]] = {}
    start = threading.Barrier(8)

    def client(indices: range) -> None:
        start.wait()
        for i in indices:
            results[i] = batcher.predict(requests[i])

    threads = [threading.Thread(target=client, args=(range(k, 40, 8),)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert sorted(results) == list(range(40))
    for i, request in enumerate(requests):
        np.testing.assert_array_equal(results[i]["y"], expected(request["x"])["y"])
        np.testing.assert_array_equal(results[i]["s"], expected(request["x"])["s"])
    assert sum(n for n, _ in model.calls) == sum(r["x"].shape[0] for r in requests)
    assert max(n for n, _ in model.calls) <= 16


def test_incompatible_shapes_run_in_separate_batches(make_batcher) -> None:
    model = RowModel(width=-1)  # any width, but a batch needs one
    batcher = make_batcher(model)
    model.hold()
    held = batcher.submit(rows(1, 3, seed=9))
    assert model.entered.wait(WAIT_S)
    requests = [rows(1, 3, seed=1), rows(1, 5, seed=2), rows(2, 3, seed=3), rows(1, 5, seed=4)]
    futures = [batcher.submit(r) for r in requests]
    model.release()
    for future, request in zip(futures, requests, strict=True):
        assert_result(future, request)
    held.result(WAIT_S)
    # Width 3 first (it came first), then the width-5 requests that were set aside, together.
    assert model.calls == [(1, 3), (3, 3), (2, 5)]


def test_batches_never_exceed_max_batch_size_and_oversized_requests_run_alone(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model, max_batch_size=4)
    held, _ = start_held_run(model, batcher)
    requests = [rows(3, seed=1), rows(2, seed=2), rows(5, seed=3), rows(1, seed=4)]
    futures = [batcher.submit(r) for r in requests]
    model.release()
    for future, request in zip(futures, requests, strict=True):
        assert_result(future, request)
    held.result(WAIT_S)
    # 3 + 1 fill a batch; the 2 that did not fit goes next; the 5 is over the limit: alone.
    assert model.calls == [(1, 3), (4, 3), (2, 3), (5, 3)]


# --- errors go to the right caller ---------------------------------------------------------------


def test_a_failing_request_fails_alone(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model)
    held, _ = start_held_run(model, batcher)
    bad = rows(1, seed=2)
    bad["x"][0, 1] = np.nan
    requests = [rows(2, seed=1), bad, rows(1, seed=3)]
    futures = [batcher.submit(r) for r in requests]
    model.release()
    assert_result(futures[0], requests[0])
    with pytest.raises(InferenceError, match="NaN"):
        futures[1].result(WAIT_S)
    assert_result(futures[2], requests[2])
    held.result(WAIT_S)
    # The batch of 4 rows failed, then each request ran alone.
    assert model.calls == [(1, 3), (4, 3), (2, 3), (1, 3), (1, 3)]


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ({"x": np.zeros((1, 4), dtype=np.float32)}, "shape [1, 4]"),
        ({"x": np.zeros((1, 3), dtype=np.float64)}, "datatype FP64"),
        ({"z": np.zeros((1, 3), dtype=np.float32)}, "missing input 'x'"),
    ],
)
def test_invalid_request_is_refused_at_submit(model: RowModel, make_batcher, inputs: dict, fragment: str) -> None:
    batcher = make_batcher(model, max_queue_delay_us=5_000_000)
    with pytest.raises(InferenceError, match=fragment.replace("[", r"\[")):
        batcher.submit(inputs)
    assert model.calls == []


def test_outputs_that_mix_rows_fall_back_to_one_run_per_request(make_batcher) -> None:
    model = RowModel(total_sum=True)
    batcher = make_batcher(model)
    held, _ = start_held_run(model, batcher)
    requests = [rows(2, seed=1), rows(1, seed=2)]
    futures = [batcher.submit(r) for r in requests]
    model.release()
    for future, request in zip(futures, requests, strict=True):
        got = future.result(WAIT_S)
        np.testing.assert_array_equal(got["s"], [request["x"].sum()])  # its own sum, not the batch's
    held.result(WAIT_S)
    assert model.calls == [(1, 3), (3, 3), (2, 3), (1, 3)]


# --- queue delay -------------------------------------------------------------------------------


def test_a_lone_request_waits_for_company_until_the_batch_is_full(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model, max_batch_size=2, max_queue_delay_us=5_000_000)
    first = batcher.submit(rows(1, seed=1))
    # Not answered while the delay runs (5 s, far longer than this test takes)...
    with pytest.raises(TimeoutError):
        first.result(timeout=0.2)
    assert model.calls == []
    # ...and answered as soon as a second request fills the batch.
    second = batcher.submit(rows(1, seed=2))
    assert_result(first, rows(1, seed=1))
    assert_result(second, rows(1, seed=2))
    assert model.calls == [(2, 3)]


def test_a_lone_request_runs_once_the_delay_is_over(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model, max_batch_size=8, max_queue_delay_us=20_000)
    assert_result(batcher.submit(rows(2, seed=1)), rows(2, seed=1))
    assert model.calls == [(2, 3)]


def test_zero_delay_does_not_wait_for_company(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model, max_batch_size=8, max_queue_delay_us=0)
    assert_result(batcher.submit(rows(1, seed=1)), rows(1, seed=1))
    assert_result(batcher.submit(rows(1, seed=2)), rows(1, seed=2))
    assert model.calls == [(1, 3), (1, 3)]


# --- callers on an event loop --------------------------------------------------------------------


def test_predict_async_from_an_event_loop(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model, max_batch_size=6, max_queue_delay_us=5_000_000)
    requests = [rows(1 + i % 2, seed=i) for i in range(4)]  # 6 rows: one full batch

    async def main() -> list[dict[str, np.ndarray]]:
        return await asyncio.wait_for(asyncio.gather(*(batcher.predict_async(r) for r in requests)), WAIT_S)

    results = asyncio.run(main())
    for got, request in zip(results, requests, strict=True):
        np.testing.assert_array_equal(got["y"], expected(request["x"])["y"])
    assert model.calls == [(6, 3)]


def test_predict_async_raises_the_callers_own_error(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model)
    bad = rows(1)
    bad["x"][0, 0] = np.nan

    async def main() -> None:
        with pytest.raises(InferenceError, match="NaN"):
            await batcher.predict_async(bad)

    asyncio.run(main())


# --- lifetime ----------------------------------------------------------------------------------


def test_close_answers_what_is_queued_and_refuses_new_requests(model: RowModel, make_batcher) -> None:
    batcher = make_batcher(model)
    held, _ = start_held_run(model, batcher)
    queued = batcher.submit(rows(2, seed=1))
    batcher.close()
    with pytest.raises(InferenceError, match="being unloaded"):
        batcher.submit(rows(1))
    model.release()
    assert_result(queued, rows(2, seed=1))
    held.result(WAIT_S)
    assert batcher.join(WAIT_S)


def test_unbatchable_models() -> None:
    fixed = RowModel(batch_dim=4)
    assert not is_batchable(fixed) and is_batchable(RowModel())
    with pytest.raises(ConfigError, match="cannot batch"):
        DynamicBatcher(fixed, max_batch_size=4, max_queue_delay_us=0)


def test_pool_batches_only_the_configured_batchable_models() -> None:
    pool = BatcherPool(BatchingConfig(enabled=True, max_batch_size=5, max_queue_delay_us=7, models=("rows",)))
    listed, other, fixed = RowModel(), RowModel(name="other"), RowModel(batch_dim=2)
    try:
        batcher = pool.get(listed)
        assert batcher is not None and pool.get(listed) is batcher
        assert (batcher.max_batch_size, batcher.max_queue_delay_us) == (5, 7)
        assert pool.get(other) is None
        assert pool.get(fixed) is None
    finally:
        pool.close()
    assert batcher.join(WAIT_S)


def test_a_batcher_ends_when_its_model_is_gone() -> None:
    pool = BatcherPool(BatchingConfig(enabled=True))
    model = RowModel()
    batcher = pool.get(model)
    assert batcher is not None
    assert_result(batcher.submit(rows(1)), rows(1))
    # No gc.collect(): the model is in no reference cycle, so dropping the last reference frees
    # it at once (and a collection here could raise other tests' leftovers, such as unclosed
    # sockets, as ResourceWarnings in this one).
    del model
    assert batcher.join(WAIT_S)


# --- config ------------------------------------------------------------------------------------


def test_batching_config_defaults_and_toml_table(tmp_path: Path) -> None:
    raw = {"device_id": "d1", "data_dir": str(tmp_path)}
    defaults = BatchingConfig(enabled=False, max_batch_size=32, max_queue_delay_us=500, models=())
    assert AgentConfig.from_dict(raw).batching == defaults
    table = {"enabled": True, "max_batch_size": 8, "max_queue_delay_us": 2000, "models": ["detector"]}
    config = AgentConfig.from_dict({**raw, "batching": table}).batching
    assert config == BatchingConfig(enabled=True, max_batch_size=8, max_queue_delay_us=2000, models=("detector",))
    assert config.applies_to("detector") and not config.applies_to("classifier")
    assert BatchingConfig(enabled=True).applies_to("anything")
    assert not BatchingConfig(models=("detector",)).applies_to("detector")  # not enabled


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"max_batch_size": 0}, "at least 1"),
        ({"max_queue_delay_us": 10_000_001}, "10 s"),
        ({"max_queue_delay_us": -1}, "non-negative"),
        ({"enabled": "yes"}, "true or false"),
        ({"models": "detector"}, "list of strings"),
        ({"max_batch": 8}, "unknown key"),
    ],
)
def test_batching_config_rejects_nonsense(tmp_path: Path, table: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        AgentConfig.from_dict({"device_id": "d1", "data_dir": str(tmp_path), "batching": table})
