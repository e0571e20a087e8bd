"""The deployment state machine: the table, exhaustively.

Every (state, event) pair is either in TRANSITIONS and leads where the module docstring says, or
raises IllegalTransition. Every state has a recovery step, every live state can finish, and a
failure is "no change" exactly when it happens before the running model was touched.
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from edgefleet.agent.deployment.machine import (
    RECOVERY,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Recovery,
    State,
    Step,
    advance,
)
from edgefleet.shared.errors import EdgefleetError
from edgefleet.shared.wire.messages import Outcome

BEFORE_ACTIVATION = (State.PENDING, State.DOWNLOADING, State.VERIFYING, State.STAGING)
AFTER_ACTIVATION = (State.ACTIVATING, State.HEALTH_CHECKING)

# The documented machine, written out independently of the table it checks.
EXPECTED: dict[tuple[State, Event], Step] = {
    (State.PENDING, Event.START): Step(State.DOWNLOADING, None),
    (State.DOWNLOADING, Event.DOWNLOADED): Step(State.VERIFYING, None),
    (State.VERIFYING, Event.VERIFIED): Step(State.STAGING, None),
    (State.STAGING, Event.STAGED): Step(State.ACTIVATING, None),
    (State.ACTIVATING, Event.ACTIVATED): Step(State.HEALTH_CHECKING, None),
    (State.HEALTH_CHECKING, Event.HEALTHY): Step(State.DONE, Outcome.SUCCEEDED),
    (State.ACTIVATING, Event.FAIL): Step(State.ROLLING_BACK, None),
    (State.HEALTH_CHECKING, Event.FAIL): Step(State.ROLLING_BACK, None),
    (State.ROLLING_BACK, Event.ROLLED_BACK): Step(State.DONE, Outcome.FAILED_ROLLED_BACK),
    (State.ROLLING_BACK, Event.ROLLBACK_FAILED): Step(State.DONE, Outcome.FAILED_UNABLE_TO_ROLL_BACK),
    **{(s, Event.FAIL): Step(State.DONE, Outcome.FAILED_NO_CHANGE) for s in BEFORE_ACTIVATION},
    **{(s, Event.REJECT): Step(State.DONE, Outcome.REJECTED) for s in BEFORE_ACTIVATION},
    **{(s, Event.SUPERSEDE): Step(State.DONE, Outcome.FAILED_NO_CHANGE) for s in BEFORE_ACTIVATION},
    # boot recovery: start over (PENDING is never persisted), or roll back what may be live
    **{(s, Event.RECOVER): Step(State.PENDING, None) for s in BEFORE_ACTIVATION},
    **{(s, Event.RECOVER): Step(State.ROLLING_BACK, None) for s in (*AFTER_ACTIVATION, State.ROLLING_BACK)},
}
ALL_PAIRS = list(itertools.product(State, Event))


def test_the_table_is_the_documented_machine() -> None:
    assert set(TRANSITIONS) == set(EXPECTED)


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED), ids=lambda v: v.value)
def test_legal_transition_reaches_the_documented_state(state: State, event: Event) -> None:
    step = advance(state, event)
    assert step == EXPECTED[(state, event)]
    # an outcome exactly when the deployment is over
    assert (step.outcome is not None) == (step.state is State.DONE)


@pytest.mark.parametrize(
    ("state", "event"), [p for p in ALL_PAIRS if p not in EXPECTED], ids=lambda v: v.value
)
def test_illegal_transition_raises(state: State, event: Event) -> None:
    message = f"event '{event.value}' is not allowed in state '{state.value}'"
    with pytest.raises(IllegalTransition, match=message) as info:
        advance(state, event)
    assert isinstance(info.value, EdgefleetError)
    assert info.value.code == "illegal_transition"


def test_done_is_terminal() -> None:
    assert not [e for (s, e) in TRANSITIONS if s is State.DONE]


def test_every_state_has_a_recovery_step() -> None:
    assert set(RECOVERY) == set(State)
    assert all(isinstance(r, Recovery) for r in RECOVERY.values())


@pytest.mark.parametrize("state", list(State))
def test_recovery_rolls_back_exactly_when_the_running_model_may_have_changed(state: State) -> None:
    if state in BEFORE_ACTIVATION:
        assert RECOVERY[state] is Recovery.RESTART
    elif state is State.DONE:
        assert RECOVERY[state] is Recovery.NOTHING
    else:
        assert RECOVERY[state] is Recovery.ROLL_BACK


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_the_recover_event_leads_where_the_recovery_table_says(state: State) -> None:
    recovery = RECOVERY[state]
    if recovery is Recovery.NOTHING:
        with pytest.raises(IllegalTransition):
            advance(state, Event.RECOVER)
        return
    expected = {Recovery.RESTART: State.PENDING, Recovery.ROLL_BACK: State.ROLLING_BACK}[recovery]
    assert advance(state, Event.RECOVER) == Step(expected, None)


def test_a_recovered_rollback_ends_through_the_rollback_rows() -> None:
    for interrupted in (*AFTER_ACTIVATION, State.ROLLING_BACK):
        rolling = advance(interrupted, Event.RECOVER).state
        assert advance(rolling, Event.ROLLED_BACK) == Step(State.DONE, Outcome.FAILED_ROLLED_BACK)
        assert advance(rolling, Event.ROLLBACK_FAILED) == Step(State.DONE, Outcome.FAILED_UNABLE_TO_ROLL_BACK)


def _reachable(start: State) -> set[State]:
    seen = {start}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for (s, _), (nxt, _) in TRANSITIONS.items():
            if s is here and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


@pytest.mark.parametrize("state", [s for s in State if s is not State.DONE])
def test_every_live_state_can_finish(state: State) -> None:
    assert State.DONE in _reachable(state)


def test_every_state_is_reachable_from_pending() -> None:
    assert _reachable(State.PENDING) == set(State)


def test_the_happy_path_succeeds() -> None:
    state = State.PENDING
    for event in (Event.START, Event.DOWNLOADED, Event.VERIFIED, Event.STAGED, Event.ACTIVATED, Event.HEALTHY):
        step = advance(state, event)
        state = step.state
    assert step == Step(State.DONE, Outcome.SUCCEEDED)


@pytest.mark.parametrize("state", BEFORE_ACTIVATION)
@pytest.mark.parametrize("event", [Event.FAIL, Event.REJECT, Event.SUPERSEDE])
def test_failure_before_activation_changes_nothing(state: State, event: Event) -> None:
    step = advance(state, event)
    assert step.state is State.DONE
    assert step.outcome in (Outcome.FAILED_NO_CHANGE, Outcome.REJECTED)
    assert step.outcome is (Outcome.REJECTED if event is Event.REJECT else Outcome.FAILED_NO_CHANGE)


@pytest.mark.parametrize("state", AFTER_ACTIVATION)
def test_failure_after_activation_goes_through_rolling_back(state: State) -> None:
    assert advance(state, Event.FAIL) == Step(State.ROLLING_BACK, None)
    assert {advance(State.ROLLING_BACK, e).outcome for e in (Event.ROLLED_BACK, Event.ROLLBACK_FAILED)} == {
        Outcome.FAILED_ROLLED_BACK,
        Outcome.FAILED_UNABLE_TO_ROLL_BACK,
    }


@pytest.mark.parametrize("state", (*AFTER_ACTIVATION, State.ROLLING_BACK))
@pytest.mark.parametrize("event", [Event.REJECT, Event.SUPERSEDE])
def test_no_shortcut_to_done_once_activation_began(state: State, event: Event) -> None:
    # A newer directive cannot abandon a half-activated model: it must be rolled back first.
    with pytest.raises(IllegalTransition):
        advance(state, event)


def test_outcomes_once_activation_began_never_claim_no_change() -> None:
    after = {o for (s, _), (_, o) in TRANSITIONS.items() if s in (*AFTER_ACTIVATION, State.ROLLING_BACK) and o}
    assert after == {Outcome.SUCCEEDED, Outcome.FAILED_ROLLED_BACK, Outcome.FAILED_UNABLE_TO_ROLL_BACK}
