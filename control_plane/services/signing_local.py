"""Building and signing a bundle on the publisher's side (CI, a laptop), so the key never leaves it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from packaging.version import InvalidVersion, Version

from edgefleet.control_plane.services.publishing import (
    HEALTH_INPUTS_FILE,
    bundle_model_file,
    describe_model,
    infer_runtime,
)
from edgefleet.shared.bundle.format import build_bundle
from edgefleet.shared.errors import ConfigError, MessageError
from edgefleet.shared.trust.signing import SigningKey

KEY_PEM_ENV = "EDGEFLEET_PUBLISHER_KEY_PEM"


def load_publisher_key(key_file: Path | None) -> SigningKey:
    """The publisher key from a PEM file, or from the PEM text in ``$EDGEFLEET_PUBLISHER_KEY_PEM``
    (CI secret stores hand out variables more easily than files)."""
    if key_file is None:
        pem = os.environ.get(KEY_PEM_ENV)
        if not pem:
            raise ConfigError(f"no publisher key: pass --key FILE or set {KEY_PEM_ENV}")
        return SigningKey.from_pem(pem.encode())
    try:
        return SigningKey.from_pem(key_file.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read publisher key {key_file}: {exc}") from exc


def build_signed_bundle(
    model: Path,
    *,
    name: str,
    version: str,
    key_file: Path | None,
    runtime: str | None = None,
    description: str = "",
    min_version: str | None = None,
    health_inputs: Path | None = None,
    latency_budget_ms: float | None = None,
) -> Path:
    """Describe ``model`` (it must load in its runtime), sign the manifest with ``key_file``.

    Returns:
        A temporary bundle file; the caller uploads and deletes it.
    """
    key = load_publisher_key(key_file)
    runtime = runtime or infer_runtime(model.name)
    if min_version is not None:
        try:
            if Version(version) < Version(min_version):
                raise MessageError(f"version {version} is below its own floor {min_version}")
        except InvalidVersion as exc:
            raise MessageError(f"a version floor needs PEP 440 versions: {exc}") from exc
    manifest = describe_model(
        model,
        name,
        version,
        runtime,
        description,
        None,
        min_version=min_version,
        health_inputs=health_inputs,
        latency_budget_ms=latency_budget_ms,
    )
    fd, tmp = tempfile.mkstemp(suffix=".bundle", prefix=f"{name}-{version}-")
    os.close(fd)
    out = Path(tmp)
    files = {bundle_model_file(runtime): model, **({HEALTH_INPUTS_FILE: health_inputs} if health_inputs else {})}
    build_bundle(out, manifest, files, [key])
    return out
