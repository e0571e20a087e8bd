"""The models an agent is serving, by name; swapped atomically on activation and rollback.

Readers (the inference API, in-process callers) take a reference under no lock: replacing a dict
entry is atomic in CPython, and a request that already holds the old model finishes on it.
"""

from __future__ import annotations

import threading

from agent.runtimes import LoadedModel

RETIRE_GRACE_S = 5.0  # seconds an old model stays open after a swap


class ModelHost:
    """Implements the inference API's ``ModelRegistry``: one serving version per model name."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._write_lock = threading.Lock()

    def get(self, name: str, version: str | None = None) -> LoadedModel | None:
        """The serving model ``name``; None if absent or if ``version`` is given and differs."""
        model = self._models.get(name)
        if model is None or (version is not None and model.version != version):
            return None
        return model

    def models(self) -> list[LoadedModel]:
        """Every serving model."""
        return list(self._models.values())

    def swap(self, name: str, model: LoadedModel | None) -> LoadedModel | None:
        """Serve ``model`` under ``name`` (None removes it); return the model it replaced."""
        with self._write_lock:
            old = self._models.get(name)
            models = dict(self._models)
            if model is None:
                models.pop(name, None)
            else:
                models[name] = model
            self._models = models
            return old

    def retire(self, model: LoadedModel, grace_s: float = RETIRE_GRACE_S) -> None:
        """Close a swapped-out model after ``grace_s``, so requests that already hold it finish."""
        timer = threading.Timer(grace_s, model.close)
        timer.daemon = True
        timer.start()

    def close_all(self) -> None:
        """Unload everything (agent shutdown)."""
        with self._write_lock:
            models, self._models = self._models, {}
        for model in models.values():
            model.close()
