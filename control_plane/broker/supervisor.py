"""Keep the embedded broker running: restart it, on the same port with the same persistence, when it dies.

The control plane owns the embedded broker's process, so nobody else will bring it back: without
a supervisor a broker that crashed (or was killed) stays dead, and the fleet with it. The
supervisor checks the process every ``check_interval_s``; when it is gone it says so (the exit
status and the tail of the broker's log), calls ``on_down``, and restarts it through
:meth:`~edgefleet.control_plane.broker.embedded.BrokerHandle.restart`: the same host, port and
data dir, so agents reconnect to the address they were enrolled with and Mosquitto reloads the
retained messages and sessions it saved. A restart that fails is tried again after a delay that
doubles up to ``restart_max_delay_s``. ``on_up`` is called once the broker answers again.

:meth:`BrokerSupervisor.check` is one step of that loop, for tests to drive without the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from edgefleet.shared.errors import BrokerError
from edgefleet.shared.link.backoff import Backoff

log = logging.getLogger(__name__)


class SupervisedBroker(Protocol):
    """What the supervisor needs of a broker handle (:class:`~edgefleet.control_plane.broker.embedded.BrokerHandle`)."""

    @property
    def kind(self) -> str: ...

    @property
    def url(self) -> str: ...

    def is_running(self) -> bool: ...

    def restart(self, timeout_s: float = 5.0) -> None: ...

    def log_tail(self, max_bytes: int = 4_000) -> str: ...


class BrokerSupervisor:
    """Restarts a broker whose process died; knows whether it is up."""

    def __init__(
        self,
        broker: SupervisedBroker,
        *,
        check_interval_s: float = 1.0,
        restart_max_delay_s: float = 30.0,
        on_down: Callable[[], None] | None = None,
        on_up: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create the supervisor (nothing runs until :meth:`start`).

        Args:
            broker: The running broker to watch.
            check_interval_s: Seconds between checks of its process (and the first restart delay).
            restart_max_delay_s: Seconds, the longest wait between failed restarts.
            on_down: Called (on the supervisor's thread) when the broker is found dead.
            on_up: Called when a restarted broker answers again.
            clock: Monotonic seconds, for the restart backoff.
        """
        self._broker = broker
        self._interval_s = check_interval_s
        self._backoff = Backoff(check_interval_s, restart_max_delay_s)
        self._on_down = on_down
        self._on_up = on_up
        self._clock = clock
        self._up = True
        self._next_restart_at = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0  # how many times the broker was brought back

    @property
    def up(self) -> bool:
        """Whether the broker ran at the last check (or was brought back since)."""
        return self._up

    def start(self) -> None:
        """Watch the broker from a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="edgefleet-broker-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop watching (before the broker itself is stopped, or this would restart it)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def check(self) -> None:
        """One step: if the broker's process is gone, report it and restart it when the backoff allows."""
        if self._broker.is_running():
            return
        if self._up:
            self._up = False
            log.error(
                "the embedded %s broker on %s died; restarting it on the same port. Its log:\n%s",
                self._broker.kind,
                self._broker.url,
                self._broker.log_tail(),
            )
            self._call(self._on_down)
        now = self._clock()
        if now < self._next_restart_at or self._stopping.is_set():
            return
        try:
            self._broker.restart()
        except BrokerError as exc:
            delay = self._backoff.next_delay()
            self._next_restart_at = now + delay
            log.error("restarting the embedded broker failed (next try in %.1f s): %s", delay, exc)
            return
        self._backoff.reset()
        self._next_restart_at = 0.0
        self._up = True
        self.restarts += 1
        log.warning("the embedded %s broker is back on %s (restart %d)", self._broker.kind, self._broker.url,
                    self.restarts)
        self._call(self._on_up)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self.check()
            except Exception:  # the supervisor must outlive any one failed check
                log.exception("checking the embedded broker failed")

    @staticmethod
    def _call(callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            log.exception("broker supervisor callback failed")
