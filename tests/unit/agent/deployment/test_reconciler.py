"""The reconciler against fakes: every outcome, every recovery entry, and desired-state handling.

A :class:`Device` is what one agent boot holds: a real :class:`StateStore` on ``tmp_path``, a real
:class:`ModelHost` with real ONNX Runtime sessions, a :class:`FakeFetcher` that hands over bundles
built and signed in the test (or fails the way a transfer can), and an in-memory list of what
was published. :meth:`Device.reboot` starts a new one on the same data directory, which is what
an agent restarted after SIGKILL sees.

"Killed in state S" is simulated by replacing the executor's fault pause point with one that
raises :class:`Killed` (a ``BaseException``, so no ``except Exception`` swallows it) right after
S was persisted: the files on disk are then exactly what a SIGKILL there leaves behind.
"""

from __future__ import annotations

import errno
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import pytest

import edgefleet.agent.deployment.executor as executor_module
import edgefleet.agent.deployment.state_store as state_store_module
import edgefleet.agent.deployment.steps as steps_module
from edgefleet.agent.config import AgentConfig, TrustConfig
from edgefleet.agent.deployment.machine import RECOVERY, Event, Recovery, State, Step
from edgefleet.agent.deployment.planner import MAX_INTERRUPTED_ATTEMPTS
from edgefleet.agent.deployment.reconciler import Reconciler
from edgefleet.agent.deployment.state_store import STATE_FILE, AgentState, InProgress, StateStore
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.transfer.mqtt_chunks import Cancelled
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, make_mlp_weights, reference_predict
from edgefleet.shared.bundle.format import build_bundle, make_manifest
from edgefleet.shared.errors import TransferError
from edgefleet.shared.runtimes import load_model
from edgefleet.shared.trust.signing import SigningKey
from edgefleet.shared.wire.messages import (
    DeploymentEvent,
    DesiredState,
    ModelDirective,
    Outcome,
    RejectionEvent,
    ReportedState,
    decode_event,
)
from edgefleet.shared.wire.topics import Leaf

DEVICE = "unit-dev"
MODEL = "clf"
PUBLISHER = SigningKey.generate()
ONLINE = SigningKey.generate()
STRANGER = SigningKey.generate()  # trusted by nobody
N_INPUTS = 8


class Killed(BaseException):
    """Stands for SIGKILL at a pause point: nothing after it runs."""


# -- models and bundles ------------------------------------------------------------------------


def good_model(seed: int) -> bytes:
    # Same architecture as Device.assert_serves recomputes with numpy.
    return build_onnx_mlp(make_mlp_weights(n_inputs=N_INPUTS, hidden=(8,), n_outputs=3, seed=seed))


def failing_model() -> bytes:
    """Loads fine, fails at run time: a Reshape of ``[batch, 8]`` to ``[7, 5]`` (35 elements)."""
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [7, 5])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["probabilities"])],
        "fails_at_run_time",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", N_INPUTS])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [7, 5])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


@dataclass(frozen=True)
class Release:
    """A signed bundle of one model version, as the control plane would publish it."""

    name: str
    version: str
    bundle: Path
    digest: str
    size: int
    seed: int | None  # None: not an MLP (the failing model)

    @property
    def slot(self) -> str:
        return f"{self.version}-{self.digest[7:19]}"

    def directive(self) -> ModelDirective:
        return ModelDirective(
            name=self.name, version=self.version, bundle_digest=self.digest, bundle_size=self.size, runtime="onnx"
        )


def make_release(
    directory: Path, version: str, model: bytes, *, seed: int | None, key: SigningKey = PUBLISHER,
    manifest_version: str | None = None,
) -> Release:
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / f"{version}.onnx"
    model_path.write_bytes(model)
    loaded = load_model("onnx", model_path, name=MODEL, version=version)
    try:
        inputs, outputs = loaded.inputs, loaded.outputs
    finally:
        loaded.close()
    manifest = make_manifest(
        name=MODEL, version=manifest_version or version, runtime="onnx", model_file="model.onnx",
        files={"model.onnx": model_path}, inputs=inputs, outputs=outputs,
    )
    bundle = directory / f"{version}.bundle"
    digest = build_bundle(bundle, manifest, {"model.onnx": model_path}, [key])
    return Release(MODEL, version, bundle, digest, bundle.stat().st_size, seed)


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Release]:
    d = tmp_path_factory.mktemp("releases")
    return {
        "v1": make_release(d, "1.0.0", good_model(1), seed=1),
        "v2": make_release(d, "2.0.0", good_model(2), seed=2),
        "v3": make_release(d, "3.0.0", good_model(3), seed=3),
        "bad": make_release(d, "2.0.0+bad", failing_model(), seed=None),
        "unsigned": make_release(d, "2.0.0+stranger", good_model(2), seed=2, key=STRANGER),
        "mislabelled": make_release(d, "2.0.0+label", good_model(2), seed=2, manifest_version="9.9.9"),
    }


