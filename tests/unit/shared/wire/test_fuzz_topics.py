"""Garbage and truncated messages on every topic the agent and the control plane subscribe to.

Property: a payload either is a valid message or is refused with an edgefleet error at the
boundary; nothing else escapes, and nothing stored changes. The agent reports what it refused
(rejection events) and never touches its state; the control plane's database is unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func
from sqlmodel import Session, select

from edgefleet.agent.config import AgentConfig, TransferConfig, TrustConfig
from edgefleet.agent.deployment.reconciler import Reconciler
from edgefleet.agent.deployment.state_store import StateStore
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.transfer.mqtt_chunks import ChunkFetcher
from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.engine import create_db_engine, create_tables
from edgefleet.control_plane.db.tables import Deployment, Device, DeviceEvent
from edgefleet.control_plane.messaging.ingest import Ingestor
from edgefleet.shared.errors import EdgefleetError
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.chunks import Chunk
from edgefleet.shared.wire.messages import DesiredState, ModelDirective, RejectionEvent, decode_event
from edgefleet.shared.wire.topics import DEVICE_PUBLISHES, Leaf, device_topic

ONLINE = SigningKey.generate()
PUBLISHER = SigningKey.generate()
DIGEST = "sha256:" + "ab" * 32

# Valid messages, then truncated and bit-flipped copies: garbage that is *almost* right reaches
# deeper into the decoders than random bytes.
_VALID = [
    DesiredState(
        device_id="dev",
        sequence=5,
        issued_at=time.time(),
        expires_at=time.time() + 3600,
        models=(ModelDirective(name="m", version="1", bundle_digest=DIGEST, bundle_size=10, runtime="onnx"),),
    ).seal(ONLINE),
    Chunk(bundle_digest=DIGEST, chunk_size=1024, index=0, total_size=10, data=b"0123456789").encode(),
    json.dumps(
        {
            "schema": "edgefleet.reported/v1",
            "device_id": "dev",
            "ts": 1.0,
            "applied_sequence": 1,
            "models": [],
            "agent": {},
        }
    ).encode(),
    json.dumps(
        {"schema": "edgefleet.chunkreq/v1", "bundle_digest": DIGEST, "chunk_size": 4096, "indices": [0, 1]}
    ).encode(),
]


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "json"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    base = draw(st.sampled_from(_VALID))
    if kind == "truncated":
        return base[: draw(st.integers(0, max(0, len(base) - 1)))]
    if kind == "flipped":
        data = bytearray(base)
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    value = draw(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
            max_leaves=12,
        )
    )
    return json.dumps(value).encode()


@pytest.fixture
def agent_side(tmp_path: Path):
    config = AgentConfig(
        device_id="dev",
        data_dir=tmp_path / "agent",
        trust=TrustConfig(publisher_keys=(PUBLISHER.public_hex,), online_keys=(ONLINE.public_hex,)),
        transfer=TransferConfig(chunk_size_bytes=1024),
    )
    config.data_dir.mkdir()
    store = StateStore(config.data_dir)
    published: list[tuple[Leaf, bytes]] = []
    fetcher = ChunkFetcher(config.data_dir / "downloads", config.transfer, lambda request: None)
    reconciler = Reconciler(
        config, store, ModelHost(), fetcher, lambda leaf, data, retain: published.append((leaf, data))
    )
    return reconciler, fetcher, store, published


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads(), topic=st.sampled_from(["desired", "chunks", "keyring"]))
def test_agent_refuses_garbage_on_every_subscribed_topic_and_keeps_its_state(agent_side, payload, topic) -> None:
    reconciler, fetcher, store, published = agent_side
    before = store.state
    published.clear()
    if topic == "desired":
        reconciler.offer_desired(payload)
    elif topic == "chunks":
        fetcher.on_message(payload)  # no transfer is active: dropped
    else:
        reconciler.offer_keyring(payload)  # static-key mode: rotation is off, nothing changes
    if payload == _VALID[0] and topic == "desired":
        return  # the one valid desired state in the pool is accepted, as it should be
    assert store.state == before
    for leaf, data in published:
        assert leaf is Leaf.EVENTS
        assert isinstance(decode_event(data), RejectionEvent)


@pytest.fixture
def control_plane_side(tmp_path: Path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    create_tables(engine)
    store = BundleStore(tmp_path / "bundles", cache_bytes=1024 * 1024)
    sent: list[tuple[str, bytes]] = []

    class Publisher:
        def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
            sent.append((topic, payload))

    ingestor = Ingestor(
        engine, store, Publisher(), max_chunk_bytes=1024 * 1024, max_chunk_request_bytes=8 * 1024 * 1024
    )
    yield ingestor, engine, sent
    store.close()
    engine.dispose()


def _counts(engine) -> tuple[int, int, int]:
    with Session(engine) as session:
        return tuple(session.exec(select(func.count()).select_from(t)).one() for t in (Device, DeviceEvent, Deployment))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads(), leaf=st.sampled_from(DEVICE_PUBLISHES))
def test_control_plane_refuses_garbage_on_every_ingested_topic(control_plane_side, payload, leaf) -> None:
    ingestor, engine, sent = control_plane_side
    before = _counts(engine)
    sent.clear()
    try:
        ingestor.handle(device_topic("dev", leaf), payload)
    except EdgefleetError:
        assert _counts(engine) == before  # refused: nothing stored
        return
    # Accepted: it was a valid message of that topic (a chunk request for an unknown bundle is
    # answered with a chunk error, never with data).
    for _topic, data in sent:
        assert data.startswith(b"{")
