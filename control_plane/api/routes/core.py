"""The REST API routes (``/healthz`` and ``/api/v1``). Thin: the rules live in the services.

Errors are ``{"detail": {"code", "message", "retryable"}}`` (see :func:`edgefleet_error_handler`):
400 bad input, 404 not found, 409 conflict, 413 too large, 422 a body that fails its schema.
"""

from __future__ import annotations

import json
from collections import defaultdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from sqlmodel import Session, col, or_, select
from starlette.concurrency import run_in_threadpool

from edgefleet.control_plane.api.deps import ControlPlane, ControlPlaneDep, SessionDep
from edgefleet.control_plane.api.schemas import (
    deployment_public,
    device_public,
    device_shadows_public,
    model_version_public,
)
from edgefleet.control_plane.bundles.store import normalize_digest
from edgefleet.control_plane.db.tables import (
    Assignment,
    Deployment,
    DeploymentCreate,
    DeploymentPublic,
    DeploymentStatus,
    Device,
    DeviceCreate,
    DevicePublic,
    ModelVersion,
    ModelVersionPublic,
    ShadowAssignment,
    ShadowCreate,
    ShadowPublic,
    utcnow,
)
from edgefleet.control_plane.errors import http_status
from edgefleet.control_plane.services.publishing import infer_runtime, publish_model
from edgefleet.control_plane.services.uploads import FILE_FIELD, receive_upload
from edgefleet.shared.errors import EdgefleetError, MessageError, NotFoundError
from edgefleet.shared.wire.strict import DEVICE_ID_RE

MAX_PAGE = 10_000  # rows one list request may return
BUNDLE_MEDIA_TYPE = "application/x-tar"
_UPLOAD_FIELDS = {"name", "version", "runtime", "description", "labels"}


# --- shapes only the API uses ----------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str
    message: str
    retryable: bool


class ErrorResponse(BaseModel):
    detail: ErrorDetail


class Health(BaseModel):
    status: str
    broker_connected: bool


class BrokerAddress(BaseModel):
    host: str
    port: int
    kind: str = Field(description='"mosquitto" or "amqtt" (embedded, started by this process) or "external".')


class PublicKeys(BaseModel):
    publisher: list[str]
    online: list[str]


class Info(BaseModel):
    version: str
    broker: BrokerAddress
    keys: PublicKeys
    keyring_version: int = 0


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


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
                    },
                }
            }
        },
    }
}


# --- error handlers ----------------------------------------------------------------------------


async def edgefleet_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Any :class:`EdgefleetError` as its HTTP status and ``{"detail": exc.to_dict()}``."""
    assert isinstance(exc, EdgefleetError)
    return JSONResponse(status_code=http_status(exc), content={"detail": exc.to_dict()})


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's schema errors in the same ``detail`` shape, with the per-field list added."""
    assert isinstance(exc, RequestValidationError)
    errors = jsonable_encoder(exc.errors())
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    detail = MessageError(f"{where}: {first.get('msg', 'invalid request')}").to_dict()
    detail["code"] = "request_invalid"
    detail["errors"] = errors
    return JSONResponse(status_code=422, content={"detail": detail})


# --- routes ------------------------------------------------------------------------------------

health_router = APIRouter()
router = APIRouter(prefix="/api/v1")


@health_router.get("/healthz", response_model=Health, tags=["health"])
def healthz(cp: ControlPlaneDep) -> Health:
    """Liveness: the process answers; ``broker_connected`` says whether MQTT is up."""
    return Health(status="ok", broker_connected=cp.bridge.connected)


