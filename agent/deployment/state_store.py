"""The agent's durable state: one JSON file, replaced atomically on every change.

It holds the last accepted desired state (so a restart resumes it without a replay from the
broker), the sequence fully applied, the active slot of each model, and the deployment in
progress with its state-machine state (persisted *before* the step it names runs), and the
shadow candidate of each model (persisted as LOADING before it is loaded, so a load that
crashes the agent is not tried again on boot).

A deployment the agent died in while loading or checking its candidate is counted in
``interrupted`` (by model, for one bundle digest), so that a bundle that kills the runtime is
tried a bounded number of times, not on every boot.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefleet.agent.deployment.machine import State
from edgefleet.agent.deployment.shadow_machine import ShadowState
from edgefleet.shared.errors import ConfigError
from edgefleet.shared.files import atomic_write_json

STATE_FILE = "state.json"
STATE_SCHEMA = "edgefleet.agent-state/v1"


@dataclass(frozen=True, slots=True, kw_only=True)
class ActiveModel:
    """A model slot the agent serves."""

    name: str
    version: str
    bundle_digest: str
    runtime: str
    slot: str  # directory name under models/<name>/
    model_file: str
    accelerators: tuple[str, ...] = ()  # from the signed manifest: which providers to prefer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class InProgress:
    """The deployment under way (at most one at a time)."""

    sequence: int
    name: str
    version: str
    bundle_digest: str
    bundle_size: int
    runtime: str
    state: State  # persisted as its string value
    started_at: float
    previous: ActiveModel | None  # what to roll back to

    def __post_init__(self) -> None:
        # Loaded from JSON (or built by an older caller) with the plain string value.
        object.__setattr__(self, "state", State(self.state))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Interruption:
    """How many deployments of one bundle the agent died in, while loading or checking it."""

    bundle_digest: str
    count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowModel:
    """A shadow candidate beside a serving model: loaded and fed sampled inputs, never served."""

    name: str
    version: str
    bundle_digest: str
    runtime: str
    sample_rate: float
    serving_version: str  # the serving version it was deployed beside
    state: ShadowState  # LOADING (persisted before the load), RUNNING or FAILED; persisted as its value
    slot: str = ""  # directory name under models/<name>/; "" until staged
    model_file: str = ""
    message: str = ""  # why it failed
    failed_sequence: int = 0  # the accepted desired-state sequence it failed under (not retried there)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", ShadowState(self.state))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentState:
    """Everything the agent must remember across restarts."""

    desired_envelope: str | None = None  # the last accepted signed desired state, as received
    accepted_sequence: int = 0
    applied_sequence: int = 0
    active: dict[str, ActiveModel] = field(default_factory=dict)
    in_progress: InProgress | None = None
    # model name -> the digest that failed; kept until the desired state names another digest
    # for the model (or none), or asks for a retry (see planner.carried_failures)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: dict[str, Interruption] = field(default_factory=dict)  # model name -> deaths mid-activation
    shadows: dict[str, ShadowModel] = field(default_factory=dict)  # model name -> its shadow candidate
    floors: dict[str, str] = field(default_factory=dict)  # model name -> lowest version still installable

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": STATE_SCHEMA,
            "desired_envelope": self.desired_envelope,
            "accepted_sequence": self.accepted_sequence,
            "applied_sequence": self.applied_sequence,
            "active": {k: v.to_dict() for k, v in sorted(self.active.items())},
            "in_progress": self.in_progress.to_dict() if self.in_progress else None,
            "failed": dict(self.failed),
            "shadows": {k: v.to_dict() for k, v in sorted(self.shadows.items())},
            "floors": dict(self.floors),
        }
        if self.interrupted:  # absent when empty: files of agents before it stay byte-identical
            out["interrupted"] = {k: v.to_dict() for k, v in sorted(self.interrupted.items())}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AgentState:
        if raw.get("schema") != STATE_SCHEMA:
            raise ConfigError(f"agent state file has schema {raw.get('schema')!r}, expected {STATE_SCHEMA!r}")
        progress = raw.get("in_progress")
        return cls(
            desired_envelope=raw.get("desired_envelope"),
            accepted_sequence=int(raw["accepted_sequence"]),
            applied_sequence=int(raw["applied_sequence"]),
            active={k: _active(v) for k, v in raw["active"].items()},
            in_progress=None
            if progress is None
            else InProgress(
                **{**progress, "previous": _active(progress["previous"]) if progress["previous"] else None}
            ),
            failed=dict(raw.get("failed", {})),
            interrupted={k: Interruption(**v) for k, v in raw.get("interrupted", {}).items()},
            floors=dict(raw.get("floors", {})),
            shadows={k: ShadowModel(**v) for k, v in raw.get("shadows", {}).items()},
        )


def _active(raw: dict[str, Any]) -> ActiveModel:
    return ActiveModel(**{**raw, "accelerators": tuple(raw.get("accelerators", ()))})


class StateStore:
    """Holds the current :class:`AgentState` and writes every change through to disk."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / STATE_FILE
        self._lock = threading.Lock()
        self._state = self._load()
        self._write_error: OSError | None = None

    def sweep_temp_files(self) -> list[Path]:
        """Remove the temp files of atomic writes a kill interrupted (``.<file>.*.tmp``); return them.

        The atomic writer removes its temp file on an exception, but nothing runs after SIGKILL
        or power loss; each leftover may be as large as the file it was replacing.
        """
        swept = sorted(self._path.parent.glob(".*.tmp"))
        for path in swept:
            path.unlink(missing_ok=True)
        return swept

    def _load(self) -> AgentState:
        if not self._path.exists():
            return AgentState()
        try:
            raw = json.loads(self._path.read_text())
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
            return AgentState.from_dict(raw)
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise ConfigError(f"agent state file {self._path} is unreadable: {exc}") from exc

    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def write_error(self) -> OSError | None:
        """Why the last write failed (disk full, say); None once a write succeeds again."""
        return self._write_error

    def update(self, **changes: Any) -> AgentState:
        """Replace fields, persist atomically, and return the new state.

        Raises:
            OSError: The file could not be written; the state in memory is left as it was.
        """
        with self._lock:
            new = replace(self._state, **changes)
            self._write(new)
            self._state = new
            return new

    def update_or_hold(self, **changes: Any) -> OSError | None:
        """Replace fields in memory, and persist them if the disk lets us.

        For what must not be lost although it cannot be written now (a desired state accepted
        while the disk is full: the broker will not deliver it again). The change is held in
        memory and written with the next successful write (:meth:`flush`, or any update).

        Returns:
            None if it was persisted; else the write's error.
        """
        with self._lock:
            self._state = replace(self._state, **changes)
            try:
                self._write(self._state)
            except OSError as exc:
                return exc
            return None

    def flush(self) -> None:
        """Write the state held in memory, if the last write failed.

        Raises:
            OSError: It still cannot be written.
        """
        with self._lock:
            if self._write_error is not None:
                self._write(self._state)

    def _write(self, state: AgentState) -> None:
        try:
            atomic_write_json(self._path, state.to_dict())
        except OSError as exc:
            self._write_error = exc
            raise
        self._write_error = None
