"""The deployment state machine of one model on one device.

Theory of operation: a deployment moves one model to the bundle a desired state names. Each
step is announced by an event; the legal (state, event) pairs are exactly the keys of
:data:`TRANSITIONS`, and anything else raises :class:`IllegalTransition`. The machine does no
I/O: the executor persists the new state *before* it performs the step that state names, so
that after a crash :data:`RECOVERY` says, from the stored state alone, what to do on boot, and the
RECOVER event moves the stored deployment there through the same table.

::

    PENDING ─start─▶ DOWNLOADING ─downloaded─▶ VERIFYING ─verified─▶ STAGING ─staged─▶ ACTIVATING
        │                 │                       │                     │                 │
        └──── fail / reject / supersede: nothing changed yet ───────────┴──▶ DONE (no change | rejected)
    ACTIVATING ─activated─▶ HEALTH_CHECKING ─healthy─▶ DONE (succeeded)
    ACTIVATING / HEALTH_CHECKING ─fail─▶ ROLLING_BACK ─rolled_back─▶ DONE (failed, rolled back)
                                                      └rollback_failed▶ DONE (failed, unable to roll back)
    boot: PENDING … STAGING ─recover─▶ PENDING (start over; PENDING is never persisted)
          ACTIVATING / HEALTH_CHECKING / ROLLING_BACK ─recover─▶ ROLLING_BACK

Until ACTIVATING begins the running model is untouched, so failures before it are "no change".
ACTIVATING loads the candidate beside the serving model and HEALTH_CHECKING checks it there; it
is swapped in only once the check passed, on the way to DONE. A failure in either state rolls
back all the same (the store, the slot, and a reload of the previous model prove the device can
still serve it). A death in either state is rolled back on boot and, unless it keeps happening,
deployed again (:func:`edgefleet.agent.deployment.planner.plan_recovery`).
A retryable failure before activation still ends the attempt in DONE (no change); the executor
then reports nothing, and the same desired state is tried again. DONE is terminal: a deployment
found DONE on boot has nothing left to do but, perhaps, its report.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from edgefleet.shared.errors import EdgefleetError
from edgefleet.shared.wire.messages import Outcome


class State(StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    ACTIVATING = "activating"
    HEALTH_CHECKING = "health_checking"
    ROLLING_BACK = "rolling_back"
    DONE = "done"


class Event(StrEnum):
    START = "start"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    STAGED = "staged"
    ACTIVATED = "activated"
    HEALTHY = "healthy"
    FAIL = "fail"
    REJECT = "reject"
    SUPERSEDE = "supersede"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    RECOVER = "recover"  # boot found the deployment in this stored state


class IllegalTransition(EdgefleetError):
    code = "illegal_transition"


_BEFORE_ACTIVATION = (State.PENDING, State.DOWNLOADING, State.VERIFYING, State.STAGING)
_UNPROVEN = (State.ACTIVATING, State.HEALTH_CHECKING, State.ROLLING_BACK)

# (state, event) -> (next state, outcome once DONE).
TRANSITIONS: dict[tuple[State, Event], tuple[State, Outcome | None]] = {
    (State.PENDING, Event.START): (State.DOWNLOADING, None),
    (State.DOWNLOADING, Event.DOWNLOADED): (State.VERIFYING, None),
    (State.VERIFYING, Event.VERIFIED): (State.STAGING, None),
    (State.STAGING, Event.STAGED): (State.ACTIVATING, None),
    (State.ACTIVATING, Event.ACTIVATED): (State.HEALTH_CHECKING, None),
    (State.HEALTH_CHECKING, Event.HEALTHY): (State.DONE, Outcome.SUCCEEDED),
    (State.ACTIVATING, Event.FAIL): (State.ROLLING_BACK, None),
    (State.HEALTH_CHECKING, Event.FAIL): (State.ROLLING_BACK, None),
    (State.ROLLING_BACK, Event.ROLLED_BACK): (State.DONE, Outcome.FAILED_ROLLED_BACK),
    (State.ROLLING_BACK, Event.ROLLBACK_FAILED): (State.DONE, Outcome.FAILED_UNABLE_TO_ROLL_BACK),
    **{(s, Event.FAIL): (State.DONE, Outcome.FAILED_NO_CHANGE) for s in _BEFORE_ACTIVATION},
    **{(s, Event.REJECT): (State.DONE, Outcome.REJECTED) for s in _BEFORE_ACTIVATION},
    **{(s, Event.SUPERSEDE): (State.DONE, Outcome.FAILED_NO_CHANGE) for s in _BEFORE_ACTIVATION},
    **{(s, Event.RECOVER): (State.PENDING, None) for s in _BEFORE_ACTIVATION},
    **{(s, Event.RECOVER): (State.ROLLING_BACK, None) for s in _UNPROVEN},
}


class Recovery(StrEnum):
    """What the agent does on boot for a deployment it finds in a stored state."""

    RESTART = "restart"  # nothing changed yet: start over (downloads resume from verified chunks)
    ROLL_BACK = "roll_back"  # the new slot may be live and unproven: return to the previous one
    NOTHING = "nothing"  # finished: only the report may be missing


# Keyed by the stored state; RESTART and ROLL_BACK are where the RECOVER event leads (PENDING,
# ROLLING_BACK), NOTHING is DONE, which has no RECOVER row.
RECOVERY: dict[State, Recovery] = {
    State.PENDING: Recovery.RESTART,
    State.DOWNLOADING: Recovery.RESTART,
    State.VERIFYING: Recovery.RESTART,
    State.STAGING: Recovery.RESTART,
    State.ACTIVATING: Recovery.ROLL_BACK,
    State.HEALTH_CHECKING: Recovery.ROLL_BACK,
    State.ROLLING_BACK: Recovery.ROLL_BACK,
    State.DONE: Recovery.NOTHING,
}


@dataclass(frozen=True, slots=True)
class Step:
    """The result of one transition."""

    state: State
    outcome: Outcome | None


def is_unproven(state: State) -> bool:
    """Whether a deployment in ``state`` may have a live model that has not passed its health check."""
    return state in _UNPROVEN


def advance(state: State, event: Event) -> Step:
    """Apply ``event`` in ``state``; raise :class:`IllegalTransition` for an illegal pair."""
    try:
        next_state, outcome = TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"event {event.value!r} is not allowed in state {state.value!r}") from None
    return Step(next_state, outcome)
