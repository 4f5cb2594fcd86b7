"""The verifier's retention purge thread: the templates of flights past `retention.purge_after_departure_h`.

A round runs every minute, and at once when the gallery changed (a flight rescheduled or added may be due
now: `wake()`). Each round opens its own connection to the gallery the verifier has now, so it never shares
one with the main loop; a failure is logged and tried again next round. The round also runs the gallery's
integrity check (a full read of the file, at most once a minute) and reports it in the health registry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kiosk.errors import UsageError
from kiosk.services.health import INTEGRITY, HealthRegistry
from kiosk.services.metrics import VerifierMetrics
from kiosk.store.flights import SqliteBoardingStore
from kiosk.store.queries import GalleryQueries

log = logging.getLogger("kiosk.services.verifier")  # the verifier's log lines, as they always were

PURGE_EVERY_S = 60.0


class RetentionPurger(threading.Thread):
    """Purges departed flights' templates in the background until `stop()`."""

    def __init__(
        self,
        gallery: Callable[[], GalleryQueries],
        purge_after_h: float,
        health: HealthRegistry,
        metrics: VerifierMetrics | None = None,
        every_s: float = PURGE_EVERY_S,
    ) -> None:
        """`gallery`: the gallery the verifier has now (it changes when a restored file is switched to)."""
        super().__init__(name="retention", daemon=True)
        self.gallery = gallery
        self.purge_after_h = purge_after_h
        self.health = health
        self.metrics = metrics
        self.every_s = every_s
        self._stopping = threading.Event()  # (not `_stop`: Thread has a method of that name)
        self._now = threading.Event()  # set: look for flights due for purging now
        self._now.set()
        self._last_integrity = float("-inf")
        self.rounds = 0  # rounds finished (tests wait on `round_done`)
        self.round_done = threading.Event()

    def wake(self) -> None:
        """Look for flights due now (the gallery changed)."""
        self._now.set()

    def stop(self) -> None:
        self._stopping.set()
        self._now.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._now.wait(self.every_s)  # every minute, and at once when the gallery changed
            self._now.clear()
            if self._stopping.is_set():
                return
            try:
                self.purge_round()
            except Exception as exc:  # noqa: BLE001 - retry next round
                log.warning("retention purge failed (next try in %.0fs): %s", self.every_s, exc)
            self.rounds += 1
            self.round_done.set()

    def purge_round(self) -> None:
        """One round: the integrity check when due, then every flight due for purging."""
        try:
            gallery = self.gallery().reopen()
        except UsageError as exc:  # not a usable database any more (or gone: the file check says so)
            self._integrity(str(exc), self.gallery().name)
            raise
        with gallery:
            check = getattr(gallery, "integrity_problem", None)
            # a page corrupt inside the file, which the header check cannot see (a full read of the file: at
            # most once a round, not at each purge a gallery change brings forward)
            if check is not None and time.monotonic() - self._last_integrity >= self.every_s:
                self._last_integrity = time.monotonic()
                self._integrity(check(), gallery.name)
            store = SqliteBoardingStore(gallery)
            for flight in store.due_for_purge(time.time(), self.purge_after_h):
                result = store.purge(flight)
                if self.metrics is not None:
                    self.metrics.purges.inc()
                log.info(
                    "retention: flight %s departed more than %g h ago; templates of %d passenger(s) deleted, "
                    "%d kept for a later flight",
                    flight,
                    self.purge_after_h,
                    len(result.subjects_purged),
                    len(result.kept),
                )

    def _integrity(self, problem: str, name: str) -> None:
        if problem != self.health.error(INTEGRITY):
            if problem:
                log.error("%s", problem)
            else:
                log.info("gallery %s passes its integrity check again", name)
        self.health.report(INTEGRITY, problem)
