"""One owner for gallery concurrency: reads never wait for the write lock, an enrollment's check and insert
are one transaction, a locked gallery is a runtime failure (retried), and a verifier whose gallery reload
fails still never accepts a subject who was removed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time

import cv2
import numpy as np
import pytest

from kiosk.errors import RuntimeFailure
from kiosk.tools.scenes import Walk
from tests.conftest import BIN, run_cli
from tests.pipeline_helpers import Events, kiosk, live_gate, make_video, people, read_stderr_until, stop, write_config
from tests.sealing_helpers import CODEC, sealed_gallery

MODEL = "m:1"


def _unit(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    e = rng.standard_normal((n, dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_reads_do_not_wait_for_a_writer_and_a_locked_gallery_is_a_runtime_failure(tmp_path):
    path = tmp_path / "g.db"
    with sealed_gallery(path) as g:
        g.enroll("a", "A", _unit(np.random.default_rng(0), 1), MODEL)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a long import holding the write lock
    writer.execute("INSERT INTO subjects (id, name, created) VALUES ('b', 'B', 0)")
    try:
        t0 = time.monotonic()
        with sealed_gallery(path, timeout=5.0) as reader:  # opening a current gallery takes no write lock
            m = reader.matrix(MODEL, 8)
        assert time.monotonic() - t0 < 1.0 and m.subject_ids == ["a"]  # the committed snapshot, at once
        writer.execute("COMMIT")
    finally:
        writer.close()
    # A gallery that must be created (or upgraded) while another process holds the write lock: after the busy
    # timeout it is a runtime failure (exit 1: `kiosk run` restarts the verifier), not a config error (exit 2).
    fresh = tmp_path / "new.db"
    holder = sqlite3.connect(fresh, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE other (x)")
    try:
        with pytest.raises(RuntimeFailure, match="still locked by another process") as err:
            sealed_gallery(fresh, timeout=0.3)
        assert err.value.exit_code == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with sealed_gallery(fresh) as g:  # and once the lock is gone it opens
        assert g.revision() == 0


@pytest.mark.slow
def test_two_processes_enrolling_one_face_under_two_ids_never_both_succeed(tmp_path, photos):
    """The same photo under two ids at the same moment, five times over: exactly one is enrolled each time."""
    for attempt in range(5):
        folder = tmp_path / f"round{attempt}"
        folder.mkdir()
        config = write_config(folder, gallery_only=True)
        procs = [
            subprocess.Popen(
                [str(BIN / "kiosk-enroll"), "-q", "-c", str(config), "add", "--id", sid, str(photos["yaoming.jpg"])],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for sid in ("FIRST", "SECOND")
        ]
        results = [(p.wait(120), p.communicate()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        assert any("duplicate" in err or "already enrolled subject" in err for _, (_, err) in results), results
        listed = json.loads(run_cli("kiosk-enroll", "-c", str(config), "list", "--json").stdout)
        assert len(listed["subjects"]) == 1


def test_removed_subject_not_accepted_while_reloads_fail(tmp_path, engine, photos):
    crops = people(engine, photos)
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=40, w0=80, w1=170)], seconds=1.5)
    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": False}])
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    verifier = kiosk(config, "verify")
    said = ""  # the verifier's stderr, read while it runs
    events = Events(config, ("event.", "health.verifier"))
    try:
        assert events.wait_for(lambda ev: ev.health, 30)
        # Break every reload: a template of the wrong size for another subject (the verifier refuses it).
        db = sqlite3.connect(tmp_path / "gallery.db", isolation_level=None)
        db.execute("INSERT INTO subjects (id, name, created) VALUES ('BROKEN', '', 0)")
        db.execute(
            "INSERT INTO templates (subject_id, model_id, dim, embedding, created) "
            "SELECT 'BROKEN', model_id, 7, zeroblob(28), 0 FROM templates LIMIT 1"
        )
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")
        db.close()
        assert events.wait_for(lambda ev: ev.health[-1]["gallery"]["stale"], 10)
        assert "does not have the model's 512 dims" in events.health[-1]["gallery"]["error"]
        assert run_cli("kiosk-enroll", "-q", "-c", str(config), "remove", "YAO").returncode == 0
        with sqlite3.connect(tmp_path / "gallery.db") as db:
            (revision,) = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        # The verifier tries to reload the gallery after the removal, and fails (BROKEN is still there).
        said = read_stderr_until(verifier, f"(the gallery is at revision {revision})", 15)
        tried = time.time()
        assert events.wait_for(lambda ev: ev.health[-1]["sent_at"] > tried, 10)  # a heartbeat since
        assert events.health[-1]["gallery"]["subjects"] == 1  # the search matrix still holds YAO...
        assert kiosk(config, "capture", "--camera", "cam-a1").wait(60) == 0
        assert events.wait_for(lambda ev: ev.events, 20)
        # ...but the accept is confirmed against the gallery itself: YAO is gone, so no door opens.
        assert [(e.type, e.reason, e.subject_id) for e in events.events] == [("reject", "not_enrolled", "YAO")]
    finally:
        events.close()
        _, err = stop(verifier)
    assert "Traceback" not in said + err


@pytest.mark.slow
def test_reloads_during_a_long_write_transaction_keep_deciding_and_pick_up_the_import(tmp_path, engine, photos):
    """An import holds the gallery's write lock for seconds while the verifier reloads every second: no reload
    error, decisions keep coming, and the new subject is matched once the import commits."""
    crops = people(engine, photos)
    # Parker walks up, then 1.5 s of nobody (his track ends), over and over: a decision every 2.8 s.
    make_video(tmp_path / "parker.avi", [Walk(crops["parker"], start=0, frames=40, w0=80, w1=170)], seconds=2.8)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "parker.avi", "realtime": True, "loop": True}],
        policy={"repeat_accept_s": 0.0},
    )
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    parker = cv2.resize(crops["parker"], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    parker_emb = engine.describe(parker, engine.detector.detect(parker).largest()).faces.embeddings[0]
    with live_gate(config) as gate:
        events = gate.events
        assert events.wait_for(lambda ev: any(e.reason == "no_match" for e in ev.events), 20)
        db = sqlite3.connect(tmp_path / "gallery.db", isolation_level=None, timeout=10)
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")  # a reload is due
        (bumped,) = db.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'revision'").fetchone()
        db.execute("BEGIN IMMEDIATE")  # ...and the import holds the write lock meanwhile
        db.execute("INSERT INTO subjects (id, name, created) VALUES ('PARKER', 'Tony Parker', 0)")
        (tid,) = db.execute(
            "INSERT INTO templates (subject_id, model_id, dim, embedding, created, key_id) VALUES "
            "(?, ?, ?, x'', 0, ?) RETURNING id",
            ("PARKER", engine.model_id, engine.dim, CODEC.current_id()),
        ).fetchone()
        db.execute(
            "UPDATE templates SET embedding = ? WHERE id = ?",
            (CODEC.seal("PARKER", engine.model_id, tid, parker_emb), tid),
        )
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")
        held_from = len(events.events)
        events.poll(6.0)  # six reload periods under the lock
        during = events.events[held_from:]
        assert during and all(e.reason == "no_match" for e in during)  # decisions kept coming
        assert not any(h["gallery"]["stale"] for h in events.health)  # no reload failed
        assert events.health[-1]["gallery"]["revision"] == bumped  # the reload did not wait for the lock
        db.execute("COMMIT")
        db.close()
        assert events.wait_for(lambda ev: any(e.type == "accept" and e.subject_id == "PARKER" for e in ev.events), 20)
    assert "gallery reload failed" not in gate.verifier_err and "Traceback" not in gate.verifier_err


@pytest.mark.slow  # backups and restores under a running verifier
def test_backup_restore_under_a_running_verifier_and_no_silent_empty_gallery(tmp_path, engine, photos):
    crops = people(engine, photos)
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": True, "loop": True}],
        policy={"repeat_accept_s": 0.0},
    )
    enroll = lambda *a: run_cli("kiosk-enroll", "-q", "-c", str(config), *a)  # noqa: E731
    assert enroll("add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode == 0
    res = enroll("backup", str(tmp_path / "before.db"))
    assert res.returncode == 0 and "revision" in res.stdout
    assert (tmp_path / "before.db").stat().st_mode & 0o777 == 0o600
    assert enroll("remove", "YAO").returncode == 0
    with live_gate(config) as gate:
        events = gate.events
        assert events.wait_for(lambda ev: any(e.reason == "no_match" for e in ev.events), 20)
        res = enroll("restore", str(tmp_path / "before.db"))  # while the verifier runs (cp would be ignored)
        assert res.returncode == 0, res.stderr
        assert events.wait_for(lambda ev: any(e.type == "accept" and e.subject_id == "YAO" for e in ev.events), 20)
    # A configured gallery that is missing: the verifier says how to make one and creates nothing.
    (tmp_path / "gallery.db").unlink()
    for extra in ("gallery.db-wal", "gallery.db-shm"):
        (tmp_path / extra).unlink(missing_ok=True)
    res = run_cli("kiosk", "-c", str(config), "verify", timeout=60)
    assert res.returncode == 2 and "kiosk-enroll -c CONFIG init" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "gallery.db").exists()
    res = enroll("init")
    assert res.returncode == 0 and (tmp_path / "gallery.db").exists()
    assert enroll("restore", str(tmp_path / "missing.db")).returncode == 2