# -- fakes -------------------------------------------------------------------------------------


class FakeFetcher:
    """Hands over prepared bundles by digest, or fails / hangs the way a transfer can."""

    def __init__(self, downloads: Path, releases: dict[str, Release]) -> None:
        self.downloads = downloads
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.by_digest = {r.digest: r for r in releases.values()}
        self.calls: list[str] = []
        self.failures: dict[str, BaseException] = {}
        self.hang: set[str] = set()  # these never complete: wait for cancel
        self.hanging = threading.Event()

    def fetch(self, digest: str, size: int, cancel: threading.Event) -> Path:
        self.calls.append(digest)
        if digest in self.hang:
            self.hanging.set()
            if not cancel.wait(timeout=10):
                raise TransferError("test fetch hung for 10 s without being cancelled")
            raise Cancelled("a newer desired state superseded this download")
        if digest in self.failures:
            raise self.failures[digest]
        release = self.by_digest[digest]
        assert size == release.size
        dest = self.downloads / f"{digest.removeprefix('sha256:')}.bundle"
        shutil.copyfile(release.bundle, dest)  # the reconciler may delete what it was given
        return dest


class Device:
    """One boot of an agent: store, host, reconciler, fetcher, and what it published."""

    def __init__(self, data_dir: Path, releases: dict[str, Release], *, slots_kept: int = 2) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.releases = releases
        self.config = AgentConfig(
            device_id=DEVICE,
            data_dir=data_dir,
            trust=TrustConfig(publisher_keys=(PUBLISHER.public_hex,), online_keys=(ONLINE.public_hex,)),
            slots_kept_per_model=slots_kept,
        )
        self.store = StateStore(data_dir)
        self.host = ModelHost()
        self.fetcher = FakeFetcher(data_dir / "downloads", releases)
        self.published: list[tuple[Leaf, bytes, bool]] = []
        self.reconciler = Reconciler(
            self.config, self.store, self.host, self.fetcher, lambda leaf, payload, retain: self.published.append(
                (leaf, payload, retain)
            ),
        )

    def reboot(self) -> Device:
        """The agent after SIGKILL: a fresh process on the same data directory, booted like Agent.start."""
        self.host.close_all()
        device = Device(self.data_dir, self.releases, slots_kept=self.config.slots_kept_per_model)
        device.reconciler.recover()
        device.reconciler.load_active()
        return device

    def events(self) -> list[DeploymentEvent]:
        events = [decode_event(p) for leaf, p, _ in self.published if leaf is Leaf.EVENTS]
        return [e for e in events if isinstance(e, DeploymentEvent)]

    def rejections(self) -> list[RejectionEvent]:
        events = [decode_event(p) for leaf, p, _ in self.published if leaf is Leaf.EVENTS]
        return [e for e in events if isinstance(e, RejectionEvent)]

    def outcomes(self) -> list[tuple[str, Outcome]]:
        return [(e.version, e.outcome) for e in self.events()]

    def last_reported(self) -> ReportedState:
        return [ReportedState.decode(p) for leaf, p, _ in self.published if leaf is Leaf.REPORTED][-1]

    def offer(self, sequence: int, *releases: Release, **kwargs: object) -> bytes:
        envelope = desired(sequence, *releases, **kwargs)  # type: ignore[arg-type]
        self.reconciler.offer_desired(envelope)
        return envelope

    def reconcile(self) -> bool:
        """One :meth:`Reconciler.step` without its error handling: take the wake-up, then reconcile."""
        self.reconciler._wake.clear()
        self.reconciler._cancel.clear()
        return self.reconciler.reconcile_once()

    def deploy(self, sequence: int, *releases: Release) -> bool:
        self.offer(sequence, *releases)
        return self.reconcile()

    def serving_version(self) -> str | None:
        model = self.host.get(MODEL)
        return None if model is None else model.version

    def slots(self) -> set[str]:
        directory = self.data_dir / "models" / MODEL
        return {p.name for p in directory.iterdir()} if directory.exists() else set()

    def on_disk(self) -> AgentState:
        """What a next boot would read (not the in-memory copy)."""
        return StateStore(self.data_dir).state

    def assert_serves(self, release: Release) -> None:
        """The host serves ``release`` and computes what its weights compute."""
        assert self.serving_version() == release.version
        assert release.seed is not None
        x = np.random.default_rng(0).standard_normal((3, N_INPUTS)).astype(np.float32)
        got = self.host.get(MODEL).predict({"input": x})["probabilities"]  # type: ignore[union-attr]
        weights = make_mlp_weights(n_inputs=N_INPUTS, hidden=(8,), n_outputs=3, seed=release.seed)
        expected = reference_predict(weights, x)
        np.testing.assert_allclose(got, expected, atol=1e-5)

    def assert_clean(self) -> None:
        """Nothing half-installed: no deployment pending, no unpacking debris, no bundle left over."""
        state = self.on_disk()
        assert state.in_progress is None
        assert state == self.store.state
        assert not list((self.data_dir / "models").glob("*/*.unpacking"))
        assert not list(self.fetcher.downloads.iterdir()), "a downloaded bundle was left behind"
        for active in state.active.values():
            assert (self.data_dir / "models" / active.name / active.slot / active.model_file).is_file()


