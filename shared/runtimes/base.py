"""The one interface every inference runtime is served through.

A :class:`LoadedModel` is a model file opened in its runtime, with a fixed signature. Its
:meth:`LoadedModel.predict` is on the inference hot path, so everything that can be known at
load time (names, dtypes, which dimensions are fixed) is precomputed there and a call only
compares.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import numpy as np

from edgefleet.shared.errors import ConfigError, InferenceError
from edgefleet.shared.tensors import NUMPY_TO_V2, TensorSpec


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """How a runtime should execute a model.

    Attributes:
        intra_op_threads: Threads one inference may use; ``0`` lets the runtime choose. ``1``
            is the default because an edge device usually serves several models and requests
            at once, and one thread each gives the steadiest latency.
        providers: ONNX Runtime execution providers in order of preference; ``None`` picks
            the best available automatically. Ignored by TFLite.
    """

    intra_op_threads: int = 1
    providers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """Reject values a runtime would misread (a negative thread count means "default" to some).

        Raises:
            ConfigError: If ``intra_op_threads`` is not an int >= 0 or ``providers`` is not a
                tuple of strings.
        """
        threads = self.intra_op_threads
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
            raise ConfigError(f"intra_op_threads must be an int >= 0, got {threads!r}")
        if self.providers is not None and (
            not isinstance(self.providers, tuple) or not all(isinstance(p, str) for p in self.providers)
        ):
            raise ConfigError(f"providers must be a tuple of strings or None, got {self.providers!r}")


@dataclass(frozen=True, slots=True)
class _InputCheck:
    """What :meth:`LoadedModel.predict` compares one input against, precomputed at load."""

    name: str
    dtype: np.dtype[Any]
    datatype: str
    rank: int
    # (axis, size) for every dimension that is not dynamic; usually all but the batch axis.
    fixed_dims: tuple[tuple[int, int], ...]
    spec_shape: tuple[int, ...]


class LoadedModel(abc.ABC):
    """A model opened in its runtime, ready to answer :meth:`predict`.

    Subclasses call ``super().__init__`` with the signature they read from the runtime and
    implement :meth:`_run` (and :meth:`close` if they hold resources).

    Attributes:
        name: Model name, as deployed.
        version: Model version, as deployed.
        runtime: ``"onnx"`` or ``"tflite"``.
        inputs: The input tensors, in the model's order.
        outputs: The output tensors, in the model's order.
    """

    runtime: ClassVar[str]

    def __init__(
        self,
        *,
        name: str,
        version: str,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
    ) -> None:
        self.name = name
        self.version = version
        self.inputs = inputs
        self.outputs = outputs
        self._checks = tuple(
            _InputCheck(
                name=spec.name,
                dtype=spec.numpy_dtype,
                datatype=spec.datatype,
                rank=len(spec.shape),
                fixed_dims=tuple((axis, size) for axis, size in enumerate(spec.shape) if size != -1),
                spec_shape=spec.shape,
            )
            for spec in inputs
        )
        self._n_inputs = len(inputs)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on one request.

        Args:
            inputs: One numpy array per model input, by name. Arrays must already have the
                model's dtype: nothing is cast, because a silent cast (float64 -> float32,
                int64 -> int8) can change the answer without anyone noticing.

        Returns:
            Every model output, by name, as arrays the caller owns.

        Raises:
            InferenceError: If an input is missing or unknown, or has the wrong dtype, rank or
                shape, or the runtime fails on the request.
        """
        self.validate(inputs)
        return self._run(inputs)

    def validate(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Check ``inputs`` against the signature without running the model.

        :meth:`predict` calls it first; the dynamic batcher calls it on each request before
        queueing it, so that a bad request fails alone instead of failing the batch it would join.

        Raises:
            InferenceError: If an input is missing or unknown, or has the wrong dtype, rank or
                shape.
        """
        for check in self._checks:
            array = inputs.get(check.name)
            if array is None:
                raise InferenceError(
                    f"{self._label()}: missing input {check.name!r}; the model takes "
                    f"{[c.name for c in self._checks]}, got {sorted(inputs)}"
                )
            if not isinstance(array, np.ndarray):
                raise InferenceError(
                    f"{self._label()}: input {check.name!r} must be a numpy array, got {type(array).__name__}"
                )
            dtype = array.dtype
            # Identity first: native dtypes are singletons, so the common case skips __ne__.
            if dtype is not check.dtype and dtype != check.dtype:
                raise InferenceError(
                    f"{self._label()}: input {check.name!r} has datatype {_v2_name(dtype)}, expected {check.datatype}"
                )
            shape = array.shape
            if len(shape) != check.rank:
                self._raise_shape(check, shape)
            # A plain loop, not any(<genexpr>): building a generator costs more than the
            # one or two comparisons a typical signature needs.
            for axis, size in check.fixed_dims:
                if shape[axis] != size:
                    self._raise_shape(check, shape)
        # Every expected name was found, so a size mismatch can only mean extra names.
        if len(inputs) != self._n_inputs:
            unknown = sorted(set(inputs) - {check.name for check in self._checks})
            raise InferenceError(
                f"{self._label()}: unknown input(s) {unknown}; the model takes {[check.name for check in self._checks]}"
            )

    @abc.abstractmethod
    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the runtime on inputs that :meth:`predict` has validated.

        Raises:
            InferenceError: If the runtime fails.
        """

    def close(self) -> None:  # noqa: B027 - a no-op default is intended; not every runtime holds resources
        """Release the runtime's resources; :meth:`predict` fails afterwards."""

    def _raise_shape(self, check: _InputCheck, shape: tuple[int, ...]) -> NoReturn:
        raise InferenceError(
            f"{self._label()}: input {check.name!r} has shape {list(shape)}, "
            f"expected {list(check.spec_shape)} (-1 = any size)"
        )

    def _label(self) -> str:
        return f"model {self.name!r} version {self.version!r}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}:{self.version} ({self.runtime})>"


def _v2_name(dtype: np.dtype[Any]) -> str:
    """The v2 datatype name of ``dtype``, or numpy's own name for dtypes v2 has no name for."""
    return NUMPY_TO_V2.get(dtype) or str(dtype)
