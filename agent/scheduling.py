"""Shared timing for many agents in one process: one timer thread, coalesced steps on a pool.

- :class:`Timer` runs delayed and periodic calls (heartbeats, a reconciler's "step me again in
  N seconds") for every agent of the process from one thread and one heap. :meth:`Timer.run_due`
  is the whole logic and takes no thread: unit tests call it with a fake clock.
- :class:`SerialStepper` turns a reconciler's ``on_work`` pokes into ``step()`` calls on a shared
  pool: at most one step of an agent runs or waits at a time; pokes while one runs coalesce into
  one more step after it; a delay the step returns schedules the next poke on the timer.

Timer callbacks run on the timer thread: they must be quick (a heartbeat publish is).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class TimerHandle:
    """A scheduled call; :meth:`cancel` stops it (and, for a periodic one, its repeats)."""

    def __init__(self, fn: Callable[[], None], interval_s: float | None) -> None:
        self.fn = fn
        self.interval_s = interval_s
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run this call (again)."""
        self.cancelled = True


class Timer:
    """Delayed and periodic calls for a whole process, on one thread."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, name: str = "edgefleet-timer") -> None:
        """Create the timer; :meth:`start` starts its thread.

        Args:
            clock: Monotonic seconds.
            name: The thread's name.
        """
        self._clock = clock
        self._name = name
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn`` once, ``delay_s`` seconds from now."""
        return self._add(delay_s, TimerHandle(fn, None))

    def call_every(self, interval_s: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn`` every ``interval_s`` seconds, the first time one interval from now."""
        return self._add(interval_s, TimerHandle(fn, max(interval_s, 0.001)))

    def run_due(self) -> float | None:
        """Run every call that is due now; return seconds until the next one, or None if none.

        Periodic calls are re-armed from their due time, not from when they ran, so a busy
        moment does not make every later heartbeat late.
        """
        while True:
            with self._cond:
                if not self._heap:
                    return None
                due, _, handle = self._heap[0]
                now = self._clock()
                if due > now:
                    return due - now
                heapq.heappop(self._heap)
                if handle.cancelled:
                    continue
                if handle.interval_s is not None:
                    # The next beat on the grid after now: missed beats are skipped, not fired in a burst.
                    next_due = due + handle.interval_s * (math.floor((now - due) / handle.interval_s) + 1)
                    heapq.heappush(self._heap, (next_due, next(self._order), handle))
            try:
                handle.fn()
            except Exception:  # one agent's failure must not stop the others' timers
                log.exception("timer call failed")

    def start(self) -> None:
        """Start the timer thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; calls not yet run are dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _add(self, delay_s: float, handle: TimerHandle) -> TimerHandle:
        with self._cond:
            heapq.heappush(self._heap, (self._clock() + max(0.0, delay_s), next(self._order), handle))
            self._cond.notify()
        return handle

    def _run(self) -> None:
        while True:
            wait = self.run_due()
            with self._cond:
                if self._stopping:
                    return
                # Re-check under the lock: a call added meanwhile may be due sooner.
                if self._heap:
                    wait = max(0.0, self._heap[0][0] - self._clock())
                if wait is None or wait > 0:
                    self._cond.wait(wait)


Submit = Callable[[Callable[[], None]], object]
CallLater = Callable[[float, Callable[[], None]], object]


class SerialStepper:
    """Runs one agent's ``step()`` on a shared pool: one at a time, coalesced, re-scheduled."""

    def __init__(self, step: Callable[[], float | None], submit: Submit, call_later: CallLater) -> None:
        """Create the stepper.

        Args:
            step: Does the due work; returns seconds until it is due again, or None when idle.
            submit: Runs a callable on the pool (e.g. ``ThreadPoolExecutor.submit``).
            call_later: Runs a callable after a delay (e.g. :meth:`Timer.call_later`).
        """
        self._step = step
        self._submit = submit
        self._call_later = call_later
        self._lock = threading.Lock()
        self._queued = False  # a step is submitted and has not started
        self._running = False
        self._again = False  # poked while running: step once more after this one
        self._closed = False
        self._idle = threading.Condition(self._lock)

    def poke(self) -> None:
        """Work may be due: make sure a step runs soon (safe from any thread, cheap to repeat)."""
        with self._lock:
            if self._closed or self._queued:
                return
            if self._running:
                self._again = True
                return
            self._queued = True
        self._submit(self._run)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Run no more steps; wait up to ``timeout_s`` for a running one; True if none runs now."""
        with self._lock:
            self._closed = True
            return self._idle.wait_for(lambda: not self._running, timeout_s)

    def _run(self) -> None:
        with self._lock:
            self._queued = False
            if self._closed:
                return
            self._running = True
            self._again = False
        delay: float | None = None
        try:
            delay = self._step()
        except Exception:  # step() promises not to raise; a bug must still not wedge the agent
            log.exception("reconciler step failed")
        with self._lock:
            self._running = False
            again = self._again and not self._closed
            self._idle.notify_all()
        if again or delay == 0:
            self.poke()
        elif delay is not None:
            self._call_later(delay, self.poke)
