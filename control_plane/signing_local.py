"""Building and signing a bundle on the publisher's side (CI, a laptop), so the key never leaves it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from packaging.version import InvalidVersion, Version

from control_plane.publishing import bundle_model_file, describe_model, infer_runtime
from shared.bundle import build_bundle
from shared.errors import ConfigError, MessageError
from shared.signing import SigningKey


def build_signed_bundle(
    model: Path,
    *,
    name: str,
    version: str,
    key_file: Path,
    runtime: str | None = None,
    description: str = "",
    min_version: str | None = None,
) -> Path:
    """Describe ``model`` (it must load in its runtime), sign the manifest with ``key_file``.

    Returns:
        A temporary bundle file; the caller uploads and deletes it.
    """
    try:
        key = SigningKey.from_pem(key_file.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read publisher key {key_file}: {exc}") from exc
    runtime = runtime or infer_runtime(model.name)
    if min_version is not None:
        try:
            if Version(version) < Version(min_version):
                raise MessageError(f"version {version} is below its own floor {min_version}")
        except InvalidVersion as exc:
            raise MessageError(f"a version floor needs PEP 440 versions: {exc}") from exc
    manifest = describe_model(model, name, version, runtime, description, None, min_version=min_version)
    fd, tmp = tempfile.mkstemp(suffix=".bundle", prefix=f"{name}-{version}-")
    os.close(fd)
    out = Path(tmp)
    build_bundle(out, manifest, {bundle_model_file(runtime): model}, [key])
    return out