def desired(
    sequence: int, *releases: Release, device_id: str = DEVICE, key: SigningKey = ONLINE, ttl_s: float = 3600,
    issued_at: float | None = None, retry: int = 0,
) -> bytes:
    issued = time.time() if issued_at is None else issued_at
    state = DesiredState(
        device_id=device_id, sequence=sequence, issued_at=issued, expires_at=issued + ttl_s,
        models=tuple(msgspec.structs.replace(r.directive(), retry=retry) for r in releases),
    )
    return state.seal(key)


@pytest.fixture
def device(tmp_path: Path, releases: dict[str, Release]) -> Iterator[Device]:
    dev = Device(tmp_path / "agent-data", releases)
    yield dev
    dev.host.close_all()


def kill_at(monkeypatch: pytest.MonkeyPatch, state: str) -> None:
    """Make the next deployment 'die' right after it persisted ``state``."""

    def pause_point(current: str) -> None:
        if current == state:
            raise Killed(current)

    monkeypatch.setattr(executor_module, "pause_point", pause_point)


# -- outcomes ----------------------------------------------------------------------------------


def test_succeeded_installs_serves_and_reports(device: Device, releases: dict[str, Release]) -> None:
    assert device.deploy(1, releases["v1"]) is False
    assert device.outcomes() == [("1.0.0", Outcome.SUCCEEDED)]
    device.assert_serves(releases["v1"])
    assert device.slots() == {releases["v1"].slot}
    state = device.on_disk()
    assert state.active[MODEL].bundle_digest == releases["v1"].digest
    assert state.applied_sequence == state.accepted_sequence == 1
    assert device.last_reported().models[0].state == "serving"
    device.assert_clean()


def test_succeeded_keeps_the_previous_slot_and_prunes_older_ones(device: Device, releases: dict[str, Release]) -> None:
    device.deploy(1, releases["v1"])
    device.deploy(2, releases["v2"])
    assert device.slots() == {releases["v1"].slot, releases["v2"].slot}
    assert device.on_disk().active[MODEL].version == "2.0.0"
    device.deploy(3, releases["v3"])
    assert device.outcomes() == [(v, Outcome.SUCCEEDED) for v in ("1.0.0", "2.0.0", "3.0.0")]
    assert device.slots() == {releases["v2"].slot, releases["v3"].slot}, "slots_kept_per_model = 2"
    device.assert_serves(releases["v3"])
    device.assert_clean()


def test_a_retryable_transfer_failure_is_retried_without_a_final_outcome(
    device: Device, releases: dict[str, Release]
) -> None:
    device.deploy(1, releases["v1"])
    device.fetcher.failures[releases["v2"].digest] = TransferError("chunks stopped coming")
    assert device.deploy(2, releases["v2"]) is True, "a transfer failure is retryable"
    # No outcome yet: the deployment stays pending at the control plane while the agent retries.
    assert device.outcomes()[-1] == ("1.0.0", Outcome.SUCCEEDED)
    assert device.on_disk().in_progress is None
    assert MODEL not in device.on_disk().failed, "a retryable failure must not block a retry"
    device.assert_serves(releases["v1"])
    del device.fetcher.failures[releases["v2"].digest]
    assert device.reconcile() is False  # the retry, same desired state
    assert device.outcomes()[-1] == ("2.0.0", Outcome.SUCCEEDED)
    device.assert_serves(releases["v2"])
    device.assert_clean()


