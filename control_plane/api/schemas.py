"""Database rows to API shapes (the ``*Public`` models); no business rules here."""

from __future__ import annotations

import json
from collections.abc import Iterable

from edgefleet.control_plane.db.tables import (
    Assignment,
    AssignmentPublic,
    Deployment,
    DeploymentPublic,
    Device,
    DevicePublic,
    ModelVersion,
    ModelVersionPublic,
    ShadowAssignment,
    ShadowPublic,
    ShadowReportPublic,
    TensorSpecPublic,
)
from edgefleet.control_plane.services.publishing import manifest_of


def model_version_public(row: ModelVersion) -> ModelVersionPublic:
    """A model version with the signature and metadata from its signed manifest."""
    manifest = manifest_of(row)
    return ModelVersionPublic(
        name=row.name,
        version=row.version,
        runtime=row.runtime,
        bundle_digest=row.bundle_digest,
        bundle_size=row.bundle_size,
        inputs=[TensorSpecPublic(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in manifest.inputs],
        outputs=[TensorSpecPublic(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in manifest.outputs],
        description=manifest.description,
        labels=dict(manifest.labels),
        created_at=row.created_at,
    )


def device_public(device: Device, assignments: Iterable[Assignment]) -> DevicePublic:
    """A device with its last reported state and what it is assigned."""
    return DevicePublic(
        id=device.id,
        created_at=device.created_at,
        last_seen_at=device.last_seen_at,
        online=device.online,
        desired_sequence=device.desired_sequence,
        applied_sequence=device.applied_sequence,
        # Stored only after strict decoding, so it always parses.
        reported=json.loads(device.reported_json) if device.reported_json else None,
        agent=json.loads(device.agent_json) if device.agent_json else {},
        assignments=sorted(
            (AssignmentPublic(model_name=a.model_name, version=a.version) for a in assignments),
            key=lambda a: a.model_name,
        ),
    )


def deployment_public(row: Deployment) -> DeploymentPublic:
    """A deployment as stored."""
    return DeploymentPublic.model_validate(row, from_attributes=True)


def device_shadows_public(
    device: Device, assignments: Iterable[Assignment], shadows: Iterable[ShadowAssignment]
) -> list[ShadowPublic]:
    """The shadows of one device: each asked for, and each it reports, merged by model name.

    A shadow still reported after it was removed (the device has not caught up) is listed with
    ``version`` null; one asked for but not reported yet has ``report`` null.
    """
    serving = {a.model_name: a.version for a in assignments}
    desired = {s.model_name: s for s in shadows}
    # Stored only after strict decoding, so it always parses.
    reported = json.loads(device.reported_json) if device.reported_json else {}
    reports = {r["name"]: r for r in reported.get("shadows", [])}
    rows = []
    for name in sorted(desired.keys() | reports.keys()):
        wanted, report = desired.get(name), reports.get(name)
        rows.append(
            ShadowPublic(
                device_id=device.id,
                model_name=name,
                serving_version=serving.get(name),
                version=wanted.version if wanted else None,
                sample_rate=wanted.sample_rate if wanted else None,
                agreement=report["agreements"] / report["samples"] if report and report["samples"] else None,
                report=ShadowReportPublic.model_validate({k: v for k, v in report.items() if k != "name"})
                if report
                else None,
                reported_ts=device.reported_ts if report else None,
            )
        )
    return rows
