"""Which error becomes which state-machine event: one table for every deployment step.

A step (download, verify, stage, activate, health-check, and a shadow's load and check) runs
inside :func:`attempt`. If it raises, :func:`classify` looks the exception up in
:data:`ERROR_EVENTS` (the first matching class wins, so the specific ones come first) and
returns a :class:`Failure`: the event to fire, the code and message to report, and whether the
same desired state is tried again. Anything not in the table (a bug, a foreign exception a
runtime let through) is a plain failure: a bad bundle never stops the worker.

Rejections exist only before activation; once the new model may be live, every error is a
failure, which rolls back (the table of :mod:`edgefleet.agent.deployment.machine` has no other
way out of ACTIVATING and HEALTH_CHECKING).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from edgefleet.agent.deployment.machine import TRANSITIONS, Event, State
from edgefleet.agent.transfer.mqtt_chunks import Cancelled
from edgefleet.shared.errors import BundleError, EdgefleetError, MessageError, TrustError

MAX_MESSAGE_CHARS = 2000  # characters of a message an event or a stored failure keeps
_T = TypeVar("_T")

# Exception class -> event. A class's code comes from the exception itself (EdgefleetError.code),
# or is the class name for a foreign one (e.g. "OSError" for a full disk).
ERROR_EVENTS: tuple[tuple[type[BaseException], Event], ...] = (
    (Cancelled, Event.SUPERSEDE),  # a newer desired state no longer wants this bundle
    (TrustError, Event.REJECT),  # not signed by whom it must be
    (BundleError, Event.REJECT),  # integrity, unsafe archive, incompatible, downgrade
    (MessageError, Event.REJECT),  # a manifest that does not decode
    (EdgefleetError, Event.FAIL),  # transfer (retryable), runtime load, inference, ...
    (OSError, Event.FAIL),  # disk full, permissions
    (Exception, Event.FAIL),  # anything else: still an outcome, never a dead worker
)


@dataclass(frozen=True, slots=True)
class Failure:
    """What a failed step means for the deployment."""

    event: Event
    code: str
    message: str
    retryable: bool  # not an outcome: the same desired state is tried again after a delay


def classify(exc: Exception, state: State) -> Failure:
    """Map an exception raised while the deployment was in ``state`` to its :class:`Failure`."""
    event = next(event for cls, event in ERROR_EVENTS if isinstance(exc, cls))
    if (state, event) not in TRANSITIONS:
        event = Event.FAIL  # after activation began only a failure (and its rollback) is possible
    code = exc.code if isinstance(exc, EdgefleetError) else type(exc).__name__
    retryable = event is Event.FAIL and isinstance(exc, EdgefleetError) and exc.retryable
    return Failure(event=event, code=code, message=str(exc)[:MAX_MESSAGE_CHARS], retryable=retryable)


class StepFailed(EdgefleetError):
    """A step raised; carries what :func:`classify` made of it (internal to the executors)."""

    code = "step_failed"

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def attempt(state: State, step: Callable[[], _T]) -> _T:
    """Run one step of a deployment in ``state``; whatever it raises is re-raised as :class:`StepFailed`."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001 - every error is an outcome; classify() says which
        raise StepFailed(classify(exc, state)) from exc


def drops_download(state: State, failure: Failure) -> bool:
    """Whether the downloaded bundle is deleted after ``failure`` in ``state``.

    A bundle that failed verification is never kept; one whose unpacking failed for lack of room
    gives its space back (a full disk must not stay full because of us).
    """
    if failure.event is Event.REJECT:
        return state in (State.VERIFYING, State.STAGING)
    return failure.event is Event.FAIL and state is State.STAGING