def test_failed_no_change_when_the_disk_fills_while_staging(
    device: Device, releases: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.deploy(1, releases["v1"])
    real_extract = steps_module.extract_bundle

    def extract_until_full(bundle: Path, dest: Path, **kwargs: object) -> object:
        def no_space(*args: object, **kw: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as m:  # the real extraction, with every file write failing
            m.setattr("edgefleet.shared.bundle.format._copy_hashed", no_space)
            return real_extract(bundle, dest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(steps_module, "extract_bundle", extract_until_full)
    assert device.deploy(2, releases["v2"]) is False, "disk full is not retried under the same desired state"
    assert device.outcomes()[-1] == ("2.0.0", Outcome.FAILED_NO_CHANGE)
    assert device.events()[-1].error_code == "OSError"
    device.assert_serves(releases["v1"])
    assert device.slots() == {releases["v1"].slot}
    assert device.on_disk().failed == {MODEL: releases["v2"].digest}
    device.assert_clean()  # includes: the downloaded bundle was dropped, giving its space back
    # A later desired state is not blocked by the failure.
    monkeypatch.setattr(steps_module, "extract_bundle", real_extract)
    device.deploy(3, releases["v3"])
    assert device.outcomes()[-1] == ("3.0.0", Outcome.SUCCEEDED)
    device.assert_serves(releases["v3"])


def test_failed_rolled_back_when_the_health_check_fails(device: Device, releases: dict[str, Release]) -> None:
    device.deploy(1, releases["v1"])
    assert device.deploy(2, releases["bad"]) is False
    assert device.outcomes()[-1] == ("2.0.0+bad", Outcome.FAILED_ROLLED_BACK)
    assert device.events()[-1].error_code  # the runtime's reason travels with the outcome
    device.assert_serves(releases["v1"])
    state = device.on_disk()
    assert state.active[MODEL].bundle_digest == releases["v1"].digest
    assert state.failed == {MODEL: releases["bad"].digest}
    assert device.slots() == {releases["v1"].slot}, "the rolled-back slot is removed"
    assert device.last_reported().models[0].version == "1.0.0"
    device.assert_clean()
    # Not retried under the same desired state.
    device.reconcile()
    assert device.fetcher.calls.count(releases["bad"].digest) == 1


def test_failed_unable_to_roll_back_when_the_previous_slot_is_gone(
    device: Device, releases: dict[str, Release]
) -> None:
    device.deploy(1, releases["v1"])
    (device.data_dir / "models" / MODEL / releases["v1"].slot / "model.onnx").unlink()
    device.deploy(2, releases["bad"])
    assert device.outcomes()[-1] == ("2.0.0+bad", Outcome.FAILED_UNABLE_TO_ROLL_BACK)
    assert device.serving_version() is None
    state = device.on_disk()
    assert MODEL not in state.active and state.in_progress is None
    assert state.failed == {MODEL: releases["bad"].digest}
    assert device.last_reported().models == ()
    # A later desired state recovers the device.
    device.deploy(3, releases["v3"])
    assert device.outcomes()[-1] == ("3.0.0", Outcome.SUCCEEDED)
    device.assert_serves(releases["v3"])


@pytest.mark.parametrize("kind", ["unsigned", "mislabelled"])
def test_rejected_is_not_retried_under_the_same_desired_state_but_is_under_a_new_one(
    device: Device, releases: dict[str, Release], kind: str
) -> None:
    device.deploy(1, releases["v1"])
    bad = releases[kind]
    assert device.deploy(2, bad) is False
    assert device.outcomes()[-1] == (bad.version, Outcome.REJECTED)
    device.assert_serves(releases["v1"])
    assert device.slots() == {releases["v1"].slot}
    assert device.on_disk().failed == {MODEL: bad.digest}
    device.assert_clean()  # a bundle that failed verification is never kept
    device.reconcile()
    device.reconcile()
    assert device.fetcher.calls.count(bad.digest) == 1, "retried under the same desired state"
    assert len(device.events()) == 2
    device.offer(3, bad)  # re-signed, or another model changed: the same bundle stays failed
    device.reconcile()
    assert device.fetcher.calls.count(bad.digest) == 1, "a failed bundle was tried again"
    device.offer(4, bad, retry=1)  # the operator asks again
    assert device.on_disk().failed == {}
    device.reconcile()
    assert device.fetcher.calls.count(bad.digest) == 2
    assert device.outcomes()[-1] == (bad.version, Outcome.REJECTED)


def test_a_hung_download_is_superseded_by_a_newer_desired_state(
    device: Device, releases: dict[str, Release]
) -> None:
    device.deploy(1, releases["v1"])
    device.fetcher.hang.add(releases["v2"].digest)
    device.offer(2, releases["v2"])
    worker = threading.Thread(target=device.reconcile)
    worker.start()
    assert device.fetcher.hanging.wait(5)
    assert device.on_disk().in_progress is not None and device.on_disk().in_progress.state == "downloading"
    device.offer(3, releases["v3"])  # paho's thread, while the worker is stuck in the transfer
    worker.join(5)
    assert not worker.is_alive(), "the stuck download was not cancelled"
    assert device.outcomes() == [("1.0.0", Outcome.SUCCEEDED), ("2.0.0", Outcome.FAILED_NO_CHANGE)]
    assert device.events()[-1].error_code == Cancelled.code
    assert MODEL not in device.on_disk().failed, "superseded is not a failure of the bundle"
    device.reconcile()  # what the worker does next: it was woken by the offer
    assert device.outcomes()[-1] == ("3.0.0", Outcome.SUCCEEDED)
    device.assert_serves(releases["v3"])
    device.assert_clean()


# -- offer_desired: verification, duplicates, replays --------------------------------------------


def test_offer_accepts_a_newer_state_and_persists_it_before_anything_runs(
    device: Device, releases: dict[str, Release]
) -> None:
    envelope = device.offer(5, releases["v1"])
    state = device.on_disk()
    assert (state.accepted_sequence, state.desired_envelope) == (5, envelope.decode())
    assert device.fetcher.calls == [] and device.published == []
    assert not device.reconciler.idle.is_set()


def test_offer_ignores_the_retained_duplicate_and_refuses_replays(
    device: Device, releases: dict[str, Release], caplog: pytest.LogCaptureFixture
) -> None:
    device.offer(5, releases["v2"])
    offer = device.reconciler.offer_desired
    accepted = device.on_disk()
    before = (device.data_dir / STATE_FILE).read_bytes()

    caplog.clear()
    offer(accepted.desired_envelope.encode())  # type: ignore[union-attr]  # the broker's retained copy
    assert not [r for r in caplog.records if "refused" in r.getMessage()], "a duplicate is not an attack"

    refused = {
        "replay of an older state": desired(4, releases["v1"]),
        "same sequence, other content": desired(5, releases["v1"]),
        "another device's state": desired(6, releases["v1"], device_id="other-dev"),
        "expired": desired(7, releases["v1"], issued_at=time.time() - 7200),
        "signed by an untrusted key": desired(8, releases["v1"], key=STRANGER),
        "not a desired state at all": b'{"payloadType": "x"}',
    }
    for what, envelope in refused.items():
        caplog.clear()
        offer(envelope)
        assert [r for r in caplog.records if "refused" in r.getMessage()], f"{what}: not logged as refused"
        assert (device.data_dir / STATE_FILE).read_bytes() == before, f"{what}: changed the stored state"
    assert device.store.state == accepted


def test_a_restarted_agent_reconciles_its_stored_state_and_ignores_the_retained_copy(
    device: Device, releases: dict[str, Release]
) -> None:
    envelope = device.offer(3, releases["v1"])  # accepted, then the agent dies before deploying
    rebooted = device.reboot()
    rebooted.reconciler.offer_desired(envelope)  # the broker delivers the retained copy on connect
    assert rebooted.on_disk().accepted_sequence == 3
    rebooted.reconcile()  # no replay from the broker needed
    assert rebooted.outcomes() == [("1.0.0", Outcome.SUCCEEDED)]
    rebooted.reconcile()
    assert rebooted.fetcher.calls == [releases["v1"].digest], "deployed twice"
    rebooted.host.close_all()


def test_a_new_desired_state_with_another_digest_clears_the_recorded_failure(
    device: Device, releases: dict[str, Release]
) -> None:
    device.deploy(1, releases["v1"])
    device.deploy(2, releases["bad"])
    assert device.on_disk().failed == {MODEL: releases["bad"].digest}
    device.offer(3, releases["v3"])
    assert device.on_disk().failed == {}


def test_a_failed_bundle_is_not_deployed_again_by_each_new_desired_state(
    device: Device, releases: dict[str, Release]
) -> None:
    """Re-signs, key rotations and other models' changes bring new states naming the same bundle."""
    device.deploy(1, releases["v1"])
    device.deploy(2, releases["bad"])
    for sequence in (3, 4, 5):
        device.deploy(sequence, releases["bad"])
    assert device.fetcher.calls.count(releases["bad"].digest) == 1, "the known-bad bundle was deployed again"
    assert device.outcomes() == [("1.0.0", Outcome.SUCCEEDED), ("2.0.0+bad", Outcome.FAILED_ROLLED_BACK)]
    assert device.on_disk().failed == {MODEL: releases["bad"].digest}
    device.assert_serves(releases["v1"])
    # An explicit retry is one more attempt, with its own outcome, and only one.
    device.offer(6, releases["bad"], retry=1)
    device.reconcile()
    device.offer(7, releases["bad"], retry=1)  # the same retry, re-signed
    device.reconcile()
    assert device.fetcher.calls.count(releases["bad"].digest) == 2
    assert [e.sequence for e in device.events()] == [1, 2, 6]


# -- recovery: killed in every state --------------------------------------------------------------

# The deployment that is interrupted, by the state it is killed in: a good bundle everywhere except
# rolling_back, which a good bundle never reaches.
KILLED_DEPLOYMENT = {s: "v2" for s in State} | {State.ROLLING_BACK: "bad"}


# Killed while the candidate was loaded or checked: rolled back, then deployed again (a kill is
# not a verdict on the bundle). Killed rolling back: the bundle had already failed.
RETRIED = (State.ACTIVATING, State.HEALTH_CHECKING)


def _expected_after_recovery(state: State) -> tuple[Outcome, str]:
    action = RECOVERY[state]
    if action is Recovery.ROLL_BACK and state not in RETRIED:
        return Outcome.FAILED_ROLLED_BACK, "v1"
    return Outcome.SUCCEEDED, "v2"  # RESTART: done again; NOTHING: it had already succeeded; RETRIED


def _interrupt(device: Device, releases: dict[str, Release], state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave ``device``'s data directory as a crash in ``state`` would."""
    target = releases[KILLED_DEPLOYMENT[state]]
    if state is State.PENDING:
        # The reconciler never persists PENDING (START is persisted as DOWNLOADING), but the
        # table covers it: write it as an older agent or a crash-safe future change might.
        device.offer(2, target)
        d = target.directive()
        device.store.update(
            in_progress=InProgress(
                sequence=2, name=d.name, version=d.version, bundle_digest=d.bundle_digest, bundle_size=d.bundle_size,
                runtime=d.runtime, state=State.PENDING.value, started_at=time.time(),
                previous=device.store.state.active[MODEL],
            )
        )
        return
    kill_at(monkeypatch, state.value)
    with pytest.raises(Killed):
        device.deploy(2, target)
    monkeypatch.setattr(executor_module, "pause_point", lambda current: None)
    assert device.on_disk().in_progress.state == state.value  # type: ignore[union-attr]


@pytest.mark.parametrize("state", list(State), ids=[s.value for s in State])
def test_killed_in_every_state_recovers_per_the_table(
    device: Device, releases: dict[str, Release], state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    device.deploy(1, releases["v1"])
    _interrupt(device, releases, state, monkeypatch)
    killed = releases[KILLED_DEPLOYMENT[state]]
    outcome, survivor = _expected_after_recovery(state)

    rebooted = device.reboot()
    rebooted.reconcile()
    rebooted.reconcile()  # and nothing more happens afterwards

    assert rebooted.outcomes() == [(killed.version, outcome)], "exactly one outcome reported after the restart"
    rebooted.assert_serves(releases[survivor])
    state_after = rebooted.on_disk()
    assert state_after.active[MODEL].bundle_digest == releases[survivor].digest
    if state in RETRIED:
        assert state_after.failed == {} and state_after.interrupted == {}
        assert rebooted.fetcher.calls == [killed.digest], "deployed again, once"
        assert rebooted.slots() == {releases["v1"].slot, killed.slot}
    elif RECOVERY[state] is Recovery.ROLL_BACK:
        assert rebooted.events()[0].error_code == "agent_restarted"
        assert state_after.failed == {MODEL: killed.digest}, "a rolled-back bundle must not be retried"
        assert rebooted.fetcher.calls == []
        assert rebooted.slots() == {releases["v1"].slot}
    elif RECOVERY[state] is Recovery.RESTART:
        assert rebooted.fetcher.calls == [killed.digest]
        assert rebooted.slots() == {releases["v1"].slot, killed.slot}
    else:
        assert rebooted.fetcher.calls == []
        assert rebooted.slots() == {releases["v1"].slot, killed.slot}
    rebooted.assert_clean()
    rebooted.host.close_all()


def test_the_recovery_cases_cover_the_table() -> None:
    assert set(KILLED_DEPLOYMENT) == set(RECOVERY) == set(State)


def test_killed_mid_unpack_leaves_no_debris_after_recovery(
    device: Device, releases: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.deploy(1, releases["v1"])

    def killed_while_writing(bundle: Path, dest: Path, **kwargs: object) -> None:
        debris = dest.with_name(dest.name + ".unpacking")
        debris.mkdir(parents=True)
        (debris / "model.onnx").write_bytes(b"half a model")
        raise Killed("staging")

    monkeypatch.setattr(steps_module, "extract_bundle", killed_while_writing)
    with pytest.raises(Killed):
        device.deploy(2, releases["v2"])
    # The desired state moves on before the agent comes back: nothing will redo this unpack.
    device.offer(3, releases["v1"])
    monkeypatch.undo()
    rebooted = device.reboot()
    assert not list((device.data_dir / "models").glob("*/*.unpacking"))
    rebooted.reconcile()
    rebooted.assert_serves(releases["v1"])
    assert rebooted.slots() == {releases["v1"].slot}
    rebooted.host.close_all()


@pytest.mark.parametrize("state", [State.ACTIVATING, State.HEALTH_CHECKING, State.ROLLING_BACK])
def test_an_unproven_model_is_never_reported_serving(
    device: Device, releases: dict[str, Release], state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane counts "serving" as success: a model mid-health-check must not say so."""
    device.deploy(1, releases["v1"])
    seen: list[ReportedState] = []

    def pause_point(current: str) -> None:
        if current == state.value:
            seen.append(device.reconciler.reported_state())  # what a heartbeat would send now

    monkeypatch.setattr(executor_module, "pause_point", pause_point)
    device.deploy(2, releases[KILLED_DEPLOYMENT[state]])
    assert len(seen) == 1
    unproven = releases[KILLED_DEPLOYMENT[state]].digest
    assert not [m for m in seen[0].models if m.bundle_digest == unproven and m.state == "serving"]


def test_state_file_round_trips(device: Device, releases: dict[str, Release]) -> None:
    device.deploy(1, releases["v1"])
    device.deploy(2, releases["bad"])
    assert AgentState.from_dict(device.store.state.to_dict()) == device.on_disk() == device.store.state


# -- every state change goes through the table ------------------------------------------------------


def record_transitions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[State, Event]]:
    """Every (state, event) the executor hands to the transition table, in order."""
    fired: list[tuple[State, Event]] = []
    real_advance = executor_module.advance

    def advance(state: State, event: Event) -> Step:
        fired.append((state, event))
        return real_advance(state, event)

    monkeypatch.setattr(executor_module, "advance", advance)
    return fired


def test_a_rollback_ends_through_the_rolling_back_rows(
    device: Device, releases: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.deploy(1, releases["v1"])
    fired = record_transitions(monkeypatch)
    device.deploy(2, releases["bad"])
    assert fired[-2:] == [(State.HEALTH_CHECKING, Event.FAIL), (State.ROLLING_BACK, Event.ROLLED_BACK)]
    assert [e for _, e in fired[:6]] == [
        Event.START, Event.DOWNLOADED, Event.VERIFIED, Event.STAGED, Event.ACTIVATED, Event.FAIL
    ]


def test_a_rollback_that_cannot_load_the_previous_model_fires_rollback_failed(
    device: Device, releases: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.deploy(1, releases["v1"])
    (device.data_dir / "models" / MODEL / releases["v1"].slot / "model.onnx").unlink()
    fired = record_transitions(monkeypatch)
    device.deploy(2, releases["bad"])
    assert fired[-1] == (State.ROLLING_BACK, Event.ROLLBACK_FAILED)


@pytest.mark.parametrize("state", [s for s in State if s is not State.DONE], ids=lambda s: s.value)
def test_boot_recovery_goes_through_the_recover_event(
    device: Device, releases: dict[str, Release], state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    device.deploy(1, releases["v1"])
    _interrupt(device, releases, state, monkeypatch)
    fired = record_transitions(monkeypatch)
    rebooted = device.reboot()
    if RECOVERY[state] is Recovery.ROLL_BACK:
        assert fired == [(state, Event.RECOVER), (State.ROLLING_BACK, Event.ROLLED_BACK)]
    else:
        assert fired == [(state, Event.RECOVER)]
        assert rebooted.on_disk().in_progress is None, "PENDING is never persisted"
    rebooted.host.close_all()


def test_an_unexpected_error_in_a_step_is_an_outcome_not_a_dead_worker(
    device: Device, releases: dict[str, Release]
) -> None:
    device.deploy(1, releases["v1"])
    device.fetcher.failures[releases["v2"].digest] = ValueError("a bug in a transfer")
    assert device.deploy(2, releases["v2"]) is False
    assert device.outcomes()[-1] == ("2.0.0", Outcome.FAILED_NO_CHANGE)
    assert device.events()[-1].error_code == "ValueError"
    assert device.on_disk().failed == {MODEL: releases["v2"].digest}
    device.assert_serves(releases["v1"])
    device.assert_clean()


# -- issue 8: the candidate is proven before it serves; deaths mid-activation are bounded --------


def test_the_candidate_never_serves_before_its_health_check_passes(
    device: Device, releases: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.deploy(1, releases["v1"])
    served: list[str] = []
    real_swap = device.host.swap

    def swap(name: str, model: object) -> object:
        served.append(getattr(model, "version", "-"))
        return real_swap(name, model)  # type: ignore[arg-type]

    monkeypatch.setattr(device.host, "swap", swap)
    serving_at: dict[str, str | None] = {}

    def pause_point(current: str) -> None:
        serving_at[current] = device.serving_version()

    monkeypatch.setattr(executor_module, "pause_point", pause_point)
    device.deploy(2, releases["bad"])
    assert device.outcomes()[-1] == ("2.0.0+bad", Outcome.FAILED_ROLLED_BACK)
    assert "2.0.0+bad" not in served, "the unproven model was put into the serving host"
    device.deploy(3, releases["v2"])
    assert serving_at["activating"] == serving_at["health_checking"] == "1.0.0"
    assert served[-1] == "2.0.0"
    device.assert_serves(releases["v2"])


def test_a_bundle_that_keeps_killing_the_agent_ends_as_a_runtime_crash(
    device: Device, releases: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that crashes the runtime (SIGSEGV) dies the same way on every boot: bounded retries."""
    device.deploy(1, releases["v1"])
    kill_at(monkeypatch, State.HEALTH_CHECKING.value)  # and on every boot after
    with pytest.raises(Killed):
        device.deploy(2, releases["v2"])
    for death in range(1, MAX_INTERRUPTED_ATTEMPTS):
        device = device.reboot()
        device.assert_serves(releases["v1"])
        assert device.events() == [], f"an outcome after death {death}: the retry must stay pending"
        assert device.on_disk().interrupted[MODEL].count == death
        with pytest.raises(Killed):
            device.reconcile()
    device = device.reboot()
    [event] = device.events()
    assert (event.version, event.outcome, event.error_code) == ("2.0.0", Outcome.FAILED_ROLLED_BACK, "runtime_crashed")
    assert "1.0.0 restored" in event.message
    device.reconcile()
    device.reconcile()
    assert device.events() == [event], "tried again after it was given up"
    device.assert_serves(releases["v1"])
    state = device.on_disk()
    assert state.failed == {MODEL: releases["v2"].digest} and state.interrupted == {}
    device.assert_clean()
    device.host.close_all()


def test_the_outcome_says_when_the_health_check_ran_on_zeros(device: Device, releases: dict[str, Release]) -> None:
    device.deploy(1, releases["v1"])
    assert "ran on zeros" in device.events()[-1].message
    device.deploy(2, releases["bad"])
    assert "ran on zeros" in device.events()[-1].message, "a failed check on zeros must say so too"


def test_the_outcome_says_nothing_of_zeros_when_the_bundle_has_samples(
    device: Device, tmp_path: Path
) -> None:
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(good_model(4))
    samples = tmp_path / "health.npz"
    np.savez(samples, input=np.ones((2, N_INPUTS), dtype=np.float32))
    loaded = load_model("onnx", model_path, name=MODEL, version="4.0.0")
    inputs, outputs = loaded.inputs, loaded.outputs
    loaded.close()
    files = {"model.onnx": model_path, "health.npz": samples}
    manifest = make_manifest(
        name=MODEL, version="4.0.0", runtime="onnx", model_file="model.onnx", files=files,
        inputs=inputs, outputs=outputs, health_inputs="health.npz",
    )
    bundle = tmp_path / "4.bundle"
    digest = build_bundle(bundle, manifest, files, [PUBLISHER])
    release = Release(MODEL, "4.0.0", bundle, digest, bundle.stat().st_size, 4)
    device.fetcher.by_digest[digest] = release
    device.deploy(1, release)
    assert device.outcomes() == [("4.0.0", Outcome.SUCCEEDED)]
    assert "zeros" not in device.events()[-1].message


def test_a_desired_state_that_arrives_while_the_disk_is_full_is_kept_and_applied_later(
    device: Device, releases: dict[str, Release], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.deploy(1, releases["v1"])
    real_write = state_store_module.atomic_write_json

    def disk_full(path: Path, value: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_store_module, "atomic_write_json", disk_full)
    device.offer(2, releases["v2"])  # paho's thread: must not raise, must not lose it
    assert device.store.state.accepted_sequence == 2
    assert device.on_disk().accepted_sequence == 1
    [rejection] = device.rejections()
    assert rejection.code == "state_not_persisted" and "desired state 2" in rejection.message
    assert device.last_reported().agent["health"].startswith("state_not_persisted")
    assert device.reconciler.step() == device.config.retry_delay_s, "a retry is due"
    assert device.fetcher.calls == [releases["v1"].digest], "deployed from a state that is not on disk"
    device.assert_serves(releases["v1"])

    monkeypatch.setattr(state_store_module, "atomic_write_json", real_write)  # space is back
    assert device.reconciler.step() is None
    assert device.on_disk().accepted_sequence == 2
    assert device.outcomes()[-1] == ("2.0.0", Outcome.SUCCEEDED)
    device.assert_serves(releases["v2"])
    assert device.last_reported().agent["health"] == "ok"


def test_temp_files_of_interrupted_writes_are_swept_on_start(device: Device, releases: dict[str, Release]) -> None:
    device.deploy(1, releases["v1"])
    leftovers = [device.data_dir / ".state.json.k1ll3d.tmp", device.data_dir / ".keyring.json.x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a state file")
    rebooted = device.reboot()
    assert [p for p in leftovers if p.exists()] == []
    rebooted.assert_serves(releases["v1"])
    rebooted.host.close_all()
