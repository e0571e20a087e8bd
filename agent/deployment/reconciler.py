"""Reconciling the device towards its signed desired state: a thin coordinator.

The paho thread hands every ``desired`` message to :meth:`Reconciler.offer_desired`, which verifies
it (signature, device, sequence, expiry), persists the accepted envelope, and wakes the worker. If
the envelope cannot be persisted (a full disk), it is held in memory, not lost: the broker has it
acknowledged and will not deliver it again. The condition is reported (an event, and ``health`` in
the reported state's agent info) and each step writes it again until the disk lets it; nothing is
deployed from a desired state that is not on disk. A pass (:meth:`Reconciler.reconcile_once`) asks
the pure planner (:mod:`edgefleet.agent.deployment.planner`) what is left to do, has the executor
(:mod:`edgefleet.agent.deployment.executor`) perform the first action, and plans again, until only
the closing actions remain; a newer desired state arriving meanwhile ends the pass so the next one
starts over with it. On boot :meth:`recover` performs the planner's recovery action for a
deployment a crash interrupted, and the stored envelope is reconciled again: no replay from the
broker is needed, and a retained desired state that was already accepted is recognised as a
duplicate.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.deployment.executor import Executor
from edgefleet.agent.deployment.failures import MAX_MESSAGE_CHARS
from edgefleet.agent.deployment.planner import (
    CLOSING,
    Facts,
    Key,
    RecoverShadows,
    ShadowRun,
    carried_failures,
    plan,
    plan_recovery,
)
from edgefleet.agent.deployment.reporting import reported_state
from edgefleet.agent.deployment.state_store import AgentState, StateStore
from edgefleet.agent.deployment.steps import BundleSteps
from edgefleet.agent.deployment.trust_store import TrustStore
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.transfer.http import HttpFetcher
from edgefleet.agent.transfer.mqtt_chunks import ChunkFetcher
from edgefleet.shared.errors import EdgefleetError, MessageError, SignatureError, TrustError
from edgefleet.shared.trust.signing import stored_envelope_payload
from edgefleet.shared.wire.messages import (
    DESIRED_PAYLOAD_TYPE,
    DesiredState,
    RejectionEvent,
    RejectionSubject,
    ReportedState,
    verify_desired_state,
)
from edgefleet.shared.wire.topics import Leaf

log = logging.getLogger(__name__)
_MAX_HEALTH_CHARS = 255  # an agent info value
HEALTH_OK = "ok"
STATE_NOT_PERSISTED = "state_not_persisted"  # the code of the event, and the prefix of the health value


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
        self._publish = publish
        self._clock = clock
        self._trust = trust if trust is not None else TrustStore(config.trust, config.data_dir, clock)
        self._deferred_envelope: bytes | None = None  # signed under a keyring version we have not seen yet
        self._wake = threading.Event()
        self._cancel = threading.Event()
        self._offer_lock = threading.Lock()
        steps = BundleSteps(config, self._trust, fetcher, http_fetcher, self._cancel)
        self._executor = Executor(config, store, host, steps, publish, self.publish_reported, clock)
        self._shadows_recovered = False  # the first pass after boot marks shadows left LOADING failed
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
                self._reject(RejectionSubject.DESIRED, exc)
                return
            self._deferred_envelope = None
            failed, interrupted = carried_failures(state, _stored_desired(state), desired)
            error = self._store.update_or_hold(
                desired_envelope=envelope.decode(),
                accepted_sequence=desired.sequence,
                failed=failed,
                interrupted=interrupted,
            )
            if error is not None:
                self._report_not_persisted(desired.sequence, error)
            log.info(
                "accepted desired state %d: %s",
                desired.sequence,
                ", ".join(f"{m.name}:{m.version}" for m in desired.models) or "no models",
            )
            progress = self._store.state.in_progress
            if progress is not None and not any(m.bundle_digest == progress.bundle_digest for m in desired.models):
                self._cancel.set()
            shadow_digests = {m.shadow.bundle_digest for m in desired.models if m.shadow is not None}
            fetching = self._executor.shadow_fetching
            if fetching is not None and fetching not in shadow_digests:
                self._cancel.set()
            self.wake()

    def offer_keyring(self, data: bytes, *, topic: str | None = None) -> None:
        """A keyring version arrived (network thread): accept it in order, then retry a deferred state.

        Args:
            data: The keyring bytes.
            topic: The topic they came on; a topic naming another version than the payload's is refused.
        """
        try:
            changed = self._trust.offer_keyring(data, topic=topic)
        except EdgefleetError as exc:
            self._reject(RejectionSubject.KEYRING, exc)
            return
        if changed and self._deferred_envelope is not None:
            self.offer_desired(self._deferred_envelope)

    def _reject(self, subject: RejectionSubject, exc: EdgefleetError) -> None:
        log.warning("%s refused: %s", subject, exc)
        self._publish_rejection(subject, exc.code, str(exc))

    def _report_not_persisted(self, sequence: int, error: OSError) -> None:
        message = f"desired state {sequence} accepted but not persisted ({error}); held in memory, retrying"
        log.error("%s", message)
        self._publish_rejection(RejectionSubject.DESIRED, STATE_NOT_PERSISTED, message)
        self.publish_reported()

    def _publish_rejection(self, subject: RejectionSubject, code: str, message: str) -> None:
        event = RejectionEvent(
            event_id=uuid.uuid4().hex,
            device_id=self._config.device_id,
            ts=self._clock(),
            subject=subject,
            code=code,
            message=message[:MAX_MESSAGE_CHARS],
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
                self._host.swap(active.name, self._executor.load(active))
            except EdgefleetError as exc:
                log.error("could not load active model %s:%s: %s", active.name, active.version, exc)

    def recover(self) -> None:
        """Sweep what a kill left behind, and finish a deployment it interrupted (the recovery table)."""
        for path in self._store.sweep_temp_files():
            log.warning("removed %s, left by an interrupted write", path.name)
        self._executor.sweep_unpacking()
        for action in plan_recovery(self._store.state, max_interrupted=self._config.max_interrupted_attempts_count):
            progress = action.progress
            log.warning(
                "recovering deployment %s:%s from state %s: %s",
                progress.name,
                progress.version,
                progress.state.value,
                type(action).__name__,
            )
            self._executor.perform(action)

    # -- worker thread -----------------------------------------------------------------------

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
            self._store.flush()  # a desired state held in memory is written before it is acted on
            retry = self.reconcile_once()
        except (EdgefleetError, OSError):
            # E.g. state.json cannot be written (disk full): keep serving, try again later.
            log.exception("reconcile failed; retrying in %.0f s", self._config.retry_delay_s)
            self.publish_reported()  # its health says why
            retry = True
        if retry:
            self._wake.set()  # due again once the delay has passed
            return self._config.retry_delay_s
        if self._wake.is_set():
            return 0.0
        self.idle.set()
        return None

    def reconcile_once(self) -> bool:
        """Bring active models in line with the accepted desired state; True if a retry is due."""
        desired = _stored_desired(self._store.state)
        if desired is None:
            self.publish_reported()
            return False
        attempted: set[Key] = set()
        retry = False
        while True:
            actions = plan(desired, self._store.state, self._facts(attempted, retry))
            if not actions:
                return False  # a newer desired state arrived: start over with it
            head = actions[0]
            if isinstance(head, CLOSING):
                for action in actions:
                    self._executor.perform(action)
                return retry
            retry |= self._executor.perform(head)
            attempted.add(head.key)
            if isinstance(head, RecoverShadows):
                self._shadows_recovered = True

    def _facts(self, attempted: set[Key], retry: bool) -> Facts:
        """What the planner needs to know that is not in the stored state."""
        return Facts(
            now=self._clock(),
            serving=frozenset(m.name for m in self._host.models()),
            shadow_runs={
                r.name: ShadowRun(bundle_digest=r.bundle_digest, sample_rate=r.sample_rate)
                for r in self._host.shadows()
            },
            attempted=frozenset(attempted),
            shadows_recovered=self._shadows_recovered,
            retry_due=retry,
            superseded=self._wake.is_set(),
        )

    # -- reporting ---------------------------------------------------------------------------

    def reported_state(self) -> ReportedState:
        """What this device runs now."""
        error = self._store.write_error
        health = HEALTH_OK if error is None else f"{STATE_NOT_PERSISTED}: {error}"[:_MAX_HEALTH_CHARS]
        return reported_state(self._config.device_id, self._store.state, self._host, now=self._clock(), health=health)

    def publish_reported(self) -> None:
        """Publish the reported state (retained)."""
        self._publish(Leaf.REPORTED, self.reported_state().encode(), True)


def _stored_desired(state: AgentState) -> DesiredState | None:
    """The accepted desired state (verified when it was accepted), if any."""
    if state.desired_envelope is None:
        return None
    return DesiredState.decode(
        stored_envelope_payload(state.desired_envelope.encode(), payload_type=DESIRED_PAYLOAD_TYPE)
    )


def _is_duplicate(envelope: bytes, accepted: str | None) -> bool:
    return accepted is not None and envelope == accepted.encode()
