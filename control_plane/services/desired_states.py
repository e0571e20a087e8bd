"""Desired states: what each device should run, signed with the online key and published retained.

A device's desired state is a pure function of database rows (:func:`desired_state_for`):
its :class:`~edgefleet.control_plane.db.tables.Assignment` rows joined to their
:class:`~edgefleet.control_plane.db.tables.ModelVersion` rows, a sequence number and a validity window.
:class:`DesiredStateService` does the I/O around it:

1. change the assignments (and record a :class:`~edgefleet.control_plane.db.tables.Deployment` per device),
2. bump each device's ``desired_sequence`` atomically in the database
   (``UPDATE ... RETURNING``, so two replicas can never sign the same number twice),
3. sign the new state and store the envelope with the device,
4. commit, and only then publish the envelope retained at QoS 1 on the device's ``desired``
   topic, so that nothing is ever published that the database does not know about.

A process-wide lock is held from step 1 to step 4: sequences are published in the order they
were issued, and the retained message is always the newest. (Across replicas the newest
sequence still wins on the device, which refuses anything not newer than what it accepted.)

What is published can still be lost: a broker killed before it saved its retained messages
forgets the newest states. :meth:`DesiredStateService.republish_all` (at start and on every
reconnect to the broker) and :meth:`DesiredStateService.republish_lagging` (periodically: online
devices that report an older sequence than their desired one) publish the stored envelopes again;
a device ignores a copy of a state it already accepted. A deployment made while the broker is
unreachable is accepted and *queued*: its state is committed, its message says so, and the
reconnect publishes it.

Signed states expire (``ttl_s``); :meth:`DesiredStateService.resign_expiring`, run by the
scheduler, re-signs any state past half its validity with a new sequence, so a device that
comes back after days still finds a valid one waiting.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import delete, update
from sqlmodel import Session, col, func, select

from edgefleet.control_plane.db.tables import (
    Assignment,
    Deployment,
    DeploymentStatus,
    Device,
    ModelVersion,
    Shadow,
    active_shadow,
    assigned_version,
    shadow_version,
)
from edgefleet.control_plane.messaging.publisher import MessagePublisher
from edgefleet.control_plane.services.publishing import manifest_of
from edgefleet.shared.errors import ConflictError, IncompatibleBundleError, MessageError, NotFoundError
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.messages import MAX_MODELS, DesiredState, ModelDirective, ShadowDirective
from edgefleet.shared.wire.topics import Leaf, device_topic

log = logging.getLogger(__name__)

QUEUED_MESSAGE = "queued: the MQTT broker is unreachable; the desired state is published when it is back"



def desired_state_for(
    device_id: str,
    sequence: int,
    models: Iterable[ModelVersion],
    *,
    retries: Mapping[str, int] | None = None,
    issued_at: float,
    ttl_s: float,
    shadows: Mapping[str, tuple[ModelVersion, float]] | None = None,
    bundle_base_url: str | None = None,
) -> DesiredState:
    """The desired state of a device, from the model versions assigned to it.

    Args:
        device_id: The device the state is bound to.
        sequence: Its sequence number (strictly greater than any the device accepted before).
        models: The :class:`ModelVersion` rows of the device's assignments, one per model name.
        retries: By model name, the directive's ``retry`` (see :class:`ModelDirective`); 0 if absent.
        issued_at: Unix seconds of signing.
        ttl_s: Seconds until it expires.
        shadows: By model name, the candidate :class:`ModelVersion` and sample rate of the
            device's shadow assignments; a candidate of the version already served is left out.
        bundle_base_url: The control plane's public URL; if given, each directive names
            ``{base}/api/v1/bundles/{digest}`` so agents can fetch over HTTP range requests
            (MQTT chunks stay the fallback). The digest, not the URL, is what is trusted.

    Returns:
        The unsigned state, models sorted by name (same rows, same bytes).
    """
    directives = sorted(
        (
            ModelDirective(
                name=m.name,
                version=m.version,
                bundle_digest=m.bundle_digest,
                bundle_size=m.bundle_size,
                runtime=m.runtime,
                retry=(retries or {}).get(m.name, 0),
                urls=_bundle_urls(bundle_base_url, m.bundle_digest),
                shadow=_shadow_directive(m, (shadows or {}).get(m.name), bundle_base_url),
            )
            for m in models
        ),
        key=lambda d: d.name,
    )
    return DesiredState(
        device_id=device_id,
        sequence=sequence,
        issued_at=issued_at,
        expires_at=issued_at + ttl_s,
        models=tuple(directives),
    )


def _bundle_urls(base_url: str | None, digest: str) -> tuple[str, ...]:
    return (f"{base_url.rstrip('/')}/api/v1/bundles/{digest}",) if base_url else ()


def _shadow_directive(
    serving: ModelVersion, shadow: tuple[ModelVersion, float] | None, bundle_base_url: str | None = None
) -> ShadowDirective | None:
    if shadow is None or shadow[0].version == serving.version:
        return None
    candidate, sample_rate = shadow
    return ShadowDirective(
        version=candidate.version,
        bundle_digest=candidate.bundle_digest,
        bundle_size=candidate.bundle_size,
        runtime=candidate.runtime,
        sample_rate=sample_rate,
        urls=_bundle_urls(bundle_base_url, candidate.bundle_digest),
    )


def is_past_half_life(issued_at: float, expires_at: float, now: float) -> bool:
    """Whether a state valid from ``issued_at`` to ``expires_at`` should be re-signed at ``now``."""
    return now >= (issued_at + expires_at) / 2


class DesiredStateService:
    """Changes assignments and publishes the resulting signed desired states."""

    def __init__(
        self,
        publisher: MessagePublisher,
        online_key: SigningKey,
        *,
        ttl_s: float,
        bundle_base_url: str | None = None,
        resign_batch_count: int = 500,
        broker_up: Callable[[], bool] = lambda: True,
    ) -> None:
        """Create the service.

        Args:
            publisher: Where envelopes go (the MQTT bridge, or a fake in tests).
            online_key: Signs every desired state.
            ttl_s: Validity of each signed state, in seconds.
            bundle_base_url: Public URL of the control plane, named in directives for HTTP download.
            resign_batch_count: Devices re-signed per transaction by :meth:`resign_expiring`.
            broker_up: Whether the publisher is connected to the broker now; deployments made
                while it is not are marked queued.
        """
        self._broker_up = broker_up
        self._resign_batch = resign_batch_count
        self._publisher = publisher
        self._key = online_key
        self._ttl_s = ttl_s
        self._bundle_base_url = bundle_base_url
        # Taken before the session's first statement: on SQLite every transaction holds the
        # database write lock, and taking ours second could deadlock against a waiting writer.
        self._lock = threading.Lock()

    def assign(
        self, session: Session, device_ids: Sequence[str], model_name: str, version: str, *, now: float
    ) -> list[Deployment]:
        """Make ``device_ids`` run ``model_name`` at ``version``.

        Upserts the assignments, marks older pending deployments of the model on those devices
        superseded, signs and publishes each device's new desired state, and records one pending
        :class:`Deployment` per device. Commits.

        Args:
            session: Database session with no transaction of its own in progress.
            device_ids: Target devices (duplicates are ignored).
            model_name: A published model's name.
            version: One of its published versions.
            now: Unix seconds (signing time).

        Returns:
            The new deployments, in the order of ``device_ids``.

        Raises:
            NotFoundError: The model version or a device does not exist.
            MessageError: No devices, or a device would get more than ``MAX_MODELS`` models.
        """
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise MessageError("a deployment needs at least one device")
        with self._transaction(session) as issued:
            model = session.exec(
                select(ModelVersion).where(ModelVersion.name == model_name, ModelVersion.version == version)
            ).first()
            if model is None:
                raise NotFoundError(f"model {model_name!r} version {version!r} is not published")
            _require_devices(session, ids)
            for device_id in ids:
                assignment = session.exec(
                    select(Assignment).where(Assignment.device_id == device_id, Assignment.model_name == model_name)
                ).first()
                if assignment is None:
                    session.add(Assignment(device_id=device_id, model_name=model_name, version=version))
                else:
                    assignment.version = version
                    session.add(assignment)
                _supersede_pending(session, device_id, model_name, now)
                _remove_shadows(session, [device_id], model_name, now, only_version=version)  # promoted
            session.flush()
            _check_model_counts(session, ids)
            issued += [self._issue(session, device_id, now, deploying=model_name) for device_id in ids]
            stamp = _utc(now)
            queued = "" if self._broker_up() else QUEUED_MESSAGE
            deployments = [
                Deployment(
                    device_id=state.device_id,
                    model_name=model_name,
                    version=version,
                    bundle_digest=model.bundle_digest,
                    sequence=state.sequence,
                    status=DeploymentStatus.PENDING,
                    message=queued,
                    created_at=stamp,
                    updated_at=stamp,
                )
                for state, _ in issued
            ]
            session.add_all(deployments)
        for deployment in deployments:
            session.refresh(deployment)
        log.info("assigned %s %s to %d device(s)", model_name, version, len(ids))
        return deployments

    def unassign(self, session: Session, device_ids: Sequence[str], model_name: str, *, now: float) -> list[str]:
        """Stop running ``model_name`` on ``device_ids``; commits.

        Devices without that model are left alone (no new desired state).

        Returns:
            The devices whose desired state changed.

        Raises:
            NotFoundError: A device does not exist.
        """
        ids = list(dict.fromkeys(device_ids))
        with self._transaction(session) as issued:
            _require_devices(session, ids)
            assignments = session.exec(
                select(Assignment).where(col(Assignment.device_id).in_(ids), Assignment.model_name == model_name)
            ).all()
            changed = [a.device_id for a in assignments]
            if not changed:
                session.rollback()
                return []
            for assignment in assignments:
                session.delete(assignment)
                _supersede_pending(session, assignment.device_id, model_name, now)
            _remove_shadows(session, changed, model_name, now)
            session.flush()
            issued += [self._issue(session, device_id, now) for device_id in changed]
        log.info("unassigned %s from %d device(s)", model_name, len(changed))
        return changed

    def set_shadow(
        self,
        session: Session,
        device_ids: Sequence[str],
        model_name: str,
        version: str,
        sample_rate: float,
        *,
        now: float,
    ) -> list[Shadow]:
        """Run ``version`` of ``model_name`` as a shadow beside the serving version on ``device_ids``.

        Replaces any shadow of that model on those devices, then signs and publishes each
        device's new desired state. Commits.

        Args:
            session: Database session with no transaction of its own in progress.
            device_ids: Target devices (duplicates are ignored); each must run ``model_name``.
            model_name: A published model's name.
            version: The candidate: a published version with the serving versions' inputs.
            sample_rate: Fraction of requests mirrored, in (0, 1].
            now: Unix seconds (signing time).

        Returns:
            The shadow assignments, in the order of ``device_ids``.

        Raises:
            MessageError: No devices, or a sample rate outside (0, 1].
            NotFoundError: The model version or a device does not exist.
            ConflictError: A device does not run the model, or already serves ``version``.
            IncompatibleBundleError: The candidate's inputs differ from a serving version's.
        """
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise MessageError("a shadow needs at least one device")
        if not (math.isfinite(sample_rate) and 0.0 < sample_rate <= 1.0):
            raise MessageError(f"sample_rate must be in (0, 1], got {sample_rate}")
        with self._transaction(session) as issued:
            candidate = _model_version(session, model_name, version)
            _require_devices(session, ids)
            assigned = session.exec(
                select(Assignment).where(col(Assignment.device_id).in_(ids), Assignment.model_name == model_name)
            ).all()
            serving = {a.device_id: a.version for a in assigned}
            not_running = [i for i in ids if i not in serving]
            if not_running:
                raise ConflictError(
                    f"device(s) {not_running[:10]} do not run model {model_name!r}: deploy it before shadowing"
                )
            serving_already = [i for i in ids if serving[i] == version]
            if serving_already:
                raise ConflictError(f"device(s) {serving_already[:10]} already serve {model_name!r} {version!r}")
            inputs = manifest_of(candidate).inputs
            for serving_version in sorted(set(serving.values())):
                served = manifest_of(_model_version(session, model_name, serving_version)).inputs
                if served != inputs:
                    raise IncompatibleBundleError(
                        f"{model_name!r} {version!r} takes {[t.to_dict() for t in inputs]}, but the serving "
                        f"version {serving_version!r} takes {[t.to_dict() for t in served]}: a shadow must take "
                        "the same inputs"
                    )
            # Replaced, not kept: the new row is the one the device will report.
            session.exec(delete(Shadow).where(col(Shadow.device_id).in_(ids), col(Shadow.model_name) == model_name))
            session.flush()
            rows = [
                Shadow(
                    device_id=device_id,
                    model_name=model_name,
                    version=version,
                    bundle_digest=candidate.bundle_digest,
                    sample_rate=sample_rate,
                    created_at=_utc(now),
                )
                for device_id in ids
            ]
            session.add_all(rows)
            session.flush()
            issued += [self._issue(session, device_id, now) for device_id in ids]
        for row in rows:
            session.refresh(row)
        log.info("shadowing %s %s (sample rate %g) on %d device(s)", model_name, version, sample_rate, len(ids))
        return rows

    def clear_shadow(self, session: Session, device_ids: Sequence[str], model_name: str, *, now: float) -> list[str]:
        """Stop the shadow of ``model_name`` on ``device_ids``; commits.

        Devices without such a shadow are left alone (no new desired state).

        Returns:
            The devices whose desired state changed.

        Raises:
            NotFoundError: A device does not exist.
        """
        ids = list(dict.fromkeys(device_ids))
        with self._transaction(session) as issued:
            _require_devices(session, ids)
            changed = list(
                session.exec(
                    select(Shadow.device_id).where(
                        col(Shadow.device_id).in_(ids), Shadow.model_name == model_name, active_shadow()
                    )
                ).all()
            )
            if not changed:
                session.rollback()
                return []
            _remove_shadows(session, changed, model_name, now)
            session.flush()
            issued += [self._issue(session, device_id, now) for device_id in changed]
        log.info("stopped the shadow of %s on %d device(s)", model_name, len(changed))
        return changed

    def resign_expiring(self, session: Session, *, now: float) -> list[str]:
        """Re-sign, with a new sequence, every desired state past half its validity; commits.

        Args:
            session: Database session with no transaction of its own in progress.
            now: Unix seconds.

        Returns:
            The devices whose state was re-signed.
        """
        done: list[str] = []
        while True:
            with self._transaction(session) as issued:
                # Each batch commits, and re-signed states move their midpoint into the
                # future, so this query never returns the same device twice.
                batch = session.exec(
                    select(Device.id)
                    .where(
                        Device.desired_sequence > 0,
                        col(Device.desired_issued_at).is_not(None),
                        (col(Device.desired_issued_at) + col(Device.desired_expires_at)) / 2 <= now,
                    )
                    .order_by(col(Device.id))
                    .limit(self._resign_batch)
                ).all()
                if not batch:
                    session.rollback()
                    break
                issued += [self._issue(session, device_id, now) for device_id in batch]
            done.extend(batch)
        if done:
            log.info("re-signed the desired state of %d device(s)", len(done))
        return done

    def rotate_online_key(self, session: Session, key: SigningKey, *, now: float) -> int:
        """Sign with ``key`` from now on and re-sign every device's desired state with it; commits.

        Call after the keyring version naming ``key`` is published: agents that see the
        re-signed state first hold it until their keyring catches up.

        Returns:
            How many desired states were re-signed.
        """
        with self._lock:
            self._key = key
        with self._transaction(session) as issued:
            ids = session.exec(select(Device.id).where(Device.desired_sequence > 0).order_by(col(Device.id))).all()
            issued += [self._issue(session, device_id, now) for device_id in ids]
        log.info("online key rotated; re-signed %d desired state(s)", len(issued))
        return len(issued)

    def republish_all(self, session: Session) -> int:
        """Publish every device's stored envelope again, unchanged (retained).

        For a broker that lost its retained messages (the in-memory amqtt fallback after a
        restart). Devices that already accepted a state ignore the identical copy.

        Returns:
            How many envelopes were published.
        """
        with self._lock:
            rows = session.exec(select(Device.id, Device.desired_envelope).where(Device.desired_envelope != "")).all()
            session.rollback()
            for device_id, envelope in rows:
                self._publisher.publish(device_topic(device_id, Leaf.DESIRED), envelope.encode(), retain=True)
        return len(rows)

    def republish_lagging(self, session: Session, *, now: float, grace_s: float) -> list[str]:
        """Publish the stored envelope again to online devices that report an older sequence than it.

        Reconciliation for a state the broker lost (or a device never received): only states
        signed at least ``grace_s`` ago count, so a deployment in progress is left alone.

        Returns:
            The devices whose state was published again.
        """
        with self._lock:
            rows = session.exec(
                select(Device.id, Device.desired_envelope).where(
                    col(Device.online).is_(True),
                    Device.desired_envelope != "",
                    col(Device.applied_sequence) < col(Device.desired_sequence),
                    col(Device.desired_issued_at) <= now - grace_s,
                )
            ).all()
            session.rollback()
            for device_id, envelope in rows:
                self._publisher.publish(device_topic(device_id, Leaf.DESIRED), envelope.encode(), retain=True)
        if rows:
            log.info("published the desired state again to %d device(s) whose reported sequence lags", len(rows))
        return [device_id for device_id, _ in rows]

    @contextmanager
    def _transaction(self, session: Session) -> Iterator[list[tuple[DesiredState, bytes]]]:
        """One change: under the publish lock, commit it (or roll it back on any error), then
        publish the desired states it issued, so publish order always follows sequence order."""
        with self._lock:
            issued: list[tuple[DesiredState, bytes]] = []
            try:
                yield issued
                session.commit()
            except BaseException:
                session.rollback()
                raise
            self._publish(issued)

    def _issue(
        self, session: Session, device_id: str, now: float, *, deploying: str | None = None
    ) -> tuple[DesiredState, bytes]:
        """Bump the sequence, compute, sign and store the desired state of one device (no commit).

        ``deploying`` names the model a new deployment is being recorded for (its row is added
        after this, once the sequence is known): its directive's ``retry`` counts that deployment.
        """
        sequence = session.exec(
            update(Device)
            .where(col(Device.id) == device_id)
            .values(desired_sequence=col(Device.desired_sequence) + 1)
            .returning(col(Device.desired_sequence))
        ).scalar_one()
        models = session.exec(
            select(ModelVersion)
            .join(Assignment, assigned_version())
            .where(Assignment.device_id == device_id)
        ).all()
        shadows = session.exec(
            select(ModelVersion, Shadow.sample_rate)
            .join(Shadow, shadow_version())
            .where(Shadow.device_id == device_id)
        ).all()
        # A directive's retry is the number of deployments of its model on this device: unchanged by
        # re-signs and by other models' changes, and one more with each explicit deployment, which
        # is how a device is asked to try again a bundle that failed there before.
        retries = dict(
            session.exec(
                select(Deployment.model_name, func.count())
                .where(Deployment.device_id == device_id)
                .group_by(col(Deployment.model_name))
            ).all()
        )
        if deploying is not None:
            retries[deploying] = retries.get(deploying, 0) + 1
        state = desired_state_for(
            device_id,
            sequence,
            models,
            retries=retries,
            issued_at=now,
            ttl_s=self._ttl_s,
            shadows={m.name: (m, rate) for m, rate in shadows},
            bundle_base_url=self._bundle_base_url,
        )
        envelope = state.seal(self._key)
        session.exec(
            update(Device)
            .where(col(Device.id) == device_id)
            .values(
                desired_issued_at=state.issued_at,
                desired_expires_at=state.expires_at,
                desired_envelope=envelope.decode(),
            )
        )
        return state, envelope

    def _publish(self, issued: Iterable[tuple[DesiredState, bytes]]) -> None:
        for state, envelope in issued:
            self._publisher.publish(device_topic(state.device_id, Leaf.DESIRED), envelope, retain=True)


def _require_devices(session: Session, ids: Sequence[str]) -> None:
    known = set(session.exec(select(Device.id).where(col(Device.id).in_(ids))).all())
    missing = [i for i in ids if i not in known]
    if missing:
        raise NotFoundError(
            f"unknown device(s) {missing[:10]}: a device registers when its agent first reports, "
            "or with POST /api/v1/devices"
        )


def _model_version(session: Session, name: str, version: str) -> ModelVersion:
    row = session.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    if row is None:
        raise NotFoundError(f"model {name!r} version {version!r} is not published")
    return row


def _remove_shadows(
    session: Session, device_ids: Sequence[str], model_name: str, now: float, only_version: str | None = None
) -> None:
    """Mark the active shadows of ``model_name`` on ``device_ids`` removed (of one version only, if given).

    The rows stay (see :class:`~edgefleet.control_plane.db.tables.Shadow`): the API lists a
    removed shadow for as long as its device still reports it.
    """
    statement = (
        update(Shadow)
        .where(col(Shadow.device_id).in_(device_ids), col(Shadow.model_name) == model_name, active_shadow())
        .values(removed_at=_utc(now))
    )
    if only_version is not None:
        statement = statement.where(col(Shadow.version) == only_version)
    session.exec(statement)


def _supersede_pending(session: Session, device_id: str, model_name: str, now: float) -> None:
    session.exec(
        update(Deployment)
        .where(
            col(Deployment.device_id) == device_id,
            col(Deployment.model_name) == model_name,
            col(Deployment.status) == DeploymentStatus.PENDING,
        )
        .values(status=DeploymentStatus.SUPERSEDED, updated_at=_utc(now))
    )


def _check_model_counts(session: Session, ids: Sequence[str]) -> None:
    counts = session.exec(
        select(Assignment.device_id, func.count())
        .where(col(Assignment.device_id).in_(ids))
        .group_by(col(Assignment.device_id))
    ).all()
    for device_id, count in counts:
        if count > MAX_MODELS:
            raise MessageError(f"device {device_id!r} would run {count} models; a device runs at most {MAX_MODELS}")


def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)
