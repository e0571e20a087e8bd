"""Performing the planner's actions: the agent's deployment I/O, and nothing that decides.

:meth:`Executor.perform` carries out one action of :mod:`edgefleet.agent.deployment.planner`:
download, verify, stage, activate, health-check, roll back, load a shadow, persist, publish. Each
step's outcome goes back into the transition tables (:func:`~edgefleet.agent.deployment.machine.advance`
for a deployment, rollback and recovery included; :func:`~edgefleet.agent.deployment.shadow_machine.advance_shadow`
for a shadow), and the new state is persisted *before* the step it names runs. An exception from
a step is turned into an event by :func:`~edgefleet.agent.deployment.failures.classify` at one
place (:meth:`Executor._attempt`); a failure to persist the state itself is not a step's outcome
and propagates to the coordinator, which retries the pass later.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.deployment.compatibility import (
    check_installable,
    device_accelerators,
    device_machine,
    preferred_providers,
    raised_floor,
)
from edgefleet.agent.deployment.failures import Failure, classify, drops_download
from edgefleet.agent.deployment.faults import pause_point
from edgefleet.agent.deployment.health_check import run_health_check, sample_inputs
from edgefleet.agent.deployment.machine import Event, State, Step, advance
from edgefleet.agent.deployment.planner import (
    Action,
    CollectDownloads,
    Deploy,
    DeployShadow,
    ForgetFinished,
    LoadShadow,
    MarkApplied,
    PublishReport,
    RecoverShadows,
    Remove,
    ReportFinished,
    RestartInterrupted,
    RetuneShadow,
    RollBackInterrupted,
    StopShadow,
)
from edgefleet.agent.deployment.shadow_machine import ShadowEvent, ShadowState, advance_shadow
from edgefleet.agent.deployment.state_store import ActiveModel, InProgress, ShadowModel, StateStore
from edgefleet.agent.deployment.trust_store import TrustStore
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.serving.shadow import ShadowRunner
from edgefleet.agent.transfer.http import HttpFetcher
from edgefleet.agent.transfer.mqtt_chunks import ChunkFetcher
from edgefleet.shared.bundle.format import BundleLimits, extract_bundle, verify_bundle
from edgefleet.shared.bundle.manifest import Manifest
from edgefleet.shared.errors import IncompatibleBundleError, TransferError
from edgefleet.shared.runtimes import LoadedModel, RuntimeOptions, load_model
from edgefleet.shared.wire.messages import DeploymentEvent, ModelDirective, Outcome
from edgefleet.shared.wire.topics import Leaf

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_MAX_MESSAGE_CHARS = 2000


class _StepFailed(Exception):
    """Internal: a step raised; carries what :func:`classify` made of it."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Executor:
    """Performs deployment actions against the store, the model host, the fetchers and the broker."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        host: ModelHost,
        fetcher: ChunkFetcher,
        http_fetcher: HttpFetcher | None,
        trust: TrustStore,
        publish: Callable[[Leaf, bytes, bool], object],
        publish_reported: Callable[[], None],
        clock: Callable[[], float],
        cancel: threading.Event,
    ) -> None:
        self._config = config
        self._store = store
        self._host = host
        self._fetcher = fetcher
        self._http_fetcher = http_fetcher  # None: bundles come only over MQTT
        self._trust = trust
        self._publish = publish
        self._publish_reported = publish_reported
        self._clock = clock
        self._cancel = cancel  # set by the coordinator when a newer desired state supersedes a download
        self._models_dir = config.data_dir / "models"
        self._limits = BundleLimits(max_bundle_bytes=config.transfer.max_bundle_bytes)
        self._runtime_options = RuntimeOptions(
            intra_op_threads=config.runtime.intra_op_threads, providers=config.runtime.onnx_providers
        )
        self.shadow_fetching: str | None = None  # digest of the shadow bundle being downloaded

    def perform(self, action: Action) -> bool:
        """Carry out ``action``; return True if it failed in a retryable way (try the pass again later)."""
        match action:
            case Deploy():
                return self._deploy(action)
            case DeployShadow():
                return self._deploy_shadow(action)
            case LoadShadow():
                stored = self._store.state.shadows.get(action.entry.name)
                return self._start_shadow(action.entry, action.sequence, _shadow_state(stored), ShadowEvent.LOAD)
            case _:
                self._perform_bookkeeping(action)
                return False

    def _perform_bookkeeping(self, action: Action) -> None:
        match action:
            case Remove():
                self._remove(action.name)
            case RecoverShadows():
                self._recover_shadows(action)
            case StopShadow():
                self._stop_shadow(action.name)
            case RetuneShadow():
                self._retune_shadow(action)
            case MarkApplied():
                self._store.update(applied_sequence=action.sequence)
            case CollectDownloads():
                self._collect_downloads(action.keep)
            case PublishReport():
                self._publish_reported()
            case RollBackInterrupted():
                self._roll_back_interrupted(action.progress)
            case RestartInterrupted():
                advance(action.progress.state, Event.RECOVER)  # -> PENDING, which is never persisted
                self._store.update(in_progress=None)
            case ReportFinished():
                self._finish(action.progress, Outcome.SUCCEEDED)
            case ForgetFinished():
                self._store.update(in_progress=None)
            case _:
                raise TypeError(f"not an action: {action!r}")

    # -- boot ------------------------------------------------------------------------------------

    def sweep_unpacking(self) -> None:
        """Remove the debris of extractions a kill interrupted (``<slot>.unpacking``).

        A restart may never redo that unpack (the desired state can move on meanwhile), so it is
        swept on boot rather than on retry.
        """
        for debris in self._models_dir.glob("*/*.unpacking"):
            shutil.rmtree(debris, ignore_errors=True)

    def load(self, active: ActiveModel) -> LoadedModel:
        """Load an installed model from its slot, with the providers its bundle prefers."""
        path = self._models_dir / active.name / active.slot / active.model_file
        providers = preferred_providers(active.accelerators, self._config.runtime.onnx_providers)
        options = dataclasses.replace(self._runtime_options, providers=providers)
        return load_model(active.runtime, path, name=active.name, version=active.version, options=options)

    def _roll_back_interrupted(self, progress: InProgress) -> None:
        interrupted = progress.state
        progress = self._advance(progress, Event.RECOVER)  # -> ROLLING_BACK
        step = self._roll_back(progress)
        # Failed first: a crash before the report then repeats the (idempotent) rollback and
        # reports; the other order could retry the bundle under the same desired state.
        self._record_failed(progress)
        self._finish_step(progress, step, "agent_restarted", f"agent restarted during {interrupted.value}")

    # -- one deployment --------------------------------------------------------------------------

    def _deploy(self, action: Deploy) -> bool:
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
        try:
            progress = self._advance(progress, Event.START)  # -> DOWNLOADING
            downloaded = bundle = self._attempt(progress.state, lambda: self._download(directive))
            progress = self._advance(progress, Event.DOWNLOADED)  # -> VERIFYING
            manifest = self._attempt(progress.state, lambda: self._verify(downloaded, directive))
            progress = self._advance(progress, Event.VERIFIED)  # -> STAGING
            slot = self._attempt(progress.state, lambda: self._stage(downloaded, directive))
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
            model = self._attempt(progress.state, lambda: self._activate(new))
            progress = self._advance(progress, Event.ACTIVATED)  # -> HEALTH_CHECKING
            self._attempt(progress.state, lambda: self._health_check(model, slot, manifest))
            progress = self._advance(progress, Event.HEALTHY)  # -> DONE
        except _StepFailed as failed:
            return self._fail(progress, failed.failure, bundle)
        floor = raised_floor(self._store.state.floors.get(directive.name), manifest)
        if floor is not None:
            self._store.update(floors={**self._store.state.floors, directive.name: floor})
        previous = action.previous
        if previous is not None and previous.slot != new.slot:
            self._prune_slots(directive.name, keep={new.slot, previous.slot})
        self._finish(progress, Outcome.SUCCEEDED)
        return False

    def _attempt(self, state: State, step: Callable[[], _T]) -> _T:
        """Run one step; whatever it raises becomes a :class:`Failure` (the one place errors map to events)."""
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - every error is an outcome; classify() says which
            raise _StepFailed(classify(exc, state)) from exc

    def _advance(self, progress: InProgress, event: Event) -> InProgress:
        progress = dataclasses.replace(progress, state=advance(progress.state, event).state)
        self._persist(progress)
        return progress

    def _persist(self, progress: InProgress) -> None:
        # Persisted before the step runs: this is what recovery reads after a crash.
        self._store.update(in_progress=progress)
        pause_point(progress.state.value)

    def _download(self, directive: ModelDirective) -> Path:
        """HTTP(S) when the directive has URLs or the agent prefers its control plane's; else, or
        when every HTTP source fails, MQTT chunks (both resume from the same partial download)."""
        digest, size = directive.bundle_digest, directive.bundle_size
        sources = self._http_fetcher.sources(digest, directive.urls) if self._http_fetcher else ()
        if sources:
            assert self._http_fetcher is not None
            try:
                return self._http_fetcher.fetch(digest, size, sources, self._cancel)
            except TransferError as exc:
                log.warning("HTTP download of %s failed, falling back to MQTT chunks: %s", digest[:19], exc)
        return self._fetcher.fetch(digest, size, self._cancel)

    def _verify(self, bundle: Path, directive: ModelDirective) -> Manifest:
        manifest = verify_bundle(
            bundle,
            trusted_keys=self._trust.publisher_keys,
            threshold=self._trust.publisher_threshold,
            limits=self._limits,
        )
        check_installable(
            manifest,
            directive,
            machine=device_machine(),
            accelerators=device_accelerators(),
            floor=self._store.state.floors.get(directive.name),
        )
        return manifest

    def _stage(self, bundle: Path, directive: ModelDirective) -> Path:
        slot = self._models_dir / directive.name / slot_name(directive.version, directive.bundle_digest)
        if slot.exists():
            bundle.unlink(missing_ok=True)  # e.g. killed after the unpack, before STAGED was persisted
            return slot  # staged before (e.g. a rollback target): extraction renames atomically, so it is complete
        extract_bundle(
            bundle,
            slot,
            trusted_keys=self._trust.publisher_keys,
            threshold=self._trust.publisher_threshold,
            limits=self._limits,
        )
        bundle.unlink(missing_ok=True)  # the slot holds the verified files now
        return slot

    def _activate(self, new: ActiveModel) -> LoadedModel:
        model = self.load(new)
        self._store.update(active={**self._store.state.active, new.name: new})
        old = self._host.swap(new.name, model)
        if old is not None:
            self._host.retire(old)
        return model

    def _health_check(self, model: LoadedModel, slot: Path | None = None, manifest: Manifest | None = None) -> None:
        """Warm-up inference on the bundle's sample inputs (or zeros) within its latency budget."""
        budget_s = self._config.health_check_timeout_s
        if manifest is not None and manifest.latency_budget_ms is not None:
            budget_s = manifest.latency_budget_ms / 1000.0
        run_health_check(model, sample_inputs(model, slot, manifest), budget_s)

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
            model = self.load(previous) if previous is not None else None
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
        old = self._host.swap(progress.name, model)
        if old is not None:
            self._host.retire(old)
        self._discard_failed_slot(progress)

    def _discard_failed_slot(self, progress: InProgress) -> None:
        """Remove the slot of a deployment that was rolled back: nothing serves it or rolls back to it."""
        slot = slot_name(progress.version, progress.bundle_digest)
        in_use = {s.slot for s in self._store.state.shadows.values() if s.name == progress.name}
        if progress.previous is not None:
            in_use.add(progress.previous.slot)
        if slot not in in_use:  # e.g. a promoted shadow's slot: the shadow still runs from it
            shutil.rmtree(self._models_dir / progress.name / slot, ignore_errors=True)

    def _record_failed(self, progress: InProgress) -> None:
        """Not retried under the same desired state (a new one clears it)."""
        self._store.update(failed={**self._store.state.failed, progress.name: progress.bundle_digest})

    def _finish_step(self, progress: InProgress, step: Step, code: str, message: str) -> None:
        assert step.outcome is not None, "a deployment ends only in DONE"
        self._finish(dataclasses.replace(progress, state=step.state), step.outcome, code, message)

    def _finish(self, progress: InProgress, outcome: Outcome, code: str = "", message: str = "") -> None:
        self._store.update(in_progress=None)
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
            message=message[:_MAX_MESSAGE_CHARS],
            duration_s=max(0.0, self._clock() - progress.started_at),
        )
        log.info("deployment %s:%s ended: %s %s", progress.name, progress.version, outcome.value, message)
        self._publish(Leaf.EVENTS, event.encode(), False)

    def _remove(self, name: str) -> None:
        active = dict(self._store.state.active)
        active.pop(name, None)
        self._store.update(active=active)
        old = self._host.swap(name, None)
        if old is not None:
            self._host.retire(old)
        log.info("model %s removed (no longer desired)", name)

    def _prune_slots(self, name: str, keep: set[str]) -> None:
        directory = self._models_dir / name
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

    # -- shadow candidates -----------------------------------------------------------------------
    #
    # A shadow reuses the deployment's fetch -> verify -> stage steps, but never activates: see
    # agent.deployment.shadow_machine for its lifecycle.

    def _recover_shadows(self, action: RecoverShadows) -> None:
        for name in action.names:
            entry = self._store.state.shadows[name]
            log.error("shadow %s:%s was loading when the agent stopped", entry.name, entry.version)
            self._put_shadow(
                dataclasses.replace(
                    entry,
                    state=advance_shadow(entry.state, ShadowEvent.RECOVER),
                    message="the agent stopped while loading this shadow; not retried under this desired state",
                    failed_sequence=action.sequence,
                )
            )

    def _retune_shadow(self, action: RetuneShadow) -> None:
        stored = self._store.state.shadows[action.name]
        runner = self._host.shadow(action.name)
        assert runner is not None, "planned only for an attached runner"
        runner.set_sample_rate(action.sample_rate)
        state = advance_shadow(stored.state, ShadowEvent.RETUNE)
        self._put_shadow(dataclasses.replace(stored, state=state, sample_rate=action.sample_rate))

    def _deploy_shadow(self, action: DeployShadow) -> bool:
        """Fetch, verify and stage a shadow's bundle, then load it; True if a retry is due."""
        directive = action.directive
        shadow = directive.shadow
        assert shadow is not None
        stored_state = _shadow_state(self._store.state.shadows.get(directive.name))
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
        self.shadow_fetching = shadow.bundle_digest
        phase, bundle = State.DOWNLOADING, None
        try:
            downloaded = bundle = self._attempt(phase, lambda: self._download(bundle_directive))
            phase = State.VERIFYING
            manifest = self._attempt(phase, lambda: self._verify(downloaded, bundle_directive))
            phase = State.STAGING
            slot = self._attempt(phase, lambda: self._stage(downloaded, bundle_directive))
        except _StepFailed as failed:
            if bundle is not None and drops_download(phase, failed.failure):
                bundle.unlink(missing_ok=True)
            return self._shadow_failed(entry, stored_state, action.sequence, failed.failure)
        finally:
            self.shadow_fetching = None
        entry = dataclasses.replace(entry, runtime=manifest.runtime, slot=slot.name, model_file=manifest.model_file)
        return self._start_shadow(entry, action.sequence, stored_state, ShadowEvent.STAGED)

    def _start_shadow(self, entry: ShadowModel, sequence: int, stored: ShadowState, event: ShadowEvent) -> bool:
        """Load a staged shadow, check it against the serving model, and attach it."""
        serving = self._host.get(entry.name)
        if serving is None:
            return False
        state = advance_shadow(stored, event)  # -> LOADING
        entry = dataclasses.replace(entry, state=state, message="", serving_version=serving.version)
        self._put_shadow(entry)  # persisted before the load: see RecoverShadows
        try:
            path = self._models_dir / entry.name / entry.slot / entry.model_file
            model = self._attempt(
                State.ACTIVATING,
                lambda: load_model(
                    entry.runtime, path, name=entry.name, version=entry.version, options=self._runtime_options
                ),
            )
        except _StepFailed as failed:
            return self._shadow_failed(entry, state, sequence, failed.failure)
        try:
            self._attempt(State.HEALTH_CHECKING, lambda: self._check_shadow(model, serving))
        except _StepFailed as failed:
            model.close()
            return self._shadow_failed(entry, state, sequence, failed.failure)
        runner = ShadowRunner(
            model, bundle_digest=entry.bundle_digest, sample_rate=entry.sample_rate, limits=self._config.shadow
        )
        try:
            old = self._host.attach_shadow(entry.name, runner)
        except KeyError:  # the serving model went away meanwhile: try again on the next pass
            runner.close()
            advance_shadow(state, ShadowEvent.RETRY)
            return False
        if old is not None:
            old.close()
        self._put_shadow(dataclasses.replace(entry, state=advance_shadow(state, ShadowEvent.STARTED)))
        log.info("shadow %s:%s running beside %s", entry.name, entry.version, serving.version)
        return False  # the pass publishes the reported state with it

    def _check_shadow(self, model: LoadedModel, serving: LoadedModel) -> None:
        """A candidate must take the serving model's inputs and pass the health check."""
        if model.inputs != serving.inputs:
            raise IncompatibleBundleError(
                f"shadow inputs {[s.to_dict() for s in model.inputs]} differ from the serving "
                f"model's {[s.to_dict() for s in serving.inputs]}"
            )
        self._health_check(model)

    def _shadow_failed(self, entry: ShadowModel, state: ShadowState, sequence: int, failure: Failure) -> bool:
        """Record why a shadow could not run (reported as failed); True if a retry is due."""
        if failure.event is Event.SUPERSEDE or failure.retryable:
            advance_shadow(state, ShadowEvent.RETRY)  # nothing recorded
            if failure.retryable:
                log.warning("shadow %s:%s: %s (will retry)", entry.name, entry.version, failure.message)
            return failure.retryable
        log.warning("shadow %s:%s failed: %s", entry.name, entry.version, failure.message)
        self._put_shadow(
            dataclasses.replace(
                entry,
                state=advance_shadow(state, ShadowEvent.FAIL),
                message=f"{failure.code}: {failure.message}"[:_MAX_MESSAGE_CHARS],
                failed_sequence=sequence,
            )
        )
        return False

    def _stop_shadow(self, name: str) -> None:
        """Stop and forget the shadow of ``name`` (its slot is left for pruning)."""
        runner = self._host.detach_shadow(name)
        if runner is not None:
            runner.close()
        shadows = dict(self._store.state.shadows)
        removed = shadows.pop(name)
        advance_shadow(removed.state, ShadowEvent.REMOVE)  # -> ABSENT: no entry
        self._store.update(shadows=shadows)
        log.info("shadow %s:%s unloaded (no longer desired)", name, removed.version)

    def _put_shadow(self, entry: ShadowModel) -> None:
        self._store.update(shadows={**self._store.state.shadows, entry.name: entry})


def slot_name(version: str, bundle_digest: str) -> str:
    """The directory under ``models/<name>/`` a bundle is unpacked into."""
    return f"{version}-{bundle_digest[7:19]}"


def _shadow_state(stored: ShadowModel | None) -> ShadowState:
    return ShadowState.ABSENT if stored is None else stored.state
