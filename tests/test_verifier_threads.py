"""The verifier's background threads against a real SQLite gallery file, without a verifier around them: the
retention purger, the gallery watch, and the health registry they report to. Each test drives a round and
waits on its end (an event, or `sync()`), never on a sleep."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kiosk.boarding.gates import GateFlights
from kiosk.services.gallery_watch import Checked, GalleryWatch, Loaded, Switched
from kiosk.services.health import GALLERY, GALLERY_FILE, INTEGRITY, MESSAGES, HealthRegistry
from kiosk.services.retention_purger import RetentionPurger
from kiosk.store.flights import SqliteBoardingStore, load_gate_flights
from kiosk.store.queries import GalleryQueries
from kiosk.store.sqlite_file import Gallery
from tests.sealing_helpers import sealed_gallery

MODEL = "m:1"
WAIT_S = 10.0


def _embedding(seed: int) -> np.ndarray:
    e = np.random.default_rng(seed).standard_normal((1, 8)).astype(np.float32)
    return e / np.linalg.norm(e)


def _build(gallery: GalleryQueries, previous: GateFlights | None = None) -> GateFlights:
    return load_gate_flights(gallery, MODEL, 8, require_flight=False, gates={"A1"}, previous=previous)


@pytest.fixture
def gallery(tmp_path: Path) -> Iterator[Gallery]:
    """ANN on flight LH123, which departed two hours ago; BOB on no flight."""
    g = sealed_gallery(tmp_path / "gallery.db")
    g.enroll("ANN", "Ann", _embedding(1), MODEL)
    g.enroll("BOB", "Bob", _embedding(2), MODEL)
    store = SqliteBoardingStore(g)
    store.add_flight("LH123", time.time() - 7200)
    store.add_passengers("LH123", ["ANN"])
    yield g
    g.close()


def _subjects(gallery: Gallery) -> list[str]:
    return gallery.matrix(MODEL, 8).subject_ids


# -- the retention purger ----------------------------------------------------------------------------------


def test_the_purger_deletes_a_departed_flights_templates_at_once_and_again_when_woken(gallery, caplog):
    caplog.set_level(logging.INFO)
    health = HealthRegistry()
    purger = RetentionPurger(lambda: gallery, 1.0, health, every_s=3600)
    purger.start()
    try:
        assert purger.round_done.wait(WAIT_S)
        assert _subjects(gallery) == ["BOB"]
        assert (
            "retention: flight LH123 departed more than 1 h ago; templates of 1 passenger(s) deleted, "
            "0 kept for a later flight" in caplog.messages
        )
        assert health.records() == []  # the integrity check passed
        # a flight added later that is due already: purged when the gallery's change wakes the purger
        store = SqliteBoardingStore(gallery)
        store.add_flight("BA456", time.time() - 7200)
        store.add_passengers("BA456", ["BOB"])
        purger.round_done.clear()
        purger.wake()
        assert purger.round_done.wait(WAIT_S)
        assert _subjects(gallery) == []
        assert purger.rounds == 2
    finally:
        purger.stop()
        purger.join(WAIT_S)
    assert not purger.is_alive()


def test_the_purger_reports_a_gallery_it_cannot_open_as_an_integrity_problem_and_keeps_going(gallery, tmp_path, caplog):
    health = HealthRegistry()
    (tmp_path / "gallery.db").unlink()
    purger = RetentionPurger(lambda: gallery, 1.0, health, every_s=3600)
    purger.start()
    try:
        assert purger.round_done.wait(WAIT_S)
        assert "does not exist" in health.error(INTEGRITY)
        assert health.latest() == ""  # not the status's last_error
        assert any("retention purge failed (next try in 3600s)" in m for m in caplog.messages)
        assert purger.is_alive()
    finally:
        purger.stop()
        purger.join(WAIT_S)


# -- the gallery watch -------------------------------------------------------------------------------------


@pytest.fixture
def watched(gallery: Gallery) -> Iterator[tuple[GalleryWatch, HealthRegistry, threading.Event]]:
    """A watch on `gallery` that runs a round only when asked (`sync()`), with the event its `on_change` sets."""
    health = HealthRegistry()
    changed = threading.Event()
    watch = GalleryWatch(gallery, _build(gallery), _build, health, on_change=changed.set, poll_s=3600)
    watch.start()
    yield watch, health, changed
    watch.stop()
    watch.join(WAIT_S)
    assert not watch.is_alive()


def test_the_watch_builds_a_new_view_when_the_revision_moves_and_wakes_the_purge(gallery, watched):
    watch, health, changed = watched
    watch.sync()
    assert [type(u) for u in watch.updates()] == [Checked]  # nothing changed: nothing to adopt
    assert not changed.is_set()
    gallery.enroll("CAT", "Cat", _embedding(3), MODEL)
    watch.sync()
    loaded, checked = watch.updates()
    assert isinstance(loaded, Loaded) and isinstance(checked, Checked)
    assert loaded.flights.full.subject_ids == ["ANN", "BOB", "CAT"]
    assert loaded.flights.revision == gallery.revision()
    assert changed.is_set()  # a flight rescheduled or added may be due for purging now
    assert health.records() == []


def test_a_failed_reload_keeps_the_old_view_and_says_so_until_one_succeeds(gallery, caplog):
    health = HealthRegistry()
    fail = threading.Event()
    fail.set()

    def build(g: GalleryQueries, previous: GateFlights | None = None) -> GateFlights:
        if fail.is_set():
            raise RuntimeError("disk on fire")
        return _build(g, previous)

    watch = GalleryWatch(gallery, _build(gallery), build, health, poll_s=3600)
    watch.start()
    try:
        gallery.enroll("CAT", "Cat", _embedding(3), MODEL)
        watch.sync()
        assert [type(u) for u in watch.updates()] == [Checked]  # no view to adopt: the old one stays
        assert health.error(GALLERY) == "gallery reload: disk on fire"
        assert health.latest() == "gallery reload: disk on fire"  # the status's last_error
        assert any("gallery reload failed, keeping revision" in m for m in caplog.messages)
        fail.clear()
        watch.sync()  # the revision is still ahead of the view: tried again
        loaded = [u for u in watch.updates() if isinstance(u, Loaded)]
        assert [u.flights.full.subject_ids for u in loaded] == [["ANN", "BOB", "CAT"]]
        assert health.records() == [] and health.latest() == ""
    finally:
        watch.stop()
        watch.join(WAIT_S)


def test_a_deleted_gallery_file_is_stale_and_one_restored_at_its_path_is_switched_to(
    gallery, watched, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    watch, health, _ = watched
    path = tmp_path / "gallery.db"
    gallery.backup(tmp_path / "backup.db")
    path.unlink()
    watch.sync()
    assert watch.updates() == [Checked()]
    assert health.error(GALLERY_FILE) == f"gallery file {path} is gone (deleted or moved away)"
    assert f"gallery file {path} is gone (deleted or moved away)" in caplog.messages
    shutil.copy(tmp_path / "backup.db", path)
    watch.sync()
    switched, loaded, checked = watch.updates()
    assert isinstance(switched, Switched) and isinstance(loaded, Loaded) and isinstance(checked, Checked)
    try:
        assert watch.gallery() is switched.gallery and switched.gallery.path == path
        assert switched.gallery.file_problem() == ""
        assert loaded.flights.full.subject_ids == ["ANN", "BOB"]  # loaded afresh, whatever its revision
        assert health.error(GALLERY_FILE) == "" and health.records() == []
        assert any("switching to the gallery now at" in m for m in caplog.messages)
        assert f"gallery file {path} is in place again" in caplog.messages
    finally:
        switched.gallery.close()


def test_sync_waits_for_a_round_that_began_after_it_was_asked(gallery, watched):
    watch, _, _ = watched
    for _ in range(3):
        gallery.enroll("CAT", "Cat", _embedding(3), MODEL)  # (re-enrolled: the revision moves each time)
        revision = gallery.revision()
        watch.sync()
        assert [u.flights.revision for u in watch.updates() if isinstance(u, Loaded)] == [revision]


# -- the health registry -----------------------------------------------------------------------------------


def test_last_error_is_the_latest_problem_until_its_component_is_cleared():
    health = HealthRegistry()
    assert health.latest() == "" and health.first(GALLERY_FILE, GALLERY) == ""
    health.report(MESSAGES, "control: not a JSON object", latest=True)
    health.report(GALLERY, "gallery: database is locked", latest=True)
    assert health.latest() == "gallery: database is locked"
    health.clear(GALLERY)
    assert health.latest() == ""  # as a cleared gallery error cleared last_error
    health.report(GALLERY, "gallery: database is locked", latest=True)
    health.report(MESSAGES, "history: bad cursor", latest=True)
    health.clear(GALLERY)
    assert health.latest() == "history: bad cursor"  # a later bad message stays
    health.report(INTEGRITY, "corrupt page")
    health.report(GALLERY_FILE, "gone")
    assert health.first(GALLERY_FILE, INTEGRITY, GALLERY) == "gone"
    assert health.latest() == "history: bad cursor"  # a stale file is no message


def test_a_record_keeps_its_first_time_while_the_component_keeps_failing():
    health = HealthRegistry()
    assert health.report(GALLERY, "gallery: locked") is None
    first = health.records()[0]
    before = health.report(GALLERY, "gallery: still locked")
    assert before == first
    [again] = health.records()
    assert again.error == "gallery: still locked" and again.since == first.since
    assert health.report(GALLERY, "") == again and health.records() == []
