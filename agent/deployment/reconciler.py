"""Reconciling the device towards its signed desired state, one deployment at a time.

The paho thread hands every ``desired`` message to :meth:`Reconciler.offer_desired`, which
verifies it (signature, device, sequence, expiry), persists the accepted envelope, and wakes the
worker. The worker (:meth:`Reconciler.run`) compares desired with active models and drives each
needed deployment through :mod:`agent.deployment`'s state machine, persisting the state before
each step. On boot :meth:`recover` applies :data:`agent.deployment.RECOVERY` to a deployment that
a crash interrupted, and the stored envelope is reconciled again: no replay from the broker is
needed, and a retained desired state that was already accepted is recognised as a duplicate.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.deployment.compatibility import (
    check_installable,
    device_accelerators,
    device_machine,
    preferred_providers,
    raised_floor,
)
from edgefleet.agent.deployment.faults import pause_point
from edgefleet.agent.deployment.health_check import run_health_check, sample_inputs
from edgefleet.agent.deployment.machine import RECOVERY, Event, Recovery, State, advance
from edgefleet.agent.deployment.state_store import ActiveModel, InProgress, ShadowModel, StateStore
from edgefleet.agent.deployment.trust_store import TrustStore
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.serving.shadow import ShadowRunner
from edgefleet.agent.transfer.http import HttpFetcher
from edgefleet.agent.transfer.mqtt_chunks import Cancelled, ChunkFetcher
from edgefleet.shared.bundle.format import BundleLimits, extract_bundle, verify_bundle
from edgefleet.shared.bundle.manifest import Manifest
from edgefleet.shared.errors import (
    BundleError,
    EdgefleetError,
    IncompatibleBundleError,
    MessageError,
    SignatureError,
    TransferError,
    TrustError,
)
from edgefleet.shared.runtimes import LoadedModel, RuntimeOptions, load_model
from edgefleet.shared.trust.signing import stored_envelope_payload
from edgefleet.shared.wire.messages import (
    DESIRED_PAYLOAD_TYPE,
    DeploymentEvent,
    DesiredState,
    ModelDirective,
    ModelReport,
    Outcome,
    RejectionEvent,
    ReportedState,
    ShadowReport,
    verify_desired_state,
)
from edgefleet.shared.wire.topics import Leaf

log = logging.getLogger(__name__)
_UNPROVEN = (State.ACTIVATING, State.HEALTH_CHECKING, State.ROLLING_BACK)
RETRY_DELAY_S = 5.0  # after a retryable failure (transfer), try the same desired state again


class _Failed(Exception):
    """Internal: a step failed; carries the state-machine event and the cause."""

    def __init__(self, event: Event, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.event = event
        self.cause = cause


class Reconciler:
    """Drives the device from its active models to the desired ones."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        host: ModelHost,
        fetcher: ChunkFetcher,
        publish: Callable[[Leaf, bytes, bool], object],
        clock: Callable[[], float] = time.time,
        trust: TrustStore | None = None,
        http_fetcher: HttpFetcher | None = None,
        on_work: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        # Called (from any thread) whenever work arrives, so that an owner that drives many agents
        # from a small pool can schedule :meth:`step`; the one-agent :meth:`run` loop needs none.
        self._on_work = on_work
        self._store = store
        self._host = host
        self._fetcher = fetcher
        self._http_fetcher = http_fetcher  # None: bundles come only over MQTT
        self._publish = publish
        self._clock = clock
        self._trust = trust if trust is not None else TrustStore(config.trust, config.data_dir, clock)
        self._deferred_envelope: bytes | None = None  # signed under a keyring version we have not seen yet
        self._wake = threading.Event()
        self._cancel = threading.Event()
        self._offer_lock = threading.Lock()
        self._models_dir = config.data_dir / "models"
        self._limits = BundleLimits(max_bundle_bytes=config.transfer.max_bundle_bytes)
        self._runtime_options = RuntimeOptions(
            intra_op_threads=config.runtime.intra_op_threads, providers=config.runtime.onnx_providers
        )
        self._shadow_limits = config.shadow
        self._shadow_fetching: str | None = None  # digest of the shadow bundle being downloaded
        self._shadows_recovered = False
        self.idle = threading.Event()  # set while nothing is left to do (tests and the demo wait on it)

    # -- paho thread -------------------------------------------------------------------------

    def offer_desired(self, envelope: bytes) -> None:
        """Verify a received desired state and, if it is new, accept it and wake the worker."""
        with self._offer_lock:
            state = self._store.state
            if _is_duplicate(envelope, state.desired_envelope):
                return  # the retained copy of what we already accepted
            try:
                desired = verify_desired_state(
                    envelope,
                    trusted_keys=self._trust.online_keys,
                    device_id=self._config.device_id,
                    last_sequence=state.accepted_sequence,
                    now=self._clock(),
                )
            except (TrustError, MessageError) as exc:
                if isinstance(exc, SignatureError) and self._trust.keyring_version:
                    # Perhaps signed by a rotated-in online key: retry once the keyring catches up.
                    self._deferred_envelope = envelope
                self._reject("desired", exc)
                return
            self._deferred_envelope = None
            self._store.update(desired_envelope=envelope.decode(), accepted_sequence=desired.sequence, failed={})
            log.info(
                "accepted desired state %d: %s",
                desired.sequence,
                ", ".join(f"{m.name}:{m.version}" for m in desired.models) or "no models",
            )
            progress = self._store.state.in_progress
            if progress is not None and not any(m.bundle_digest == progress.bundle_digest for m in desired.models):
                self._cancel.set()
            shadow_digests = {m.shadow.bundle_digest for m in desired.models if m.shadow is not None}
            if self._shadow_fetching is not None and self._shadow_fetching not in shadow_digests:
                self._cancel.set()
            self.wake()

    def offer_keyring(self, data: bytes) -> None:
        """A keyring version arrived (paho thread): accept it in order, then retry a deferred state."""
        try:
            changed = self._trust.offer_keyring(data)
        except EdgefleetError as exc:
            self._reject("keyring", exc)
            return
        if changed and self._deferred_envelope is not None:
            self.offer_desired(self._deferred_envelope)

    def _reject(self, subject: str, exc: EdgefleetError) -> None:
        log.warning("%s refused: %s", subject, exc)
        event = RejectionEvent(
            event_id=uuid.uuid4().hex,
            device_id=self._config.device_id,
            ts=self._clock(),
            subject=subject,
            code=exc.code,
            message=str(exc)[:2000],
        )
        self._publish(Leaf.EVENTS, event.encode(), False)

    def wake(self) -> None:
        """Mark work as due and tell the owner (new desired state, shutdown, tests)."""
        self.idle.clear()
        self._wake.set()
        if self._on_work is not None:
            self._on_work()

    # -- boot --------------------------------------------------------------------------------

    def load_active(self) -> None:
        """Load every active model from its slot (agent start); report a model that fails."""
        for active in self._store.state.active.values():
            try:
                self._host.swap(active.name, self._load(active))
            except EdgefleetError as exc:
                log.error("could not load active model %s:%s: %s", active.name, active.version, exc)

    def recover(self) -> None:
        """Finish a deployment a crash interrupted, according to the recovery table."""
        # A kill mid-extraction leaves ``<slot>.unpacking``; a restart may never redo that unpack
        # (the desired state can move on meanwhile), so it is swept here rather than on retry.
        for debris in self._models_dir.glob("*/*.unpacking"):
            shutil.rmtree(debris, ignore_errors=True)
        progress = self._store.state.in_progress
        if progress is None:
            return
        action = RECOVERY[State(progress.state)]
        log.warning(
            "recovering deployment %s:%s from state %s: %s", progress.name, progress.version, progress.state, action
        )
        if action is Recovery.ROLL_BACK:
            outcome = self._roll_back(progress)
            # Failed first: a crash before the report then repeats the (idempotent) rollback and
            # reports; the other order could retry the bundle under the same desired state.
            self._store.update(failed={**self._store.state.failed, progress.name: progress.bundle_digest})
            self._finish(progress, outcome, "agent_restarted", f"agent restarted during {progress.state}")
        elif action is Recovery.NOTHING and self._is_active(progress):
            # DONE is persisted only on the way to success: the report is what may be missing.
            self._finish(progress, Outcome.SUCCEEDED)
        else:
            self._store.update(in_progress=None)

    # -- worker thread -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Reconcile whenever woken, until ``stop`` is set (one thread for one agent)."""
        self._wake.set()
        while not stop.is_set():
            self._wake.wait(timeout=1.0)
            if stop.is_set():
                break
            delay = self.step()
            if delay:
                stop.wait(delay)

    def step(self) -> float | None:
        """Do the work that is due, if any; return seconds until the next step is due, or None.

        None means idle until woken (see ``on_work``). Never raises for a failed pass: a pass that
        could not finish (disk full, say) asks to be stepped again after the retry delay.
        """
        if not self._wake.is_set():
            return None
        self._wake.clear()
        self._cancel.clear()
        try:
            retry = self.reconcile_once()
        except (EdgefleetError, OSError):
            # E.g. state.json cannot be written (disk full): keep serving, try again later.
            log.exception("reconcile failed; retrying in %.0f s", RETRY_DELAY_S)
            retry = True
        if retry:
            self._wake.set()  # due again once the delay has passed
            return RETRY_DELAY_S
        if self._wake.is_set():
            return 0.0
        self.idle.set()
        return None

    def reconcile_once(self) -> bool:
        """Bring active models in line with the accepted desired state; True if a retry is due."""
        state = self._store.state
        if state.desired_envelope is None:
            self.publish_reported()
            return False
        desired = DesiredState.decode(
            stored_envelope_payload(state.desired_envelope.encode(), payload_type=DESIRED_PAYLOAD_TYPE)
        )
        retry = False
        for directive in desired.models:
            state = self._store.state
            active = state.active.get(directive.name)
            if active is not None and active.bundle_digest == directive.bundle_digest:
                continue
            if state.failed.get(directive.name) == directive.bundle_digest:
                continue  # already failed under this desired state: wait for a new one
            if self._wake.is_set():
                return False  # a newer desired state arrived: start over with it
            retry |= self._deploy(directive, desired.sequence)
        for name in set(self._store.state.active) - {m.name for m in desired.models}:
            self._remove(name)
        retry |= self._reconcile_shadows(desired)
        if not retry and not self._wake.is_set():
            self._store.update(applied_sequence=desired.sequence)
            self._collect_downloads(desired)
        self.publish_reported()
        return retry

    def _collect_downloads(self, desired: DesiredState) -> None:
        """Delete partial or complete downloads of bundles no longer desired (superseded transfers)."""
        keep = {m.bundle_digest.removeprefix("sha256:") for m in desired.models}
        keep |= {m.shadow.bundle_digest.removeprefix("sha256:") for m in desired.models if m.shadow is not None}
        downloads = self._config.data_dir / "downloads"
        if not downloads.is_dir():
            return
        for path in downloads.iterdir():
            if path.name.split(".", 1)[0] not in keep:
                path.unlink(missing_ok=True)

    # -- one deployment ----------------------------------------------------------------------

    def _deploy(self, directive: ModelDirective, sequence: int) -> bool:
        """Run one deployment to its end; return True if it failed in a retryable way."""
        previous = self._store.state.active.get(directive.name)
        progress = InProgress(
            sequence=sequence,
            name=directive.name,
            version=directive.version,
            bundle_digest=directive.bundle_digest,
            bundle_size=directive.bundle_size,
            runtime=directive.runtime,
            state=State.PENDING.value,
            started_at=self._clock(),
            previous=previous,
        )
        log.info("deploying %s:%s (%s)", directive.name, directive.version, directive.bundle_digest[:19])
        try:
            progress = self._step(progress, Event.START)  # -> DOWNLOADING
            bundle = self._download(directive)
            progress = self._step(progress, Event.DOWNLOADED)  # -> VERIFYING
            manifest = self._verify(bundle, directive)
            progress = self._step(progress, Event.VERIFIED)  # -> STAGING
            slot = self._stage(bundle, directive)
            progress = self._step(progress, Event.STAGED)  # -> ACTIVATING
            new = ActiveModel(
                name=directive.name,
                version=directive.version,
                bundle_digest=directive.bundle_digest,
                runtime=manifest.runtime,
                slot=slot.name,
                model_file=manifest.model_file,
                accelerators=manifest.compatibility.accelerators,
            )
            model = self._activate(new)
            progress = self._step(progress, Event.ACTIVATED)  # -> HEALTH_CHECKING
            self._health_check(model, slot, manifest)
            progress = self._step(progress, Event.HEALTHY)  # -> DONE
        except _Failed as failure:
            return self._fail(progress, failure)
        floor = raised_floor(self._store.state.floors.get(directive.name), manifest)
        if floor is not None:
            self._store.update(floors={**self._store.state.floors, directive.name: floor})
        if previous is not None and previous.slot != new.slot:
            self._prune_slots(directive.name, keep={new.slot, previous.slot})
        self._finish(progress, Outcome.SUCCEEDED)
        return False

    def _step(self, progress: InProgress, event: Event) -> InProgress:
        step = advance(State(progress.state), event)
        progress = dataclasses.replace(progress, state=step.state.value)
        # Persisted before the step runs: this is what recovery reads after a crash.
        self._store.update(in_progress=progress)
        pause_point(progress.state)
        return progress

    def _download(self, directive: ModelDirective) -> Path:
        """HTTP(S) when the directive has URLs or the agent prefers its control plane's; else, or
        when every HTTP source fails, MQTT chunks (both resume from the same partial download)."""
        digest, size = directive.bundle_digest, directive.bundle_size
        try:
            sources = self._http_fetcher.sources(digest, directive.urls) if self._http_fetcher else ()
            if sources:
                assert self._http_fetcher is not None
                try:
                    return self._http_fetcher.fetch(digest, size, sources, self._cancel)
                except TransferError as exc:
                    log.warning("HTTP download of %s failed, falling back to MQTT chunks: %s", digest[:19], exc)
            return self._fetcher.fetch(digest, size, self._cancel)
        except Cancelled as exc:
            raise _Failed(Event.SUPERSEDE, exc) from exc
        except BundleError as exc:
            raise _Failed(Event.REJECT, exc) from exc
        except (EdgefleetError, OSError) as exc:
            raise _Failed(Event.FAIL, exc) from exc

    def _verify(self, bundle: Path, directive: ModelDirective) -> Manifest:
        try:
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
        except (TrustError, BundleError, MessageError) as exc:
            bundle.unlink(missing_ok=True)  # never keep what failed verification
            raise _Failed(Event.REJECT, exc) from exc
        except OSError as exc:
            raise _Failed(Event.FAIL, exc) from exc

    def _stage(self, bundle: Path, directive: ModelDirective) -> Path:
        slot = self._models_dir / directive.name / _slot_name(directive.version, directive.bundle_digest)
        if slot.exists():
            bundle.unlink(missing_ok=True)  # e.g. killed after the unpack, before STAGED was persisted
            return slot  # staged before (e.g. a rollback target): extraction renames atomically, so it is complete
        try:
            extract_bundle(
                bundle,
                slot,
                trusted_keys=self._trust.publisher_keys,
                threshold=self._trust.publisher_threshold,
                limits=self._limits,
            )
        except (TrustError, BundleError) as exc:
            raise _Failed(Event.REJECT, exc) from exc
        except OSError as exc:  # disk full, permissions: nothing changed
            # Give the space back (a full disk must not stay full because of us): a new desired
            # state downloads again rather than finding no room to deploy anything.
            bundle.unlink(missing_ok=True)
            raise _Failed(Event.FAIL, exc) from exc
        bundle.unlink(missing_ok=True)  # the slot holds the verified files now
        return slot

    def _load(self, active: ActiveModel) -> LoadedModel:
        path = self._models_dir / active.name / active.slot / active.model_file
        providers = preferred_providers(active.accelerators, self._config.runtime.onnx_providers)
        options = dataclasses.replace(self._runtime_options, providers=providers)
        return load_model(active.runtime, path, name=active.name, version=active.version, options=options)

    def _activate(self, new: ActiveModel) -> LoadedModel:
        try:
            model = self._load(new)
        except (EdgefleetError, OSError) as exc:
            raise _Failed(Event.FAIL, exc) from exc
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
        try:
            run_health_check(model, sample_inputs(model, slot, manifest), budget_s)
        except EdgefleetError as exc:
            raise _Failed(Event.FAIL, exc) from exc

    def _fail(self, progress: InProgress, failure: _Failed) -> bool:
        cause = failure.cause
        code = cause.code if isinstance(cause, EdgefleetError) else type(cause).__name__
        log.warning("deployment %s:%s failed in %s: %s", progress.name, progress.version, progress.state, cause)
        step = advance(State(progress.state), failure.event)
        progress = dataclasses.replace(progress, state=step.state.value)
        if step.state is State.ROLLING_BACK:
            self._store.update(in_progress=progress)
            pause_point(progress.state)
            outcome = self._roll_back(progress)
        else:
            assert step.outcome is not None
            outcome = step.outcome
        retryable = failure.event is Event.FAIL and isinstance(cause, EdgefleetError) and cause.retryable
        if retryable:
            # Not an outcome: the same desired state is tried again shortly, and the control plane
            # keeps the deployment pending until a final outcome arrives.
            self._store.update(in_progress=None)
            return True
        if failure.event is not Event.SUPERSEDE:
            self._store.update(failed={**self._store.state.failed, progress.name: progress.bundle_digest})
        self._finish(progress, outcome, code, str(cause))
        return False

    def _roll_back(self, progress: InProgress) -> Outcome:
        previous = progress.previous
        try:
            model = self._load(previous) if previous is not None else None
        except (EdgefleetError, OSError) as exc:
            log.error("rollback of %s to %s failed: %s", progress.name, previous, exc)
            active = {k: v for k, v in self._store.state.active.items() if k != progress.name}
            self._store.update(active=active)
            old = self._host.swap(progress.name, None)
            if old is not None:
                self._host.retire(old)
            self._discard_failed_slot(progress)
            return Outcome.FAILED_UNABLE_TO_ROLL_BACK
        active = {k: v for k, v in self._store.state.active.items() if k != progress.name}
        if previous is not None:
            active[progress.name] = previous
        self._store.update(active=active)
        old = self._host.swap(progress.name, model)
        if old is not None:
            self._host.retire(old)
        self._discard_failed_slot(progress)
        return Outcome.FAILED_ROLLED_BACK

    def _discard_failed_slot(self, progress: InProgress) -> None:
        """Remove the slot of a deployment that was rolled back: nothing serves it or rolls back to it."""
        slot = _slot_name(progress.version, progress.bundle_digest)
        in_use = {s.slot for s in self._store.state.shadows.values() if s.name == progress.name}
        if progress.previous is not None:
            in_use.add(progress.previous.slot)
        if slot not in in_use:  # e.g. a promoted shadow's slot: the shadow still runs from it
            shutil.rmtree(self._models_dir / progress.name / slot, ignore_errors=True)

    def _is_active(self, progress: InProgress) -> bool:
        active = self._store.state.active.get(progress.name)
        return active is not None and active.bundle_digest == progress.bundle_digest

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
            message=message[:2000],
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

    # -- shadow candidates -------------------------------------------------------------------
    #
    # A shadow reuses the deployment's fetch -> verify -> stage steps, but never activates:
    # it is loaded beside the serving model, health-checked, and attached to the model host,
    # which mirrors sampled requests to it (agent.shadow). Its state is persisted as "loading"
    # before each load, so a load that crashes the agent is marked failed on the next boot
    # instead of crashing it again; a failure is not retried under the same desired state.

    def _reconcile_shadows(self, desired: DesiredState) -> bool:
        """Unload shadows no longer desired, then deploy or load the desired ones; True to retry."""
        if not self._shadows_recovered:
            self._recover_shadows()
        wanted = {
            m.name: m
            for m in desired.models
            # A shadow of the version now serving is a promotion: nothing left to compare.
            if m.shadow is not None and m.shadow.bundle_digest != m.bundle_digest and m.shadow.version != m.version
        }
        for name, stored in list(self._store.state.shadows.items()):
            directive = wanted.get(name)
            if directive is None or directive.shadow is None or directive.shadow.bundle_digest != stored.bundle_digest:
                self._unload_shadow(name)
        retry = False
        for name, directive in wanted.items():
            if self._wake.is_set():
                return False  # a newer desired state arrived: start over with it
            if self._host.get(name) is None:
                continue  # nothing serving to compare with (yet)
            retry |= self._ensure_shadow(directive, desired.sequence)
        return retry

    def _recover_shadows(self) -> None:
        """First pass after boot: a shadow still "loading" was being loaded when the agent died."""
        self._shadows_recovered = True
        for entry in self._store.state.shadows.values():
            if entry.state == "loading":
                log.error("shadow %s:%s was loading when the agent stopped", entry.name, entry.version)
                self._put_shadow(
                    dataclasses.replace(
                        entry,
                        state="failed",
                        message="the agent stopped while loading this shadow; not retried under this desired state",
                        failed_sequence=self._store.state.accepted_sequence,
                    )
                )

    def _ensure_shadow(self, directive: ModelDirective, sequence: int) -> bool:
        """Make the shadow of ``directive`` run: adjust, load from its slot, or deploy; True to retry."""
        shadow = directive.shadow
        assert shadow is not None
        stored = self._store.state.shadows.get(directive.name)
        runner = self._host.shadow(directive.name)
        if stored is not None and stored.bundle_digest == shadow.bundle_digest:
            if stored.state == "failed" and stored.failed_sequence == sequence:
                return False  # already failed under this desired state: wait for a new one
            if stored.state == "running" and runner is not None and runner.bundle_digest == stored.bundle_digest:
                if stored.sample_rate != shadow.sample_rate:
                    runner.set_sample_rate(shadow.sample_rate)
                    self._put_shadow(dataclasses.replace(stored, sample_rate=shadow.sample_rate))
                return False
            if stored.slot:  # staged before (agent restart, or a failure retried): no download
                entry = dataclasses.replace(stored, sample_rate=shadow.sample_rate, serving_version=directive.version)
                return self._start_shadow(entry, sequence)
        return self._deploy_shadow(directive, sequence)

    def _deploy_shadow(self, directive: ModelDirective, sequence: int) -> bool:
        """Fetch, verify and stage a shadow's bundle, then load it; True if a retry is due."""
        shadow = directive.shadow
        assert shadow is not None
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
            state="loading",
        )
        log.info("deploying shadow %s:%s beside %s", directive.name, shadow.version, directive.version)
        self._shadow_fetching = shadow.bundle_digest
        try:
            bundle = self._download(bundle_directive)
            manifest = self._verify(bundle, bundle_directive)
            slot = self._stage(bundle, bundle_directive)
        except _Failed as failure:
            return self._shadow_failed(entry, sequence, failure)
        finally:
            self._shadow_fetching = None
        entry = dataclasses.replace(entry, runtime=manifest.runtime, slot=slot.name, model_file=manifest.model_file)
        return self._start_shadow(entry, sequence)

    def _start_shadow(self, entry: ShadowModel, sequence: int) -> bool:
        """Load a staged shadow, check it against the serving model, and attach it."""
        serving = self._host.get(entry.name)
        if serving is None:
            return False
        entry = dataclasses.replace(entry, state="loading", message="", serving_version=serving.version)
        self._put_shadow(entry)  # persisted before the load: see _recover_shadows
        try:
            path = self._models_dir / entry.name / entry.slot / entry.model_file
            model = load_model(
                entry.runtime, path, name=entry.name, version=entry.version, options=self._runtime_options
            )
        except (EdgefleetError, OSError) as exc:
            return self._shadow_failed(entry, sequence, _Failed(Event.FAIL, exc))
        try:
            if model.inputs != serving.inputs:
                raise _Failed(
                    Event.REJECT,
                    IncompatibleBundleError(
                        f"shadow inputs {[s.to_dict() for s in model.inputs]} differ from the serving "
                        f"model's {[s.to_dict() for s in serving.inputs]}"
                    ),
                )
            self._health_check(model)
        except _Failed as failure:
            model.close()
            return self._shadow_failed(entry, sequence, failure)
        runner = ShadowRunner(
            model, bundle_digest=entry.bundle_digest, sample_rate=entry.sample_rate, limits=self._shadow_limits
        )
        try:
            old = self._host.attach_shadow(entry.name, runner)
        except KeyError:  # the serving model went away meanwhile: try again on the next pass
            runner.close()
            return False
        if old is not None:
            old.close()
        self._put_shadow(dataclasses.replace(entry, state="running"))
        log.info("shadow %s:%s running beside %s", entry.name, entry.version, serving.version)
        return False  # reconcile_once publishes the reported state with it

    def _shadow_failed(self, entry: ShadowModel, sequence: int, failure: _Failed) -> bool:
        """Record why a shadow could not run (reported as "failed"); True if a retry is due."""
        cause = failure.cause
        if failure.event is Event.SUPERSEDE:
            return False  # a newer desired state arrived during the download
        if failure.event is Event.FAIL and isinstance(cause, EdgefleetError) and cause.retryable:
            log.warning("shadow %s:%s: %s (will retry)", entry.name, entry.version, cause)
            return True
        code = cause.code if isinstance(cause, EdgefleetError) else type(cause).__name__
        log.warning("shadow %s:%s failed: %s", entry.name, entry.version, cause)
        self._put_shadow(
            dataclasses.replace(entry, state="failed", message=f"{code}: {cause}"[:2000], failed_sequence=sequence)
        )
        return False

    def _unload_shadow(self, name: str) -> None:
        """Stop and forget the shadow of ``name`` (its slot is left for pruning)."""
        runner = self._host.detach_shadow(name)
        if runner is not None:
            runner.close()
        shadows = dict(self._store.state.shadows)
        removed = shadows.pop(name, None)
        self._store.update(shadows=shadows)
        if removed is not None:
            log.info("shadow %s:%s unloaded (no longer desired)", name, removed.version)

    def _put_shadow(self, entry: ShadowModel) -> None:
        self._store.update(shadows={**self._store.state.shadows, entry.name: entry})

    def _shadow_report(self, entry: ShadowModel) -> ShadowReport | None:
        if entry.state == "failed":
            return ShadowReport(
                name=entry.name,
                serving_version=entry.serving_version,
                version=entry.version,
                bundle_digest=entry.bundle_digest,
                state="failed",
                message=entry.message,
            )
        runner = self._host.shadow(entry.name)
        if runner is None or runner.bundle_digest != entry.bundle_digest:
            return None  # not loaded yet
        return runner.report()

    # -- reporting ---------------------------------------------------------------------------

    def reported_state(self) -> ReportedState:
        """What this device runs now."""
        state = self._store.state
        progress = state.in_progress
        # A model between activation and a passed health check is live but unproven, and the
        # control plane takes "serving" as success: leave it out until the deployment ends.
        unproven = (
            (progress.name, progress.bundle_digest)
            if progress is not None and State(progress.state) in _UNPROVEN
            else None
        )
        models = tuple(
            ModelReport(
                name=a.name,
                version=a.version,
                bundle_digest=a.bundle_digest,
                runtime=a.runtime,
                state="serving" if self._host.get(a.name, a.version) is not None else "failed",
            )
            for a in state.active.values()
            if (a.name, a.bundle_digest) != unproven
        )
        shadows = tuple(r for r in map(self._shadow_report, state.shadows.values()) if r is not None)
        return ReportedState(
            device_id=self._config.device_id,
            ts=self._clock(),
            applied_sequence=state.applied_sequence,
            models=models,
            agent={"version": _agent_version(), "arch": platform.machine(), "python": platform.python_version()},
            shadows=shadows,
        )

    def publish_reported(self) -> None:
        """Publish the reported state (retained)."""
        self._publish(Leaf.REPORTED, self.reported_state().encode(), True)


def _slot_name(version: str, bundle_digest: str) -> str:
    """The directory under ``models/<name>/`` a bundle is unpacked into."""
    return f"{version}-{bundle_digest[7:19]}"


def _is_duplicate(envelope: bytes, accepted: str | None) -> bool:
    return accepted is not None and envelope == accepted.encode()


def _agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0+unknown"
