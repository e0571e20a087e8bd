"""The FastAPI application and its lifespan: start every part in order, stop them in reverse.

Start-up, each step registering its own teardown on one ``ExitStack`` so that a failure half-way
stops exactly what was started::

    data dirs -> database (schema upgraded) -> first admin token (a new data dir only) -> keys
      -> bundle store -> broker (embedded unless configured) -> MQTT bridge (connect, subscribe)
      -> republish stored desired states -> re-sign scheduler

On a database with no API token the first start makes an admin token, writes it to
``<data_dir>/admin-token`` (mode 0600) and logs it once: every route but ``/healthz`` and the
enrollment exchange needs a token (:mod:`edgefleet.control_plane.api.access`).

Stored desired states are published again at start, and on every reconnect to the broker, because
a crash between a commit and its publish would otherwise leave a device without its newest state
until the next re-sign, and because a broker forgets retained messages when it restarts (amqtt:
all; Mosquitto: those of the seconds before a SIGKILL). The embedded broker keeps its port across
starts and is restarted by a supervisor when it dies.
Devices ignore an identical copy of a state they already accepted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager
from datetime import UTC, datetime
from functools import partial

from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlmodel import Session

from edgefleet.control_plane.api.access import document_access
from edgefleet.control_plane.api.auditing import AuditMiddleware
from edgefleet.control_plane.api.deps import ControlPlane
from edgefleet.control_plane.api.errors import install_error_handlers
from edgefleet.control_plane.api.routes import ROUTERS
from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.engine import create_db_engine
from edgefleet.control_plane.db.schema import upgrade_schema
from edgefleet.control_plane.db.tables import utcnow
from edgefleet.control_plane.messaging.bridge import BridgeLimits, BrokerConnection, MqttBridge
from edgefleet.control_plane.messaging.ingest import Ingestor
from edgefleet.control_plane.services.auth import ADMIN_TOKEN_FILE, ensure_first_admin_token
from edgefleet.control_plane.services.desired_states import DesiredStateService
from edgefleet.control_plane.services.keyring import KeyringService
from edgefleet.control_plane.services.keys import load_or_create_keys
from edgefleet.control_plane.settings import ServerSettings
from edgefleet.shared.errors import MessageError
from edgefleet.shared.wire.chunks import HEADER_BYTES

log = logging.getLogger(__name__)

DEFAULT_BROKER_PORT = 1883
EMBEDDED_BROKER_HOST = "127.0.0.1"  # one machine: the embedded broker is not exposed
_PACKET_SLACK_BYTES = 64 * 1024  # bytes beyond a chunk's data: its header, the topic, MQTT framing


def create_app(settings: ServerSettings, *, clock: Callable[[], float] = time.time) -> FastAPI:
    """Build the control plane's FastAPI app; its parts start with the app's lifespan.

    Args:
        settings: Validated settings.
        clock: Unix seconds now, for signing times and bookkeeping (tests pass their own).

    Returns:
        The app; ``app.state.control_plane`` (and ``app.state.broker_host`` /
        ``app.state.broker_port``) are set while it runs.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with ExitStack() as stack:
            control_plane = _start(settings, clock, stack)
            app.state.control_plane = control_plane
            app.state.broker_host = control_plane.broker_host
            app.state.broker_port = control_plane.broker_port
            log.info(
                "control plane up: data in %s, broker %s:%d",
                settings.data_dir,
                control_plane.broker_host,
                control_plane.broker_port,
            )
            yield
            log.info("control plane stopping")

    app = FastAPI(
        title="edgefleet control plane",
        summary="Deploy signed ML model bundles to edge devices over MQTT.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(AuditMiddleware)
    document_access(ROUTERS)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _start(settings: ServerSettings, clock: Callable[[], float], stack: ExitStack) -> ControlPlane:
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)

    engine = create_db_engine(settings.database_url)
    stack.callback(engine.dispose)
    upgrade_schema(engine)
    with Session(engine) as session:
        admin_token = ensure_first_admin_token(session, data_dir, now=utcnow())
    if admin_token is not None:
        # Shown this once (only its hash is stored); the file is for this machine's CLI.
        log.warning(
            "first start: created an admin API token, saved in %s (mode 0600):\n\n    %s\n\n"
            "use it with: export EDGEFLEET_TOKEN=$(cat %s)",
            data_dir / ADMIN_TOKEN_FILE,
            admin_token,
            data_dir / ADMIN_TOKEN_FILE,
        )

    keyring = KeyringService(data_dir / "keys", load_or_create_keys(data_dir / "keys"))
    store = BundleStore(
        data_dir / "bundles",
        cache_bytes=settings.bundle_cache_bytes,
        max_open_files_count=settings.bundle_max_open_files_count,
        cache_window_divisor_count=settings.bundle_cache_window_divisor_count,
    )
    stack.callback(store.close)

    broker_host, broker_port, broker_kind = _start_broker(settings, stack)

    ingestor: Ingestor | None = None

    def handle(topic: str, payload: bytes) -> None:
        assert ingestor is not None  # set below, before the bridge starts
        ingestor.handle(topic, payload)

    def handle_batch(messages: Sequence[tuple[str, bytes]]) -> Sequence[MessageError | None]:
        assert ingestor is not None
        return ingestor.handle_batch(messages)

    bridge = MqttBridge(
        BrokerConnection(
            host=broker_host,
            port=broker_port,
            username=settings.broker_username,
            password=settings.broker_password,
            tls_ca_file=settings.broker_tls_ca_file,
            tls_cert_file=settings.broker_tls_cert_file,
            tls_key_file=settings.broker_tls_key_file,
            client_id_suffix=settings.client_id_suffix,
            share_group=settings.share_group,
        ),
        handle,
        batch_handler=handle_batch,
        limits=BridgeLimits(
            keepalive_s=settings.broker_keepalive_s,
            reconnect_min_s=settings.broker_reconnect_min_delay_s,
            reconnect_max_s=settings.broker_reconnect_max_delay_s,
            max_inflight_count=settings.broker_max_inflight_count,
            queue_max_count=settings.ingest_queue_max_count,
            batch_max_count=settings.ingest_batch_max_count,
            handler_attempts_count=settings.handler_attempts_count,
        ),
    )
    ingestor = Ingestor(
        engine,
        store,
        bridge,
        max_chunk_bytes=settings.max_chunk_bytes,
        max_chunk_request_bytes=settings.max_chunk_request_bytes,
        chunk_grant_ttl_s=settings.chunk_grant_ttl_s,
        max_chunk_grants_count=settings.max_chunk_grants_count,
        clock=clock,
    )
    desired = DesiredStateService(
        bridge,
        keyring.keys.online,
        ttl_s=settings.desired_state_ttl_s,
        bundle_base_url=settings.public_url,
        resign_batch_count=settings.resign_batch_count,
        broker_up=lambda: bridge.connected,
    )
    bridge.on_reconnected(partial(_republish, engine, keyring, bridge, desired))
    bridge.start()
    stack.callback(bridge.stop)
    if not bridge.wait_ready(settings.broker_connect_timeout_s):
        log.warning(
            "no MQTT connection to %s:%d after %.0f s; going on, and paho keeps trying",
            broker_host,
            broker_port,
            settings.broker_connect_timeout_s,
        )

    keyring.publish_all(bridge)  # before desired states: agents need the keys that signed them
    with Session(engine) as session:
        republished = desired.republish_all(session)
    if republished:
        log.info("published %d stored desired state(s) again", republished)

    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.add_job(
        _resign_job(engine, desired, clock),
        "interval",
        seconds=settings.resign_interval_s,
        id="resign-desired-states",
        max_instances=1,
        coalesce=True,
        # Also once right away: after downtime, some states may already be past half-life.
        next_run_time=datetime.now(UTC),
    )
    scheduler.add_job(
        _reconcile_job(engine, desired, clock, settings.reconcile_interval_s),
        "interval",
        seconds=settings.reconcile_interval_s,
        id="reconcile-desired-states",
        max_instances=1,
        coalesce=True,
    )
    scheduler.start()
    stack.callback(scheduler.shutdown)

    return ControlPlane(
        settings=settings,
        engine=engine,
        store=store,
        desired=desired,
        ingestor=ingestor,
        bridge=bridge,
        keyring=keyring,
        broker_host=broker_host,
        broker_port=broker_port,
        broker_kind=broker_kind,
        clock=clock,
    )


