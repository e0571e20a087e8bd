"""Reconnect backoff: wait ``min_s``, then twice as long after each failure, up to ``max_s``."""

from __future__ import annotations


class Backoff:
    """Delays between reconnect attempts; :meth:`reset` once a connection is accepted."""

    def __init__(self, min_s: float, max_s: float) -> None:
        """Create the backoff.

        Args:
            min_s: Seconds before the first retry (and the first connect after :meth:`reset`).
            max_s: Seconds, the longest wait.
        """
        self._min_s = max(0.0, min_s)
        self._max_s = max(self._min_s, max_s)
        self._last: float | None = None

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt (grows with each call until reset)."""
        self._last = self._min_s if self._last is None else min(self._max_s, max(self._last * 2, self._min_s))
        return self._last

    def reset(self) -> None:
        """Start again from ``min_s`` (a connection was accepted)."""
        self._last = None
