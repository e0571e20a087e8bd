"""The bundle manifest: what a publisher signs about a model.

It lists every file of the bundle with its sha256 and size, the runtime, the input/output
signature, what the bundle is compatible with, and room for the drift reference profile that
the agent compares live inputs against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from edgefleet.shared.bundle import ustar
from edgefleet.shared.bundle.versions import check_version
from edgefleet.shared.errors import MessageError, NotFoundError
from edgefleet.shared.tensors import TensorSpec
from edgefleet.shared.wire.strict import (
    NAME_RE,
    check_keys,
    check_schema,
    dumps,
    get_float,
    get_int,
    get_list,
    get_str,
    get_str_map,
    loads_object,
)

MANIFEST_PAYLOAD_TYPE = "application/vnd.edgefleet.manifest+json"
RUNTIMES = ("onnx", "tflite")
MODEL_EXTENSIONS = {".onnx": "onnx", ".tflite": "tflite"}
MAX_MANIFEST_BYTES = 512 * 1024  # bytes
BUNDLE_FILES_PREFIX = "files/"  # where a listed file lives in the bundle archive
MAX_FILES = 256  # count
MAX_TENSORS = 64  # count
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,127}){0,7}\Z")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEntry:
    """One file of the bundle, relative to its ``files/`` directory."""

    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, raw: object) -> FileEntry:
        if not isinstance(raw, dict):
            raise MessageError("manifest.files[]: expected an object")
        check_keys(raw, "manifest.files[]", {"path", "sha256", "size"})
        # The path pattern alone rules out "..", absolute paths, backslashes and empty segments.
        path = get_str(raw, "path", "manifest.files[]", pattern=_PATH)
        # Every listed file must fit a plain ustar header, the only kind a bundle may carry.
        if ustar.split_name(BUNDLE_FILES_PREFIX + path) is None:
            raise MessageError(f"manifest.files[]: path {path!r:.80} is too long for a bundle member name")
        return cls(
            path=path,
            sha256=get_str(raw, "sha256", f"manifest.files[{path}]", pattern=_HEX64),
            size=get_int(raw, "size", f"manifest.files[{path}]", maximum=ustar.MAX_SIZE),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Compatibility:
    """What a device must have to run the bundle; empty tuples mean "any"."""

    architectures: tuple[str, ...] = ()
    accelerators: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"architectures": list(self.architectures), "accelerators": list(self.accelerators)}

    @classmethod
    def from_dict(cls, raw: object) -> Compatibility:
        if not isinstance(raw, dict):
            raise MessageError("manifest.compatibility: expected an object")
        check_keys(raw, "manifest.compatibility", {"architectures", "accelerators"})
        out: dict[str, tuple[str, ...]] = {}
        for key in ("architectures", "accelerators"):
            items = get_list(raw, key, "manifest.compatibility", max_items=32)
            if not all(isinstance(i, str) and 0 < len(i) <= 64 for i in items):
                raise MessageError(f"manifest.compatibility.{key}: expected short strings")
            out[key] = tuple(items)
        return cls(**out)


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The signed description of a bundle (schema ``edgefleet.manifest/v1``)."""

    name: str
    version: str
    runtime: str
    model_file: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created_at: str
    compatibility: Compatibility = field(default_factory=Compatibility)
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    drift_reference: dict[str, Any] | None = None
    # Publisher-set rollback floor: once a device installed this bundle, it refuses versions below.
    min_version: str | None = None
    # Health check after activation: a bundle file (.npz, one array per input) with sample inputs
    # for the warm-up inference, and the time that inference may take.
    health_inputs: str | None = None
    latency_budget_ms: float | None = None

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``.

        Raises:
            NotFoundError: The manifest lists no file at ``path``.
        """
        for entry in self.files:
            if entry.path == path:
                return entry
        raise NotFoundError(f"{self.name} {self.version}: the manifest lists no file {path!r:.200}")

    @property
    def total_size(self) -> int:
        """Sum of all file sizes, in bytes."""
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "edgefleet.manifest/v1",
            "name": self.name,
            "version": self.version,
            "runtime": self.runtime,
            "model_file": self.model_file,
            "files": [f.to_dict() for f in self.files],
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "created_at": self.created_at,
            "compatibility": self.compatibility.to_dict(),
            "description": self.description,
            "labels": dict(self.labels),
            "drift_reference": self.drift_reference,
            **({"min_version": self.min_version} if self.min_version is not None else {}),
            **({"health_inputs": self.health_inputs} if self.health_inputs is not None else {}),
            **({"latency_budget_ms": self.latency_budget_ms} if self.latency_budget_ms is not None else {}),
        }

    def encode(self) -> bytes:
        """Canonical JSON bytes: what the publisher signs."""
        return dumps(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Parse and validate manifest bytes; :class:`MessageError` on anything off."""
        return cls.from_dict(loads_object(data, "manifest", MAX_MANIFEST_BYTES))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        check_schema(raw, "manifest", 1)
        check_keys(
            raw,
            "manifest",
            {"schema", "name", "version", "runtime", "model_file", "files", "inputs", "outputs", "created_at"},
            {"compatibility", "description", "labels", "drift_reference", "min_version", "health_inputs",
             "latency_budget_ms"},
        )
        runtime = get_str(raw, "runtime", "manifest")
        if runtime not in RUNTIMES:
            raise MessageError(f"manifest.runtime: {runtime!r} is not one of {RUNTIMES}")
        files = tuple(FileEntry.from_dict(f) for f in get_list(raw, "files", "manifest", max_items=MAX_FILES))
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise MessageError("manifest.files: duplicate path")
        model_file = get_str(raw, "model_file", "manifest")
        if model_file not in paths:
            raise MessageError(f"manifest.model_file {model_file!r} is not among the listed files")
        health_inputs = get_str(raw, "health_inputs", "manifest") if "health_inputs" in raw else None
        if health_inputs is not None and health_inputs not in paths:
            raise MessageError(f"manifest.health_inputs {health_inputs!r} is not among the listed files")
        budget = get_float(raw, "latency_budget_ms", "manifest") if "latency_budget_ms" in raw else None
        if budget is not None and budget <= 0:
            raise MessageError("manifest.latency_budget_ms must be positive")
        drift = raw.get("drift_reference")
        if drift is not None and not isinstance(drift, dict):
            raise MessageError("manifest.drift_reference: expected an object or null")
        return cls(
            name=get_str(raw, "name", "manifest", pattern=NAME_RE),
            version=check_version(get_str(raw, "version", "manifest"), "manifest.version"),
            runtime=runtime,
            model_file=model_file,
            files=files,
            inputs=tuple(TensorSpec.from_dict(t) for t in get_list(raw, "inputs", "manifest", max_items=MAX_TENSORS)),
            outputs=tuple(TensorSpec.from_dict(t) for t in get_list(raw, "outputs", "manifest", max_items=MAX_TENSORS)),
            created_at=get_str(raw, "created_at", "manifest", max_len=64),
            compatibility=Compatibility.from_dict(raw.get("compatibility", {"architectures": [], "accelerators": []})),
            description=get_str(raw, "description", "manifest", max_len=4096) if "description" in raw else "",
            labels=get_str_map(raw, "labels", "manifest") if "labels" in raw else {},
            drift_reference=drift,
            min_version=(
                check_version(get_str(raw, "min_version", "manifest"), "manifest.min_version")
                if "min_version" in raw
                else None
            ),
            health_inputs=health_inputs,
            latency_budget_ms=budget,
        )
