"""``/api/v1/models``: publish a model file (signed here into a bundle) and read the catalog."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, status
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from edgefleet.control_plane.api.access import require
from edgefleet.control_plane.api.auditing import audit_target
from edgefleet.control_plane.api.deps import ControlPlane, ControlPlaneDep, SessionDep
from edgefleet.control_plane.api.errors import error_responses
from edgefleet.control_plane.api.schemas import ModelVersionPublic, model_version_public
from edgefleet.control_plane.api.uploads import FILE_FIELD, FormLimits, receive_upload
from edgefleet.control_plane.services.auth import Role
from edgefleet.control_plane.services.catalog import get_model_version, list_model_versions
from edgefleet.control_plane.services.publishing import infer_runtime, publish_model
from edgefleet.shared.errors import MessageError

router = APIRouter(prefix="/api/v1", tags=["models"])

HEALTH_INPUTS_FIELD = "health_inputs"
_UPLOAD_FIELDS = {"name", "version", "runtime", "description", "labels", "min_version", "latency_budget_ms"}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD, "name", "version"],
                    "properties": {
                        FILE_FIELD: {"type": "string", "format": "binary", "description": "An .onnx or .tflite file."},
                        "name": {"type": "string", "description": "Model name, [a-z0-9._-], at most 64 chars."},
                        "version": {"type": "string", "description": "Version, [A-Za-z0-9._+-], at most 64 chars."},
                        "runtime": {"type": "string", "enum": ["onnx", "tflite"],
                                    "description": "Default: from the file's extension."},
                        "description": {"type": "string"},
                        "labels": {"type": "string", "description": 'A JSON object of strings, e.g. {"team": "cv"}.'},
                        HEALTH_INPUTS_FIELD: {"type": "string", "format": "binary",
                                              "description": "An .npz of sample inputs (one array per model "
                                                             "input) for the device's health check."},
                        "min_version": {"type": "string",
                                        "description": "Devices that install this version refuse versions below this."},
                        "latency_budget_ms": {"type": "number", "exclusiveMinimum": 0,
                                              "description": "The device's health-check inference must finish "
                                                             "within this."},
                    },
                }
            }
        },
    }
}


@router.post(
    "/models",
    dependencies=[require(Role.PUBLISHER)],
    response_model=ModelVersionPublic,
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400, 409, 413),
    openapi_extra=_UPLOAD_BODY,
)
async def upload_model(request: Request, cp: ControlPlaneDep) -> ModelVersionPublic:
    """Publish a model file: checked (parsed, then loaded in a sandboxed child), described, signed and stored.

    Publishing the same bytes under the same name and version again returns the existing
    version (201 as well); different bytes under an existing name and version is a 409.
    """
    tmp = cp.store.new_temp_path(".upload")
    health_inputs = cp.store.new_temp_path(".npz")
    try:
        limits = FormLimits(
            max_field_bytes=cp.settings.upload_max_field_bytes,
            max_parts_count=cp.settings.upload_max_parts_count,
            overhead_bytes=cp.settings.upload_form_overhead_bytes,
        )
        upload = await receive_upload(
            request,
            tmp,
            max_file_bytes=cp.settings.max_upload_bytes,
            limits=limits,
            attachments={HEALTH_INPUTS_FIELD: health_inputs},
        )
        fields = upload.fields
        unknown = sorted(set(fields) - _UPLOAD_FIELDS)
        if unknown:
            raise MessageError(f"unknown form field(s) {unknown}; expected {sorted(_UPLOAD_FIELDS | {FILE_FIELD})}")
        for required in ("name", "version"):
            if not fields.get(required):
                raise MessageError(f"the form field {required!r} is required")
        runtime = fields.get("runtime") or infer_runtime(upload.filename)
        audit_target(request, f"model={fields['name']} version={fields['version']}")
        options = _PublishOptions(
            filename=upload.filename,
            description=fields.get("description", ""),
            labels=_parse_labels(fields.get("labels", "")),
            min_version=fields.get("min_version") or None,
            latency_budget_ms=_parse_budget(fields.get("latency_budget_ms", "")),
            health_inputs=health_inputs if HEALTH_INPUTS_FIELD in upload.attachments else None,
            health_inputs_filename=upload.attachments.get(HEALTH_INPUTS_FIELD),
        )
        # Checking and signing the model is blocking work: off the event loop.
        return await run_in_threadpool(_publish, cp, tmp, fields["name"], fields["version"], runtime, options)
    finally:
        tmp.unlink(missing_ok=True)
        health_inputs.unlink(missing_ok=True)


@dataclass(frozen=True, kw_only=True)
class _PublishOptions:
    """The upload form's optional fields, parsed."""

    filename: str
    description: str
    labels: dict[str, str]
    min_version: str | None
    latency_budget_ms: float | None
    health_inputs: Path | None
    health_inputs_filename: str | None


def _publish(
    cp: ControlPlane, path: Path, name: str, version: str, runtime: str, options: _PublishOptions
) -> ModelVersionPublic:
    with Session(cp.engine) as session:
        row = publish_model(
            session,
            cp.store,
            cp.keys,
            model_path=path,
            name=name,
            version=version,
            runtime=runtime,
            description=options.description,
            labels=options.labels,
            trusted_keys=cp.keyring.publisher_keys(),
            filename=options.filename,
            min_version=options.min_version,
            latency_budget_ms=options.latency_budget_ms,
            health_inputs=options.health_inputs,
            health_inputs_filename=options.health_inputs_filename,
        )
        return model_version_public(row)


@router.get("/models", dependencies=[require(Role.VIEWER)], response_model=list[ModelVersionPublic])
def list_models(session: SessionDep, name: str | None = None) -> list[ModelVersionPublic]:
    """Every published model version (optionally of one model), by name then age."""
    return [model_version_public(row) for row in list_model_versions(session, name=name)]


@router.get(
    "/models/{name}/versions/{version}",
    dependencies=[require(Role.VIEWER)],
    response_model=ModelVersionPublic,
    responses=error_responses(404),
)
def get_model(name: str, version: str, session: SessionDep) -> ModelVersionPublic:
    """One published model version."""
    return model_version_public(get_model_version(session, name, version))


def _parse_budget(text: str) -> float | None:
    if not text:
        return None
    try:
        budget = float(text)
    except ValueError:
        raise MessageError(f"latency_budget_ms must be a number of milliseconds, got {text!r:.40}") from None
    if not (math.isfinite(budget) and budget > 0):
        raise MessageError(f"latency_budget_ms must be a positive number of milliseconds, got {text!r:.40}")
    return budget


def _parse_labels(text: str) -> dict[str, str]:
    if not text:
        return {}
    try:
        labels = json.loads(text)
    except ValueError as exc:
        raise MessageError(f"labels must be a JSON object of strings: {exc}") from exc
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise MessageError("labels must be a JSON object of strings")
    return labels