@router.get("/info", response_model=Info, tags=["info"])
def info(cp: ControlPlaneDep) -> Info:
    """Server version, the broker agents connect to, and the public keys they pin at enrollment."""
    if cp.keyring is not None:
        current = cp.keyring.current
        keys = {
            "publisher": [k.public_bytes_raw().hex() for k in current.publisher_keys.values()],
            "online": [k.public_bytes_raw().hex() for k in current.online_keys.values()],
        }
    else:
        keys = cp.keys.public_keys()
    return Info(
        version=_package_version(),
        broker=BrokerAddress(host=cp.broker_host, port=cp.broker_port, kind=cp.broker_kind),
        keys=PublicKeys(publisher=keys["publisher"], online=keys["online"]),
        keyring_version=cp.keyring.current.version if cp.keyring is not None else 0,
    )


@router.post(
    "/models",
    response_model=ModelVersionPublic,
    status_code=status.HTTP_201_CREATED,
    responses=_errors(400, 409, 413),
    openapi_extra=_UPLOAD_BODY,
    tags=["models"],
)
async def upload_model(request: Request, cp: ControlPlaneDep) -> ModelVersionPublic:
    """Publish a model file: it is loaded, described, signed into a bundle and stored.

    Publishing the same bytes under the same name and version again returns the existing
    version (201 as well); different bytes under an existing name and version is a 409.
    """
    tmp = cp.store.new_temp_path(".upload")
    try:
        upload = await receive_upload(request, tmp, max_file_bytes=cp.settings.max_upload_bytes)
        fields = upload.fields
        unknown = sorted(set(fields) - _UPLOAD_FIELDS)
        if unknown:
            raise MessageError(f"unknown form field(s) {unknown}; expected {sorted(_UPLOAD_FIELDS | {FILE_FIELD})}")
        for required in ("name", "version"):
            if not fields.get(required):
                raise MessageError(f"the form field {required!r} is required")
        runtime = fields.get("runtime") or infer_runtime(upload.filename)
        labels = _parse_labels(fields.get("labels", ""))
        row = await run_in_threadpool(
            _publish, cp, tmp, fields["name"], fields["version"], runtime, fields.get("description", ""), labels
        )
    finally:
        tmp.unlink(missing_ok=True)
    return row


def _publish(
    cp: ControlPlane, path: Path, name: str, version_: str, runtime: str, description: str, labels: dict[str, str]
) -> ModelVersionPublic:
    with Session(cp.engine) as session:
        row = publish_model(
            session,
            cp.store,
            cp.keys,
            model_path=path,
            name=name,
            version=version_,
            runtime=runtime,
            description=description,
            labels=labels,
            trusted_keys=cp.keyring.publisher_keys() if cp.keyring else None,
        )
        return model_version_public(row)


@router.get("/models", response_model=list[ModelVersionPublic], tags=["models"])
def list_models(session: SessionDep, name: str | None = None) -> list[ModelVersionPublic]:
    """Every published model version (optionally of one model), by name then age."""
    query = select(ModelVersion).order_by(col(ModelVersion.name), col(ModelVersion.created_at))
    if name is not None:
        query = query.where(ModelVersion.name == name)
    return [model_version_public(row) for row in session.exec(query).all()]


@router.get(
    "/models/{name}/versions/{version}", response_model=ModelVersionPublic, responses=_errors(404), tags=["models"]
)
def get_model_version(name: str, version: str, session: SessionDep) -> ModelVersionPublic:
    """One published model version."""
    row = session.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    if row is None:
        raise NotFoundError(f"model {name!r} version {version!r} is not published")
    return model_version_public(row)


@router.get(
    "/bundles/{digest}",
    response_class=FileResponse,
    responses={
        200: {"content": {BUNDLE_MEDIA_TYPE: {}}, "description": "The bundle (a signed tar)."},
        206: {"content": {BUNDLE_MEDIA_TYPE: {}}, "description": "The requested byte range."},
        **_errors(400, 404),
    },
    tags=["bundles"],
)
def download_bundle(digest: str, cp: ControlPlaneDep) -> FileResponse:
    """Download a bundle by digest (``sha256:<hex>`` or the bare hex), with HTTP Range support."""
    digest = normalize_digest(digest)
    path = cp.store.path_for(digest)
    if not path.is_file():
        raise NotFoundError(f"bundle {digest} is not stored")
    return FileResponse(
        path,
        media_type=BUNDLE_MEDIA_TYPE,
        filename=digest.removeprefix("sha256:") + ".bundle",
        # Content-addressed: the bytes behind this URL never change.
        headers={"ETag": f'"{digest}"', "Cache-Control": "public, max-age=31536000, immutable"},
    )


