"""The token bucket with a fake clock, and the blocking limiter around it."""

from __future__ import annotations

import threading
import time

import pytest
from support.clock import FakeClock

from edgefleet.agent.config import TransferConfig
from edgefleet.agent.transfer.bandwidth import BandwidthLimiter, TokenBucket
from edgefleet.shared.errors import ConfigError


def test_a_full_bucket_lets_a_burst_through_then_charges_the_rate() -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=500, now=0.0)

    assert bucket.reserve(500, now=0.0) == 0.0
    assert bucket.reserve(250, now=0.0) == pytest.approx(0.25)  # in debt: wait until it is paid
    assert bucket.reserve(250, now=0.0) == pytest.approx(0.5)  # debts add up
    assert bucket.tokens(now=0.5) == pytest.approx(0.0)
    assert bucket.reserve(100, now=0.7) == 0.0


def test_refill_stops_at_the_burst_size() -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=500, now=0.0)
    bucket.reserve(500, now=0.0)

    assert bucket.tokens(now=60.0) == 500  # an hour idle is still only one burst
    assert bucket.reserve(501, now=60.0) == pytest.approx(0.001)


def test_a_reservation_larger_than_the_burst_waits_for_its_whole_size() -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=100, now=0.0)

    assert bucket.reserve(1100, now=0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("rate", [1_000, 65_536, 3_000_000])
def test_the_long_run_rate_is_the_cap(rate: int) -> None:
    """A greedy sender that waits exactly what it is told moves rate x time (+ one burst)."""
    burst = rate * TransferConfig().bandwidth_burst_s
    bucket = TokenBucket(rate_bytes_per_s=rate, burst_bytes=burst, now=0.0)
    now, sent, block = 0.0, 0, 16 * 1024
    while now < 10.0:
        now += bucket.reserve(block, now)
        sent += block
    assert sent <= rate * now + burst + block
    assert sent >= rate * now - block


def test_a_clock_going_backwards_adds_no_tokens() -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=1000, now=10.0)
    bucket.reserve(1000, now=10.0)

    assert bucket.tokens(now=5.0) == 0.0
    assert bucket.tokens(now=10.5) == pytest.approx(500.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 10), (-1, 10), (10, 0)])
def test_a_bucket_needs_a_positive_rate_and_burst(rate: float, burst: float) -> None:
    with pytest.raises(ConfigError, match="positive"):
        TokenBucket(rate_bytes_per_s=rate, burst_bytes=burst, now=0.0)


def test_the_limiter_asks_its_bucket_with_its_clock() -> None:
    clock = FakeClock(100.0)
    limiter = BandwidthLimiter(1000, burst_bytes=1000, clock=clock)

    assert limiter.delay_for(1000) == 0.0
    assert limiter.delay_for(500) == pytest.approx(0.5)
    clock.now += 2.0
    assert limiter.delay_for(1000) == 0.0


def test_consume_blocks_for_the_debt_and_a_cancel_cuts_it_short() -> None:
    limiter = BandwidthLimiter(1000, burst_bytes=1)
    limiter.consume(1)
    cancel = threading.Event()
    threading.Timer(0.05, cancel.set).start()

    # Would wait 100 s for these bytes; the cancel ends it.
    assert limiter.consume(100_000, cancel) is False
    assert cancel.is_set()


def test_consume_waits_about_the_reserved_time() -> None:
    limiter = BandwidthLimiter(10_000, burst_bytes=1)
    limiter.consume(1)
    started = time.monotonic()
    assert limiter.consume(1000, threading.Event()) is True
    assert 0.08 <= time.monotonic() - started < 1.0


def test_a_zero_rate_is_unlimited() -> None:
    limiter = BandwidthLimiter(0)

    assert limiter.unlimited
    assert limiter.delay_for(10**12) == 0.0
    assert limiter.consume(10**12) is True
    cancelled = threading.Event()
    cancelled.set()
    assert limiter.consume(1, cancelled) is False  # a cancel still tells the caller to stop
