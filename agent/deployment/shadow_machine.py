"""The lifecycle of a shadow candidate beside one serving model.

Theory of operation: a shadow is deployed like a model (fetch, verify, stage) but never
activated: it is loaded beside the serving model, checked against it, and attached to the model
host, which mirrors sampled requests to it (:mod:`edgefleet.agent.serving.shadow`). Only the
states below are persisted (``ShadowModel.state``; ABSENT is "no entry"), and the legal
(state, event) pairs are exactly the keys of :data:`SHADOW_TRANSITIONS`; anything else raises
:class:`~edgefleet.agent.deployment.machine.IllegalTransition`. The machine does no I/O.

::

    ABSENT / FAILED ─staged─▶ LOADING ─started─▶ RUNNING ─retune─▶ RUNNING
    FAILED / RUNNING / LOADING ─load (already staged)─▶ LOADING
    ABSENT / FAILED / LOADING ─fail─▶ FAILED          (not retried under the same desired state)
    ABSENT / FAILED / LOADING ─retry─▶ unchanged      (retryable, superseded, or the serving model went away)
    LOADING ─recover─▶ FAILED                         (boot: the agent died while loading it)
    LOADING / RUNNING / FAILED ─remove─▶ ABSENT

LOADING is persisted *before* each load, so a candidate that crashes the agent while loading is
found LOADING on the next boot and marked FAILED instead of being loaded (and crashing) again.
The download before STAGED is not persisted: a crash there simply starts it over.
"""

from __future__ import annotations

from enum import StrEnum

from edgefleet.agent.deployment.machine import IllegalTransition


class ShadowState(StrEnum):
    ABSENT = "absent"  # no entry in the agent state
    LOADING = "loading"
    RUNNING = "running"
    FAILED = "failed"


class ShadowEvent(StrEnum):
    STAGED = "staged"  # fetched, verified and unpacked: about to be loaded
    LOAD = "load"  # its slot is already staged: load it from there
    STARTED = "started"  # loaded, checked and attached beside the serving model
    FAIL = "fail"
    RETRY = "retry"
    RETUNE = "retune"  # a new sample rate
    RECOVER = "recover"
    REMOVE = "remove"


# Where a fetch or a load can fail: nothing runs yet (or any more), and a failure leaves serving untouched.
_BEFORE_RUNNING = (ShadowState.ABSENT, ShadowState.FAILED, ShadowState.LOADING)

SHADOW_TRANSITIONS: dict[tuple[ShadowState, ShadowEvent], ShadowState] = {
    (ShadowState.ABSENT, ShadowEvent.STAGED): ShadowState.LOADING,
    (ShadowState.FAILED, ShadowEvent.STAGED): ShadowState.LOADING,
    (ShadowState.FAILED, ShadowEvent.LOAD): ShadowState.LOADING,
    (ShadowState.RUNNING, ShadowEvent.LOAD): ShadowState.LOADING,
    (ShadowState.LOADING, ShadowEvent.LOAD): ShadowState.LOADING,
    (ShadowState.LOADING, ShadowEvent.STARTED): ShadowState.RUNNING,
    (ShadowState.RUNNING, ShadowEvent.RETUNE): ShadowState.RUNNING,
    (ShadowState.LOADING, ShadowEvent.RECOVER): ShadowState.FAILED,
    **{(s, ShadowEvent.FAIL): ShadowState.FAILED for s in _BEFORE_RUNNING},
    **{(s, ShadowEvent.RETRY): s for s in _BEFORE_RUNNING},
    **{
        (s, ShadowEvent.REMOVE): ShadowState.ABSENT
        for s in (ShadowState.LOADING, ShadowState.RUNNING, ShadowState.FAILED)
    },
}


def advance_shadow(state: ShadowState, event: ShadowEvent) -> ShadowState:
    """Apply ``event`` in ``state``; raise :class:`IllegalTransition` for an illegal pair."""
    try:
        return SHADOW_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"shadow event {event.value!r} is not allowed in state {state.value!r}") from None
