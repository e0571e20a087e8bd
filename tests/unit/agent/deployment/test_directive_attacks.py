"""Desired-state attacks: each is refused, reported as a rejection event, and changes nothing.

Replay (older or equal sequence), expiry, a state for another device, a signature by an
unknown key, and payload-type confusion (a validly signed envelope of another type).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig, TrustConfig
from edgefleet.agent.deployment.reconciler import Reconciler
from edgefleet.agent.deployment.state_store import StateStore
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.transfer.mqtt_chunks import ChunkFetcher
from edgefleet.shared.bundle.manifest import MANIFEST_PAYLOAD_TYPE
from edgefleet.shared.trust.signing import SigningKey, seal_envelope
from edgefleet.shared.wire.messages import DesiredState, RejectionEvent, decode_event
from edgefleet.shared.wire.topics import Leaf

ONLINE = SigningKey.generate()
PUBLISHER = SigningKey.generate()


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.now = time.time()
        self.data_dir = tmp_path
        config = AgentConfig(
            device_id="dev-a",
            data_dir=tmp_path,
            trust=TrustConfig(publisher_keys=(PUBLISHER.public_hex,), online_keys=(ONLINE.public_hex,)),
        )
        self.store = StateStore(tmp_path)
        self.published: list[tuple[Leaf, bytes]] = []
        fetcher = ChunkFetcher(tmp_path / "downloads", config.transfer, lambda request: None)
        self.reconciler = Reconciler(
            config,
            self.store,
            ModelHost(),
            fetcher,
            lambda leaf, data, retain: self.published.append((leaf, data)),
            clock=lambda: self.now,
        )

    def state(self, sequence: int, *, device: str = "dev-a", ttl_s: float = 3600, key: SigningKey = ONLINE) -> bytes:
        return DesiredState(device_id=device, sequence=sequence, issued_at=self.now, expires_at=self.now + ttl_s).seal(
            key
        )

    def rejections(self) -> list[RejectionEvent]:
        events = [decode_event(data) for leaf, data in self.published if leaf is Leaf.EVENTS]
        return [e for e in events if isinstance(e, RejectionEvent)]


@pytest.fixture
def agent(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path)
    harness.reconciler.offer_desired(harness.state(5))
    assert harness.store.state.accepted_sequence == 5
    return harness


@pytest.mark.parametrize(
    "attack,code,fragment",
    [
        (lambda h: h.state(4), "directive_rejected", "not newer than 5"),
        (lambda h: h.state(6, device="dev-b"), "directive_rejected", "for device 'dev-b'"),
        (lambda h: h.state(6, ttl_s=-1), "directive_rejected", "expired"),
        (lambda h: h.state(6, key=SigningKey.generate()), "signature_invalid", "0 valid signature"),
        (
            lambda h: seal_envelope(
                MANIFEST_PAYLOAD_TYPE,
                DesiredState(device_id="dev-a", sequence=6, issued_at=h.now, expires_at=h.now + 60).encode(),
                [ONLINE],
            ),
            "signature_invalid",
            "payload type",
        ),
        (lambda h: h.state(6)[:-7], "message_invalid", "not JSON"),
    ],
    ids=["replay", "other-device", "expired", "unknown-key", "payload-type-confusion", "truncated"],
)
def test_attack_is_refused_reported_and_changes_nothing(agent: Harness, attack, code: str, fragment: str) -> None:
    state_file = agent.data_dir / "state.json"
    before, on_disk = agent.store.state, state_file.read_bytes()
    agent.reconciler.offer_desired(attack(agent))
    assert agent.store.state == before
    assert state_file.read_bytes() == on_disk
    [rejection] = agent.rejections()
    assert (rejection.subject, rejection.code) == ("desired", code)
    assert fragment in rejection.message


def test_the_retained_copy_of_the_accepted_state_is_silently_ignored(agent: Harness) -> None:
    agent.reconciler.offer_desired(agent.store.state.desired_envelope.encode())
    assert agent.rejections() == []
