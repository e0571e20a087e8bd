"""Checking a publisher's health-check sample inputs (an ``.npz``) against the model's signature.

A device runs its post-activation warm-up on these arrays (``agent/deployment/health_check.py``
loads them with ``np.load(allow_pickle=False)``); a file that does not fit the model would
fail that check on every device, so it is refused at publish time instead. The archive is
untrusted: each member's ``.npy`` header is read and its size bounded before any array is
allocated, so a small file that declares a huge array costs nothing.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgefleet.shared.errors import MessageError
from edgefleet.shared.tensors import TensorSpec

MAX_HEALTH_INPUT_BYTES = 256 * 1024 * 1024  # bytes, all arrays together once loaded
_NPY_SUFFIX = ".npy"


def check_health_inputs(path: Path, inputs: Sequence[TensorSpec], *, label: str) -> None:
    """Refuse sample inputs a device could not feed to the model.

    Args:
        path: The ``.npz`` file.
        inputs: The model's input signature.
        label: How errors name the file (the user's name for it).

    Raises:
        MessageError: Not an ``.npz`` without pickles, over :data:`MAX_HEALTH_INPUT_BYTES`, or
            arrays whose names, dtypes or shapes do not match the inputs one to one.
    """
    expected = {spec.name: spec for spec in inputs}
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            names = [m.removesuffix(_NPY_SUFFIX) for m in members]
            if sorted(names) != sorted(expected):
                raise MessageError(
                    f"health inputs {label!r:.100} hold arrays {sorted(names)[:16]}; the model's inputs are "
                    f"{sorted(expected)[:16]} (one array per input, named as the input)"
                )
            total = 0
            for member, name in zip(members, names, strict=True):
                with archive.open(member) as f:
                    shape, dtype = _npy_header(f, f"{label!r:.100} array {name!r:.80}")
                total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if total > MAX_HEALTH_INPUT_BYTES:
                    raise MessageError(f"health inputs {label!r:.100} are over {MAX_HEALTH_INPUT_BYTES} bytes")
                spec = expected[name]
                if dtype != spec.numpy_dtype or not spec.accepts_shape(shape):
                    raise MessageError(
                        f"health inputs {label!r:.100}: array {name!r:.80} is {dtype} {list(shape)}, the input "
                        f"takes {spec.datatype} {list(spec.shape)} (-1 = any size)"
                    )
            # Headers are bounded; now the real load, exactly as a device does it.
            with np.load(path, allow_pickle=False) as loaded:
                for name in loaded.files:
                    _ = loaded[name]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # The file is a temp file on the server: its path must not reach the user.
        reason = str(exc).replace(str(path), label)
        raise MessageError(f"health inputs {label!r:.100} are not a readable .npz without pickles: {reason}") from exc


def _npy_header(f: object, where: str) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(f)  # type: ignore[arg-type]
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(f)  # type: ignore[arg-type]
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = fmt.read_array_header_2_0(f)  # type: ignore[arg-type]
    else:
        raise MessageError(f"health inputs {where}: unsupported .npy version {version}")
    if dtype.hasobject:
        raise MessageError(f"health inputs {where}: object arrays need pickles, which are refused")
    return tuple(int(d) for d in shape), dtype
