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

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import AgentConfig
from agent.deployment import RECOVERY, Event, Recovery, State, advance
from agent.faults import pause_point
from agent.model_host import ModelHost
from agent.runtimes import LoadedModel, RuntimeOptions, load_model
from agent.state_store import ActiveModel, InProgress, StateStore
from agent.transfer import Cancelled, ChunkFetcher
from shared.bundle import BundleLimits, extract_bundle, verify_bundle
from shared.errors import (
    BundleError,
    DirectiveError,
    EdgefleetError,
    IncompatibleBundleError,
    InferenceError,
    MessageError,
    TrustError,
)
from shared.manifest import Manifest
from shared.messages import (
    DESIRED_PAYLOAD_TYPE,
    DeploymentEvent,
    DesiredState,
    ModelDirective,
    ModelReport,
    Outcome,
    ReportedState,
    verify_desired_state,
)
from shared.signing import key_id, open_envelope, public_key_from_hex
from shared.topics import Leaf

log = logging.getLogger(__name__)
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
    ) -> None:
        self._config = config
        self._store = store
        self._host = host
        self._fetcher = fetcher
        self._publish = publish
        self._clock = clock
        self._publisher_keys = _keyring(config.trust.publisher_keys)
        self._online_keys = _keyring(config.trust.online_keys)
        self._wake = threading.Event()
        self._cancel = threading.Event()
        self._offer_lock = threading.Lock()
        self._models_dir = config.data_dir / "models"
        self._limits = BundleLimits(max_bundle_bytes=config.transfer.max_bundle_bytes)
        self._runtime_options = RuntimeOptions(
            intra_op_threads=config.runtime.intra_op_threads, providers=config.runtime.onnx_providers
        )
        self.idle = threading.Event()  # set while nothing is left to do (tests and the demo wait on it)

    # -- paho thread -------------------------------------------------------------------------

    def offer_desired(self, envelope: bytes) -> None:
        """Verify a received desired state and, if it is new, accept it and wake the worker."""
        with self._offer_lock:
            state = self._store.state
            try:
                desired = verify_desired_state(
                    envelope,
                    trusted_keys=self._online_keys,
                    device_id=self._config.device_id,
                    last_sequence=state.accepted_sequence,
                    now=self._clock(),
                )
            except DirectiveError as exc:
                if _is_duplicate(envelope, state.desired_envelope):
                    return  # the retained copy of what we already accepted
                log.warning("desired state refused: %s", exc)
                return
            except (TrustError, MessageError) as exc:
                log.warning("desired state refused: %s", exc)
                return
            self._store.update(desired_envelope=envelope.decode(), accepted_sequence=desired.sequence, failed={})
            log.info(
                "accepted desired state %d: %s",
                desired.sequence,
                ", ".join(f"{m.name}:{m.version}" for m in desired.models) or "no models",
            )
            progress = self._store.state.in_progress
            if progress is not None and not any(m.bundle_digest == progress.bundle_digest for m in desired.models):
                self._cancel.set()
            self.idle.clear()
            self._wake.set()

    def wake(self) -> None:
        """Wake the worker now (shutdown, tests)."""
        self._wake.set()

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
        progress = self._store.state.in_progress
        if progress is None:
            return
        action = RECOVERY[State(progress.state)]
        log.warning(
            "recovering deployment %s:%s from state %s: %s", progress.name, progress.version, progress.state, action
        )
        if action is Recovery.ROLL_BACK:
            outcome = self._roll_back(progress)
            self._finish(progress, outcome, "agent_restarted", f"agent restarted during {progress.state}")
            self._store.update(failed={**self._store.state.failed, progress.name: progress.bundle_digest})
        else:
            self._store.update(in_progress=None)

    # -- worker thread -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Reconcile whenever woken, until ``stop`` is set."""
        self._wake.set()
        while not stop.is_set():
            self._wake.wait(timeout=1.0)
            if stop.is_set():
                break
            if not self._wake.is_set():
                continue
            self._wake.clear()
            self._cancel.clear()
            retry = self.reconcile_once()
            if retry:
                stop.wait(RETRY_DELAY_S)
                self._wake.set()
            elif not self._wake.is_set():
                self.idle.set()

    def reconcile_once(self) -> bool:
        """Bring active models in line with the accepted desired state; True if a retry is due."""
        state = self._store.state
        if state.desired_envelope is None:
            self.publish_reported()
            return False
        desired = DesiredState.decode(
            open_envelope(
                state.desired_envelope.encode(), payload_type=DESIRED_PAYLOAD_TYPE, trusted_keys=self._online_keys
            )
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
        if not retry and not self._wake.is_set():
            self._store.update(applied_sequence=desired.sequence)
        self.publish_reported()
        return retry

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
            )
            model = self._activate(new)
            progress = self._step(progress, Event.ACTIVATED)  # -> HEALTH_CHECKING
            self._health_check(model)
            progress = self._step(progress, Event.HEALTHY)  # -> DONE
        except _Failed as failure:
            return self._fail(progress, failure)
        if previous is not None and previous.slot != new.slot:
            self._prune_slots(directive.name, keep={new.slot, previous.slot})
        self._finish(progress, Outcome.SUCCEEDED)
        return False

    def _step(self, progress: InProgress, event: Event) -> InProgress:
        step = advance(State(progress.state), event)
        progress = InProgress(**{**_fields(progress), "state": step.state.value})
        # Persisted before the step runs: this is what recovery reads after a crash.
        self._store.update(in_progress=progress)
        pause_point(progress.state)
        return progress

    def _download(self, directive: ModelDirective) -> Path:
        try:
            return self._fetcher.fetch(directive.bundle_digest, directive.bundle_size, self._cancel)
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
                trusted_keys=self._publisher_keys,
                threshold=self._config.trust.publisher_threshold,
                limits=self._limits,
            )
            if (manifest.name, manifest.version, manifest.runtime) != (
                directive.name,
                directive.version,
                directive.runtime,
            ):
                raise IncompatibleBundleError(
                    f"bundle is {manifest.name}:{manifest.version} ({manifest.runtime}), the desired state names "
                    f"{directive.name}:{directive.version} ({directive.runtime})"
                )
            arches = manifest.compatibility.architectures
            if arches and platform.machine() not in arches:
                raise IncompatibleBundleError(f"bundle is for {list(arches)}, this device is {platform.machine()}")
            return manifest
        except (TrustError, BundleError, MessageError) as exc:
            bundle.unlink(missing_ok=True)  # never keep what failed verification
            raise _Failed(Event.REJECT, exc) from exc
        except OSError as exc:
            raise _Failed(Event.FAIL, exc) from exc

    def _stage(self, bundle: Path, directive: ModelDirective) -> Path:
        slot = self._models_dir / directive.name / f"{directive.version}-{directive.bundle_digest[7:19]}"
        if slot.exists():
            return slot  # staged before (e.g. a rollback target): extraction renames atomically, so it is complete
        try:
            extract_bundle(
                bundle,
                slot,
                trusted_keys=self._publisher_keys,
                threshold=self._config.trust.publisher_threshold,
                limits=self._limits,
            )
        except (TrustError, BundleError) as exc:
            raise _Failed(Event.REJECT, exc) from exc
        except OSError as exc:  # disk full, permissions: nothing changed
            raise _Failed(Event.FAIL, exc) from exc
        bundle.unlink(missing_ok=True)  # the slot holds the verified files now
        return slot

    def _load(self, active: ActiveModel) -> LoadedModel:
        path = self._models_dir / active.name / active.slot / active.model_file
        return load_model(active.runtime, path, name=active.name, version=active.version, options=self._runtime_options)

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

    def _health_check(self, model: LoadedModel) -> None:
        """A warm-up inference on zeros of the declared input shapes, within the time budget."""
        inputs = {
            spec.name: np.zeros([1 if d == -1 else d for d in spec.shape], dtype=spec.numpy_dtype)
            for spec in model.inputs
        }
        started = time.monotonic()
        try:
            outputs = model.predict(inputs)
        except (InferenceError, EdgefleetError) as exc:
            raise _Failed(Event.FAIL, exc) from exc
        elapsed = time.monotonic() - started
        if elapsed > self._config.health_check_timeout_s:
            raise _Failed(Event.FAIL, InferenceError(f"warm-up took {elapsed:.1f} s, over the budget"))
        if set(outputs) != {spec.name for spec in model.outputs}:
            raise _Failed(Event.FAIL, InferenceError(f"outputs {sorted(outputs)} do not match the signature"))

    def _fail(self, progress: InProgress, failure: _Failed) -> bool:
        cause = failure.cause
        code = cause.code if isinstance(cause, EdgefleetError) else type(cause).__name__
        log.warning("deployment %s:%s failed in %s: %s", progress.name, progress.version, progress.state, cause)
        step = advance(State(progress.state), failure.event)
        progress = InProgress(**{**_fields(progress), "state": step.state.value})
        if step.state is State.ROLLING_BACK:
            self._store.update(in_progress=progress)
            pause_point(progress.state)
            outcome = self._roll_back(progress)
        else:
            assert step.outcome is not None
            outcome = step.outcome
        retryable = failure.event is Event.FAIL and isinstance(cause, EdgefleetError) and cause.retryable
        if failure.event is not Event.SUPERSEDE and not retryable:
            self._store.update(failed={**self._store.state.failed, progress.name: progress.bundle_digest})
        self._finish(progress, outcome, code, str(cause))
        return retryable

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
            return Outcome.FAILED_UNABLE_TO_ROLL_BACK
        active = {k: v for k, v in self._store.state.active.items() if k != progress.name}
        if previous is not None:
            active[progress.name] = previous
        self._store.update(active=active)
        old = self._host.swap(progress.name, model)
        if old is not None:
            self._host.retire(old)
        return Outcome.FAILED_ROLLED_BACK

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
        slots = sorted(
            (p for p in directory.iterdir() if p.is_dir() and p.name not in keep), key=lambda p: p.stat().st_mtime
        )
        for slot in slots[: max(0, len(slots) + len(keep) - self._config.slots_kept_per_model)]:
            shutil.rmtree(slot, ignore_errors=True)

    # -- reporting ---------------------------------------------------------------------------

    def reported_state(self) -> ReportedState:
        """What this device runs now."""
        state = self._store.state
        models = tuple(
            ModelReport(
                name=a.name,
                version=a.version,
                bundle_digest=a.bundle_digest,
                runtime=a.runtime,
                state="serving" if self._host.get(a.name, a.version) is not None else "failed",
            )
            for a in state.active.values()
        )
        return ReportedState(
            device_id=self._config.device_id,
            ts=self._clock(),
            applied_sequence=state.applied_sequence,
            models=models,
            agent={"version": _agent_version(), "arch": platform.machine(), "python": platform.python_version()},
        )

    def publish_reported(self) -> None:
        """Publish the reported state (retained)."""
        self._publish(Leaf.REPORTED, self.reported_state().encode(), True)


def _keyring(hex_keys: tuple[str, ...]) -> dict[str, Ed25519PublicKey]:
    keys = [public_key_from_hex(k) for k in hex_keys]
    return {key_id(k): k for k in keys}


def _fields(progress: InProgress) -> dict[str, object]:
    return {f.name: getattr(progress, f.name) for f in dataclasses.fields(progress)}


def _is_duplicate(envelope: bytes, accepted: str | None) -> bool:
    return accepted is not None and envelope == accepted.encode()


def _agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0+unknown"
