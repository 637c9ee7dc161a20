"""Waiting for a condition that another thread or process makes true.

Tests observe the server from outside (its counters change on its own thread or
process), so they poll: :func:`wait_until` returns as soon as the condition holds and
gives up after a generous timeout, which only a broken run ever reaches.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_until"]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds; False if it never did within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
