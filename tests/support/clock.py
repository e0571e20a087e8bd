"""A clock for tests: a callable returning seconds that only moves when the test moves it."""

from __future__ import annotations


class FakeClock:
    """Seconds since an arbitrary origin; set or advance ``now`` to move time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self.now += seconds
