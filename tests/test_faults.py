"""Faults injected into real processes: the gate must fail closed and lose nothing."""

from __future__ import annotations

import os
import signal
import time

from kiosk.config import load_config
from kiosk.messaging.transport import Transport, control_request
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.pipeline_helpers import Events, audit, kiosk, make_video, people, stop, write_config


def test_a_paused_verifier_publishes_no_accept_from_frames_older_than_the_bound(tmp_path, engine, photos):
    """SIGSTOP the verifier for 3 s (a long GC pause, a swap storm) while a live camera keeps sending: after
    SIGCONT the frames from before the pause are dropped, and no accept carries a stale capture."""
    crops = people(engine, photos)
    # Yao walks up, then nobody for a second, over and over (each walk-up a transaction).
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": True,
                                      "loop": True}], policy={"repeat_accept_s": 0.0, "max_frame_age_ms": 500.0})
    assert run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO",
                   str(photos["yaoming.jpg"])).returncode == 0
    verifier = kiosk(config, "verify")
    capture = None
    events = Events(config, ("event.", "health.verifier"))
    transport = Transport(load_config(config), role="test-faults")
    try:
        assert events.wait_for(lambda ev: ev.health, 30)
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert events.wait_for(lambda ev: any(e.type == "accept" for e in ev.events), 20)
        pid = events.health[-1]["pid"]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3.0)
        os.kill(pid, signal.SIGCONT)
        resumed = len(events.events)
        events.poll(6.0)
        after = events.events[resumed:]
        assert any(e.type == "accept" for e in after)  # the gate works on after the pause...
        accepts = [e for e in events.events if e.type == "accept"]
        assert all(e.latency_ms < 500 + 300 for e in accepts), [e.latency_ms for e in accepts]  # ...never stale
        status = control_request(transport, {"cmd": "status"})
        assert status is not None and status["pid"] == pid and status["cameras"]["cam-a1"]["too_old"] > 0
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
    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": True,
                                      "loop": True}], policy={"repeat_accept_s": 0.0})
    assert run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO",
                   str(photos["yaoming.jpg"])).returncode == 0
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
    logged = {e["event_id"] for e in audit(config)}
    assert all(e.event_id in logged for e in events.events if e.type == "accept")


def test_a_torn_last_line_stays_on_its_own(tmp_path):
    from kiosk.services.audit import AuditLog, read_tail

    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"type": "accept", "event_id": "a"}\n{"type": "acc')  # power lost mid-line
    log = AuditLog(path)
    assert log.write(b'{"type": "reject", "event_id": "b"}')
    log.close()
    assert path.read_bytes().splitlines()[-2:] == [b'{"type": "acc', b'{"type": "reject", "event_id": "b"}']
    assert [r["event_id"] for r in read_tail(path)] == ["a", "b"]
