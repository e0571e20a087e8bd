"""What the agents of one process share: one MQTT network thread, one timer, one small step pool.

An agent started on its own builds a set for itself (N=1); :class:`~edgefleet.agent.fleet_host.AgentHost`
builds one set for all of its agents. Either way it is the same code path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from edgefleet.agent.scheduling import Timer
from edgefleet.shared.link.driver import PahoDriver

STEP_WORKERS = 8  # threads running reconciler steps for all agents of a process (a step may block on a download)


class FleetResources:
    """The driver, timer and pool many agents share; :meth:`start` before use, :meth:`stop` after."""

    def __init__(self, *, step_workers: int = STEP_WORKERS, clock: Callable[[], float] = time.monotonic) -> None:
        """Create the shared machinery (no thread runs until :meth:`start`).

        Args:
            step_workers: Threads for reconciler steps; a step that downloads holds one until done.
            clock: Monotonic seconds, for the driver's and the timer's deadlines.
        """
        self.driver = PahoDriver(clock=clock)
        self.timer = Timer(clock=clock)
        self.pool = ThreadPoolExecutor(max_workers=step_workers, thread_name_prefix="edgefleet-step")
        self._started = False

    def start(self) -> None:
        """Start the network and timer threads (idempotent)."""
        if not self._started:
            self.driver.start()
            self.timer.start()
            self._started = True

    def stop(self) -> None:
        """Stop the pool (waiting for running steps), the timer and the network thread."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.timer.stop()
        self.driver.stop()
        self._started = False
