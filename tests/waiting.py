"""Waiting for something to happen, in one place: poll a predicate briefly until it holds, or fail naming it.

A test that sleeps a fixed time and hopes is slow when the machine is idle and flaky when it is busy; a test that
waits for the event it needs is neither. `wait_until` is the one helper every test uses for that.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *, every: float = 0.02) -> T:
    """Call `predicate` every `every` seconds until it returns something true, and return that; raise
    AssertionError saying `what` was awaited (and for how long) when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
