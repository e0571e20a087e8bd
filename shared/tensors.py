"""Tensor signatures and the dtype names of the Open Inference Protocol (KServe v2).

A model's inputs and outputs are described by :class:`TensorSpec`; ``-1`` in a shape means
"any size" (usually the batch dimension). The v2 datatype strings are the wire names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.shared.errors import MessageError

# Open Inference Protocol datatype name -> numpy dtype.
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_V2: dict[np.dtype[Any], str] = {v: k for k, v in V2_TO_NUMPY.items()}

MAX_RANK = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """Name, v2 datatype and shape of one model input or output (``-1`` = dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype that carries this tensor."""
        return V2_TO_NUMPY[self.datatype]

    def to_dict(self) -> dict[str, Any]:
        """Encode as the JSON object used in manifests and v2 metadata."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, raw: object) -> TensorSpec:
        """Decode strictly; raise :class:`MessageError` on anything unexpected."""
        if not isinstance(raw, dict) or set(raw) != {"name", "datatype", "shape"}:
            raise MessageError(f"tensor spec must be an object with name, datatype, shape: {raw!r:.200}")
        name, datatype, shape = raw["name"], raw["datatype"], raw["shape"]
        if not isinstance(name, str) or not name or len(name) > 256:
            raise MessageError(f"tensor name must be a non-empty string of at most 256 chars: {name!r:.80}")
        if datatype not in V2_TO_NUMPY:
            raise MessageError(f"tensor {name!r}: unknown datatype {datatype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape)
        ):
            raise MessageError(f"tensor {name!r}: shape must be a list of ints >= -1, rank <= {MAX_RANK}")
        return cls(name=name, datatype=datatype, shape=tuple(shape))

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete shape fits this spec (``-1`` matches any size)."""
        return len(shape) == len(self.shape) and all(s in (-1, d) for s, d in zip(self.shape, shape, strict=True))
