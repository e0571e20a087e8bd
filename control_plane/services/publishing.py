"""Publishing a model: from a model file to a signed, stored bundle and its database row.

The model is checked first (:func:`.model_check.check_model`): its own format is parsed
without running it, then it is loaded in its runtime (the same :func:`shared.runtimes.load_model`
a device uses) in a short-lived child process with time and memory limits, never in the server
process, because a hostile file can crash a native runtime. That proves it loads and gives the
input/output signature for the manifest: a file that would fail on every device is refused
here, with a 400 that names the user's file, not discovered fleet-wide.

Publishing is idempotent for CI retries: the same name, version and model bytes again return
the existing version; the same name and version with other bytes is a conflict, because
devices and deployments refer to a version by name and it must mean one thing forever.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.version import InvalidVersion, Version
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from edgefleet.control_plane.bundles.store import BundleStore
from edgefleet.control_plane.db.tables import ModelVersion, utcnow
from edgefleet.control_plane.services.health_inputs import check_health_inputs
from edgefleet.control_plane.services.keys import ControlPlaneKeys
from edgefleet.control_plane.services.model_check import DEFAULT_LIMITS, CheckLimits, check_model
from edgefleet.shared.bundle.format import build_bundle, make_manifest, sha256_file, verify_bundle
from edgefleet.shared.bundle.manifest import MODEL_EXTENSIONS, RUNTIMES, Manifest
from edgefleet.shared.bundle.versions import check_version
from edgefleet.shared.errors import ConflictError, MessageError, TrustError
from edgefleet.shared.wire.strict import NAME_RE

log = logging.getLogger(__name__)

MAX_DESCRIPTION_CHARS = 4096  # what the manifest decoder accepts
MAX_LABELS = 64  # count, likewise
_READ_BLOCK = 1024 * 1024  # bytes
HEALTH_INPUTS_FILE = "health/inputs.npz"  # where a bundle carries its health-check sample inputs


def infer_runtime(filename: str) -> str:
    """The runtime a model file's extension implies (``.onnx`` -> onnx, ``.tflite`` -> tflite).

    Raises:
        MessageError: Any other extension.
    """
    suffix = Path(filename).suffix.lower()
    runtime = MODEL_EXTENSIONS.get(suffix)
    if runtime is None:
        raise MessageError(
            f"cannot tell the runtime from {filename!r:.100}: use a {sorted(MODEL_EXTENSIONS)} file or give the runtime"
        )
    return runtime


def bundle_model_file(runtime: str) -> str:
    """The model file's path inside a bundle of ``runtime``: ``model.onnx`` or ``model.tflite``."""
    extension = next(ext for ext, rt in MODEL_EXTENSIONS.items() if rt == runtime)
    return "model" + extension


