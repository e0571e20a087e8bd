"""Pure timing logic: reconnect backoff, the shared timer, coalesced reconciler steps (no threads run)."""

from __future__ import annotations

from collections.abc import Callable

from support.clock import FakeClock

from edgefleet.agent.scheduling import SerialStepper, Timer
from edgefleet.shared.link.backoff import Backoff


def test_backoff_doubles_up_to_its_ceiling_and_resets() -> None:
    backoff = Backoff(0.5, 4.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_a_zero_minimum_backoff_still_grows_from_zero_without_sticking() -> None:
    backoff = Backoff(0.0, 2.0)
    assert backoff.next_delay() == 0.0
    assert backoff.next_delay() == 0.0  # doubling zero: a broker refusing at once is retried at once


def test_timer_runs_calls_when_due_in_order() -> None:
    clock = FakeClock()
    timer = Timer(clock=clock)
    ran: list[str] = []
    timer.call_later(2.0, lambda: ran.append("b"))
    timer.call_later(1.0, lambda: ran.append("a"))

    assert timer.run_due() == 1.0
    assert ran == []
    clock.now += 1.0
    assert timer.run_due() == 1.0
    assert ran == ["a"]
    clock.now += 5.0
    assert timer.run_due() is None
    assert ran == ["a", "b"]


def test_a_periodic_call_keeps_its_rhythm_and_skips_missed_beats() -> None:
    clock = FakeClock()
    timer = Timer(clock=clock)
    beats: list[float] = []
    timer.call_every(10.0, lambda: beats.append(clock.now))

    clock.now += 10.0
    timer.run_due()
    clock.now += 35.0  # three beats missed (a busy moment): one runs, not a burst of three
    timer.run_due()
    assert beats == [1010.0, 1045.0]
    assert timer.run_due() == 5.0  # on the grid: the next beat is at 1050


def test_a_cancelled_call_does_not_run() -> None:
    clock = FakeClock()
    timer = Timer(clock=clock)
    ran: list[int] = []
    handle = timer.call_every(1.0, lambda: ran.append(1))
    clock.now += 1.0
    timer.run_due()
    handle.cancel()
    clock.now += 5.0
    timer.run_due()
    assert ran == [1]


def test_a_failing_timer_call_does_not_stop_the_others() -> None:
    clock = FakeClock()
    timer = Timer(clock=clock)
    ran: list[str] = []

    def boom() -> None:
        raise RuntimeError("bug")

    timer.call_later(0, boom)
    timer.call_later(0, lambda: ran.append("next"))
    timer.run_due()
    assert ran == ["next"]


class FakePool:
    """Holds submitted callables until the test runs them."""

    def __init__(self) -> None:
        self.queued: list[Callable[[], None]] = []
        self.later: list[tuple[float, Callable[[], None]]] = []

    def submit(self, fn: Callable[[], None]) -> None:
        self.queued.append(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.later.append((delay, fn))

    def run_one(self) -> None:
        self.queued.pop(0)()


def test_pokes_before_a_step_starts_coalesce_into_one_step() -> None:
    pool = FakePool()
    steps: list[int] = []
    stepper = SerialStepper(lambda: steps.append(1) or None, pool.submit, pool.call_later)

    for _ in range(5):
        stepper.poke()
    assert len(pool.queued) == 1
    pool.run_one()
    assert steps == [1]
    assert pool.queued == [] and pool.later == []


def test_a_poke_during_a_step_runs_exactly_one_more_step_after_it() -> None:
    pool = FakePool()
    steps: list[int] = []

    def step() -> float | None:
        steps.append(1)
        if len(steps) == 1:
            stepper.poke()  # work arrives while this step runs (from another thread in real life)
            stepper.poke()
            assert pool.queued == [], "never two steps of one agent at once"
        return None

    stepper = SerialStepper(step, pool.submit, pool.call_later)
    stepper.poke()
    pool.run_one()
    assert len(pool.queued) == 1
    pool.run_one()
    assert steps == [1, 1]
    assert pool.queued == []


def test_a_returned_delay_schedules_the_next_step_and_zero_runs_it_at_once() -> None:
    pool = FakePool()
    delays = iter([30.0, 0.0, None])
    stepper = SerialStepper(lambda: next(delays), pool.submit, pool.call_later)

    stepper.poke()
    pool.run_one()
    assert [d for d, _ in pool.later] == [30.0] and pool.queued == []
    _, fire = pool.later.pop()
    fire()
    pool.run_one()  # returns 0.0: due again now
    assert len(pool.queued) == 1 and pool.later == []
    pool.run_one()
    assert pool.queued == [] and pool.later == []


def test_a_closed_stepper_runs_nothing_more() -> None:
    pool = FakePool()
    steps: list[int] = []
    stepper = SerialStepper(lambda: steps.append(1) or None, pool.submit, pool.call_later)
    stepper.poke()
    assert stepper.close(timeout_s=0) is True
    pool.run_one()
    stepper.poke()
    assert steps == [] and pool.queued == []


def test_a_step_that_raises_leaves_the_agent_steppable() -> None:
    pool = FakePool()
    calls: list[int] = []

    def step() -> float | None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return None

    stepper = SerialStepper(step, pool.submit, pool.call_later)
    stepper.poke()
    pool.run_one()
    stepper.poke()
    pool.run_one()
    assert calls == [1, 1]
