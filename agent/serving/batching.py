"""Server-side dynamic batching: concurrent requests to one model, run as one.

Theory of operation
-------------------
A :class:`DynamicBatcher` serves one loaded model with one worker thread. A caller (the inference
API's event loop, or any thread) hands it a request; the request is validated against the
model's signature in the caller's thread, so that a malformed request fails alone and at once,
then queued. The worker takes the oldest request and, until ``max_queue_delay_us`` after *that*
request arrived, gathers more until the batch holds ``max_batch_size`` rows (entries along the
first axis). A request joins only a batch it fits: the same shape as the batch's first request
on every axis but the first, for every input. The others wait for the next batch, in arrival
order. A request over ``max_batch_size`` rows, or whose inputs disagree on their row count,
runs alone.

A batch is concatenated along axis 0, run once, and every output is sliced back into each
request's rows. If the batched run fails, or an output's first dimension is not the batch's row
count (a model that does not keep rows apart), each request of the batch is run again on its
own, so that every caller gets its own answer or its own error, never a neighbour's.

Only models whose every input and output is dynamic on axis 0 can be batched
(:func:`is_batchable`). Whether rows are truly independent (no batch statistics, no ops across
rows) the agent cannot tell: that is the operator's call, made per model in ``[batching]``.

Lifetime: a batcher holds its model weakly, and :class:`BatcherPool` closes it (its thread
exits) when the model is garbage-collected after a swap; a request in flight holds the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.agent.config import BatchingConfig
from edgefleet.shared.errors import ConfigError, InferenceError
from edgefleet.shared.runtimes import LoadedModel

__all__ = ["BatcherPool", "DynamicBatcher", "is_batchable"]

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
# Called once per request, on the worker thread: (outputs, None) or (None, error).
_Deliver = Callable[[Outputs | None, BaseException | None], None]
_STOP = object()  # queued by close(): the worker drains what it has, then exits


def is_batchable(model: LoadedModel) -> bool:
    """Whether every input and output of ``model`` has a dynamic (-1) first dimension."""
    specs = model.inputs + model.outputs
    return bool(model.inputs) and all(spec.shape and spec.shape[0] == -1 for spec in specs)


@dataclass(slots=True, eq=False)
class _Pending:
    """One queued request."""

    inputs: Mapping[str, np.ndarray]
    rows: int
    # The shape of every input past axis 0, in model order; None: the request runs alone.
    key: tuple[tuple[int, ...], ...] | None
    enqueued_s: float  # time.monotonic() when queued
    deliver: _Deliver


class DynamicBatcher:
    """Runs concurrent requests to one model as batches on a worker thread (see module docstring).

    Thread-safe: :meth:`submit`, :meth:`predict` and :meth:`predict_async` may be called from
    any thread or event loop.
    """

    def __init__(self, model: LoadedModel, *, max_batch_size: int, max_queue_delay_us: int) -> None:
        """Start the worker thread for ``model``.

        Args:
            model: The model; held weakly, so the batcher never keeps an unloaded model alive.
            max_batch_size: Most rows in one run; at least 1.
            max_queue_delay_us: Microseconds the oldest queued request waits for others before
                its batch runs anyway; 0 batches only what is already queued.

        Raises:
            ConfigError: If the model is not batchable or a limit is out of range.
        """
        if not is_batchable(model):
            raise ConfigError(f"model {model.name!r}: cannot batch, not every input and output is dynamic on axis 0")
        if max_batch_size < 1 or max_queue_delay_us < 0:
            raise ConfigError("max_batch_size must be >= 1 and max_queue_delay_us >= 0")
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self._delay_s = max_queue_delay_us / 1e6
        self._model_ref = weakref.ref(model)
        self._label = f"model {model.name!r} version {model.version!r}"
        self._input_names = tuple(spec.name for spec in model.inputs)
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        # Makes "check closed, then put" atomic against close(), so nothing lands behind _STOP.
        self._lock = threading.Lock()
        self._closed = False
        self._warned_unsplittable = False
        self._thread = threading.Thread(target=self._work, name=f"batcher-{model.name}", daemon=True)
        self._thread.start()

    # -- callers -------------------------------------------------------------------------------

    def submit(self, inputs: Mapping[str, np.ndarray]) -> Future[Outputs]:
        """Queue one request.

        Args:
            inputs: As for :meth:`LoadedModel.predict`.

        Returns:
            A future that resolves to this request's outputs (its own rows only), or to the
            :class:`InferenceError` the model raised on it.

        Raises:
            InferenceError: At once, if the inputs do not fit the model's signature, the model
                was unloaded, or the batcher is closed.
        """
        future: Future[Outputs] = Future()

        def deliver(result: Outputs | None, error: BaseException | None) -> None:
            if error is None:
                future.set_result(result)  # type: ignore[arg-type]
            else:
                future.set_exception(error)

        self._enqueue(inputs, deliver)
        return future

    def predict(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        """Run one request through the batcher, blocking the calling thread until it is answered.

        Raises:
            InferenceError: As :meth:`LoadedModel.predict` would.
        """
        return self.submit(inputs).result()

    async def predict_async(self, inputs: Mapping[str, np.ndarray]) -> Outputs:
        """Run one request through the batcher without blocking the event loop.

        Raises:
            InferenceError: As :meth:`LoadedModel.predict` would.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()

        def deliver(result: Outputs | None, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, result, error)

        self._enqueue(inputs, deliver)
        return await future

    def close(self) -> None:
        """Stop taking requests; the worker answers those already queued, then exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the worker to exit after :meth:`close`; return whether it has."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _enqueue(self, inputs: Mapping[str, np.ndarray], deliver: _Deliver) -> None:
        model = self._model_ref()
        if model is None:
            raise InferenceError(f"{self._label}: model was unloaded")
        model.validate(inputs)
        rows, key = self._shape_key(inputs)
        pending = _Pending(inputs, rows, key, time.monotonic(), deliver)
        with self._lock:
            if self._closed:
                raise InferenceError(f"{self._label}: model is being unloaded")
            self._queue.put(pending)

    def _shape_key(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, tuple[tuple[int, ...], ...] | None]:
        # validate() has checked names, dtypes and ranks (>= 1, since axis 0 is dynamic).
        rows = inputs[self._input_names[0]].shape[0]
        if rows == 0 or rows > self.max_batch_size:
            return rows, None
        key = []
        for name in self._input_names:
            shape = inputs[name].shape
            if shape[0] != rows:
                return rows, None  # rows could not be told apart in the outputs
            key.append(shape[1:])
        return rows, tuple(key)

    # -- worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        carry: deque[_Pending] = deque()  # set aside by an earlier batch, oldest first
        stopping = False
        while True:
            if carry:
                first = carry.popleft()
            elif stopping:
                return
            else:
                item = self._queue.get()
                if not isinstance(item, _Pending):  # _STOP
                    stopping = True
                    continue
                first = item
            batch = [first]
            if first.key is not None and first.rows < self.max_batch_size:
                stopping = self._gather(batch, carry, stopping)
            self._run(batch)

    def _gather(self, batch: list[_Pending], carry: deque[_Pending], stopping: bool) -> bool:
        """Add requests that fit ``batch`` from ``carry``, then from the queue until the deadline.

        Returns:
            Whether :meth:`close` was seen (no more waiting on the queue after that).
        """
        first = batch[0]
        rows = first.rows
        limit = self.max_batch_size
        aside_old: list[_Pending] = []
        aside_new: list[_Pending] = []
        # Requests set aside earlier are older than anything queued: they go first.
        while carry and rows < limit:
            item = carry.popleft()
            if item.key == first.key and rows + item.rows <= limit:
                batch.append(item)
                rows += item.rows
            else:
                aside_old.append(item)
        deadline = first.enqueued_s + self._delay_s
        while rows < limit and not stopping:
            remaining = deadline - time.monotonic()
            try:
                got = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(got, _Pending):  # _STOP
                stopping = True
                break
            pending = got
            if pending.key == first.key and rows + pending.rows <= limit:
                batch.append(pending)
                rows += pending.rows
            else:
                aside_new.append(pending)
        carry.extendleft(reversed(aside_old))
        carry.extend(aside_new)
        return stopping

    def _run(self, batch: list[_Pending]) -> None:
        model = self._model_ref()
        if model is None:
            for pending in batch:
                _deliver(pending, None, InferenceError(f"{self._label}: model was unloaded"))
            return
        if len(batch) == 1:
            self._run_alone(model, batch[0])
            return
        try:
            joined = {name: np.concatenate([p.inputs[name] for p in batch]) for name in self._input_names}
            outputs = model.predict(joined)
        except Exception as exc:
            # One request may have made the whole batch fail (an out-of-range index, say):
            # rerun each alone so that only its caller sees the error.
            log.debug("%s: batch of %d failed (%s); running its requests one by one", self._label, len(batch), exc)
            for pending in batch:
                self._run_alone(model, pending)
            return
        total = sum(p.rows for p in batch)
        if any(out.ndim == 0 or out.shape[0] != total for out in outputs.values()):
            if not self._warned_unsplittable:
                self._warned_unsplittable = True
                log.warning("%s: outputs do not keep one row per input row; not batching it", self._label)
            for pending in batch:
                self._run_alone(model, pending)
            return
        start = 0
        for pending in batch:
            stop = start + pending.rows
            # Views of the batch's outputs: each caller's rows, which nobody else reads.
            _deliver(pending, {name: out[start:stop] for name, out in outputs.items()}, None)
            start = stop

    def _run_alone(self, model: LoadedModel, pending: _Pending) -> None:
        try:
            result = model.predict(pending.inputs)
        except Exception as exc:  # every caller must be answered, bugs included
            _deliver(pending, None, exc)
        else:
            _deliver(pending, result, None)


def _deliver(pending: _Pending, result: Outputs | None, error: BaseException | None) -> None:
    try:
        pending.deliver(result, error)
    except Exception:
        # The caller's loop closed or its future was already settled: nobody is waiting.
        log.debug("could not deliver an inference result", exc_info=True)


def _settle(future: asyncio.Future[Any], result: Outputs | None, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled (client went away)
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class BatcherPool:
    """The batchers of one inference API: one per loaded model batching applies to, made on first use."""

    def __init__(self, config: BatchingConfig) -> None:
        """Create an empty pool.

        Args:
            config: Which models to batch, and how.
        """
        self.config = config
        # None marks a model looked at and not batched, so the lookup is one dict probe.
        self._batchers: weakref.WeakKeyDictionary[LoadedModel, DynamicBatcher | None] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, model: LoadedModel) -> DynamicBatcher | None:
        """The batcher of ``model``, or None if its requests run inline."""
        try:
            return self._batchers[model]
        except KeyError:
            pass
        with self._lock:
            if model in self._batchers:
                return self._batchers[model]
            batcher: DynamicBatcher | None = None
            if self.config.applies_to(model.name):
                if is_batchable(model):
                    batcher = DynamicBatcher(
                        model,
                        max_batch_size=self.config.max_batch_size,
                        max_queue_delay_us=self.config.max_queue_delay_us,
                    )
                    # Ends the worker thread once a swapped-out model is gone.
                    weakref.finalize(model, batcher.close)
                else:
                    log.info("model %r is not batched: not every input and output is dynamic on axis 0", model.name)
            self._batchers[model] = batcher
            return batcher

    def close(self) -> None:
        """Close every batcher (their queued requests are still answered)."""
        with self._lock:
            batchers = [b for b in self._batchers.values() if b is not None]
        for batcher in batchers:
            batcher.close()
