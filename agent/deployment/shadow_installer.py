"""Performing the planner's shadow actions: deploy, load, retune, stop and recover shadow candidates.

A shadow reuses a deployment's fetch, verify and stage steps (:class:`BundleSteps`) but never
activates. Every change of its stored state goes through
:func:`~edgefleet.agent.deployment.shadow_machine.advance_shadow`, and LOADING is persisted before
each load; a step's exception becomes a :class:`~edgefleet.agent.deployment.failures.Failure`
through :func:`~edgefleet.agent.deployment.failures.attempt`, like a deployment's.
"""

from __future__ import annotations

import dataclasses
import logging

from edgefleet.agent.config import ShadowConfig
from edgefleet.agent.deployment.failures import MAX_MESSAGE_CHARS, Failure, StepFailed, attempt, drops_download
from edgefleet.agent.deployment.machine import Event, State
from edgefleet.agent.deployment.planner import DeployShadow, LoadShadow, RecoverShadows, RetuneShadow
from edgefleet.agent.deployment.shadow_machine import ShadowEvent, ShadowState, advance_shadow
from edgefleet.agent.deployment.state_store import ShadowModel, StateStore
from edgefleet.agent.deployment.steps import BundleSteps
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.serving.shadow import ShadowRunner
from edgefleet.shared.errors import IncompatibleBundleError
from edgefleet.shared.runtimes import LoadedModel
from edgefleet.shared.wire.messages import ModelDirective

log = logging.getLogger(__name__)


