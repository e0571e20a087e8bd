"""States are enums in memory and the same strings on disk: existing state.json files still load."""

from __future__ import annotations

import json
from pathlib import Path

from edgefleet.agent.deployment.machine import State
from edgefleet.agent.deployment.shadow_machine import ShadowState
from edgefleet.agent.deployment.state_store import STATE_FILE, STATE_SCHEMA, StateStore

DIGEST = "sha256:" + "ab" * 32
# As an agent from before the enums wrote it.
OLD_FILE = {
    "schema": STATE_SCHEMA,
    "desired_envelope": None,
    "accepted_sequence": 3,
    "applied_sequence": 2,
    "active": {},
    "in_progress": {
        "sequence": 3, "name": "m", "version": "2", "bundle_digest": DIGEST, "bundle_size": 10, "runtime": "onnx",
        "state": "health_checking", "started_at": 1.5, "previous": None,
    },
    "failed": {},
    "shadows": {
        "m": {
            "name": "m", "version": "3", "bundle_digest": DIGEST, "runtime": "onnx", "sample_rate": 0.5,
            "serving_version": "2", "state": "loading", "slot": "3-abababababab", "model_file": "model.onnx",
            "message": "", "failed_sequence": 0,
        }
    },
    "floors": {},
}


def test_an_old_state_file_loads_into_enums_and_is_written_back_unchanged(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps(OLD_FILE))
    store = StateStore(tmp_path)
    assert store.state.in_progress is not None and store.state.in_progress.state is State.HEALTH_CHECKING
    assert store.state.shadows["m"].state is ShadowState.LOADING
    store.update(applied_sequence=2)  # rewrite the file
    assert json.loads((tmp_path / STATE_FILE).read_text()) == OLD_FILE
