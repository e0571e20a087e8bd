"""Ingest: what the control plane does with each message a device publishes.

One handler per leaf (:attr:`Ingestor.routes`, see :mod:`shared.wire.topics`)::

    reported        -> Device row (auto-registered), pending deployments whose bundle now
                       serves are marked succeeded
    events          -> DeviceEvent row, once per event_id; the matching pending deployment
                       takes the event's outcome
    status          -> Device.online and last_seen_at
    chunks/request  -> one Chunk per index on the device's chunks/data, or one ChunkError

Every payload is decoded strictly and must name the device whose topic it came on (the broker's
ACLs authenticate the topic, not the payload). Anything that does not decode raises
:class:`~shared.errors.MessageError` before the database is touched; the MQTT bridge logs it
and drops the message.

Database messages can be applied one by one or as a batch in one transaction
(:meth:`Ingestor.handle_batch`, what the MQTT bridge's ingest worker uses); chunk requests
are served on a worker of their own (see :mod:`control_plane.messaging.bridge`).

Ingest is idempotent: MQTT QoS 1 delivers at least once, and after a control-plane restart the
broker redelivers whatever was not acknowledged, so every handler must tolerate seeing the
same message twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeAlias

from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.tables import (
    Assignment,
    Deployment,
    DeploymentStatus,
    Device,
    DeviceEvent,
    ModelVersion,
    ShadowAssignment,
    assigned_version,
    shadow_version,
)
from edgefleet.control_plane.messaging.publisher import MessagePublisher
from edgefleet.shared.errors import MessageError, NotFoundError
from edgefleet.shared.wire.chunks import Chunk, ChunkError, ChunkRequest, chunk_count
from edgefleet.shared.wire.messages import (
    DeploymentEvent,
    DeviceStatus,
    RejectionEvent,
    ReportedState,
    decode_event,
)
from edgefleet.shared.wire.topics import Leaf, device_topic, parse_device_topic

log = logging.getLogger(__name__)

DEPLOYMENT_EVENT_KIND = "deployment"


DeviceMessage: TypeAlias = ReportedState | DeviceStatus | DeploymentEvent | RejectionEvent
_WHAT = {Leaf.REPORTED: "reported state", Leaf.EVENTS: "event", Leaf.STATUS: "status"}  # for error messages


@dataclass(frozen=True, slots=True)
class _Decoded:
    """A message that decoded and names the device of its topic, ready to apply."""

    leaf: Leaf
    device_id: str
    message: DeviceMessage


class ChunkErrorCode:
    """The ``code`` values of the ChunkErrors the control plane sends."""

    BUNDLE_NOT_FOUND = "bundle_not_found"
    BUNDLE_NOT_ASSIGNED = "bundle_not_assigned"
    CHUNK_TOO_LARGE = "chunk_too_large"
    REQUEST_TOO_LARGE = "request_too_large"
    CHUNK_OUT_OF_RANGE = "chunk_out_of_range"


class Ingestor:
    """Applies device messages to the database and answers chunk requests."""

    def __init__(
        self,
        engine: Engine,
        store: BundleStore,
        publisher: MessagePublisher,
        *,
        max_chunk_bytes: int,
        max_chunk_request_bytes: int,
        chunk_grant_ttl_s: float = 2.0,
        max_chunk_grants_count: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create the ingestor.

        Args:
            engine: The database.
            store: Bundles to serve chunks from.
            publisher: Where chunk answers go.
            max_chunk_bytes: Largest chunk size a device may ask for.
            max_chunk_request_bytes: Largest chunk size x count in one request.
            chunk_grant_ttl_s: Seconds a device's checked right to a bundle serves its next
                requests without asking the database again.
            max_chunk_grants_count: Remembered (device, bundle, chunk size) rights before they are dropped.
            clock: Unix seconds now (for ``last_seen_at`` and bookkeeping times).
        """
        self._engine = engine
        self._store = store
        self._publisher = publisher
        self._max_chunk_bytes = max_chunk_bytes
        self._max_request_bytes = max_chunk_request_bytes
        self._grant_ttl_s = chunk_grant_ttl_s
        self._max_grants = max_chunk_grants_count
        self._clock = clock
        # (device, digest, chunk size) -> (when the database allowed it, chunk count): see handle_chunk_request
        self._grants: dict[tuple[str, str, int], tuple[float, int]] = {}

    def handle(self, topic: str, payload: bytes) -> None:
        """Dispatch one received message by its topic's leaf (see :attr:`routes`).

        Raises:
            MessageError: The topic is not a device-published one, or the payload does not
                decode or names another device. Nothing was changed.
        """
        device_id, leaf = parse_device_topic(topic)
        handler = self.routes.get(leaf)
        if handler is None:
            raise MessageError(f"{leaf.value!r} is a topic the control plane publishes, not one it ingests")
        handler(device_id, payload)

    @property
    def routes(self) -> dict[Leaf, Callable[[str, bytes], object]]:
        """The dispatch table: leaf -> handler of (device id, payload)."""
        return {
            Leaf.REPORTED: self.handle_reported_state,
            Leaf.EVENTS: self.handle_deployment_event,
            Leaf.STATUS: self.handle_status,
            Leaf.CHUNK_REQUEST: self.handle_chunk_request,
        }

    def handle_batch(self, messages: Sequence[tuple[str, bytes]]) -> list[MessageError | None]:
        """Apply many (topic, payload) messages in arrival order, in one database transaction.

        Each payload is decoded first; one that does not decode is rejected alone (its
        MessageError is in the result) and never reaches the database. If the transaction
        fails on a constraint (the same event committed meanwhile by another replica), the
        batch is applied again one message per transaction, which handles that case.

        Returns:
            Per message, the MessageError that rejected it, or None.

        Raises:
            SQLAlchemyError: The database failed for another reason; nothing was committed.
        """
        results: list[MessageError | None] = []
        decoded: list[_Decoded] = []
        for topic, payload in messages:
            try:
                device_id, leaf = parse_device_topic(topic)
                if leaf is Leaf.CHUNK_REQUEST:  # not a database write: served at once
                    self.handle_chunk_request(device_id, payload)
                else:
                    decoded.append(self._decode(device_id, leaf, payload))
            except MessageError as exc:
                results.append(exc)
            else:
                results.append(None)
        if not decoded:
            return results
        now = self._clock()
        try:
            with Session(self._engine) as session:
                for message in decoded:
                    self._apply(session, message, now)
                session.commit()
        except IntegrityError:
            for message in decoded:
                self._apply_alone(message, now)
        return results

    def handle_reported_state(self, device_id: str, payload: bytes) -> None:
        """Store a device's reported state; mark pending deployments it shows serving succeeded.

        A report older than the stored one (lower ``(applied_sequence, ts)``, e.g. a QoS 1
        redelivery after a newer message) only refreshes ``last_seen_at``.
        """
        self._apply_alone(self._decode(device_id, Leaf.REPORTED, payload), self._clock())

    def handle_deployment_event(self, device_id: str, payload: bytes) -> bool:
        """Record a deployment event once and apply its outcome to the matching deployment.

        The matching deployments are the pending ones of this device, model and bundle digest
        first carried by a desired state no newer than the event's (a re-signed state carries
        the same deployment under a higher sequence).

        Returns:
            True if the event was new, False for a duplicate ``event_id``.
        """
        return self._apply_alone(self._decode(device_id, Leaf.EVENTS, payload), self._clock())

    def handle_status(self, device_id: str, payload: bytes) -> None:
        """Apply a device's online/offline status (the offline form is its MQTT last will).

        Applied in arrival order, not by ``ts``: a last will carries the time it was set, at
        connect, which is older than the "online" published right after it.
        """
        self._apply_alone(self._decode(device_id, Leaf.STATUS, payload), self._clock())

    # -- decode, then apply within a session --------------------------------------------------------

    def _decode(self, device_id: str, leaf: Leaf, payload: bytes) -> _Decoded:
        message: DeviceMessage
        if leaf is Leaf.REPORTED:
            message = ReportedState.decode(payload)
        elif leaf is Leaf.EVENTS:
            message = decode_event(payload)
        elif leaf is Leaf.STATUS:
            message = DeviceStatus.decode(payload)
        else:
            raise MessageError(f"{leaf.value!r} is a topic the control plane publishes, not one it ingests")
        _require_same_device(message.device_id, device_id, _WHAT[leaf])
        return _Decoded(leaf=leaf, device_id=device_id, message=message)

    def _apply_alone(self, decoded: _Decoded, now: float) -> bool:
        """Apply one message in a transaction of its own; False if it changed nothing new."""
        with Session(self._engine) as session:
            changed = self._apply(session, decoded, now)
            try:
                session.commit()
            except IntegrityError:
                # The same event_id committed concurrently (another replica, or a redelivery
                # racing this one): it is recorded, which is all that matters.
                session.rollback()
                return False
        return changed

    def _apply(self, session: Session, decoded: _Decoded, now: float) -> bool:
        message = decoded.message
        if isinstance(message, ReportedState):
            self._apply_reported(session, decoded.device_id, message, now)
            return True
        if isinstance(message, DeviceStatus):
            self._apply_status(session, decoded.device_id, message, now)
            return True
        if isinstance(message, RejectionEvent):
            return self._apply_rejection(session, message, now)
        return self._apply_event(session, decoded.device_id, message, now)

    def _apply_reported(self, session: Session, device_id: str, report: ReportedState, now: float) -> None:
        device = _get_or_register(session, device_id, now)
        device.last_seen_at = _utc(now)
        stale = device.reported_ts is not None and (report.applied_sequence, report.ts) < (
            device.applied_sequence,
            device.reported_ts,
        )
        if stale:
            log.debug("ignoring a stale reported state of %s", device_id)
            session.add(device)
            return
        device.applied_sequence = report.applied_sequence
        device.reported_ts = report.ts
        device.reported_json = report.encode().decode()
        device.agent_json = json.dumps(report.agent, sort_keys=True)
        session.add(device)
        # A device that applied a higher sequence than we ever signed means our database
        # was restored or reset: continue above it, or the device refuses every new state.
        session.exec(
            update(Device)
            .where(col(Device.id) == device_id, col(Device.desired_sequence) < report.applied_sequence)
            .values(desired_sequence=report.applied_sequence)
        )
        serving = {(m.name, m.bundle_digest) for m in report.models if m.state == "serving"}
        pending = session.exec(
            select(Deployment).where(
                Deployment.device_id == device_id, col(Deployment.status) == DeploymentStatus.PENDING
            )
        ).all()
        for deployment in pending:
            if (deployment.model_name, deployment.bundle_digest) in serving:
                deployment.status = DeploymentStatus.SUCCEEDED
                deployment.message = "the device reports the bundle serving"
                deployment.updated_at = _utc(now)
                session.add(deployment)

    def _apply_rejection(self, session: Session, event: RejectionEvent, now: float) -> bool:
        """Store a device's refusal of a message (idempotent by event id)."""
        if session.exec(select(DeviceEvent.id).where(DeviceEvent.event_id == event.event_id)).first() is not None:
            return False
        log.warning("device %s rejected a %s message: %s: %s", event.device_id, event.subject, event.code,
                    event.message)
        device = _get_or_register(session, event.device_id, now)
        device.last_seen_at = _utc(now)
        session.add(device)
        session.add(
            DeviceEvent(
                event_id=event.event_id,
                device_id=event.device_id,
                ts=event.ts,
                kind="rejected",
                payload_json=event.encode().decode(),
                received_at=_utc(now),
            )
        )
        return True

    def _apply_event(self, session: Session, device_id: str, event: DeploymentEvent, now: float) -> bool:
        if session.exec(select(DeviceEvent.id).where(DeviceEvent.event_id == event.event_id)).first() is not None:
            return False
        device = _get_or_register(session, device_id, now)
        device.last_seen_at = _utc(now)
        session.add(device)
        session.add(
            DeviceEvent(
                event_id=event.event_id,
                device_id=device_id,
                ts=event.ts,
                kind=DEPLOYMENT_EVENT_KIND,
                payload_json=event.encode().decode(),
                received_at=_utc(now),
            )
        )
        matching = session.exec(
            select(Deployment).where(
                Deployment.device_id == device_id,
                Deployment.model_name == event.name,
                Deployment.bundle_digest == event.bundle_digest,
                Deployment.sequence <= event.sequence,
                col(Deployment.status) == DeploymentStatus.PENDING,
            )
        ).all()
        for deployment in matching:
            deployment.status = DeploymentStatus(event.outcome.value)
            deployment.error_code = event.error_code
            deployment.message = event.message
            deployment.updated_at = _utc(now)
            session.add(deployment)
        if not matching:
            log.info("event %s from %s matches no pending deployment", event.event_id, device_id)
        return True

    def _apply_status(self, session: Session, device_id: str, status: DeviceStatus, now: float) -> None:
        device = _get_or_register(session, device_id, now)
        device.online = status.online
        device.last_seen_at = _utc(now)
        session.add(device)

    def handle_chunk_request(self, device_id: str, payload: bytes) -> None:
        """Answer a chunk request with the chunks, or with one ChunkError saying why not.

        Only bundles assigned to the requesting device (to serve, or as a shadow) are served,
        within the chunk-size and per-request limits.
        """
        request = ChunkRequest.decode(payload)
        reply_topic = device_topic(device_id, Leaf.CHUNK_DATA)
        # A transfer is a stream of requests for one bundle: the database is asked once every
        # chunk_grant_ttl_s, not for every request (that query cost more than the chunks' bytes).
        grant_key = (device_id, request.bundle_digest, request.chunk_size)
        error = None
        if not self._within_grant(grant_key, request):
            error = self._refusal(device_id, request)
            if error is None:
                self._remember_grant(grant_key)
        if error is not None:
            log.info("chunk request from %s refused: %s", device_id, error.message)
            self._publisher.publish(reply_topic, error.encode(), retain=False)
            return
        for index in request.indices:
            data = self._store.read_chunk(request.bundle_digest, request.chunk_size, index)
            chunk = Chunk(
                bundle_digest=request.bundle_digest,
                chunk_size=request.chunk_size,
                index=index,
                total_size=self._store.size(request.bundle_digest),
                data=data,
            )
            self._publisher.publish(reply_topic, chunk.encode(), retain=False)

    def _within_grant(self, key: tuple[str, str, int], request: ChunkRequest) -> bool:
        """Whether a recent check already allows this request (else :meth:`_refusal` decides)."""
        grant = self._grants.get(key)
        if grant is None:
            return False
        granted_at, count = grant
        return (
            0 <= self._clock() - granted_at < self._grant_ttl_s
            and request.chunk_size * len(request.indices) <= self._max_request_bytes
            and all(i < count for i in request.indices)
        )

    def _remember_grant(self, key: tuple[str, str, int]) -> None:
        if len(self._grants) >= self._max_grants:
            self._grants.clear()
        self._grants[key] = (self._clock(), chunk_count(self._store.size(key[1]), key[2]))

    def _refusal(self, device_id: str, request: ChunkRequest) -> ChunkError | None:
        digest = request.bundle_digest

        def refuse(code: str, message: str) -> ChunkError:
            return ChunkError(bundle_digest=digest, code=code, message=message)

        if request.chunk_size > self._max_chunk_bytes:
            return refuse(
                ChunkErrorCode.CHUNK_TOO_LARGE,
                f"chunk size {request.chunk_size} is over this control plane's {self._max_chunk_bytes} bytes",
            )
        if request.chunk_size * len(request.indices) > self._max_request_bytes:
            return refuse(
                ChunkErrorCode.REQUEST_TOO_LARGE,
                f"{len(request.indices)} chunks of {request.chunk_size} bytes is over the "
                f"{self._max_request_bytes}-byte limit per request; ask for fewer at a time",
            )
        with Session(self._engine) as session:
            assigned = session.exec(
                select(Assignment.id)
                .join(ModelVersion, assigned_version())
                .where(Assignment.device_id == device_id, ModelVersion.bundle_digest == digest)
            ).first()
            if assigned is None:  # a shadow candidate's bundle is assigned too
                assigned = session.exec(
                    select(ShadowAssignment.id)
                    .join(ModelVersion, shadow_version())
                    .where(ShadowAssignment.device_id == device_id, ModelVersion.bundle_digest == digest)
                ).first()
            known = assigned is not None or (
                session.exec(select(ModelVersion.id).where(ModelVersion.bundle_digest == digest)).first() is not None
            )
        if not known:
            return refuse(ChunkErrorCode.BUNDLE_NOT_FOUND, f"no bundle {digest} is published")
        if assigned is None:
            return refuse(ChunkErrorCode.BUNDLE_NOT_ASSIGNED, f"bundle {digest} is not assigned to {device_id}")
        try:
            size = self._store.size(digest)
        except NotFoundError:
            log.error("bundle %s is published but missing from the bundle store", digest)
            return refuse(ChunkErrorCode.BUNDLE_NOT_FOUND, f"bundle {digest} is missing from the store")
        count = chunk_count(size, request.chunk_size)
        beyond = [i for i in request.indices if i >= count]
        if beyond:
            return refuse(
                ChunkErrorCode.CHUNK_OUT_OF_RANGE,
                f"chunk index {beyond[0]} is past the end: the bundle has {count} chunks of {request.chunk_size}",
            )
        return None


def _require_same_device(payload_device: str, topic_device: str, what: str) -> None:
    if payload_device != topic_device:
        raise MessageError(f"{what} names device {payload_device!r} but came on the topic of {topic_device!r}")


def _get_or_register(session: Session, device_id: str, now: float) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        log.info("device %s registered itself", device_id)
        device = Device(id=device_id, created_at=_utc(now))
        session.add(device)
    return device


def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)
