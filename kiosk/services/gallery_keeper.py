"""The main loop's side of the verifier's gallery: what the gallery watch (kiosk.services.gallery_watch) found,
applied where the loop owns it.

The loop owns the gallery connection and boarding store the gatekeeper confirms and boards in, the view the
core decides from, and the gatekeeper's stale state; the watch thread owns none of them, and hands over
through its queue: a file switched to (the gatekeeper uses it from now on, the old one is closed), a new view
(adopted, counted, logged), a round's end (the gatekeeper told the gallery's state)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from kiosk.boarding.gates import GateFlights
from kiosk.boarding.matrix import GalleryMatrix
from kiosk.pipeline.core import VerifierCore
from kiosk.pipeline.gatekeeper import Gatekeeper
from kiosk.services.gallery_watch import GalleryWatch, Loaded, Switched
from kiosk.services.health import GALLERY, GALLERY_FILE, INTEGRITY, HealthRegistry
from kiosk.services.metrics import VerifierMetrics
from kiosk.store.flights import SqliteBoardingStore
from kiosk.store.queries import GalleryQueries
from kiosk.store.sqlite_file import Gallery

log = logging.getLogger("kiosk.services.verifier")  # the verifier's log lines, as they always were


def log_gates(gates: set[str], old: GateFlights | None, new: GateFlights) -> None:
    """Each gate's flight, when it is new or changed."""
    for gate in sorted(gates):
        flight = new.flight_of(gate)
        if old is None or old.flight_of(gate) != flight:
            log.info(
                "gate %s: %s",
                gate,
                f"boarding flight {flight} ({len(new.manifests[flight])} passengers)"
                if flight
                else "not boarding; processes nobody"
                if new.require_flight
                else "not boarding; matches against everyone enrolled (1:N)",
            )


def count_gallery(metrics: VerifierMetrics, matrix: GalleryMatrix) -> None:
    metrics.gallery_subjects.set(len(matrix))
    metrics.gallery_templates.set(matrix.template_count)
    metrics.gallery_unreadable.set(sum(matrix.unreadable.values()))


class GalleryKeeper:
    """The gallery as the main loop has it."""

    def __init__(
        self,
        gallery: GalleryQueries,
        store: SqliteBoardingStore,
        *,
        core: VerifierCore,
        gate: Gatekeeper,
        watch: GalleryWatch,
        health: HealthRegistry,
        metrics: VerifierMetrics,
        gates: set[str],
        stale_grace_s: float,
        config_source: Path | None,
        heartbeat_now: Callable[[], None],
    ) -> None:
        """`config_source`: the config file (for the restore command an operator is told to run);
        `heartbeat_now`: the stale state changed, send a heartbeat at once."""
        self.gallery = gallery
        self.store = store
        self.core = core
        self.gate = gate
        self.watch = watch
        self.health = health
        self.metrics = metrics
        self.gates = gates
        self.stale_grace_s = stale_grace_s
        self.config_source = config_source
        self._heartbeat_now = heartbeat_now

    def apply(self) -> None:
        """Apply what the gallery watch found, in order: a file switched to, a new view, a round's end."""
        for update in self.watch.updates():
            if isinstance(update, Switched):
                self._switch(update.gallery)
            elif isinstance(update, Loaded):
                self._adopt(update)
            else:
                self.update_stale()

    def refresh(self) -> None:
        """Pick up the gallery's changes now (a claim names someone not in the matrix: enrolled a moment
        ago?): wait for a watch round and adopt what it built."""
        self.watch.sync()
        self.apply()

    def _switch(self, fresh: Gallery) -> None:
        """Confirm and board in the gallery file put back at the path from now on."""
        old, self.gallery = self.gallery, fresh
        self.store = SqliteBoardingStore(fresh)
        self.gate.use(fresh, self.store)
        old.close()

    def _adopt(self, update: Loaded) -> None:
        loaded = update.flights
        log_gates(self.gates, self.core.flights, loaded)
        self.core.adopt(loaded)
        count_gallery(self.metrics, loaded.full)
        log.info(
            "gallery reloaded: revision %d, %d subjects, %d templates%s (%.0f ms)",
            loaded.revision,
            len(loaded.full),
            loaded.full.template_count,
            "" if loaded.full.scope is None else " of its gates' flights",
            update.load_ms,
        )

    def stale_reason(self) -> str:
        """Why the search matrix may be behind the gallery ("" when it is current)."""
        return self.health.first(GALLERY_FILE, INTEGRITY, GALLERY)

    def update_stale(self) -> None:
        """Stale: say so at once (heartbeat, status, metrics, console), and tell the gatekeeper, which goes on
        accepting from memory for `gallery.stale_grace_s`, then refuses every accept until the gallery is back
        (a boarding gate whose file is gone, at once: its boarded marks would go into a deleted file)."""
        reason = self.stale_reason()
        was = self.gate.stale_since
        self.gate.gallery_state(reason, file_gone=bool(self.health.error(GALLERY_FILE)), remedy=self.restore_hint())
        if reason and was is None:
            log.error(
                "gallery stale (%s): deciding from the %d subject(s) in memory for %.0f s more, then every "
                "accept is refused",
                reason,
                len(self.core.matrix),
                self.stale_grace_s,
            )
            self._heartbeat_now()
        elif not reason and was is not None:
            log.info("gallery %s is current again (stale for %.0f s)", self.gallery.name, time.monotonic() - was)
            self._heartbeat_now()

    def restore_hint(self) -> str:
        config = f"-c {self.config_source} " if self.config_source else ""
        if self.health.first(GALLERY_FILE, INTEGRITY):
            return f"run `kiosk-enroll {config}restore BACKUP` (a corrupt file is moved aside first)"
        return "check the gallery's database (see the error)"
