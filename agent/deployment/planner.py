"""What the agent should do next, decided without I/O.

Theory of operation: :func:`plan` takes the accepted desired state, the stored agent state and
:class:`Facts` (what the model host runs now, the time, and what this reconciliation pass has
already done) and returns the actions left for the pass, in order. It reads no clock, file,
socket or thread: the coordinator (:class:`~edgefleet.agent.deployment.reconciler.Reconciler`)
performs the first action through the executor, which feeds each step's outcome into the state
machines and the store, and plans again with the new state, until only the closing actions
are left (:data:`CLOSING`). Every converging action has a :attr:`key`; the planner never plans a
key the pass has already tried, so a pass ends even when an action changes nothing (a
retryable failure, a superseded download).

One pass, in order::

    Deploy(model) for each desired model not active, its digest not failed (see carried_failures)
    Remove(name) for each active model no longer desired
    RecoverShadows once after boot (a shadow stored LOADING was being loaded when the agent died)
    StopShadow(name) for each stored shadow no longer desired (or with another bundle)
    RetuneShadow | LoadShadow | DeployShadow for each desired shadow beside a serving model
    MarkApplied(sequence) and CollectDownloads(keep) unless a retry is due; PublishReport

:func:`plan_recovery` maps a deployment a crash interrupted to its boot action, by the
:data:`~edgefleet.agent.deployment.machine.RECOVERY` table. A death while the candidate was
being loaded or checked is not a verdict on the bundle (a SIGKILL, a power cut) unless it
repeats: the deployment is rolled back and tried again, silently, until the agent has died in
it :data:`MAX_INTERRUPTED_ATTEMPTS` times; then it ends ``failed_rolled_back`` with code
``runtime_crashed`` (a model that crashes the runtime, e.g. SIGSEGV, must not crash-loop the agent).

:func:`carried_failures` decides which recorded failures still hold when a new desired state
is accepted: a failed (model, digest) stays failed until the desired state names another digest
for the model (or drops the model), or raises the directive's ``retry``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from edgefleet.agent.deployment.machine import RECOVERY, Recovery, State
from edgefleet.agent.deployment.shadow_machine import ShadowState
from edgefleet.agent.deployment.state_store import ActiveModel, AgentState, InProgress, Interruption, ShadowModel
from edgefleet.shared.wire.messages import DesiredState, ModelDirective

Key = tuple[str, ...]

# Deaths of the agent while one bundle's candidate was loaded or checked, before it counts as a
# bundle that crashes the runtime: a single SIGKILL or power cut must not fail a good bundle.
MAX_INTERRUPTED_ATTEMPTS = 3


# -- converging actions (one at a time, planned again after each) -------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Deploy:
    """Run one deployment of ``directive`` through the state machine to its end."""

    directive: ModelDirective
    sequence: int  # of the desired state that asks for it
    started_at: float
    previous: ActiveModel | None  # what a failure rolls back to

    @property
    def key(self) -> Key:
        return ("deploy", self.directive.name, self.directive.bundle_digest)


@dataclass(frozen=True, slots=True, kw_only=True)
class Remove:
    """Stop serving a model that is no longer desired."""

    name: str

    @property
    def key(self) -> Key:
        return ("remove", self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoverShadows:
    """Mark the shadows found LOADING after boot as failed under ``sequence`` (not loaded again)."""

    names: tuple[str, ...]
    sequence: int

    @property
    def key(self) -> Key:
        return ("recover_shadows",)


@dataclass(frozen=True, slots=True, kw_only=True)
class StopShadow:
    """Detach and forget the shadow of ``name`` (its slot is left for pruning)."""

    name: str

    @property
    def key(self) -> Key:
        return ("stop_shadow", self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetuneShadow:
    """Change the sample rate of a running shadow in place."""

    name: str
    bundle_digest: str
    sample_rate: float

    @property
    def key(self) -> Key:
        return ("shadow", self.name, self.bundle_digest)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadShadow:
    """Load an already staged shadow from its slot, check it, and attach it."""

    entry: ShadowModel
    sequence: int

    @property
    def key(self) -> Key:
        return ("shadow", self.entry.name, self.entry.bundle_digest)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeployShadow:
    """Fetch, verify and stage the shadow ``directive`` names, then load and attach it."""

    directive: ModelDirective  # the serving model's directive; its ``shadow`` is the candidate
    sequence: int

    @property
    def key(self) -> Key:
        assert self.directive.shadow is not None
        return ("shadow", self.directive.name, self.directive.shadow.bundle_digest)


# -- closing actions (the end of a pass) --------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkApplied:
    """Record that the desired state ``sequence`` is fully applied."""

    sequence: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectDownloads:
    """Delete downloads (partial or complete) of bundles not in ``keep`` (hex sha256 digests)."""

    keep: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishReport:
    """Publish the reported state (retained)."""


# -- boot recovery ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RollBackInterrupted:
    """The new slot may be live and unproven: return to the previous one.

    ``interruptions`` counts the deaths in this bundle's activation, this one included; 0 when
    the deployment had already failed (it died ROLLING_BACK): report that failure. With
    ``retry`` the bundle is deployed again and nothing is reported yet; without it (and
    ``interruptions``) it ends as a runtime crash.
    """

    progress: InProgress
    interruptions: int = 0
    retry: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartInterrupted:
    """Nothing changed yet: drop the record; the pass deploys it afresh if still desired."""

    progress: InProgress


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportFinished:
    """It succeeded before the crash; only its report may be missing."""

    progress: InProgress


@dataclass(frozen=True, slots=True, kw_only=True)
class ForgetFinished:
    """It ended and what it installed is no longer active: nothing to report."""

    progress: InProgress


ConvergingAction = Deploy | Remove | RecoverShadows | StopShadow | RetuneShadow | LoadShadow | DeployShadow
ClosingAction = MarkApplied | CollectDownloads | PublishReport
RecoveryAction = RollBackInterrupted | RestartInterrupted | ReportFinished | ForgetFinished
PassAction = ConvergingAction | ClosingAction
Action = PassAction | RecoveryAction
CLOSING = (MarkApplied, CollectDownloads, PublishReport)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowRun:
    """A shadow runner attached in the model host now."""

    bundle_digest: str
    sample_rate: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """What the planner is told besides the desired and stored states."""

    now: float  # wall-clock seconds, from the injected clock
    serving: frozenset[str] = frozenset()  # names of the models the host serves now
    shadow_runs: Mapping[str, ShadowRun] = dataclasses.field(default_factory=dict)  # by model name
    attempted: frozenset[Key] = frozenset()  # keys of the actions this pass already performed
    shadows_recovered: bool = False  # RecoverShadows ran since boot
    retry_due: bool = False  # an action of this pass failed in a retryable way
    superseded: bool = False  # a newer desired state is waiting: this pass ends with nothing more


def plan(desired: DesiredState, state: AgentState, facts: Facts) -> tuple[PassAction, ...]:
    """The actions left for this pass, in order (see the module docstring); none if superseded."""
    if facts.superseded:
        return ()
    converging = [*_model_actions(desired, state, facts), *_shadow_actions(desired, state, facts)]
    actions: list[PassAction] = [a for a in converging if a.key not in facts.attempted]
    if not facts.retry_due:
        actions += [MarkApplied(sequence=desired.sequence), CollectDownloads(keep=desired_digests(desired))]
    actions.append(PublishReport())
    return tuple(actions)


def plan_recovery(
    state: AgentState, *, max_interrupted: int = MAX_INTERRUPTED_ATTEMPTS
) -> tuple[RecoveryAction, ...]:
    """The boot action for a deployment a crash interrupted (none if nothing was in progress).

    Args:
        state: The stored agent state.
        max_interrupted: Deaths in one bundle's activation before it ends as a runtime crash.
    """
    progress = state.in_progress
    if progress is None:
        return ()
    recovery = RECOVERY[progress.state]
    if recovery is Recovery.ROLL_BACK:
        if progress.state is State.ROLLING_BACK:  # it had already failed: finish and report that
            return (RollBackInterrupted(progress=progress),)
        prior = state.interrupted.get(progress.name)
        count = 1 + (prior.count if prior is not None and prior.bundle_digest == progress.bundle_digest else 0)
        return (RollBackInterrupted(progress=progress, interruptions=count, retry=count < max_interrupted),)
    if recovery is Recovery.RESTART:
        return (RestartInterrupted(progress=progress),)
    active = state.active.get(progress.name)
    # DONE is persisted only on the way to success: the report is what may be missing.
    if active is not None and active.bundle_digest == progress.bundle_digest:
        return (ReportFinished(progress=progress),)
    return (ForgetFinished(progress=progress),)


def carried_failures(
    state: AgentState, previous: DesiredState | None, new: DesiredState
) -> tuple[dict[str, str], dict[str, Interruption]]:
    """The recorded failures and interruption counts that still hold once ``new`` is accepted.

    One holds while ``new`` names the same digest for its model with the same ``retry`` as
    ``previous`` (the desired state it was recorded under, or a later one that kept it): an
    unrelated model assigned or removed, a key rotation or a re-sign changes nothing.

    Returns:
        ``(failed, interrupted)``, the new values of those :class:`AgentState` fields.
    """
    before = {m.name: m for m in previous.models} if previous is not None else {}
    now = {m.name: m for m in new.models}

    def holds(name: str, digest: str) -> bool:
        directive, old = now.get(name), before.get(name)
        if directive is None or directive.bundle_digest != digest:
            return False
        return old is None or old.retry == directive.retry

    failed = {name: digest for name, digest in state.failed.items() if holds(name, digest)}
    interrupted = {name: i for name, i in state.interrupted.items() if holds(name, i.bundle_digest)}
    return failed, interrupted


def desired_digests(desired: DesiredState) -> frozenset[str]:
    """The hex sha256 of every bundle ``desired`` names, shadows included."""
    digests = {m.bundle_digest for m in desired.models}
    digests |= {m.shadow.bundle_digest for m in desired.models if m.shadow is not None}
    return frozenset(d.removeprefix("sha256:") for d in digests)


def wanted_shadows(desired: DesiredState) -> dict[str, ModelDirective]:
    """The directives whose shadow should run, by model name."""
    return {
        m.name: m
        for m in desired.models
        # A shadow of the version now serving is a promotion: nothing left to compare.
        if m.shadow is not None and m.shadow.bundle_digest != m.bundle_digest and m.shadow.version != m.version
    }


def _model_actions(desired: DesiredState, state: AgentState, facts: Facts) -> list[ConvergingAction]:
    actions: list[ConvergingAction] = []
    for directive in desired.models:
        active = state.active.get(directive.name)
        if active is not None and active.bundle_digest == directive.bundle_digest:
            continue
        if state.failed.get(directive.name) == directive.bundle_digest:
            continue  # failed: wait for another digest or a retry (carried_failures)
        actions.append(Deploy(directive=directive, sequence=desired.sequence, started_at=facts.now, previous=active))
    wanted = {m.name for m in desired.models}
    actions += [Remove(name=name) for name in sorted(state.active) if name not in wanted]
    return actions


def _shadow_actions(desired: DesiredState, state: AgentState, facts: Facts) -> list[ConvergingAction]:
    actions: list[ConvergingAction] = []
    if not facts.shadows_recovered:
        loading = tuple(n for n, s in state.shadows.items() if s.state is ShadowState.LOADING)
        actions.append(RecoverShadows(names=loading, sequence=state.accepted_sequence))
    wanted = wanted_shadows(desired)
    kept: dict[str, ShadowModel] = {}
    for name, stored in state.shadows.items():
        directive = wanted.get(name)
        if directive is None or directive.shadow is None or directive.shadow.bundle_digest != stored.bundle_digest:
            actions.append(StopShadow(name=name))
        else:
            kept[name] = stored
    for name, directive in wanted.items():
        if name in facts.serving:  # nothing serving to compare with (yet): wait
            action = _shadow_action(directive, kept.get(name), facts.shadow_runs.get(name), desired.sequence)
            if action is not None:
                actions.append(action)
    return actions


def _shadow_action(
    directive: ModelDirective, stored: ShadowModel | None, run: ShadowRun | None, sequence: int
) -> ConvergingAction | None:
    shadow = directive.shadow
    assert shadow is not None
    if stored is None:
        return DeployShadow(directive=directive, sequence=sequence)
    if stored.state is ShadowState.FAILED and stored.failed_sequence == sequence:
        return None  # already failed under this desired state: wait for a new one
    if stored.state is ShadowState.RUNNING and run is not None and run.bundle_digest == stored.bundle_digest:
        if stored.sample_rate != shadow.sample_rate:
            return RetuneShadow(name=stored.name, bundle_digest=stored.bundle_digest, sample_rate=shadow.sample_rate)
        return None
    if stored.slot:  # staged before (agent restart, or a failure retried): no download
        entry = dataclasses.replace(stored, sample_rate=shadow.sample_rate, serving_version=directive.version)
        return LoadShadow(entry=entry, sequence=sequence)
    return DeployShadow(directive=directive, sequence=sequence)