def publish_model(
    session: Session,
    store: BundleStore,
    keys: ControlPlaneKeys,
    *,
    model_path: Path,
    name: str,
    version: str,
    runtime: str | None = None,
    description: str = "",
    labels: Mapping[str, str] | None = None,
    trusted_keys: Mapping[str, Ed25519PublicKey] | None = None,
    filename: str | None = None,
    min_version: str | None = None,
    health_inputs: Path | None = None,
    health_inputs_filename: str | None = None,
    latency_budget_ms: float | None = None,
    check_limits: CheckLimits = DEFAULT_LIMITS,
) -> ModelVersion:
    """Sign and store a model file as the bundle of ``name`` ``version``.

    Args:
        session: Database session; committed on success.
        store: Where the bundle goes.
        keys: ``keys.publisher`` signs the manifest.
        model_path: The model file (left in place).
        name: Model name (lowercase, ``[a-z0-9._-]``, at most 64 chars).
        version: Version string (``[A-Za-z0-9._+-]``, at most 64 chars).
        runtime: ``"onnx"`` or ``"tflite"``; ``None`` infers it from ``model_path``'s extension.
        description: Free text carried in the signed manifest.
        labels: Short string pairs carried in the signed manifest.
        trusted_keys: The keyring's publisher keys; the control plane's own key must be among
            them (after a rotation to CI-held keys it is not, and publishing must go through
            :func:`register_bundle` with a bundle signed elsewhere).
        filename: The user's name for the model file, the only name errors use (an upload
            lands in a temp file whose server path must not leak); default ``model_path.name``.
        min_version: Rollback floor devices enforce once they installed this version.
        health_inputs: An ``.npz`` of sample inputs for the device's health check.
        health_inputs_filename: The user's name for that file; default its file name.
        latency_budget_ms: The health-check inference must finish within this.
        check_limits: Time and memory bounds of the sandboxed runtime check.

    Returns:
        The new row, or the existing one if this exact model was already published under
        this name and version.

    Raises:
        MessageError: Invalid name, version, runtime, description or labels.
        RuntimeLoadError: The file does not load in its runtime, or crashes it.
        ConflictError: ``name`` ``version`` exists with a different model file or runtime.
    """
    if trusted_keys is not None and keys.publisher.key_id not in trusted_keys:
        raise TrustError(
            "the control plane's publisher key is no longer trusted by the keyring: sign bundles with a "
            "publisher key (edgefleet models push --key KEY) and upload them instead"
        )
    runtime = _check_inputs(model_path, name, version, runtime, description, labels)
    model_sha256 = _sha256_hex(model_path)
    # Also ends the read transaction before the slow part (on SQLite every transaction holds
    # the write lock): loading, hashing and signing happen with no transaction open.
    existing = _existing(session, name, version, runtime, model_sha256)
    if existing is not None:
        return existing

    manifest = describe_model(
        model_path,
        name,
        version,
        runtime,
        description,
        labels,
        min_version=min_version,
        health_inputs=health_inputs,
        latency_budget_ms=latency_budget_ms,
        label=filename or model_path.name,
        health_inputs_label=health_inputs_filename,
        check_limits=check_limits,
    )
    files = {manifest.model_file: model_path, **({HEALTH_INPUTS_FILE: health_inputs} if health_inputs else {})}
    tmp = store.new_temp_path(".bundle")
    try:
        build_bundle(tmp, manifest, files, [keys.publisher])
        # Cheap insurance: what we store is exactly what a device's verifier accepts.
        verify_bundle(tmp, trusted_keys={keys.publisher.key_id: keys.publisher.public_key})
        size = tmp.stat().st_size
        digest = store.put_file(tmp)
    finally:
        tmp.unlink(missing_ok=True)

    row = _model_version(manifest, digest, size)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        # Another publish of the same name/version won the race: same answer as if it had
        # finished before we looked.
        session.rollback()
        existing = _existing(session, name, version, runtime, model_sha256)
        if existing is None:
            raise
        return existing
    session.refresh(row)
    log.info("published %s %s (%s, %s, %d bytes)", name, version, runtime, digest, size)
    return row


def register_bundle(
    session: Session,
    store: BundleStore,
    *,
    bundle_path: Path,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    threshold: int,
) -> ModelVersion:
    """Store a bundle signed outside the control plane (CI, a publisher's laptop).

    The bundle must verify against the keyring's publisher keys, so the control plane never
    needs a publisher key of its own.

    Raises:
        SignatureError, BundleError: The bundle does not verify.
        ConflictError: The name and version exist with a different bundle.
    """
    manifest = verify_bundle(bundle_path, trusted_keys=trusted_keys, threshold=threshold)
    digest = sha256_file(bundle_path)
    row = session.exec(
        select(ModelVersion).where(ModelVersion.name == manifest.name, ModelVersion.version == manifest.version)
    ).first()
    if row is not None:
        if row.bundle_digest == digest:
            return row
        raise ConflictError(
            f"model {manifest.name!r} version {manifest.version!r} is already published with another bundle; "
            "publish a new version instead"
        )
    session.rollback()
    size = bundle_path.stat().st_size
    digest = store.put_file(bundle_path)
    row = _model_version(manifest, digest, size)
    session.add(row)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise ConflictError(f"model {manifest.name!r} version {manifest.version!r} was published concurrently") from exc
    session.refresh(row)
    log.info("registered signed bundle %s %s (%s)", manifest.name, manifest.version, digest)
    return row


def _model_version(manifest: Manifest, digest: str, size: int) -> ModelVersion:
    """The new row of a stored bundle: its manifest's name, version and runtime, and the manifest itself."""
    return ModelVersion(
        name=manifest.name,
        version=manifest.version,
        runtime=manifest.runtime,
        bundle_digest=digest,
        bundle_size=size,
        manifest_json=manifest.encode().decode(),
        created_at=utcnow(),
    )


