"""Polling until something holds, for tests that wait on other processes and threads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(probe: Callable[[], T], *, timeout_s: float, failure: str, poll_s: float = 0.05) -> T:
    """Call ``probe`` every ``poll_s`` until it returns something truthy, and return that;
    raise ``AssertionError(failure)`` once ``timeout_s`` has passed without it."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(failure)
        time.sleep(poll_s)


def within(predicate: Callable[[], object], timeout_s: float, poll_s: float) -> bool:
    """Whether ``predicate`` returns something truthy within ``timeout_s``, tried every ``poll_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False
