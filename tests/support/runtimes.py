"""Models run directly on their own runtime, as the reference an agent's answers are checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter


def direct_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    """The one output of the TFLite model at ``path`` for input ``x``, from LiteRT itself."""
    interpreter = Interpreter(model_path=str(path))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], x.shape, strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])
