"""Test-only fault injection: pause the agent right after it persisted a deployment state.

Crash-safety tests set ``EDGEFLEET_FAULT_PAUSE_AT=<state>`` (e.g. ``staging``) and
``EDGEFLEET_FAULT_PAUSE_S`` in the agent's environment, wait for the agent to log
``fault pause at <state>``, and SIGKILL it there. Unset (always, in production) this costs one
dict lookup per deployment step and never sleeps.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

_PAUSE_AT = os.environ.get("EDGEFLEET_FAULT_PAUSE_AT", "")
_PAUSE_S = float(os.environ.get("EDGEFLEET_FAULT_PAUSE_S", "30"))


def pause_point(state: str) -> None:
    """Sleep if the environment asks for a pause at ``state``."""
    if _PAUSE_AT and state == _PAUSE_AT:
        log.warning("fault pause at %s for %.0f s", state, _PAUSE_S)
        time.sleep(_PAUSE_S)
