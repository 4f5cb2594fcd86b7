"""The verifier's own health: one record per failing component, kept in one registry.

The gallery watcher, the retention purger and the main loop each report what went wrong in their part (and
clear it when it is right again); the status reads the records back. Threads write it, so every access goes
through one lock. `latest()` is the status's `last_error` fallback: the most recent problem reported as one,
until its component is cleared (a bad message, which nothing clears, stays until the next problem)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

MESSAGES = "messages"  # the last malformed or refused message (never cleared: a fact, not a state)
GALLERY = "gallery"  # the gallery's revision check or a reload failed: the search matrix may be behind it
GALLERY_FILE = "gallery_file"  # the gallery file deleted, replaced or corrupt under this process
INTEGRITY = "integrity"  # the background quick check found a corrupt page


@dataclass(frozen=True)
class Health:
    """What is wrong with one component, and since when (time.monotonic(): its first report)."""

    component: str
    error: str
    since: float


class HealthRegistry:
    """The failing components, by name; a component absent is healthy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, Health] = {}
        self._latest: str | None = None  # the component last reported with latest=True

    def report(self, component: str, error: str, *, latest: bool = False) -> Health | None:
        """`component` fails with `error` (`error` "" clears it). `latest`: the problem becomes the status's
        `last_error` until its component is cleared or another such problem is reported. Returns the record
        it replaces (None: the component was healthy)."""
        if not error:
            return self.clear(component)
        with self._lock:
            before = self._records.get(component)
            since = before.since if before is not None else time.monotonic()
            self._records[component] = Health(component, error, since)
            if latest:
                self._latest = component
            return before

    def clear(self, component: str) -> Health | None:
        """`component` is healthy again; returns the record it had (None: it was healthy)."""
        with self._lock:
            return self._records.pop(component, None)

    def error(self, component: str) -> str:
        with self._lock:
            record = self._records.get(component)
        return "" if record is None else record.error

    def first(self, *components: str) -> str:
        """The error of the first of `components` that fails ("" when none does)."""
        with self._lock:
            for component in components:
                if component in self._records:
                    return self._records[component].error
        return ""

    def latest(self) -> str:
        """The problem last reported with latest=True, while its component still fails."""
        with self._lock:
            record = None if self._latest is None else self._records.get(self._latest)
        return "" if record is None else record.error

    def records(self) -> list[Health]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.component)