def manifest_of(row: ModelVersion) -> Manifest:
    """The signed manifest stored with a model version."""
    return Manifest.decode(row.manifest_json.encode())


def _check_inputs(
    model_path: Path,
    name: str,
    version: str,
    runtime: str | None,
    description: str,
    labels: Mapping[str, str] | None,
) -> str:
    if not NAME_RE.match(name):
        raise MessageError(f"model name {name!r:.80} must match {NAME_RE.pattern}")
    check_version(version)
    if runtime is None:
        runtime = infer_runtime(model_path.name)
    elif runtime not in RUNTIMES:
        raise MessageError(f"runtime {runtime!r:.40} is not one of {RUNTIMES}")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise MessageError(f"description is over {MAX_DESCRIPTION_CHARS} characters")
    if labels is not None and (
        len(labels) > MAX_LABELS
        or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 128 and len(v) <= 1024
                   for k, v in labels.items())
    ):
        raise MessageError(f"labels must be at most {MAX_LABELS} string pairs (keys <= 128, values <= 1024 chars)")
    return runtime


def _existing(session: Session, name: str, version: str, runtime: str, model_sha256: str) -> ModelVersion | None:
    row = session.exec(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)).first()
    if row is None:
        session.rollback()
        return None
    manifest = manifest_of(row)
    if row.runtime == runtime and manifest.file(manifest.model_file).sha256 == model_sha256:
        return row
    raise ConflictError(
        f"model {name!r} version {version!r} is already published with a different "
        f"{'runtime' if row.runtime != runtime else 'model file'}; publish a new version instead"
    )


def describe_model(
    model_path: Path,
    name: str,
    version: str,
    runtime: str,
    description: str,
    labels: Mapping[str, str] | None,
    *,
    min_version: str | None = None,
    health_inputs: Path | None = None,
    latency_budget_ms: float | None = None,
    label: str | None = None,
    health_inputs_label: str | None = None,
    check_limits: CheckLimits = DEFAULT_LIMITS,
) -> Manifest:
    """Check the model (sandboxed) to read its signature and describe it in a manifest (not yet signed).

    ``min_version`` sets the rollback floor devices enforce once they installed this bundle;
    ``health_inputs`` (an ``.npz``, one array per input) ships as :data:`HEALTH_INPUTS_FILE` and is
    what the device's post-activation warm-up runs on, within ``latency_budget_ms``. ``label``
    and ``health_inputs_label`` name the files in errors (default: their file names).

    Raises:
        RuntimeLoadError: The file is malformed, does not load, or crashes its runtime.
        MessageError: A version floor above the version or not PEP 440, a latency budget that
            is not a positive number, or health inputs that do not fit the model's inputs.
    """
    signature = check_model(
        runtime, model_path, label=label or model_path.name, name=name, version=version, limits=check_limits
    )
    inputs, outputs = signature.inputs, signature.outputs
    _check_release_options(version, min_version, latency_budget_ms)
    if health_inputs is not None:
        check_health_inputs(health_inputs, inputs, label=health_inputs_label or health_inputs.name)
    model_file = bundle_model_file(runtime)
    return make_manifest(
        name=name,
        version=version,
        runtime=runtime,
        model_file=model_file,
        files={model_file: model_path, **({HEALTH_INPUTS_FILE: health_inputs} if health_inputs else {})},
        inputs=inputs,
        outputs=outputs,
        description=description,
        labels=labels,
        min_version=min_version,
        health_inputs=HEALTH_INPUTS_FILE if health_inputs else None,
        latency_budget_ms=latency_budget_ms,
    )


def _check_release_options(version: str, min_version: str | None, latency_budget_ms: float | None) -> None:
    if min_version is not None:
        check_version(min_version, "min_version")
        try:
            below = Version(version) < Version(min_version)
        except InvalidVersion as exc:
            raise MessageError(f"a version floor needs PEP 440 versions: {exc}") from exc
        if below:
            raise MessageError(f"version {version} is below its own floor {min_version}")
    if latency_budget_ms is not None and not (math.isfinite(latency_budget_ms) and latency_budget_ms > 0):
        raise MessageError(f"latency_budget_ms must be a positive number of milliseconds, got {latency_budget_ms!r}")


def _sha256_hex(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()