class ShadowInstaller:
    """Brings shadow candidates up beside serving models, and takes them down."""

    def __init__(self, store: StateStore, host: ModelHost, steps: BundleSteps, limits: ShadowConfig) -> None:
        self._store = store
        self._host = host
        self._steps = steps
        self._limits = limits
        self.fetching: str | None = None  # digest of the shadow bundle being downloaded

    def recover(self, action: RecoverShadows) -> None:
        """Mark shadows found LOADING after boot as failed: loading them may be what killed the agent."""
        for name in action.names:
            entry = self._store.state.shadows[name]
            log.error("shadow %s:%s was loading when the agent stopped", entry.name, entry.version)
            self._put(
                dataclasses.replace(
                    entry,
                    state=advance_shadow(entry.state, ShadowEvent.RECOVER),
                    message="the agent stopped while loading this shadow; not retried under this desired state",
                    failed_sequence=action.sequence,
                )
            )

    def retune(self, action: RetuneShadow) -> None:
        """Change a running shadow's sample rate in place."""
        stored = self._store.state.shadows[action.name]
        runner = self._host.shadow(action.name)
        assert runner is not None, "planned only for an attached runner"
        runner.set_sample_rate(action.sample_rate)
        state = advance_shadow(stored.state, ShadowEvent.RETUNE)
        self._put(dataclasses.replace(stored, state=state, sample_rate=action.sample_rate))

    def stop(self, name: str) -> None:
        """Stop and forget the shadow of ``name`` (its slot is left for pruning)."""
        runner = self._host.detach_shadow(name)
        if runner is not None:
            runner.close()
        shadows = dict(self._store.state.shadows)
        removed = shadows.pop(name)
        advance_shadow(removed.state, ShadowEvent.REMOVE)  # -> ABSENT: no entry
        self._store.update(shadows=shadows)
        log.info("shadow %s:%s unloaded (no longer desired)", name, removed.version)

    def load(self, action: LoadShadow) -> bool:
        """Load a shadow staged before (agent restart, or a failure retried); True if a retry is due."""
        stored = self._stored_state(action.entry.name)
        return self._start(action.entry, action.sequence, stored, ShadowEvent.LOAD)

    def deploy(self, action: DeployShadow) -> bool:
        """Fetch, verify and stage a shadow's bundle, then load it; True if a retry is due."""
        directive = action.directive
        shadow = directive.shadow
        assert shadow is not None
        stored = self._stored_state(directive.name)
        bundle_directive = ModelDirective(
            name=directive.name,
            version=shadow.version,
            bundle_digest=shadow.bundle_digest,
            bundle_size=shadow.bundle_size,
            runtime=shadow.runtime,
            urls=shadow.urls,
        )
        entry = ShadowModel(
            name=directive.name,
            version=shadow.version,
            bundle_digest=shadow.bundle_digest,
            runtime=shadow.runtime,
            sample_rate=shadow.sample_rate,
            serving_version=directive.version,
            state=ShadowState.LOADING,
        )
        log.info("deploying shadow %s:%s beside %s", directive.name, shadow.version, directive.version)
        self.fetching = shadow.bundle_digest
        phase, bundle = State.DOWNLOADING, None
        floor = self._store.state.floors.get(directive.name)
        try:
            downloaded = bundle = attempt(phase, lambda: self._steps.download(bundle_directive))
            phase = State.VERIFYING
            manifest = attempt(phase, lambda: self._steps.verify(downloaded, bundle_directive, floor))
            phase = State.STAGING
            slot = attempt(phase, lambda: self._steps.stage(downloaded, bundle_directive))
        except StepFailed as failed:
            if bundle is not None and drops_download(phase, failed.failure):
                bundle.unlink(missing_ok=True)
            return self._failed(entry, stored, action.sequence, failed.failure)
        finally:
            self.fetching = None
        entry = dataclasses.replace(entry, runtime=manifest.runtime, slot=slot.name, model_file=manifest.model_file)
        return self._start(entry, action.sequence, stored, ShadowEvent.STAGED)

    def _start(self, entry: ShadowModel, sequence: int, stored: ShadowState, event: ShadowEvent) -> bool:
        """Load a staged shadow, check it against the serving model, and attach it."""
        serving = self._host.get(entry.name)
        if serving is None:
            return False
        state = advance_shadow(stored, event)  # -> LOADING
        entry = dataclasses.replace(entry, state=state, message="", serving_version=serving.version)
        self._put(entry)  # persisted before the load: see recover()
        try:
            # A load mirrors activation, the check a health check: every error is a failure.
            model = attempt(State.ACTIVATING, lambda: self._steps.load_shadow(entry))
        except StepFailed as failed:
            return self._failed(entry, state, sequence, failed.failure)
        try:
            attempt(State.HEALTH_CHECKING, lambda: self._check(model, serving))
        except StepFailed as failed:
            model.close()
            return self._failed(entry, state, sequence, failed.failure)
        runner = ShadowRunner(
            model, bundle_digest=entry.bundle_digest, sample_rate=entry.sample_rate, limits=self._limits
        )
        try:
            old = self._host.attach_shadow(entry.name, runner)
        except KeyError:  # the serving model went away meanwhile: try again on the next pass
            runner.close()
            advance_shadow(state, ShadowEvent.RETRY)
            return False
        if old is not None:
            old.close()
        self._put(dataclasses.replace(entry, state=advance_shadow(state, ShadowEvent.STARTED)))
        log.info("shadow %s:%s running beside %s", entry.name, entry.version, serving.version)
        return False  # the pass publishes the reported state with it

    def _check(self, model: LoadedModel, serving: LoadedModel) -> None:
        """A candidate must take the serving model's inputs and pass the health check."""
        if model.inputs != serving.inputs:
            raise IncompatibleBundleError(
                f"shadow inputs {[s.to_dict() for s in model.inputs]} differ from the serving "
                f"model's {[s.to_dict() for s in serving.inputs]}"
            )
        self._steps.health_check(model)

    def _failed(self, entry: ShadowModel, state: ShadowState, sequence: int, failure: Failure) -> bool:
        """Record why a shadow could not run (reported as failed); True if a retry is due."""
        if failure.event is Event.SUPERSEDE or failure.retryable:
            advance_shadow(state, ShadowEvent.RETRY)  # nothing recorded
            if failure.retryable:
                log.warning("shadow %s:%s: %s (will retry)", entry.name, entry.version, failure.message)
            return failure.retryable
        log.warning("shadow %s:%s failed: %s", entry.name, entry.version, failure.message)
        self._put(
            dataclasses.replace(
                entry,
                state=advance_shadow(state, ShadowEvent.FAIL),
                message=f"{failure.code}: {failure.message}"[:MAX_MESSAGE_CHARS],
                failed_sequence=sequence,
            )
        )
        return False

    def _stored_state(self, name: str) -> ShadowState:
        stored = self._store.state.shadows.get(name)
        return ShadowState.ABSENT if stored is None else stored.state

    def _put(self, entry: ShadowModel) -> None:
        self._store.update(shadows={**self._store.state.shadows, entry.name: entry})
