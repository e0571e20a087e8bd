"""The reported state: what this device runs now, from the stored state and the model host."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from edgefleet.agent.deployment.machine import is_unproven
from edgefleet.agent.deployment.shadow_machine import ShadowState
from edgefleet.agent.deployment.state_store import AgentState, ShadowModel
from edgefleet.agent.serving.host import ModelHost
from edgefleet.shared.wire.messages import ModelReport, ModelState, ReportedState, ShadowReport
from edgefleet.shared.wire.messages import ShadowState as ReportedShadowState


def reported_state(
    device_id: str, state: AgentState, host: ModelHost, *, now: float, health: str = "ok"
) -> ReportedState:
    """The reported state of ``device_id`` at ``now`` (seconds since the epoch, from the injected clock).

    ``health`` goes into the agent info: "ok", or what keeps the device from converging (a state
    file it cannot write, say).
    """
    progress = state.in_progress
    # A model between activation and a passed health check is live but unproven, and the
    # control plane takes "serving" as success: leave it out until the deployment ends.
    unproven = (
        (progress.name, progress.bundle_digest) if progress is not None and is_unproven(progress.state) else None
    )
    models = tuple(
        ModelReport(
            name=a.name,
            version=a.version,
            bundle_digest=a.bundle_digest,
            runtime=a.runtime,
            state=ModelState.SERVING if host.get(a.name, a.version) is not None else ModelState.FAILED,
        )
        for a in state.active.values()
        if (a.name, a.bundle_digest) != unproven
    )
    shadows = tuple(r for r in (_shadow_report(e, host) for e in state.shadows.values()) if r is not None)
    return ReportedState(
        device_id=device_id,
        ts=now,
        applied_sequence=state.applied_sequence,
        models=models,
        agent={
            "version": _agent_version(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "health": health,
        },
        shadows=shadows,
    )


def _shadow_report(entry: ShadowModel, host: ModelHost) -> ShadowReport | None:
    if entry.state is ShadowState.FAILED:
        return ShadowReport(
            name=entry.name,
            serving_version=entry.serving_version,
            version=entry.version,
            bundle_digest=entry.bundle_digest,
            state=ReportedShadowState.FAILED,
            message=entry.message,
        )
    runner = host.shadow(entry.name)
    if runner is None or runner.bundle_digest != entry.bundle_digest:
        return None  # not loaded yet
    return runner.report()


def _agent_version() -> str:
    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0+unknown"
