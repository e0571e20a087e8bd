"""What inspecting a model file tells: its runtime, input/output signature and (ONNX) opsets."""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.shared.tensors import TensorSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSignature:
    """A model's interface, as read from its file or reported by its runtime.

    Attributes:
        runtime: ``"onnx"`` or ``"tflite"``.
        inputs: The inputs a caller must give, in the model's order.
        outputs: The outputs, in the model's order.
        opsets: ``(domain, version)`` of each operator set an ONNX model imports (``""`` is
            the default domain); empty for TFLite.
    """

    runtime: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opsets: tuple[tuple[str, int], ...] = ()
