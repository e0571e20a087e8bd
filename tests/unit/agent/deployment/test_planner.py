"""The planner, pure: desired state + stored state + facts in, actions out. No threads, files or clocks."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest

from edgefleet.agent.deployment.machine import RECOVERY, Recovery, State
from edgefleet.agent.deployment.planner import (
    CLOSING,
    Action,
    CollectDownloads,
    Deploy,
    DeployShadow,
    Facts,
    ForgetFinished,
    Key,
    LoadShadow,
    MarkApplied,
    PassAction,
    PublishReport,
    RecoverShadows,
    Remove,
    ReportFinished,
    RestartInterrupted,
    RetuneShadow,
    RollBackInterrupted,
    ShadowRun,
    StopShadow,
    carried_failures,
    desired_digests,
    plan,
    plan_recovery,
)
from edgefleet.agent.deployment.shadow_machine import ShadowState
from edgefleet.agent.deployment.state_store import ActiveModel, AgentState, InProgress, Interruption, ShadowModel
from edgefleet.shared.wire.messages import DesiredState, ModelDirective, ShadowDirective

NOW = 1_700_000_000.0
SEQ = 7


def digest(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def directive(name: str, n: int, *, shadow: int | None = None, rate: float = 0.5, retry: int = 0) -> ModelDirective:
    return ModelDirective(
        name=name,
        version=f"{n}.0.0",
        bundle_digest=digest(n),
        bundle_size=100 + n,
        runtime="onnx",
        retry=retry,
        shadow=None
        if shadow is None
        else ShadowDirective(
            version=f"{shadow}.0.0", bundle_digest=digest(shadow), bundle_size=100 + shadow, runtime="onnx",
            sample_rate=rate,
        ),
    )


def desired(*models: ModelDirective, sequence: int = SEQ) -> DesiredState:
    return DesiredState(device_id="d", sequence=sequence, issued_at=NOW, expires_at=NOW + 3600, models=models)


def active(name: str, n: int) -> ActiveModel:
    return ActiveModel(
        name=name, version=f"{n}.0.0", bundle_digest=digest(n), runtime="onnx", slot=f"{n}.0.0-x", model_file="m.onnx"
    )


def shadow_entry(name: str, n: int, state: ShadowState, *, slot: str = "s", failed_sequence: int = 0,
                 rate: float = 0.5) -> ShadowModel:
    return ShadowModel(
        name=name, version=f"{n}.0.0", bundle_digest=digest(n), runtime="onnx", sample_rate=rate,
        serving_version="1.0.0", state=state, slot=slot, model_file="m.onnx" if slot else "",
        failed_sequence=failed_sequence,
    )


def facts(**kw: object) -> Facts:
    return Facts(**{"now": NOW, "shadows_recovered": True, **kw})  # type: ignore[arg-type]


def closing(d: DesiredState) -> tuple[PassAction, ...]:
    return (MarkApplied(sequence=d.sequence), CollectDownloads(keep=desired_digests(d)), PublishReport())


# -- models ---------------------------------------------------------------------------------------


def test_nothing_to_do_closes_the_pass() -> None:
    d = desired(directive("a", 1))
    state = AgentState(accepted_sequence=SEQ, active={"a": active("a", 1)})
    assert plan(d, state, facts(serving=frozenset({"a"}))) == closing(d)


def test_no_desired_models_and_nothing_active_still_closes() -> None:
    d = desired()
    assert plan(d, AgentState(), facts()) == closing(d)


def test_a_new_model_is_deployed_with_nothing_to_roll_back_to() -> None:
    d = desired(directive("a", 1))
    assert plan(d, AgentState(), facts()) == (
        Deploy(directive=directive("a", 1), sequence=SEQ, started_at=NOW, previous=None),
        *closing(d),
    )


def test_a_changed_digest_is_deployed_over_the_active_model() -> None:
    d = desired(directive("a", 2))
    state = AgentState(active={"a": active("a", 1)})
    actions = plan(d, state, facts(serving=frozenset({"a"})))
    assert actions[0] == Deploy(directive=directive("a", 2), sequence=SEQ, started_at=NOW, previous=active("a", 1))
    assert actions[1:] == closing(d)


def test_a_digest_that_failed_under_this_desired_state_is_not_tried_again() -> None:
    d = desired(directive("a", 2))
    state = AgentState(active={"a": active("a", 1)}, failed={"a": digest(2)})
    assert plan(d, state, facts()) == closing(d)


def test_a_failure_of_another_digest_does_not_block_the_desired_one() -> None:
    d = desired(directive("a", 3))
    state = AgentState(active={"a": active("a", 1)}, failed={"a": digest(2)})
    assert isinstance(plan(d, state, facts())[0], Deploy)


def test_a_model_no_longer_desired_is_removed_after_the_deployments() -> None:
    d = desired(directive("b", 5))
    state = AgentState(active={"a": active("a", 1), "c": active("c", 3)})
    actions = plan(d, state, facts())
    assert [type(a) for a in actions[:3]] == [Deploy, Remove, Remove]
    assert actions[1:3] == (Remove(name="a"), Remove(name="c"))


def test_deployments_follow_the_desired_order() -> None:
    d = desired(directive("z", 1), directive("a", 2))
    names = [a.directive.name for a in plan(d, AgentState(), facts()) if isinstance(a, Deploy)]
    assert names == ["z", "a"]


def test_what_this_pass_already_tried_is_not_planned_again() -> None:
    d = desired(directive("a", 2), directive("b", 3))
    first = plan(d, AgentState(), facts())[0]
    assert isinstance(first, Deploy)
    actions = plan(d, AgentState(), facts(attempted=frozenset({first.key})))
    assert [a.directive.name for a in actions if isinstance(a, Deploy)] == ["b"]


def test_a_retry_due_leaves_the_sequence_unapplied_and_downloads_kept() -> None:
    d = desired(directive("a", 1))
    assert plan(d, AgentState(active={"a": active("a", 1)}), facts(retry_due=True)) == (PublishReport(),)


def test_a_superseded_pass_plans_nothing() -> None:
    assert plan(desired(directive("a", 1)), AgentState(), facts(superseded=True)) == ()


def test_downloads_kept_are_every_desired_bundle_shadows_included() -> None:
    d = desired(directive("a", 1, shadow=2), directive("b", 3))
    assert desired_digests(d) == {digest(n).removeprefix("sha256:") for n in (1, 2, 3)}


def test_the_start_time_is_the_time_passed_in() -> None:
    action = plan(desired(directive("a", 1)), AgentState(), dataclasses.replace(facts(), now=42.0))[0]
    assert isinstance(action, Deploy) and action.started_at == 42.0


# -- shadows --------------------------------------------------------------------------------------


def test_a_shadow_is_deployed_beside_a_serving_model() -> None:
    d = desired(directive("a", 1, shadow=2))
    state = AgentState(active={"a": active("a", 1)})
    actions = plan(d, state, facts(serving=frozenset({"a"})))
    assert actions == (DeployShadow(directive=directive("a", 1, shadow=2), sequence=SEQ), *closing(d))


def test_a_shadow_waits_for_something_serving_to_compare_with() -> None:
    d = desired(directive("a", 1, shadow=2))
    actions = plan(d, AgentState(), facts())
    assert not [a for a in actions if isinstance(a, DeployShadow | LoadShadow)]


@pytest.mark.parametrize("same", ["digest", "version"])
def test_a_shadow_of_the_serving_version_is_a_promotion_and_not_run(same: str) -> None:
    base = directive("a", 1, shadow=2)
    assert base.shadow is not None
    shadow = msgspec.structs.replace(base.shadow, **({"bundle_digest": digest(1)} if same == "digest" else
                                                  {"version": "1.0.0"}))
    d = desired(msgspec.structs.replace(base, shadow=shadow))
    state = AgentState(active={"a": active("a", 1)}, shadows={"a": shadow_entry("a", 2, ShadowState.RUNNING)})
    actions = plan(d, state, facts(serving=frozenset({"a"})))
    assert actions == (StopShadow(name="a"), *closing(d))


def test_a_shadow_no_longer_desired_is_stopped() -> None:
    d = desired(directive("a", 1))
    state = AgentState(active={"a": active("a", 1)}, shadows={"a": shadow_entry("a", 2, ShadowState.RUNNING)})
    assert plan(d, state, facts(serving=frozenset({"a"}))) == (StopShadow(name="a"), *closing(d))


def test_a_shadow_with_another_bundle_is_stopped_then_the_new_one_deployed() -> None:
    d = desired(directive("a", 1, shadow=3))
    state = AgentState(active={"a": active("a", 1)}, shadows={"a": shadow_entry("a", 2, ShadowState.RUNNING)})
    actions = plan(d, state, facts(serving=frozenset({"a"})))
    assert actions[:2] == (StopShadow(name="a"), DeployShadow(directive=directive("a", 1, shadow=3), sequence=SEQ))


def test_a_running_shadow_with_its_runner_attached_needs_nothing() -> None:
    d = desired(directive("a", 1, shadow=2))
    state = AgentState(active={"a": active("a", 1)}, shadows={"a": shadow_entry("a", 2, ShadowState.RUNNING)})
    runs = {"a": ShadowRun(bundle_digest=digest(2), sample_rate=0.5)}
    assert plan(d, state, facts(serving=frozenset({"a"}), shadow_runs=runs)) == closing(d)


def test_a_new_sample_rate_retunes_the_running_shadow() -> None:
    d = desired(directive("a", 1, shadow=2, rate=0.25))
    state = AgentState(active={"a": active("a", 1)}, shadows={"a": shadow_entry("a", 2, ShadowState.RUNNING)})
    runs = {"a": ShadowRun(bundle_digest=digest(2), sample_rate=0.5)}
    actions = plan(d, state, facts(serving=frozenset({"a"}), shadow_runs=runs))
    assert actions[0] == RetuneShadow(name="a", bundle_digest=digest(2), sample_rate=0.25)


def test_a_stored_running_shadow_without_its_runner_is_loaded_from_its_slot() -> None:
    # After boot: stored RUNNING, nothing attached yet. No download.
    d = desired(directive("a", 1, shadow=2, rate=0.25))
    stored = shadow_entry("a", 2, ShadowState.RUNNING)
    state = AgentState(active={"a": active("a", 1)}, shadows={"a": stored})
    action = plan(d, state, facts(serving=frozenset({"a"})))[0]
    expected = dataclasses.replace(stored, sample_rate=0.25, serving_version="1.0.0")
    assert action == LoadShadow(entry=expected, sequence=SEQ)


def test_a_shadow_failed_under_this_desired_state_is_left_failed() -> None:
    d = desired(directive("a", 1, shadow=2))
    stored = shadow_entry("a", 2, ShadowState.FAILED, failed_sequence=SEQ)
    state = AgentState(active={"a": active("a", 1)}, shadows={"a": stored})
    assert plan(d, state, facts(serving=frozenset({"a"}))) == closing(d)


@pytest.mark.parametrize(("slot", "kind"), [("s", LoadShadow), ("", DeployShadow)])
def test_a_shadow_failed_under_an_older_desired_state_is_tried_again(slot: str, kind: type) -> None:
    d = desired(directive("a", 1, shadow=2))
    stored = shadow_entry("a", 2, ShadowState.FAILED, failed_sequence=SEQ - 1, slot=slot)
    state = AgentState(active={"a": active("a", 1)}, shadows={"a": stored})
    assert isinstance(plan(d, state, facts(serving=frozenset({"a"})))[0], kind)


def test_shadows_are_recovered_once_after_the_deployments_and_before_other_shadow_actions() -> None:
    d = desired(directive("a", 2, shadow=3))
    stored = {"a": shadow_entry("a", 3, ShadowState.LOADING), "b": shadow_entry("b", 4, ShadowState.RUNNING)}
    state = AgentState(accepted_sequence=SEQ, active={"a": active("a", 1)}, shadows=stored)
    actions = plan(d, state, Facts(now=NOW, serving=frozenset({"a"})))
    assert [type(a) for a in actions[:4]] == [Deploy, RecoverShadows, StopShadow, LoadShadow]
    assert actions[1] == RecoverShadows(names=("a",), sequence=SEQ)
    assert not [a for a in plan(d, state, facts(serving=frozenset({"a"}))) if isinstance(a, RecoverShadows)]


# -- a pass ends --------------------------------------------------------------------------------------


@pytest.mark.parametrize("recovered", [False, True])
def test_a_pass_ends_even_when_no_action_changes_anything(recovered: bool) -> None:
    """Every action fails retryably and changes nothing: the pass still ends, each action tried once."""
    d = desired(directive("a", 2, shadow=3), directive("b", 4), directive("c", 5, shadow=6))
    state = AgentState(
        active={"a": active("a", 1), "z": active("z", 9), "c": active("c", 5)},
        shadows={"c": shadow_entry("c", 6, ShadowState.RUNNING), "y": shadow_entry("y", 8, ShadowState.FAILED)},
    )
    attempted: set[Key] = set()
    performed: list[Action] = []
    for _ in range(100):
        actions = plan(d, state, facts(serving=frozenset({"a", "c"}), attempted=frozenset(attempted),
                                       retry_due=True, shadows_recovered=recovered))
        head = actions[0]
        if isinstance(head, CLOSING):
            break
        performed.append(head)
        attempted.add(head.key)
    else:
        pytest.fail("the pass never ended")
    assert len(performed) == len({a.key for a in performed if not isinstance(a, CLOSING)})
    assert {type(a) for a in performed} >= {Deploy, Remove, StopShadow, DeployShadow, LoadShadow}


# -- boot recovery ------------------------------------------------------------------------------------


def progress(state: State, n: int = 2) -> InProgress:
    return InProgress(
        sequence=SEQ, name="a", version=f"{n}.0.0", bundle_digest=digest(n), bundle_size=1, runtime="onnx",
        state=state, started_at=NOW, previous=active("a", 1),
    )


def test_nothing_in_progress_needs_no_recovery() -> None:
    assert plan_recovery(AgentState()) == ()


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_every_stored_state_recovers_per_the_table(state: State) -> None:
    p = progress(state)
    succeeded = AgentState(in_progress=p, active={"a": active("a", 2)})
    not_active = AgentState(in_progress=p, active={"a": active("a", 1)})
    # Died mid-activation: counted and retried; died rolling back a failure: that failure stands.
    roll_back = RollBackInterrupted(progress=p, interruptions=0 if state is State.ROLLING_BACK else 1,
                                    retry=state is not State.ROLLING_BACK)
    expected: dict[Recovery, tuple[Action, Action]] = {
        Recovery.ROLL_BACK: (roll_back, roll_back),
        Recovery.RESTART: (RestartInterrupted(progress=p), RestartInterrupted(progress=p)),
        Recovery.NOTHING: (ReportFinished(progress=p), ForgetFinished(progress=p)),
    }
    assert (plan_recovery(succeeded), plan_recovery(not_active)) == tuple((a,) for a in expected[RECOVERY[state]])


@pytest.mark.parametrize("state", [State.ACTIVATING, State.HEALTH_CHECKING])
def test_deaths_mid_activation_are_retried_up_to_the_bound_then_end_it(state: State) -> None:
    p = progress(state)
    for before, retry in [(0, True), (1, True), (2, False)]:
        interrupted = {"a": Interruption(bundle_digest=digest(2), count=before)} if before else {}
        stored = AgentState(in_progress=p, active={"a": active("a", 1)}, interrupted=interrupted)
        assert plan_recovery(stored, max_interrupted=3) == (
            RollBackInterrupted(progress=p, interruptions=before + 1, retry=retry),
        ), f"after {before} earlier deaths"


def test_deaths_in_another_bundle_do_not_count() -> None:
    p = progress(State.HEALTH_CHECKING, 2)
    stored = AgentState(in_progress=p, interrupted={"a": Interruption(bundle_digest=digest(9), count=5)})
    assert plan_recovery(stored) == (RollBackInterrupted(progress=p, interruptions=1, retry=True),)


# -- which recorded failures a new desired state keeps ---------------------------------------------


def _failed_a2() -> AgentState:
    return AgentState(
        active={"a": active("a", 1)},
        failed={"a": digest(2)},
        interrupted={"a": Interruption(bundle_digest=digest(2), count=1)},
    )


@pytest.mark.parametrize(
    "new",
    [
        desired(directive("a", 2), sequence=SEQ + 1),  # re-signed, nothing changed
        desired(directive("a", 2), directive("b", 5), sequence=SEQ + 1),  # an unrelated model assigned
    ],
    ids=["re-signed", "unrelated-model-assigned"],
)
def test_a_failed_bundle_stays_failed_under_a_new_desired_state_naming_it(new: DesiredState) -> None:
    previous = desired(directive("a", 2), directive("c", 6))  # and c is removed in both new states
    failed, interrupted = carried_failures(_failed_a2(), previous, new)
    assert failed == {"a": digest(2)}
    assert interrupted == _failed_a2().interrupted
    actions = plan(new, dataclasses.replace(_failed_a2(), failed=failed), facts())
    assert [a for a in actions if isinstance(a, Deploy) and a.directive.name == "a"] == []


@pytest.mark.parametrize(
    "new",
    [
        desired(directive("a", 3), sequence=SEQ + 1),  # another digest
        desired(directive("a", 2, retry=1), sequence=SEQ + 1),  # an explicit retry
        desired(sequence=SEQ + 1),  # the model is no longer desired
    ],
    ids=["other-digest", "retry", "model-removed"],
)
def test_a_failure_ends_with_another_digest_a_retry_or_the_model_removed(new: DesiredState) -> None:
    assert carried_failures(_failed_a2(), desired(directive("a", 2)), new) == ({}, {})


def test_a_retry_asked_for_once_is_not_asked_again_by_the_next_state() -> None:
    retried = desired(directive("a", 2, retry=1), sequence=SEQ + 1)
    resigned = desired(directive("a", 2, retry=1), sequence=SEQ + 2)
    assert carried_failures(_failed_a2(), retried, resigned)[0] == {"a": digest(2)}


def test_retry_is_optional_on_the_wire() -> None:
    """Desired states signed before ``retry`` existed decode the same; retry 0 is not sent."""
    d = desired(directive("a", 2))
    assert b"retry" not in d.encode()
    assert DesiredState.decode(d.encode()) == d
    retried = desired(directive("a", 2, retry=3))
    assert DesiredState.decode(retried.encode()).models[0].retry == 3
