"""The shadow lifecycle table, exhaustively: every (state, event) pair is legal as documented or raises."""

from __future__ import annotations

import itertools

import pytest

from edgefleet.agent.deployment.machine import IllegalTransition
from edgefleet.agent.deployment.shadow_machine import SHADOW_TRANSITIONS, ShadowEvent, ShadowState, advance_shadow
from edgefleet.shared.errors import EdgefleetError

A, L, R, F = ShadowState.ABSENT, ShadowState.LOADING, ShadowState.RUNNING, ShadowState.FAILED

# The documented lifecycle, written out independently of the table it checks.
EXPECTED: dict[tuple[ShadowState, ShadowEvent], ShadowState] = {
    (A, ShadowEvent.STAGED): L,
    (F, ShadowEvent.STAGED): L,
    (F, ShadowEvent.LOAD): L,
    (R, ShadowEvent.LOAD): L,
    (L, ShadowEvent.LOAD): L,
    (L, ShadowEvent.STARTED): R,
    (R, ShadowEvent.RETUNE): R,
    (L, ShadowEvent.RECOVER): F,
    (A, ShadowEvent.FAIL): F,
    (F, ShadowEvent.FAIL): F,
    (L, ShadowEvent.FAIL): F,
    (A, ShadowEvent.RETRY): A,
    (F, ShadowEvent.RETRY): F,
    (L, ShadowEvent.RETRY): L,
    (L, ShadowEvent.REMOVE): A,
    (R, ShadowEvent.REMOVE): A,
    (F, ShadowEvent.REMOVE): A,
}
ALL_PAIRS = list(itertools.product(ShadowState, ShadowEvent))


def test_the_table_is_the_documented_lifecycle() -> None:
    assert SHADOW_TRANSITIONS == EXPECTED


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED), ids=lambda v: v.value)
def test_legal_transition_reaches_the_documented_state(state: ShadowState, event: ShadowEvent) -> None:
    assert advance_shadow(state, event) is EXPECTED[(state, event)]


@pytest.mark.parametrize(("state", "event"), [p for p in ALL_PAIRS if p not in EXPECTED], ids=lambda v: v.value)
def test_illegal_transition_raises(state: ShadowState, event: ShadowEvent) -> None:
    with pytest.raises(IllegalTransition, match=f"shadow event '{event.value}' is not allowed in state") as info:
        advance_shadow(state, event)
    assert isinstance(info.value, EdgefleetError)


def test_every_load_is_preceded_by_a_persisted_loading_state() -> None:
    # Only LOADING leads to RUNNING, and every way into a load lands in LOADING first.
    assert {s for (s, e), n in SHADOW_TRANSITIONS.items() if n is R and s is not R} == {L}
    assert {n for (_, e), n in SHADOW_TRANSITIONS.items() if e in (ShadowEvent.STAGED, ShadowEvent.LOAD)} == {L}


def test_a_shadow_found_loading_on_boot_is_failed_not_loaded_again() -> None:
    assert advance_shadow(L, ShadowEvent.RECOVER) is F
    assert [s for (s, e) in SHADOW_TRANSITIONS if e is ShadowEvent.RECOVER] == [L]


@pytest.mark.parametrize("state", [L, R, F])
def test_every_stored_shadow_can_be_removed(state: ShadowState) -> None:
    assert advance_shadow(state, ShadowEvent.REMOVE) is A


def test_a_retry_records_nothing() -> None:
    assert all(n is s for (s, e), n in SHADOW_TRANSITIONS.items() if e is ShadowEvent.RETRY)


def test_persisted_values_are_the_old_strings() -> None:
    assert [s.value for s in (L, R, F)] == ["loading", "running", "failed"]
