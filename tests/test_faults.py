"""Faults injected into real processes: the gate must fail closed and lose nothing."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from kiosk.config import load_config
from kiosk.messaging.transport import Transport, control_request, init_keys
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.pipeline_helpers import (
    Events,
    audit,
    kiosk,
    make_video,
    people,
    read_stderr_until,
    stop,
    write_config,
)
from tests.sealing_helpers import sealed_gallery
from tests.waiting import wait_until


@pytest.mark.slow
def test_a_paused_verifier_publishes_no_accept_from_frames_older_than_the_bound(tmp_path, engine, photos):
    """SIGSTOP the verifier for 3 s (a long GC pause, a swap storm) while a live camera keeps sending: after
    SIGCONT the frames from before the pause are dropped, and no accept carries a stale capture."""
    crops = people(engine, photos)
    # Yao walks up, then nobody for a second, over and over (each walk-up a transaction).
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": True, "loop": True}],
        policy={"repeat_accept_s": 0.0, "max_frame_age_ms": 500.0},
    )
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    verifier = kiosk(config, "verify")
    capture = None
    events = Events(config, ("event.", "health.verifier"))
    transport = Transport(load_config(config), role="test-faults")
    try:
        assert events.wait_for(lambda ev: ev.health, 30)
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert events.wait_for(lambda ev: any(e.type == "accept" for e in ev.events), 20)
        pid = events.health[-1]["pid"]
        before = control_request(transport, {"cmd": "status"})["cameras"]["cam-a1"]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3.0)  # the stall under test: the verifier paused this long while frames keep coming
        os.kill(pid, signal.SIGCONT)
        resumed = len(events.events)
        events.poll(6.0)
        after = events.events[resumed:]
        assert any(e.type == "accept" for e in after)  # the gate works on after the pause...
        accepts = [e for e in events.events if e.type == "accept"]
        assert all(e.latency_ms < 500 + 300 for e in accepts), [e.latency_ms for e in accepts]  # ...never stale
        status = control_request(transport, {"cmd": "status"})
        assert status is not None and status["pid"] == pid
        # The frames queued during the pause (in the capture's send queue and the verifier's receive queue)
        # were dropped: too old to act on, or behind a newer frame that came in the same read.
        cam = status["cameras"]["cam-a1"]
        assert (cam["too_old"] + cam["dropped"]) - (before["too_old"] + before["dropped"]) >= 3, (before, cam)
    finally:
        transport.close()
        events.close()
        if capture is not None:
            stop(capture)
        _, err = stop(verifier)
    assert "Traceback" not in err


def test_an_unwritable_audit_log_lets_no_accept_through_and_recovers_by_itself(tmp_path, engine, photos):
    """The audit path is a folder (as a broken deployment or a full disk makes it unwritable): the verifier
    stays up, publishes no accept (reject audit_unavailable), says why on health; once the path is writable
    again the next accept is audited, then published. Every published accept is in the audit log."""
    crops = people(engine, photos)
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": True, "loop": True}],
        policy={"repeat_accept_s": 0.0},
    )
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    audit_path = tmp_path / "events.jsonl"
    audit_path.mkdir()  # not a file: cannot be opened for appending
    verifier = kiosk(config, "verify")
    capture = None
    events = Events(config, ("event.", "health.verifier"))
    try:
        assert events.wait_for(lambda ev: ev.health, 30)
        assert verifier.poll() is None  # no crash loop
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert events.wait_for(lambda ev: any(e.reason == "audit_unavailable" for e in ev.events), 20)
        assert not any(e.type == "accept" for e in events.events)
        assert events.wait_for(lambda ev: ev.health[-1]["audit"]["ok"] is False, 5)
        assert events.health[-1]["status"] == "degraded" and "audit log" in events.health[-1]["audit"]["error"]
        audit_path.rmdir()  # writable again
        assert events.wait_for(lambda ev: any(e.type == "accept" for e in ev.events), 20)
        assert events.wait_for(lambda ev: ev.health[-1]["audit"]["ok"] is True, 5)
    finally:
        events.close()
        if capture is not None:
            stop(capture)
        _, err = stop(verifier)
    assert "Traceback" not in err
    records = audit(config)
    logged = {e["event_id"] for e in records}
    assert all(e.event_id in logged for e in events.events if e.type == "accept")
    # the rejects the gate heard while the log was unwritable are in it now, in order, marked late
    withheld = [e.event_id for e in events.events if e.reason == "audit_unavailable"]
    late = [r["event_id"] for r in records if r.get("late")]
    assert withheld and late[: len(withheld)] == withheld
    assert all(r["reason"] == "audit_unavailable" for r in records if r.get("late"))


@pytest.mark.slow
def test_an_audit_log_moved_away_or_replaced_by_a_folder_under_a_live_gate_holds_every_published_accept(
    tmp_path, engine, photos
):
    """Under a live gate the audit file is renamed away (an operator's mv, a rotation by hand), and later
    moved away again with a folder put in its place: status says so within a second, and every accept
    published is in the file that was at the configured path when it was decided, never only in a file
    moved away."""
    crops = people(engine, photos)
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": True, "loop": True}],
        policy={"repeat_accept_s": 0.0},
    )
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    audit_path = tmp_path / "events.jsonl"
    verifier = kiosk(config, "verify")
    capture = None
    events = Events(config, ("event.", "health.verifier"))
    accepts = lambda ev: [e for e in ev.events if e.type == "accept"]  # noqa: E731
    try:
        assert events.wait_for(lambda ev: ev.health, 30)
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert events.wait_for(lambda ev: accepts(ev), 20)
        audit_path.rename(tmp_path / "moved-1.jsonl")
        renamed_at = time.time()
        assert events.wait_for(lambda ev: sum(e.decided_at > renamed_at for e in accepts(ev)) >= 2, 20)
        audit_path.rename(tmp_path / "moved-2.jsonl")
        audit_path.mkdir()  # the fault table's probe: the log gone and a folder in its place
        folder_at = time.time()
        assert events.wait_for(lambda ev: ev.health[-1]["audit"]["ok"] is False, 5)
        assert events.wait_for(lambda ev: any(e.reason == "audit_unavailable" for e in ev.events), 20)
        assert not any(e.decided_at > folder_at + 0.01 for e in accepts(events))
        audit_path.rmdir()
        restored_at = time.time()
        assert events.wait_for(lambda ev: ev.health[-1]["audit"]["ok"] is True, 5)
        assert events.wait_for(lambda ev: any(e.decided_at > restored_at for e in accepts(ev)), 20)
    finally:
        events.close()
        if capture is not None:
            stop(capture)
        _, err = stop(verifier)
    assert "Traceback" not in err

    def ids(name: str) -> set[str]:
        return {json.loads(line)["event_id"] for line in (tmp_path / name).read_text().splitlines()}

    first, second, final = ids("moved-1.jsonl"), ids("moved-2.jsonl"), {e["event_id"] for e in audit(config)}
    for e in accepts(events):
        if e.decided_at > renamed_at:
            assert e.event_id in second | final, f"accept {e.event_id} only in the file moved away"
        else:
            assert e.event_id in first | second
    assert final & {e.event_id for e in events.events if e.reason == "audit_unavailable"}  # written late


def test_a_gallery_file_deleted_replaced_or_corrupted_is_seen_by_its_open_connection(tmp_path):
    """The checks the verifier runs each second and each minute, on a real SQLite gallery."""

    path = tmp_path / "gallery.db"
    g = sealed_gallery(path)
    assert g.file_problem() == "" and g.integrity_problem() == ""
    with open(path, "r+b") as fh:  # 100 corrupt bytes over the header
        fh.write(os.urandom(100))
    assert "corrupt" in g.file_problem()
    path.unlink()
    assert "gone" in g.file_problem()
    sealed_gallery(path).close()  # another file at the path
    assert "replaced" in g.file_problem()
    g.close()
    import sqlite3

    with sqlite3.connect(path) as db:  # pages enough that one can break while the file still opens
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(f"filler-{i}", "x" * 500) for i in range(200)])
    fresh = sealed_gallery(path, create=False)
    with open(path, "r+b") as fh:  # a page of the filler, far past the header and the schema
        page = int.from_bytes(fh.read(18)[16:18], "big")
        fh.seek(path.stat().st_size - 3 * page)
        fh.write(b"\xff" * 100)
    assert fresh.file_problem() == ""
    assert "corrupt" in sealed_gallery(path, create=False).integrity_problem()
    fresh.close()


@pytest.mark.slow
def test_a_gallery_deleted_under_a_live_verifier_is_stale_at_once_refused_after_its_grace_and_restored(
    tmp_path, engine, photos
):
    """`rm gallery.db` under a live gate: the heartbeat says stale within two seconds, with what to run; accepts
    go on from memory for gallery.stale_grace_s, then every accept is refused (gallery_unavailable);
    `kiosk-enroll restore` puts a gallery back at the path and the verifier switches to it and accepts again."""
    crops = people(engine, photos)
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": True, "loop": True}],
        policy={"repeat_accept_s": 0.0},
        gallery={"path": "gallery.db", "stale_grace_s": 4.0},
    )
    enroll = lambda *a: run_cli("kiosk-enroll", "-q", "-c", str(config), *a)  # noqa: E731
    assert enroll("add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode == 0
    assert enroll("backup", str(tmp_path / "backup.db")).returncode == 0
    verifier = kiosk(config, "verify")
    capture = None
    events = Events(config, ("event.", "health.verifier"))
    accepted_after = lambda t: lambda ev: any(e.type == "accept" and e.decided_at > t for e in ev.events)  # noqa
    try:
        assert events.wait_for(lambda ev: ev.health, 30)
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert events.wait_for(accepted_after(0), 20)
        for name in ("gallery.db", "gallery.db-wal", "gallery.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        deleted = time.monotonic()
        assert events.wait_for(lambda ev: ev.health[-1]["gallery"]["stale"], 5)
        seen = time.monotonic() - deleted
        hb = events.health[-1]
        assert seen < 2.5 and hb["status"] == "degraded" and "gone" in hb["gallery"]["error"], (seen, hb)
        assert "kiosk-enroll" in hb["gallery"]["action"] and "restore" in hb["gallery"]["action"]
        assert hb["gallery"]["refusing"] == "nothing yet" and hb["gallery"]["accepts_from_memory_s"] > 0
        assert events.wait_for(accepted_after(time.time()), 20)  # from memory, within the grace
        assert events.wait_for(lambda ev: ev.health[-1]["gallery"]["refusing"] == "every accept", 10)
        refused_at = time.time()
        assert events.wait_for(
            lambda ev: any(e.reason == "gallery_unavailable" and e.decided_at > refused_at for e in ev.events), 20
        )
        assert not any(e.type == "accept" and e.decided_at > refused_at for e in events.events)
        res = enroll("restore", str(tmp_path / "backup.db"))
        assert res.returncode == 0, res.stdout + res.stderr
        restored_at = time.time()
        assert events.wait_for(lambda ev: not ev.health[-1]["gallery"]["stale"], 10), events.health[-1]
        assert events.wait_for(accepted_after(restored_at), 20)
    finally:
        events.close()
        if capture is not None:
            stop(capture)
        _, err = stop(verifier)
    assert "Traceback" not in err and "is gone" in err and "switching to the gallery" in err


def test_a_torn_last_line_stays_on_its_own(tmp_path):
    from kiosk.services.audit import AuditLog, read_tail

    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"type": "accept", "event_id": "a"}\n{"type": "acc')  # power lost mid-line
    log = AuditLog(path)
    assert log.write(b'{"type": "reject", "event_id": "b"}')
    log.close()
    assert path.read_bytes().splitlines()[-2:] == [b'{"type": "acc', b'{"type": "reject", "event_id": "b"}']
    assert [r["event_id"] for r in read_tail(path)] == ["a", "b"]


def test_an_audit_log_deleted_renamed_or_replaced_is_reopened_at_its_path_or_fails(tmp_path):
    """The file at the configured path is the one written: a deleted log is made again, a renamed one is
    left behind (the next line goes to the path), a folder in its place is a failure; what was published
    meanwhile is written first once it can be, in order and marked late."""
    from kiosk.services.audit import RETRY_EVERY_S, AuditLog, read_tail

    path = tmp_path / "events.jsonl"
    now = [0.0]
    log = AuditLog(path, clock=lambda: now[0])
    assert log.write(b'{"event_id": "a"}')
    path.unlink()  # deleted under the writer
    assert log.write(b'{"event_id": "b"}')
    assert [r["event_id"] for r in read_tail(path)] == ["b"]
    path.rename(tmp_path / "moved.jsonl")  # renamed away
    assert log.write(b'{"event_id": "c"}')
    assert [r["event_id"] for r in read_tail(path)] == ["c"]
    path.unlink()
    path.mkdir()  # replaced by a folder
    assert not log.check() and log.error
    assert not log.write(b'{"event_id": "d"}') and "audit log" in log.error
    log.defer(b'{"event_id": "d2"}')  # what the gate was told instead
    log.defer(b'{"event_id": "e"}')
    assert log.pending == 2
    path.rmdir()
    assert not log.check() and log.pending == 2  # tried again too soon: the last failure was just now
    now[0] += RETRY_EVERY_S  # the retry interval has passed
    assert log.check() and log.pending == 0 and not log.error
    assert log.write(b'{"event_id": "f"}')
    log.close()
    records = read_tail(path)
    assert [r["event_id"] for r in records] == ["d2", "e", "f"]
    assert [r.get("late") for r in records] == [True, True, None]
    assert all(isinstance(r["audited_at"], float) for r in records[:2])
    assert "d" not in {r["event_id"] for r in read_tail(tmp_path / "moved.jsonl")}


def test_a_capture_key_sends_for_its_own_camera_only(tmp_path, engine, photos):
    import yaml

    from kiosk.messaging.transport import init_keys

    crops = people(engine, photos)
    make_video(tmp_path / "v.avi", [Walk(crops["yao"], start=0, frames=20, w0=80, w1=120)], seconds=1.0)
    cameras = [
        {"id": "cam-a1", "gate": "A1", "source": "v.avi", "realtime": True, "loop": True},
        {"id": "cam-b1", "gate": "B1", "source": "v.avi", "realtime": True, "loop": True, "key": "cam-host-2"},
    ]
    config = write_config(tmp_path, cameras)
    init_keys(tmp_path / "keys", client_name="cam-host-2")
    # A config in which the host of cam-b1 claims gate A1's camera too.
    data = yaml.safe_load(config.read_text())
    data["cameras"][0]["key"] = "cam-host-2"
    rogue_config = tmp_path / "rogue.yaml"
    rogue_config.write_text(yaml.safe_dump(data))
    verifier = kiosk(config, "verify")
    transport = Transport(load_config(config), role="test-keys")
    try:
        wait_until(lambda: control_request(transport, {"cmd": "status"}, timeout_ms=1000), 30, "the verifier's status")
        rogue = kiosk(rogue_config, "capture", "--camera", "cam-a1")  # cam-host-2's key, gate A1's camera
        own = kiosk(config, "capture", "--camera", "cam-b1")  # cam-host-2's key, its own camera

        def both_heard() -> bool:  # the own camera's frames in, and the rogue's refused
            status = control_request(transport, {"cmd": "status"}, timeout_ms=2000) or {}
            return status.get("bad_messages", 0) > 10 and status["cameras"]["cam-b1"]["frames_in"] > 10

        try:
            wait_until(both_heard, 30, "cam-b1's frames in and more than 10 of the rogue's refused", every=0.1)
        finally:
            stop(rogue)
            stop(own)
        status = control_request(transport, {"cmd": "status"})
        assert status["cameras"]["cam-a1"]["frames_in"] == 0  # every message for cam-a1 from the wrong key dropped
        assert status["cameras"]["cam-b1"]["frames_in"] > 10
        assert status["bad_messages"] > 10 and "not its capture's" in status["last_error"]
    finally:
        transport.close()
        stop(verifier)


def test_fuzzed_messages_on_every_socket_leave_the_verifier_up_with_bounded_memory(tmp_path):
    """Random parts, broken JSON, wrong types and shapes from an allowed key on the frame, control, history and
    preview sockets: every one dropped or answered with an error, the verifier stays up and its memory
    bounded."""
    import json as _json
    import random

    import zmq

    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": 0}])
    verifier = kiosk(config, "verify")
    transport = Transport(load_config(config), role="test-fuzz")
    rng = random.Random(7)

    def junk() -> bytes:
        choice = rng.random()
        if choice < 0.3:
            return rng.randbytes(rng.randint(0, 3000))
        if choice < 0.6:
            return _json.dumps(
                {
                    "v": rng.choice([1, 2, None, "1"]),
                    "camera_id": rng.choice(["cam-a1", 7, None]),
                    "width": rng.choice([640, -1, 1 << 40, "x"]),
                    "height": rng.choice([480, 0, 1.5]),
                    "seq": rng.choice([1, None]),
                    "captured_at": rng.choice([1.0, "now", 1e308]),
                    "encoding": rng.choice(["bgr8", "jpeg", "png"]),
                    "gate_id": "A1",
                    "cmd": rng.choice(["status", "claim", "events", "rm -rf"]),
                    "cursors": rng.choice([{}, {"A1": ["b", 1]}, [], {"A1": [1, "x"]}]),
                }
            ).encode()
        return rng.choice([b"{", b"[]", b"null", b'{"v":1}', b"\xff\xfe", b"1e999999", b"[" * 5000])

    def rss_mb(pid: int) -> float:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    try:
        status = wait_until(
            lambda: control_request(transport, {"cmd": "status"}, timeout_ms=1000), 30, "the verifier's status"
        )
        pid, baseline = status["pid"], rss_mb(status["pid"])
        push = transport.frame_sender()
        for _ in range(400):
            topic = rng.choice([b"frame.cam-a1", b"frame.cam-zz", b"eof.cam-a1", b"health.capture.cam-a1", b"x"])
            push.send_multipart([topic] + [junk() for _ in range(rng.randint(0, 4))])
        replies = 0
        for kind in ("control", "history"):
            for _ in range(60):
                sock = transport.control_client(2000) if kind == "control" else transport.history_client(2000)
                try:
                    sock.send_multipart([junk() for _ in range(rng.randint(1, 3))])
                    reply = sock.recv_json()
                    replies += isinstance(reply, dict)
                except (zmq.Again, ValueError):
                    pass
                finally:
                    sock.close(linger=0)
        init_keys(tmp_path / "keys", client_name="console", role="console")  # a console key on the previews
        viewer = Transport(load_config(config), role="test-fuzz", client_key="console")
        try:
            preview = viewer.preview_subscriber()
            for _ in range(400):
                preview.send_multipart([junk() for _ in range(rng.randint(1, 3))])

            def all_refused() -> dict | None:  # (nearly) all 400 junk leases read and refused
                now = control_request(transport, {"cmd": "status"}, timeout_ms=5000)
                return now if now is not None and now["previews"]["refused"] >= 390 else None

            status = wait_until(all_refused, 20, "the verifier refusing the junk preview leases", every=0.2)
            assert status["previews"]["consoles"] == 0  # no junk taken as a lease
        finally:
            viewer.close()
        status = control_request(transport, {"cmd": "status"}, timeout_ms=5000)
        assert status is not None and status["pid"] == pid and status["bad_messages"] > 300
        assert replies >= 100  # nearly every request got an answer, most of them an error
        assert rss_mb(pid) < baseline + 60
        assert verifier.poll() is None
    finally:
        transport.close()
        _, err = stop(verifier)
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_gallery_corrupt_at_a_verifier_restart_keeps_the_run_up_and_a_restore_brings_it_back(
    tmp_path, engine, photos
):
    """The verifier dies and its gallery is corrupt when it restarts: `kiosk run` does not stop (the gates
    hear verifier_down from their subscriber), and `kiosk-enroll restore` over the corrupt file (moved
    aside) brings the verifier back to accepting."""
    import json

    crops = people(engine, photos)
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": True, "loop": True}],
        policy={"repeat_accept_s": 0.0},
        heartbeat={"interval_s": 0.5, "misses": 4},
        subscribers=[{"name": "gate-a1", "gate": "A1", "jsonl": "a1.jsonl"}],
    )
    enroll = lambda *a: run_cli("kiosk-enroll", "-q", "-c", str(config), *a)  # noqa: E731
    assert enroll("add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode == 0
    assert enroll("backup", str(tmp_path / "backup.db")).returncode == 0
    hook = tmp_path / "a1.jsonl"

    def handed_types() -> list[str]:
        return [json.loads(line)["type"] for line in hook.read_text().splitlines() if line.strip()]

    def downs() -> list[int]:  # where the gate was told verifier_down
        return [i for i, kind in enumerate(handed_types()) if kind == "verifier_down"] if hook.exists() else []

    run = kiosk(config, "run")
    run_err = ""  # what kiosk run said, read while it runs
    events = Events(config, ("event.", "health.verifier"))
    try:
        assert events.wait_for(lambda ev: ev.health and any(e.type == "accept" for e in ev.events), 60)
        pid = events.health[-1]["pid"]
        gallery = tmp_path / "gallery.db"
        gallery.write_bytes(os.urandom(8192))  # corrupt under the running verifier
        for extra in ("gallery.db-wal", "gallery.db-shm"):
            (tmp_path / extra).unlink(missing_ok=True)
        told_before = len(downs())  # (the gate may have heard one at its start, before the verifier was up)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(downs()) > told_before, 15, "verifier_down at the gate after the kill")
        down_at = downs()[told_before]
        # The restarted verifier fails on the corrupt gallery: kiosk run says it will retry, and goes on.
        run_err = read_stderr_until(run, "verifier cannot start again (exit 2", 30)
        assert run.poll() is None, "kiosk run stopped on a corrupt gallery at a verifier restart"
        res = enroll("restore", str(tmp_path / "backup.db"))
        assert res.returncode == 0 and "moved it aside" in res.stdout, res.stdout + res.stderr
        assert list(tmp_path.glob("gallery.db.corrupt-*"))
        assert events.wait_for(
            lambda ev: any(e.type == "accept" and e.boot_id != events.events[0].boot_id for e in ev.events), 40
        )
        # The gate's subscriber hands the new accept on after this test's own socket saw it: wait for it there.
        wait_until(
            lambda: "accept" in handed_types()[down_at + 1 :],
            20,
            "the gate's subscriber handing on an accept after the verifier_down of the kill",
        )
    finally:
        events.close()
        _, err = stop(run, timeout=30)
    assert run.returncode == 0 and "Traceback" not in run_err + err
    assert "accept" in handed_types()[down_at + 1 :]
