"""The verifier's gallery watcher thread: is the gallery file still there, and did the gallery change?

Once a second (at once when a shared PostgreSQL gallery announces a change, or when the main loop asks with
`sync()`), a round:
- checks the gallery file (deleted, replaced, corrupt): a file put back at the path (`kiosk-enroll restore`,
  a copy) that opens as a gallery is switched to, and loaded afresh;
- reads the gallery's revision on a connection of its own, and when it moved (or a subject's expiry came,
  or the file was switched) builds the new search view on another connection, off the main loop, so frames
  keep flowing; a failed build keeps the old view.
What it finds goes to the health registry (components `gallery_file` and `gallery`); what the main loop must
apply goes through a queue: `Switched` (confirm and board in the new file from now on), `Loaded` (adopt this
view), `Checked` (a round ended: tell the gatekeeper the gallery's state). The main loop takes them with
`updates()`; nothing else is shared.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kiosk.boarding.gates import GateFlights
from kiosk.services.health import GALLERY, GALLERY_FILE, INTEGRITY, HealthRegistry
from kiosk.store.queries import GalleryQueries
from kiosk.store.sqlite_file import Gallery

log = logging.getLogger("kiosk.services.verifier")  # the verifier's log lines, as they always were

GALLERY_POLL_S = 1.0

Build = Callable[[GalleryQueries, GateFlights | None], GateFlights]


@dataclass(frozen=True)
class Loaded:
    """A new view of the gallery, built off the main loop, to adopt."""

    flights: GateFlights
    load_ms: float


@dataclass(frozen=True)
class Switched:
    """The gallery file now at the path (put back after the one opened went away): confirm and board there
    from now on, and close the old one."""

    gallery: Gallery


@dataclass(frozen=True)
class Checked:
    """A round ended: the gallery's health may have changed."""


Update = Loaded | Switched | Checked


class GalleryWatch(threading.Thread):
    """Watches one gallery (and any file switched to) until `stop()`."""

    def __init__(
        self,
        gallery: GalleryQueries,
        flights: GateFlights,
        build: Build,
        health: HealthRegistry,
        on_change: Callable[[], None] = lambda: None,
        poll_s: float = GALLERY_POLL_S,
    ) -> None:
        """`flights`: the view built at start; `build(gallery, previous)` builds a view on a connection of this
        thread's; `on_change`: called when the revision moved (before the new view is built)."""
        super().__init__(name="gallery-watch", daemon=True)
        self._lock = threading.Lock()
        self._gallery = gallery  # guarded by _lock: the purger asks for it
        self._flights = flights  # the newest view built (the main loop adopts each, in order)
        self._build = build
        self.health = health
        self._on_change = on_change
        self.poll_s = poll_s
        self._conn: GalleryQueries | None = gallery.reopen()  # this thread's, for the revision
        self._force = False  # a switched file: load it whatever its revision
        self._updates: queue.SimpleQueue[Update] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()  # (not `_stop`: Thread has a method of that name)
        self._rounds = threading.Condition()
        self._rounds_started = self._rounds_finished = 0

    # -- the main loop's side ----------------------------------------------------------------------------
    def gallery(self) -> GalleryQueries:
        """The gallery being watched now."""
        with self._lock:
            return self._gallery

    def updates(self) -> list[Update]:
        """What the rounds found since the last call, in order (never blocks)."""
        found = []
        while True:
            try:
                found.append(self._updates.get_nowait())
            except queue.Empty:
                return found

    def sync(self) -> None:
        """Block until a round started after this call has ended (its view, if any, is then in `updates()`)."""
        with self._rounds:
            want = self._rounds_started + 1
            self._wake.set()
            while self._rounds_finished < want and self.is_alive():
                self._rounds.wait(0.5)

    def wake(self) -> None:
        """A round now (the gallery announced a change)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    # -- the thread --------------------------------------------------------------------------------------
    def run(self) -> None:
        listen = getattr(self.gallery(), "listen", None)
        if listen is not None:  # a shared (PostgreSQL) gallery announces its changes: a round at once
            threading.Thread(
                target=listen, args=(self._wake, self._stopping), name="gallery-listener", daemon=True
            ).start()
        try:
            while not self._stopping.is_set():
                self._wake.wait(self.poll_s)
                self._wake.clear()
                if self._stopping.is_set():
                    return
                self._round()
        finally:
            if self._conn is not None:
                self._conn.close()

    def _round(self) -> None:
        with self._rounds:
            self._rounds_started += 1
        try:
            self._check_file()
            self._check_revision()
        except Exception:  # a bug here must not end the watching; the next round tries again
            log.exception("gallery check failed")
        finally:
            self._updates.put(Checked())
            with self._rounds:
                self._rounds_finished += 1
                self._rounds.notify_all()

    def _check_file(self) -> None:
        """Is the gallery file still there and still the one open? A file put back at the path that opens as a
        gallery is switched to and loaded; anything else is stale."""
        gallery = self.gallery()
        problem = gallery.file_problem()
        if problem and isinstance(gallery, Gallery):
            try:
                fresh: Gallery | None = Gallery(gallery.path, create=False, codec=gallery.codec)
            except Exception:  # noqa: BLE001 - nothing usable at the path yet
                fresh = None
            if fresh is not None and not fresh.file_problem():
                log.warning("%s; switching to the gallery now at %s", problem, fresh.path)
                self._switch(fresh)
                problem = ""
            elif fresh is not None:
                fresh.close()
        if problem != self.health.error(GALLERY_FILE):
            if problem:
                log.error("%s", problem)
            else:
                log.info("gallery file %s is in place again", self.gallery().name)
        self.health.report(GALLERY_FILE, problem)

    def _switch(self, fresh: Gallery) -> None:
        with self._lock:
            self._gallery = fresh
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._force = True
        self.health.clear(INTEGRITY)  # the corrupt file is not the one watched any more
        self._updates.put(Switched(fresh))

    def _check_revision(self) -> None:
        try:
            if self._conn is None:
                self._conn = self.gallery().reopen()
            revision = self._conn.revision()
        except Exception as exc:  # noqa: BLE001 - a locked or broken DB must not stop the gate
            self.health.report(GALLERY, f"gallery: {exc}", latest=True)
            log.warning("gallery revision check failed: %s", exc)
            return
        matrix = self._flights.full
        expired = matrix.next_expiry is not None and time.time() >= matrix.next_expiry
        if self._force:
            self._force, expired = False, True
        if revision == matrix.revision and not expired:
            if self.health.error(GALLERY):  # the gallery answers again and nothing changed meanwhile
                log.info("gallery %s answers again (revision %d)", self.gallery().name, revision)
                self.health.clear(GALLERY)
            return
        self._on_change()
        self._load(revision)

    def _load(self, revision: int) -> None:
        """Load the view of the gallery, which was at `revision` a moment ago (for the log)."""
        try:
            # Its own connection: a gallery file that vanished is an error here, never a new empty gallery:
            # the verifier keeps deciding from the view it has and says so.
            started = time.perf_counter()
            with self.gallery().reopen() as gallery:
                loaded = self._build(gallery, self._flights)
            load_ms = (time.perf_counter() - started) * 1000
        except Exception as exc:  # noqa: BLE001 - keep serving the old view
            self.health.report(GALLERY, f"gallery reload: {exc}", latest=True)
            log.warning(
                "gallery reload failed, keeping revision %d (the gallery is at revision %d): %s",
                self._flights.full.revision,
                revision,
                exc,
            )
            return
        self._flights = loaded
        self.health.clear(GALLERY)
        self._updates.put(Loaded(loaded, load_ms))
