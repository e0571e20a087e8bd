"""A download bandwidth cap: a token bucket (pure, time passed in) and a blocking limiter around it.

One :class:`BandwidthLimiter` per agent is shared by every way a bundle comes in (HTTP blocks,
MQTT chunk requests), so the cap holds for the device as a whole.

The bucket works by *reservation*: :meth:`TokenBucket.reserve` always takes the bytes, possibly
into debt, and says how long the caller must wait before it may move them. That keeps the long
run rate exact, lets a single reservation be larger than the burst (a whole chunk window), and
needs no loop of "try, sleep, try again".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edgefleet.agent.config import TransferConfig
from edgefleet.shared.errors import ConfigError


class TokenBucket:
    """Tokens are bytes; they refill at ``rate_bytes_per_s`` up to ``burst_bytes``.

    Pure: the caller passes the time (seconds, any monotonic origin) to every call.
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float, now: float) -> None:
        """Start with a full bucket.

        Args:
            rate_bytes_per_s: Refill rate, > 0.
            burst_bytes: Bucket size, > 0: what may go at once after an idle spell.
            now: The current time in seconds.

        Raises:
            ConfigError: A rate or burst that is not positive.
        """
        if rate_bytes_per_s <= 0 or burst_bytes <= 0:
            raise ConfigError(f"rate and burst must be positive, got {rate_bytes_per_s} B/s and {burst_bytes} B")
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        self.burst_bytes = float(burst_bytes)
        self._tokens = float(burst_bytes)
        self._last = now

    def tokens(self, now: float) -> float:
        """Bytes that may go right now (negative: the debt of earlier reservations)."""
        self._refill(now)
        return self._tokens

    def reserve(self, n_bytes: int, now: float) -> float:
        """Take ``n_bytes`` and return how many seconds to wait before moving them (0.0: go now)."""
        if n_bytes < 0:
            raise ConfigError(f"cannot reserve {n_bytes} bytes")
        self._refill(now)
        self._tokens -= n_bytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bytes_per_s

    def _refill(self, now: float) -> None:
        # A clock that goes backwards (it should not: callers pass monotonic time) adds nothing.
        elapsed = max(0.0, now - self._last)
        self._last = max(self._last, now)
        self._tokens = min(self.burst_bytes, self._tokens + elapsed * self.rate_bytes_per_s)


class BandwidthLimiter:
    """Blocks callers so that the bytes they announce stay under a rate; thread-safe.

    A rate of 0 means unlimited: :meth:`consume` then returns at once.
    """

    def __init__(
        self,
        rate_bytes_per_s: int,
        *,
        burst_bytes: int | None = None,
        burst_s: float = TransferConfig.model_fields["bandwidth_burst_s"].default,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a limiter.

        Args:
            rate_bytes_per_s: The cap in bytes per second; 0 for no cap.
            burst_bytes: Bucket size; default ``burst_s`` seconds of traffic (at least 1 byte).
            burst_s: Seconds of traffic at the capped rate that may pass at once after an idle spell.
            clock: Monotonic seconds (tests pass a fake one).

        Raises:
            ConfigError: A negative rate.
        """
        if rate_bytes_per_s < 0:
            raise ConfigError(f"rate_bytes_per_s must be >= 0, got {rate_bytes_per_s}")
        self._clock = clock
        self._lock = threading.Lock()
        self._bucket: TokenBucket | None = None
        if rate_bytes_per_s > 0:
            burst = burst_bytes if burst_bytes is not None else max(1.0, rate_bytes_per_s * burst_s)
            self._bucket = TokenBucket(rate_bytes_per_s, burst, clock())

    @classmethod
    def for_transfer(cls, config: TransferConfig) -> BandwidthLimiter:
        """The limiter a transfer section asks for (its cap and burst)."""
        return cls(config.bandwidth_limit_bytes_per_s, burst_s=config.bandwidth_burst_s)

    @property
    def unlimited(self) -> bool:
        """Whether there is no cap."""
        return self._bucket is None

    def delay_for(self, n_bytes: int) -> float:
        """Reserve ``n_bytes`` and return the seconds the caller must wait (does not block)."""
        if self._bucket is None:
            return 0.0
        with self._lock:
            return self._bucket.reserve(n_bytes, self._clock())

    def consume(self, n_bytes: int, cancel: threading.Event | None = None) -> bool:
        """Wait until ``n_bytes`` may be moved.

        Args:
            n_bytes: Bytes about to be received (or asked for).
            cancel: Stops the wait early when set.

        Returns:
            True when the caller may go on, False if ``cancel`` was set while waiting.
        """
        delay = self.delay_for(n_bytes)
        if delay <= 0:
            return cancel is None or not cancel.is_set()
        if cancel is None:
            time.sleep(delay)
            return True
        return not cancel.wait(delay)
