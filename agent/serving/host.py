"""The models an agent is serving, by name; swapped atomically on activation and rollback.

Readers (the inference API, in-process callers) take a reference under no lock: replacing the
dict is atomic in CPython, and a request that already holds the old model finishes on it.

A model may have a shadow candidate attached (:mod:`agent.shadow`). :meth:`ModelHost.get` then
hands out a :class:`~agent.shadow.ShadowedModel` around the serving model, so every caller (the
HTTP API and in-process :meth:`agent.service.Agent.predict`) mirrors traffic without knowing;
without a shadow it hands out the serving model itself, so the serving path costs nothing extra.
"""

from __future__ import annotations

import threading

from edgefleet.agent.serving.shadow import ShadowedModel, ShadowRunner
from edgefleet.shared.errors import NotFoundError
from edgefleet.shared.runtimes import LoadedModel


class ModelHost:
    """Implements the inference API's ``ModelRegistry``: one serving version per model name."""

    def __init__(self, *, retire_grace_s: float = 5.0) -> None:
        """Create an empty host.

        Args:
            retire_grace_s: Seconds a swapped-out model stays open (``AgentConfig.retire_grace_s``).
        """
        self._retire_grace_s = retire_grace_s
        self._models: dict[str, LoadedModel] = {}  # the serving models themselves
        self._shadows: dict[str, ShadowRunner] = {}
        self._served: dict[str, LoadedModel] = {}  # what get() hands out: the model, or it wrapped
        self._write_lock = threading.Lock()

    def get(self, name: str, version: str | None = None) -> LoadedModel | None:
        """The serving model ``name``; None if absent or if ``version`` is given and differs."""
        model = self._served.get(name)
        if model is None or (version is not None and model.version != version):
            return None
        return model

    def models(self) -> list[LoadedModel]:
        """Every serving model."""
        return list(self._served.values())

    def swap(self, name: str, model: LoadedModel | None) -> LoadedModel | None:
        """Serve ``model`` under ``name`` (None removes it); return the model it replaced.

        An attached shadow stays attached and is re-bound to the new serving model (its stats
        start afresh when the serving version changes).
        """
        with self._write_lock:
            old = self._models.get(name)
            models = dict(self._models)
            if model is None:
                models.pop(name, None)
            else:
                models[name] = model
            self._models = models
            self._republish()
            return old

    def attach_shadow(self, name: str, runner: ShadowRunner) -> ShadowRunner | None:
        """Mirror sampled requests of the serving model ``name`` to ``runner``.

        Returns:
            The runner it replaced, for the caller to close.

        Raises:
            NotFoundError: No model ``name`` is serving (a shadow needs something to compare with).
        """
        with self._write_lock:
            serving = self._models.get(name)
            if serving is None:
                raise NotFoundError(f"model {name!r} is not serving")
            runner.bind(serving)
            old = self._shadows.get(name)
            self._shadows = {**self._shadows, name: runner}
            self._republish()
            return old

    def detach_shadow(self, name: str) -> ShadowRunner | None:
        """Stop mirroring to the shadow of ``name``; return its runner for the caller to close."""
        with self._write_lock:
            shadows = dict(self._shadows)
            old = shadows.pop(name, None)
            self._shadows = shadows
            self._republish()
            return old

    def shadow(self, name: str) -> ShadowRunner | None:
        """The shadow runner attached to ``name``, if any."""
        return self._shadows.get(name)

    def shadows(self) -> list[ShadowRunner]:
        """Every attached shadow runner."""
        return list(self._shadows.values())

    def retire(self, model: LoadedModel, grace_s: float | None = None) -> None:
        """Close a swapped-out model after ``grace_s`` (default: the host's), so requests that hold it finish."""
        timer = threading.Timer(self._retire_grace_s if grace_s is None else grace_s, model.close)
        timer.daemon = True
        timer.start()

    def close_all(self) -> None:
        """Unload everything, shadows included (agent shutdown)."""
        with self._write_lock:
            models, self._models = self._models, {}
            shadows, self._shadows = self._shadows, {}
            self._served = {}
        for runner in shadows.values():
            runner.close()
        for model in models.values():
            model.close()

    def _republish(self) -> None:
        """Rebuild what get() hands out (under the write lock), and re-bind shadows."""
        served: dict[str, LoadedModel] = {}
        for name, model in self._models.items():
            runner = self._shadows.get(name)
            if runner is None:
                served[name] = model
            else:
                runner.bind(model)
                current = self._served.get(name)
                # Keep the same wrapper object when nothing changed for this name.
                if isinstance(current, ShadowedModel) and current.inner is model and current.runner is runner:
                    served[name] = current
                else:
                    served[name] = ShadowedModel(model, runner)
        self._served = served
