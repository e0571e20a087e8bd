"""The one table from exceptions to deployment events."""

from __future__ import annotations

import errno
import itertools

import pytest

from edgefleet.agent.deployment.failures import ERROR_EVENTS, Failure, classify, drops_download
from edgefleet.agent.deployment.machine import TRANSITIONS, Event, State
from edgefleet.agent.transfer.mqtt_chunks import Cancelled
from edgefleet.shared.errors import (
    BundleIntegrityError,
    DowngradeError,
    IncompatibleBundleError,
    InferenceError,
    MessageError,
    RuntimeLoadError,
    SignatureError,
    TransferError,
    UnsafeArchiveError,
)

BEFORE = (State.DOWNLOADING, State.VERIFYING, State.STAGING)
AFTER = (State.ACTIVATING, State.HEALTH_CHECKING)
CASES: list[tuple[Exception, Event, str, bool]] = [
    (Cancelled("a newer desired state"), Event.SUPERSEDE, "superseded", False),
    (SignatureError("unknown key"), Event.REJECT, "signature_invalid", False),
    (BundleIntegrityError("hash"), Event.REJECT, "bundle_integrity", False),
    (UnsafeArchiveError("link"), Event.REJECT, "bundle_unsafe", False),
    (IncompatibleBundleError("arch"), Event.REJECT, "bundle_incompatible", False),
    (DowngradeError("floor"), Event.REJECT, "downgrade_refused", False),
    (MessageError("manifest"), Event.REJECT, "message_invalid", False),
    (TransferError("chunks stopped"), Event.FAIL, "transfer_failed", True),
    (RuntimeLoadError("onnx"), Event.FAIL, "runtime_load_failed", False),
    (InferenceError("shape"), Event.FAIL, "inference_invalid", False),
    (OSError(errno.ENOSPC, "No space left on device"), Event.FAIL, "OSError", False),
    (FileExistsError("slot"), Event.FAIL, "FileExistsError", False),
    (ValueError("a bug"), Event.FAIL, "ValueError", False),
    (KeyError("a bug"), Event.FAIL, "KeyError", False),
]


@pytest.mark.parametrize(("exc", "event", "code", "retryable"), CASES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("state", BEFORE, ids=lambda s: s.value)
def test_before_activation_each_error_becomes_its_event(
    exc: Exception, event: Event, code: str, retryable: bool, state: State
) -> None:
    assert classify(exc, state) == Failure(event=event, code=code, message=str(exc), retryable=retryable)


@pytest.mark.parametrize(("exc", "event", "code", "retryable"), CASES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("state", AFTER, ids=lambda s: s.value)
def test_after_activation_every_error_is_a_failure_that_rolls_back(
    exc: Exception, event: Event, code: str, retryable: bool, state: State
) -> None:
    failure = classify(exc, state)
    assert failure.event is Event.FAIL and failure.code == code
    assert TRANSITIONS[(state, failure.event)][0] is State.ROLLING_BACK


@pytest.mark.parametrize("state", [*BEFORE, *AFTER], ids=lambda s: s.value)
def test_every_classified_event_is_legal_where_it_is_classified(state: State) -> None:
    for (cls, _), exc in itertools.product(ERROR_EVENTS, [c[0] for c in CASES]):
        if isinstance(exc, cls):
            assert (state, classify(exc, state).event) in TRANSITIONS


def test_the_table_ends_with_a_catch_all_failure() -> None:
    assert ERROR_EVENTS[-1] == (Exception, Event.FAIL)


def test_the_message_is_bounded() -> None:
    assert len(classify(RuntimeLoadError("x" * 10_000), State.ACTIVATING).message) == 2000


@pytest.mark.parametrize(("state", "event", "dropped"), [
    (State.DOWNLOADING, Event.REJECT, False),
    (State.DOWNLOADING, Event.FAIL, False),
    (State.VERIFYING, Event.REJECT, True),  # never keep what failed verification
    (State.VERIFYING, Event.FAIL, False),  # e.g. a read error: the bytes may be fine
    (State.STAGING, Event.REJECT, True),
    (State.STAGING, Event.FAIL, True),  # disk full: give the space back
    (State.STAGING, Event.SUPERSEDE, False),
])
def test_which_failures_drop_the_downloaded_bundle(state: State, event: Event, dropped: bool) -> None:
    assert drops_download(state, Failure(event=event, code="c", message="m", retryable=False)) is dropped
