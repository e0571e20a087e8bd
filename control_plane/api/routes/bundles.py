"""``/api/v1/bundles``: download a bundle by digest; upload one signed outside the control plane."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, status
from fastapi.responses import FileResponse
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from edgefleet.control_plane.api.access import device_or, require
from edgefleet.control_plane.api.auditing import audit_target
from edgefleet.control_plane.api.deps import ControlPlane, ControlPlaneDep
from edgefleet.control_plane.api.errors import error_responses
from edgefleet.control_plane.api.schemas import ModelVersionPublic, model_version_public
from edgefleet.control_plane.api.uploads import receive_body
from edgefleet.control_plane.bundles.store import normalize_digest
from edgefleet.control_plane.services.auth import Role
from edgefleet.control_plane.services.publishing import register_bundle
from edgefleet.shared.errors import NotFoundError

router = APIRouter(prefix="/api/v1", tags=["bundles"])

BUNDLE_MEDIA_TYPE = "application/x-tar"


@router.get(
    "/bundles/{digest}",
    dependencies=[device_or(Role.VIEWER)],
    response_class=FileResponse,
    responses={
        200: {"content": {BUNDLE_MEDIA_TYPE: {}}, "description": "The bundle (a signed tar)."},
        206: {"content": {BUNDLE_MEDIA_TYPE: {}}, "description": "The requested byte range."},
        **error_responses(400, 404),
    },
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


@router.post(
    "/bundles",
    dependencies=[require(Role.PUBLISHER)],
    response_model=ModelVersionPublic,
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400, 409, 413),
    openapi_extra={
        "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    },
)
async def upload_bundle(request: Request, cp: ControlPlaneDep) -> ModelVersionPublic:
    """Register a bundle signed outside the control plane (``edgefleet models push --key``).

    It must verify against the keyring's publisher keys; the control plane adds no signature.
    """
    tmp = cp.store.new_temp_path(".bundle-upload")
    try:
        await receive_body(request, tmp, max_bytes=cp.settings.max_upload_bytes, what="the bundle")
        registered = await run_in_threadpool(_register, cp, tmp)
        audit_target(request, f"model={registered.name} version={registered.version}")
        return registered
    finally:
        tmp.unlink(missing_ok=True)


def _register(cp: ControlPlane, path: Path) -> ModelVersionPublic:
    with Session(cp.engine) as session:
        row = register_bundle(
            session,
            cp.store,
            bundle_path=path,
            trusted_keys=cp.keyring.publisher_keys(),
            threshold=cp.keyring.publisher_threshold(),
        )
        return model_version_public(row)