def _start_broker(settings: ServerSettings, stack: ExitStack) -> tuple[str, int, str]:
    if settings.broker_host is not None:
        return settings.broker_host, settings.broker_port or DEFAULT_BROKER_PORT, "external"
    # Imported here: a control plane on an external broker never needs it.
    from edgefleet.control_plane.broker.embedded import BrokerSettings
    from edgefleet.control_plane.broker.kept_port import start_on_kept_port
    from edgefleet.control_plane.broker.supervisor import BrokerSupervisor

    broker = start_on_kept_port(
        BrokerSettings(
            host=EMBEDDED_BROKER_HOST,
            data_dir=settings.data_dir / "broker",
            max_packet_size_bytes=max(
                BrokerSettings().max_packet_size_bytes, settings.max_chunk_bytes + HEADER_BYTES + _PACKET_SLACK_BYTES
            ),
        ),
        configured_port=settings.broker_port,
        kind=settings.embedded_broker_kind,
    )
    stack.callback(broker.stop)
    supervisor = BrokerSupervisor(
        broker,
        check_interval_s=settings.broker_supervise_interval_s,
        restart_max_delay_s=settings.broker_restart_max_delay_s,
    )
    supervisor.start()
    stack.callback(supervisor.stop)  # runs first: a broker being stopped must not be restarted
    log.info("embedded %s broker on %s:%d", broker.kind, broker.host, broker.port)
    return broker.host, broker.port, broker.kind


def _republish(engine: Engine, keyring: KeyringService, bridge: MqttBridge, desired: DesiredStateService) -> None:
    keyring.publish_all(bridge)  # before desired states: agents need the keys that signed them
    with Session(engine) as session:
        desired.republish_all(session)


def _reconcile_job(
    engine: Engine, desired: DesiredStateService, clock: Callable[[], float], grace_s: float
) -> Callable[[], None]:
    def run() -> None:
        try:
            with Session(engine) as session:
                desired.republish_lagging(session, now=clock(), grace_s=grace_s)
        except Exception:  # the scheduler thread must survive a bad run; the next one retries
            log.exception("reconciling desired states failed")

    return run


def _resign_job(engine: Engine, desired: DesiredStateService, clock: Callable[[], float]) -> Callable[[], None]:
    def run() -> None:
        try:
            with Session(engine) as session:
                desired.resign_expiring(session, now=clock())
        except Exception:  # the scheduler thread must survive a bad run; the next one retries
            log.exception("re-signing desired states failed")

    return run