@router.get("/devices", response_model=list[DevicePublic], tags=["devices"])
def list_devices(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[DevicePublic]:
    """Known devices, by id."""
    devices = session.exec(select(Device).order_by(col(Device.id)).offset(offset).limit(limit)).all()
    by_device: dict[str, list[Assignment]] = {d.id: [] for d in devices}
    if devices:
        for a in session.exec(select(Assignment).where(col(Assignment.device_id).in_(list(by_device)))).all():
            by_device[a.device_id].append(a)
    return [device_public(d, by_device[d.id]) for d in devices]


@router.post(
    "/devices",
    response_model=DevicePublic,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": DevicePublic, "description": "Already registered."}, **_errors(400)},
    tags=["devices"],
)
def register_device(body: DeviceCreate, session: SessionDep, response: Response) -> DevicePublic:
    """Register a device before its agent first reports (idempotent: 200 if it exists)."""
    if not DEVICE_ID_RE.match(body.id):
        raise MessageError(f"device id {body.id!r:.140} must match {DEVICE_ID_RE.pattern}")
    device = session.get(Device, body.id)
    if device is None:
        device = Device(id=body.id, created_at=utcnow())
        session.add(device)
        session.commit()
        session.refresh(device)
    else:
        response.status_code = status.HTTP_200_OK
    return device_public(device, _assignments(session, device.id))


@router.get("/devices/{device_id}", response_model=DevicePublic, responses=_errors(404), tags=["devices"])
def get_device(device_id: str, session: SessionDep) -> DevicePublic:
    """One device, with its reported state, online flag and assignments."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not registered")
    return device_public(device, _assignments(session, device_id))


@router.delete(
    "/devices/{device_id}/assignments/{model_name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(404),
    tags=["devices"],
)
def unassign_model(device_id: str, model_name: str, session: SessionDep, cp: ControlPlaneDep) -> Response:
    """Stop running a model on a device (a new desired state without it is published)."""
    changed = cp.desired.unassign(session, [device_id], model_name, now=cp.clock())
    if not changed:
        raise NotFoundError(f"device {device_id!r} is not assigned model {model_name!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/deployments",
    response_model=list[DeploymentPublic],
    status_code=status.HTTP_201_CREATED,
    responses=_errors(400, 404),
    tags=["deployments"],
)
def create_deployments(body: DeploymentCreate, session: SessionDep, cp: ControlPlaneDep) -> list[DeploymentPublic]:
    """Deploy a published model version to devices: one pending deployment per device."""
    rows = cp.desired.assign(session, body.devices, body.model, body.version, now=cp.clock())
    return [deployment_public(row) for row in rows]


@router.get("/deployments", response_model=list[DeploymentPublic], tags=["deployments"])
def list_deployments(
    session: SessionDep,
    device: str | None = None,
    model: str | None = None,
    status_: Annotated[DeploymentStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[DeploymentPublic]:
    """Deployments, newest first, optionally of one device, model or status."""
    query = select(Deployment).order_by(col(Deployment.id).desc()).offset(offset).limit(limit)
    if device is not None:
        query = query.where(Deployment.device_id == device)
    if model is not None:
        query = query.where(Deployment.model_name == model)
    if status_ is not None:
        query = query.where(col(Deployment.status) == status_)
    return [deployment_public(row) for row in session.exec(query).all()]


@router.get(
    "/deployments/{deployment_id}", response_model=DeploymentPublic, responses=_errors(404), tags=["deployments"]
)
def get_deployment(deployment_id: int, session: SessionDep) -> DeploymentPublic:
    """One deployment."""
    row = session.get(Deployment, deployment_id)
    if row is None:
        raise NotFoundError(f"deployment {deployment_id} does not exist")
    return deployment_public(row)


@router.post(
    "/shadows",
    response_model=list[ShadowPublic],
    status_code=status.HTTP_201_CREATED,
    responses=_errors(400, 404, 409),
    tags=["shadows"],
)
def create_shadows(body: ShadowCreate, session: SessionDep, cp: ControlPlaneDep) -> list[ShadowPublic]:
    """Run a candidate version beside the serving one on devices, on sampled inputs; never served.

    The candidate must take the same inputs as each device's serving version (400), every device
    must already run the model (409) at another version (409). A shadow of the model already on
    a device is replaced. Deploying the candidate's version later promotes it and drops the shadow.
    """
    rows = cp.desired.set_shadow(session, body.devices, body.model, body.version, body.sample_rate, now=cp.clock())
    return _shadow_rows(session, [r.device_id for r in rows], body.model)


@router.get("/shadows", response_model=list[ShadowPublic], tags=["shadows"])
def list_shadows(
    session: SessionDep,
    model: str | None = None,
    device: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Devices per page.")] = 1000,
    offset: Annotated[int, Query(ge=0, description="Devices to skip.")] = 0,
) -> list[ShadowPublic]:
    """Shadows asked for or still reported, per device and model, with each device's latest report.

    Paged by device (``limit`` and ``offset`` count devices); ordered by device, then model.
    """
    query = (
        select(Device.id)
        .where(
            or_(
                col(Device.id).in_(select(ShadowAssignment.device_id)),
                # Reported states are stored as compact JSON; the key appears only when non-empty.
                col(Device.reported_json).contains('"shadows":'),
            )
        )
        .order_by(col(Device.id))
        .offset(offset)
        .limit(limit)
    )
    if device is not None:
        query = query.where(Device.id == device)
    return _shadow_rows(session, list(session.exec(query).all()), model)


@router.delete(
    "/shadows/{model_name}", status_code=status.HTTP_204_NO_CONTENT, responses=_errors(404), tags=["shadows"]
)
def delete_shadows(
    model_name: str,
    device: Annotated[list[str], Query(description="Device id; repeatable.")],
    session: SessionDep,
    cp: ControlPlaneDep,
) -> Response:
    """Stop the shadow of a model on devices (a new desired state without it is published)."""
    changed = cp.desired.clear_shadow(session, device, model_name, now=cp.clock())
    if not changed:
        raise NotFoundError(f"no shadow of model {model_name!r} on device(s) {device[:10]}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- helpers -----------------------------------------------------------------------------------


def _shadow_rows(session: Session, device_ids: list[str], model: str | None) -> list[ShadowPublic]:
    if not device_ids:
        return []
    devices = session.exec(select(Device).where(col(Device.id).in_(device_ids)).order_by(col(Device.id))).all()
    assignments: defaultdict[str, list[Assignment]] = defaultdict(list)
    for a in session.exec(select(Assignment).where(col(Assignment.device_id).in_(device_ids))).all():
        assignments[a.device_id].append(a)
    shadows: defaultdict[str, list[ShadowAssignment]] = defaultdict(list)
    for s in session.exec(select(ShadowAssignment).where(col(ShadowAssignment.device_id).in_(device_ids))).all():
        shadows[s.device_id].append(s)
    rows = [row for d in devices for row in device_shadows_public(d, assignments[d.id], shadows[d.id])]
    return [row for row in rows if model is None or row.model_name == model]



def _assignments(session: Session, device_id: str) -> list[Assignment]:
    return list(session.exec(select(Assignment).where(Assignment.device_id == device_id)).all())


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


def _package_version() -> str:
    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0.0.0+unknown"
