"""Performing the planner's actions: the agent's deployment I/O, and nothing that decides.

:meth:`Executor.perform` carries out one action of :mod:`edgefleet.agent.deployment.planner`:
deploy (download, verify, stage, activate, health-check, roll back), remove, recover, persist,
publish. The steps themselves are :class:`~edgefleet.agent.deployment.steps.BundleSteps`; shadow
actions go to :class:`~edgefleet.agent.deployment.shadow_installer.ShadowInstaller`.

Each step's outcome goes back into the transition table as an event
(:func:`~edgefleet.agent.deployment.machine.advance`, rollback and boot recovery included), and
the new state is persisted *before* the step it names runs. A step's exception becomes an event
at one place, :func:`~edgefleet.agent.deployment.failures.attempt`. A failure to persist the
state itself is not a step's outcome: it propagates to the coordinator, which retries the pass.

The candidate never serves before it is proven: ACTIVATING loads it beside the serving model,
HEALTH_CHECKING checks it there, and only a passed check swaps it in. A failure in either state
rolls back what the store says (the host still serves the previous model). A death in either
state (SIGKILL, a runtime that crashes the process) is counted and retried, bounded
(:func:`~edgefleet.agent.deployment.planner.plan_recovery`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.deployment import planner
from edgefleet.agent.deployment.compatibility import raised_floor
from edgefleet.agent.deployment.failures import MAX_MESSAGE_CHARS, Failure, StepFailed, attempt, drops_download
from edgefleet.agent.deployment.faults import pause_point
from edgefleet.agent.deployment.machine import Event, State, Step, advance
from edgefleet.agent.deployment.shadow_installer import ShadowInstaller
from edgefleet.agent.deployment.state_store import ActiveModel, InProgress, Interruption, StateStore
from edgefleet.agent.deployment.steps import BundleSteps, slot_name
from edgefleet.agent.serving.host import ModelHost
from edgefleet.shared.runtimes import LoadedModel
from edgefleet.shared.wire.messages import DeploymentEvent, Outcome
from edgefleet.shared.wire.topics import Leaf

log = logging.getLogger(__name__)
RUNTIME_CRASHED = "runtime_crashed"  # the code of a bundle the agent kept dying in
AGENT_RESTARTED = "agent_restarted"  # the code of a failure the agent died while rolling back from


class Executor:
    """Performs deployment actions against the store, the model host, the fetchers and the broker."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        host: ModelHost,
        steps: BundleSteps,
        publish: Callable[[Leaf, bytes, bool], object],
        publish_reported: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._store = store
        self._host = host
        self._steps = steps
        self._publish = publish
        self._publish_reported = publish_reported
        self._clock = clock
        self._shadows = ShadowInstaller(store, host, steps, config.shadow)

    @property
    def shadow_fetching(self) -> str | None:
        """The digest of the shadow bundle being downloaded now, if any."""
        return self._shadows.fetching

    def perform(self, action: planner.Action) -> bool:
        """Carry out ``action``; return True if it failed in a retryable way (try the pass again later)."""
        match action:
            case planner.Deploy():
                return self._deploy(action)
            case planner.DeployShadow():
                return self._shadows.deploy(action)
            case planner.LoadShadow():
                return self._shadows.load(action)
            case planner.Remove():
                self._remove(action.name)
            case planner.RecoverShadows():
                self._shadows.recover(action)
            case planner.StopShadow():
                self._shadows.stop(action.name)
            case planner.RetuneShadow():
                self._shadows.retune(action)
            case planner.MarkApplied():
                self._store.update(applied_sequence=action.sequence)
            case planner.CollectDownloads():
                self._collect_downloads(action.keep)
            case planner.PublishReport():
                self._publish_reported()
            case planner.RollBackInterrupted():
                self._roll_back_interrupted(action)
            case planner.RestartInterrupted():
                advance(action.progress.state, Event.RECOVER)  # -> PENDING, which is never persisted
                self._store.update(in_progress=None)
            case planner.ReportFinished():
                self._finish(action.progress, Outcome.SUCCEEDED)
            case planner.ForgetFinished():
                self._store.update(in_progress=None)
            case _:
                raise TypeError(f"not an action: {action!r}")
        return False

    # -- boot ------------------------------------------------------------------------------------

    def sweep_unpacking(self) -> None:
        """Remove the debris of extractions a kill interrupted (``<slot>.unpacking``).

        A restart may never redo that unpack (the desired state can move on meanwhile), so it is
        swept on boot rather than on retry.
        """
        for debris in self._steps.models_dir.glob("*/*.unpacking"):
            shutil.rmtree(debris, ignore_errors=True)

    def load(self, active: ActiveModel) -> LoadedModel:
        """Load an installed model from its slot (agent start)."""
        return self._steps.load(active)

    def _roll_back_interrupted(self, action: planner.RollBackInterrupted) -> None:
        progress, count = action.progress, action.interruptions
        interrupted = progress.state
        if count == 0:  # it died rolling back a failure: finish that rollback and report it
            progress = self._advance(progress, Event.RECOVER)  # -> ROLLING_BACK
            step = self._roll_back(progress)
            # Failed first: a crash before the report then repeats the (idempotent) rollback and
            # reports; the other order could retry the bundle.
            self._record_failed(progress)
            self._finish_step(progress, step, AGENT_RESTARTED, f"agent restarted during {interrupted.value}")
            return
        # The count is persisted before the rollback, and the stored state stays where it died,
        # so a death during the rollback counts too: the bound holds even then.
        counted = Interruption(bundle_digest=progress.bundle_digest, count=count)
        self._store.update(interrupted={**self._store.state.interrupted, progress.name: counted})
        progress = dataclasses.replace(progress, state=advance(progress.state, Event.RECOVER).state)
        step = self._roll_back(progress)
        if action.retry:
            log.warning(
                "the agent died during %s of %s:%s (%d of %d): trying it again",
                interrupted.value, progress.name, progress.version, count, self._config.max_interrupted_attempts_count,
            )
            self._store.update(in_progress=None)  # not an outcome: the pass deploys it again
            return
        self._record_failed(progress)
        message = (
            f"the agent died {count} times while this bundle's model was loaded or checked (last in"
            f" {interrupted.value}): a model that crashes the runtime, or repeated kills; "
            + (f"{progress.previous.version} restored" if progress.previous is not None else "nothing to restore")
        )
        self._finish_step(progress, step, RUNTIME_CRASHED, message)

    # -- one deployment --------------------------------------------------------------------------

    def _deploy(self, action: planner.Deploy) -> bool:
        """Run one deployment to its end; return True if it failed in a retryable way."""
        directive = action.directive
        progress = InProgress(
            sequence=action.sequence,
            name=directive.name,
            version=directive.version,
            bundle_digest=directive.bundle_digest,
            bundle_size=directive.bundle_size,
            runtime=directive.runtime,
            state=State.PENDING,
            started_at=action.started_at,
            previous=action.previous,
        )
        log.info("deploying %s:%s (%s)", directive.name, directive.version, directive.bundle_digest[:19])
        bundle: Path | None = None
        model: LoadedModel | None = None  # a loaded candidate that does not serve (yet)
        try:
            progress = self._advance(progress, Event.START)  # -> DOWNLOADING
            downloaded = bundle = attempt(progress.state, lambda: self._steps.download(directive))
            progress = self._advance(progress, Event.DOWNLOADED)  # -> VERIFYING
            floor = self._store.state.floors.get(directive.name)
            manifest = attempt(progress.state, lambda: self._steps.verify(downloaded, directive, floor))
            progress = self._advance(progress, Event.VERIFIED)  # -> STAGING
            slot = attempt(progress.state, lambda: self._steps.stage(downloaded, directive))
            progress = self._advance(progress, Event.STAGED)  # -> ACTIVATING
            new = ActiveModel(
                name=directive.name,
                version=directive.version,
                bundle_digest=directive.bundle_digest,
                runtime=manifest.runtime,
                slot=slot.name,
                model_file=manifest.model_file,
                accelerators=manifest.compatibility.accelerators,
            )
            # Loaded beside the serving model, not instead of it: nothing serves it yet.
            candidate = model = attempt(progress.state, lambda: self._steps.load(new))
            progress = self._advance(progress, Event.ACTIVATED)  # -> HEALTH_CHECKING
            note = attempt(progress.state, lambda: self._steps.health_check(candidate, slot, manifest))
            attempt(progress.state, lambda: self._go_live(new, candidate))  # only a proven model serves
            model = None
            progress = self._advance(progress, Event.HEALTHY)  # -> DONE
        except StepFailed as failed:
            if model is not None:
                model.close()  # never served: no request can hold it
            return self._fail(progress, failed.failure, bundle)
        except BaseException:
            if model is not None:
                model.close()  # e.g. the next state could not be persisted: the pass is retried
            raise
        floor = raised_floor(self._store.state.floors.get(directive.name), manifest)
        if floor is not None:
            self._store.update(floors={**self._store.state.floors, directive.name: floor})
        previous = action.previous
        if previous is not None and previous.slot != new.slot:
            self._prune_slots(directive.name, keep={new.slot, previous.slot})
        self._finish(progress, Outcome.SUCCEEDED, message=note)
        return False

    def _advance(self, progress: InProgress, event: Event) -> InProgress:
        progress = dataclasses.replace(progress, state=advance(progress.state, event).state)
        self._persist(progress)
        return progress

    def _persist(self, progress: InProgress) -> None:
        # Persisted before the step runs: this is what recovery reads after a crash.
        self._store.update(in_progress=progress)
        pause_point(progress.state.value)

    def _go_live(self, new: ActiveModel, model: LoadedModel) -> None:
        """Serve a candidate that passed its health check (recorded first: recovery rolls it back)."""
        self._store.update(active={**self._store.state.active, new.name: new})
        self._serve(new.name, model)

    def _serve(self, name: str, model: LoadedModel | None) -> None:
        """Make ``model`` (or nothing) what the host serves as ``name``; the model it replaces is retired."""
        old = self._host.swap(name, model)
        if old is not None:
            self._host.retire(old)

    def _fail(self, progress: InProgress, failure: Failure, bundle: Path | None) -> bool:
        log.warning(
            "deployment %s:%s failed in %s: %s", progress.name, progress.version, progress.state, failure.message
        )
        if bundle is not None and drops_download(progress.state, failure):
            bundle.unlink(missing_ok=True)
        step = advance(progress.state, failure.event)
        progress = dataclasses.replace(progress, state=step.state)
        if step.state is State.ROLLING_BACK:
            self._persist(progress)
            step = self._roll_back(progress)
        if failure.retryable:
            # Not an outcome: the same desired state is tried again shortly, and the control plane
            # keeps the deployment pending until a final outcome arrives.
            self._store.update(in_progress=None)
            return True
        if failure.event is not Event.SUPERSEDE:
            self._record_failed(progress)
        self._finish_step(progress, step, failure.code, failure.message)
        return False

    def _roll_back(self, progress: InProgress) -> Step:
        """Return to ``progress.previous`` (ROLLING_BACK -> DONE through ROLLED_BACK or ROLLBACK_FAILED)."""
        previous = progress.previous
        try:
            model = self._steps.load(previous) if previous is not None else None
        except Exception as exc:  # noqa: BLE001 - whatever stops the previous model loading fails the rollback
            log.error("rollback of %s to %s failed: %s", progress.name, previous, exc)
            self._serve_instead(progress, None, None)
            return advance(progress.state, Event.ROLLBACK_FAILED)
        self._serve_instead(progress, previous, model)
        return advance(progress.state, Event.ROLLED_BACK)

    def _serve_instead(self, progress: InProgress, previous: ActiveModel | None, model: LoadedModel | None) -> None:
        """Make ``previous`` (or nothing) the active model of a deployment that is rolled back."""
        active = {k: v for k, v in self._store.state.active.items() if k != progress.name}
        if previous is not None:
            active[progress.name] = previous
        self._store.update(active=active)
        self._serve(progress.name, model)
        self._discard_failed_slot(progress)

    def _discard_failed_slot(self, progress: InProgress) -> None:
        """Remove the slot of a deployment that was rolled back: nothing serves it or rolls back to it."""
        slot = slot_name(progress.version, progress.bundle_digest)
        in_use = {s.slot for s in self._store.state.shadows.values() if s.name == progress.name}
        if progress.previous is not None:
            in_use.add(progress.previous.slot)
        if slot not in in_use:  # e.g. a promoted shadow's slot: the shadow still runs from it
            shutil.rmtree(self._steps.models_dir / progress.name / slot, ignore_errors=True)

    def _record_failed(self, progress: InProgress) -> None:
        """Not retried under the same desired state (a new one clears it)."""
        self._store.update(failed={**self._store.state.failed, progress.name: progress.bundle_digest})

    def _finish_step(self, progress: InProgress, step: Step, code: str, message: str) -> None:
        assert step.outcome is not None, "a deployment ends only in DONE"
        self._finish(dataclasses.replace(progress, state=step.state), step.outcome, code, message)

    def _finish(self, progress: InProgress, outcome: Outcome, code: str = "", message: str = "") -> None:
        interrupted = {k: v for k, v in self._store.state.interrupted.items() if k != progress.name}
        self._store.update(in_progress=None, interrupted=interrupted)  # an outcome ends the count
        event = DeploymentEvent(
            event_id=uuid.uuid4().hex,
            device_id=self._config.device_id,
            ts=self._clock(),
            sequence=progress.sequence,
            name=progress.name,
            version=progress.version,
            bundle_digest=progress.bundle_digest,
            outcome=outcome,
            error_code=code,
            message=message[:MAX_MESSAGE_CHARS],
            duration_s=max(0.0, self._clock() - progress.started_at),
        )
        log.info("deployment %s:%s ended: %s %s", progress.name, progress.version, outcome.value, message)
        self._publish(Leaf.EVENTS, event.encode(), False)

    def _remove(self, name: str) -> None:
        active = dict(self._store.state.active)
        active.pop(name, None)
        self._store.update(active=active)
        self._serve(name, None)
        log.info("model %s removed (no longer desired)", name)

    def _prune_slots(self, name: str, keep: set[str]) -> None:
        directory = self._steps.models_dir / name
        keep = keep | {s.slot for s in self._store.state.shadows.values() if s.name == name and s.slot}
        slots = sorted(
            (p for p in directory.iterdir() if p.is_dir() and p.name not in keep), key=lambda p: p.stat().st_mtime
        )
        for slot in slots[: max(0, len(slots) + len(keep) - self._config.slots_kept_per_model)]:
            shutil.rmtree(slot, ignore_errors=True)

    def _collect_downloads(self, keep: frozenset[str]) -> None:
        downloads = self._config.data_dir / "downloads"
        if not downloads.is_dir():
            return
        for path in downloads.iterdir():
            if path.name.split(".", 1)[0] not in keep:
                path.unlink(missing_ok=True)
