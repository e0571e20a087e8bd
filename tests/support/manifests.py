"""A sample verified manifest for tests that check versions and compatibility against it."""

from __future__ import annotations

from edgefleet.shared.bundle.manifest import FileEntry, Manifest
from edgefleet.shared.tensors import TensorSpec

MANIFEST = Manifest(
    name="det",
    version="2.0.0",
    runtime="onnx",
    model_file="model.onnx",
    files=(FileEntry(path="model.onnx", sha256="cd" * 32, size=10),),
    inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1, 4)),),
    outputs=(TensorSpec(name="y", datatype="FP32", shape=(-1, 2)),),
    created_at="2026-11-28T00:00:00+00:00",
)
"""A one-file ONNX model ``det`` 2.0.0 (FP32 ``x`` [-1, 4] → ``y`` [-1, 2])."""
