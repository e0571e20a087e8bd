"""Test-only fault injection: pause, or die of a signal, right after a deployment state is persisted.

Crash-safety tests set ``EDGEFLEET_FAULT_PAUSE_AT=<state>`` (e.g. ``staging``) and
``EDGEFLEET_FAULT_PAUSE_S`` in the agent's environment, wait for the agent to log
``fault pause at <state>``, and SIGKILL it there. ``EDGEFLEET_FAULT_SIGNAL_AT=<state>`` makes
the agent raise ``EDGEFLEET_FAULT_SIGNAL`` (a name, default ``SIGSEGV``) against itself there
instead: what a model that crashes the runtime while it is loaded or checked does to the
process, on every attempt. Unset (always, in production) this costs two string compares per
deployment step and never sleeps.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)

_PAUSE_AT = os.environ.get("EDGEFLEET_FAULT_PAUSE_AT", "")
_PAUSE_S = float(os.environ.get("EDGEFLEET_FAULT_PAUSE_S", "30"))
_SIGNAL_AT = os.environ.get("EDGEFLEET_FAULT_SIGNAL_AT", "")
_SIGNAL = os.environ.get("EDGEFLEET_FAULT_SIGNAL", "SIGSEGV")


def pause_point(state: str) -> None:
    """Sleep, or die of a signal, if the environment asks for it at ``state``."""
    if _SIGNAL_AT and state == _SIGNAL_AT:
        log.warning("fault signal %s at %s", _SIGNAL, state)
        logging.shutdown()  # the log line must reach the file before the process dies
        os.kill(os.getpid(), signal.Signals[_SIGNAL])
    if _PAUSE_AT and state == _PAUSE_AT:
        log.warning("fault pause at %s for %.0f s", state, _PAUSE_S)
        time.sleep(_PAUSE_S)
