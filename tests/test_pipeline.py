"""The real-time pipeline with real processes and sockets: capture -> ZeroMQ -> verifier -> events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import cv2
import numpy as np
import pytest

from kiosk.config import load_config
from kiosk.messaging.transport import Transport, control_request, free_port
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.pipeline_helpers import (
    Events,
    audit,
    kiosk,
    make_video,
    people,
    scrape,
    stop,
    write_config,
)
from tests.waiting import wait_until

FPS = 30


@pytest.fixture(scope="module")
def crops(engine, photos):
    return people(engine, photos)


def enroll(config, subject, photo) -> None:
    res = run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", subject, str(photo))
    assert res.returncode == 0, res.stderr


def test_replay_two_cameras_accept_reject_small_face_and_close_up(tmp_path, crops, photos):
    """Gate A1: a far face (below min_face_px), Yao walks up, Parker walks up. Gate B1: Yao at 85% of the frame."""
    s = FPS
    make_video(
        tmp_path / "a1.avi",
        [
            Walk(crops["duncan"], start=0, frames=2 * s, w0=28, w1=32, cx=0.3),  # far away: never decided
            Walk(crops["yao"], start=3 * s, frames=3 * s, w0=40, w1=180),
            Walk(crops["parker"], start=7 * s, frames=3 * s, w0=40, w1=170),
        ],
        seconds=10.5,
    )
    make_video(tmp_path / "b1.avi", [Walk(crops["yao"], start=0, frames=2 * s, w0=544, w1=544, cy=0.55)], seconds=2.0)
    # hooks.python: a module of the operator's, on PYTHONPATH.
    (tmp_path / "gatehook.py").write_text(
        "import json, pathlib\n"
        "def on_event(event):\n"
        "    with open(pathlib.Path(__file__).with_name('python-hook.jsonl'), 'a') as out:\n"
        "        out.write(json.dumps(event) + '\\n')\n"
    )
    config = write_config(
        tmp_path,
        [
            {"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": False},
            {"id": "cam-b1", "gate": "B1", "source": "b1.avi", "realtime": False},
        ],
        subscribers=[
            {"name": "gate-b1", "gate": "B1", "jsonl": "b1-hook.jsonl"},
            {"name": "gate-a1", "gate": "A1", "jsonl": "a1-hook.jsonl"},
        ],
        hooks={"python": ["gatehook:on_event"]},
    )
    enroll(config, "YAO", photos["yaoming.jpg"])
    events = Events(config, ("event.",))
    proc = kiosk(config, "run", "--exit-on-eof", env={"PYTHONPATH": str(tmp_path)})
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    events.poll(0.5)
    events.close()
    assert proc.returncode == 0, err
    log = audit(config)
    a1 = [e for e in log if e["gate_id"] == "A1"]
    b1 = [e for e in log if e["gate_id"] == "B1"]
    accepts = [e for e in a1 if e["type"] == "accept"]
    assert [e["subject_id"] for e in accepts] == ["YAO"]
    assert 3 * s <= accepts[0]["seq"] < 6 * s
    rejects = [e for e in a1 if e["type"] == "reject"]
    assert rejects and all(7 * s <= e["seq"] < 10 * s and e["reason"] == "no_match" for e in rejects)
    assert not [e for e in a1 if e["seq"] is not None and e["seq"] < 3 * s]  # the far face got nothing
    assert [(e["type"], e["subject_id"]) for e in b1] == [("accept", "YAO")]  # the close-up
    # The subscriber `kiosk run` started for gate B1 got exactly B1's event.
    hooked = [json.loads(line) for line in (tmp_path / "b1-hook.jsonl").read_text().splitlines()]
    assert [e["event_id"] for e in hooked if e["type"] in ("accept", "reject")] == [e["event_id"] for e in b1]
    # The run stopped the verifier before its subscribers: the gate heard it go.
    assert (hooked[-1]["type"], hooked[-1]["reason"]) == ("verifier_down", "the verifier is stopping")
    # hooks.python ran once for every decision of every gate: not once per subscriber, not never.
    py = [json.loads(line) for line in (tmp_path / "python-hook.jsonl").read_text().splitlines()]
    assert sorted(e["event_id"] for e in py if e["type"] in ("accept", "reject")) == sorted(e["event_id"] for e in log)
    for e in accepts + b1:
        assert e["frames"] >= 3 and e["score"] >= e["threshold"] and e["latency_ms"] >= 0
        assert e["decided_at"] >= e["captured_at"]
    # What went out on the socket is what the audit log holds, in its order, from the first event this test's
    # subscriber heard: a SUB socket hears nothing published before its subscription reaches the verifier (the
    # product's subscribers fetch that from the history socket), and on a loaded machine the close-up's accept in
    # the first second can come first (seen once in a fresh-clone CI run).
    heard, published = [e.event_id for e in events.events], [e["event_id"] for e in log]
    assert heard and heard[0] in published, (heard, published)
    assert heard == published[published.index(heard[0]) :]


def test_a_face_48_to_60_px_wide_is_accepted_with_the_default_policy(tmp_path, crops, photos):
    """policy.min_face_px 48 admits a face this small: detected at the gate's scale (24-30 px at the main pass's
    input) and looked at again at full resolution, it is tracked, matched and accepted."""
    s = FPS
    make_video(tmp_path / "a1.avi", [Walk(crops["yao"], start=0, frames=3 * s, w0=48, w1=60)], seconds=3.2)
    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": False}])
    assert load_config(config).policy.min_face_px == 48
    enroll(config, "YAO", photos["yaoming.jpg"])
    proc = kiosk(config, "run", "--exit-on-eof")
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    decided = [(e["type"], e["subject_id"]) for e in audit(config) if e["type"] in ("accept", "reject")]
    assert decided == [("accept", "YAO")], (decided, err[-3000:])


class ClaimSite:
    """A running verifier with gate A1 (a replayed video of Parker walking up, captured on demand) and gate A2
    (a camera device that does not exist), YAO enrolled, and a listener on its events."""

    def __init__(self, folder, crops, photos) -> None:
        make_video(folder / "parker.avi", [Walk(crops["parker"], start=5, frames=3 * FPS, w0=60, w1=170)], seconds=3.5)
        self.metrics_port = free_port()
        self.config = write_config(
            folder,
            [
                {"id": "cam-a1", "gate": "A1", "source": "parker.avi", "realtime": False},
                {"id": "cam-gone", "gate": "A2", "source": 9},  # no such camera device
            ],
            metrics={"port": self.metrics_port},
        )
        enroll(self.config, "YAO", photos["yaoming.jpg"])
        self.parker_photo = folder / "parker.jpg"
        cv2.imwrite(
            str(self.parker_photo), cv2.resize(crops["parker"], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
        )
        self.verifier = kiosk(self.config, "verify")
        self.gone = kiosk(self.config, "capture", "--camera", "cam-gone")
        self.events = Events(self.config)
        self.transport = Transport(load_config(self.config), role="test")

    def status(self) -> dict:
        return control_request(self.transport, {"cmd": "status"})

    def close(self) -> str:
        """Everything stopped; the verifier's stderr."""
        self.transport.close()
        self.events.close()
        stop(self.gone)
        return stop(self.verifier)[1]


@pytest.fixture(scope="module")
def claim_site(tmp_path_factory, crops, photos):
    """One running site for the claim tests (a verifier's start is the expensive part); it ends without a
    traceback."""
    site = ClaimSite(tmp_path_factory.mktemp("claims"), crops, photos)
    try:
        assert site.events.wait_for(lambda ev: any(h.get("component") == "verifier" for h in ev.health), 30)
        yield site
    finally:
        err = site.close()
    assert "Traceback" not in err


def test_a_camera_that_cannot_be_opened_is_retried_and_reported_never_a_crash(claim_site):
    site = claim_site
    assert site.events.wait_for(
        lambda ev: (
            sum(h.get("component") == "capture.cam-gone" and h.get("status") == "reconnecting" for h in ev.health) >= 2
        ),
        20,
    )
    assert site.gone.poll() is None
    # `kiosk status` does not say ok while a camera is down: each camera's state and last error.
    res = run_cli("kiosk", "status", "-c", str(site.config), "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["status"] == "degraded" and "cam-gone" in st["cameras_down"]
    assert st["cameras"]["cam-gone"]["state"] == "down" and "cannot open" in st["cameras"]["cam-gone"]["last_error"]
    res = run_cli("kiosk", "status", "-c", str(site.config))
    assert res.returncode == 0 and res.stdout.startswith("verifier DEGRADED: ")
    assert "camera cam-gone (gate A2): DOWN" in res.stdout and "cannot open device 9" in res.stdout
    m = scrape(site.metrics_port)
    gone_cam = (("camera", "cam-gone"),)
    assert m[("kiosk_camera_up", gone_cam)][1] == 0 and m[("kiosk_capture_faults_total", gone_cam)][1] >= 2


def test_malformed_input_on_the_frame_socket_is_dropped_and_counted(claim_site):
    site = claim_site
    before = site.status()["bad_messages"]
    push = site.transport.frame_sender()
    try:
        push.send_multipart([b"frame.cam-a1", b"{not json", b"xx"])
        push.send_multipart([b"frame.cam-a1", b'{"v":1,"camera_id":"cam-a1"}', b""])
        push.send(b"garbage")
        wait_until(lambda: site.status()["bad_messages"] >= before + 3, 10, "three bad messages counted")
    finally:
        push.close()
    status = site.status()
    assert status["ok"] and status["bad_messages"] == before + 3  # and the verifier keeps going
    assert scrape(site.metrics_port)[("kiosk_bad_messages_total", ())][1] == before + 3


def test_a_claim_for_a_subject_not_enrolled_or_at_an_unknown_gate_is_refused(claim_site):
    config = str(claim_site.config)
    res = run_cli("kiosk", "-c", config, "claim", "--gate", "A1", "--subject", "PARKER")
    assert res.returncode == 2 and "not enrolled" in res.stderr
    res = run_cli("kiosk", "-c", config, "claim", "--gate", "Z9", "--subject", "YAO")
    assert res.returncode == 2 and "unknown gate" in res.stderr
    assert claim_site.status()["claims"] == {}


def test_a_claim_steers_the_decision_and_a_subject_enrolled_while_running_is_accepted(claim_site):
    """A claim for YAO, Parker walks up: claim_mismatch; Parker enrolled meanwhile, a claim for PARKER:
    accepted. Operators see the claim; gates never hear it. The metrics count it all, and only grow."""
    site, config = claim_site, str(claim_site.config)
    res = run_cli("kiosk", "-c", config, "claim", "--gate", "A1", "--subject", "YAO")
    assert res.returncode == 0, res.stderr
    assert site.status()["claims"] == {"A1": "YAO"}  # operators see it...
    heard = len(site.events.health)
    assert site.events.wait_for(lambda ev: len(ev.health) > heard + 1, 10)  # heartbeats sent since the claim...
    assert not any("claims" in h or "YAO" in json.dumps(h) for h in site.events.health)  # ...and gates never hear it
    enroll(site.config, "PARKER", site.parker_photo)  # enrolled while the verifier runs
    capture = kiosk(site.config, "capture", "--camera", "cam-a1")
    assert capture.wait(60) == 0
    assert site.events.wait_for(lambda ev: any(e.type == "reject" for e in ev.events), 20)
    first = list(site.events.events)
    assert [(e.type, e.reason, e.subject_id) for e in first] == [("reject", "claim_mismatch", "YAO")]
    before = scrape(site.metrics_port)

    res = run_cli("kiosk", "-c", config, "claim", "--gate", "A1", "--subject", "PARKER")
    assert res.returncode == 0, res.stderr
    capture = kiosk(site.config, "capture", "--camera", "cam-a1")
    assert capture.wait(60) == 0
    assert site.events.wait_for(lambda ev: len(ev.events) >= 2, 20)
    second = site.events.events[1]
    assert (second.type, second.subject_id, second.gate_id) == ("accept", "PARKER", "A1")
    after = scrape(site.metrics_port)
    # Counters only grow between scrapes (the old rolling-window summaries made _count freeze and _sum fall).
    counters = [
        k for k, (kind, _) in before.items() if kind == "counter" or k[0].endswith(("_count", "_sum", "_bucket"))
    ]
    assert len(counters) > 50
    assert all(after[k][1] >= before[k][1] for k in counters), [k for k in counters if after[k][1] < before[k][1]]
    a1 = (("camera", "cam-a1"),)
    assert after[("kiosk_frames_in_total", a1)][1] > before[("kiosk_frames_in_total", a1)][1] > 0
    assert after[("kiosk_capture_frames_sent_total", a1)][1] > 0
    decisions = {k[1]: v for k, (_, v) in after.items() if k[0] == "kiosk_decisions_total"}
    assert decisions[(("gate", "A1"), ("reason", "claim_mismatch"), ("type", "reject"))] == 1
    assert decisions[(("gate", "A1"), ("reason", ""), ("type", "accept"))] == 1
    assert before[("kiosk_decisions_total", (("gate", "A1"), ("reason", "timeout"), ("type", "reject")))][1] == 0
    # Latencies are histograms in seconds: buckets, and a detect step averages well under a second.
    detect = (("stage", "detect"),)
    assert after[("kiosk_stage_seconds_bucket", (("le", "0.05"),) + detect)][0] == "histogram"
    assert 0 < after[("kiosk_stage_seconds_sum", detect)][1] / after[("kiosk_stage_seconds_count", detect)][1] < 1
    assert after[("kiosk_decision_latency_seconds_count", (("gate", "A1"),))][1] == 2
    assert after[("kiosk_gallery_subjects", ())][1] == 2
    assert after[("kiosk_provider_info", (("provider", "CPUExecutionProvider"),))][1] == 1


@pytest.mark.slow  # a supervisor, its children killed and restarted
def test_supervisor_restarts_a_killed_verifier_and_live_enrollment(tmp_path, crops, photos):
    """kiosk run, real time. Parker walks up (not enrolled: reject); the verifier is SIGKILLed and comes back;
    Parker is enrolled while everything runs; Parker's next walk is accepted; Yao (enrolled) is accepted."""
    s = FPS
    make_video(
        tmp_path / "gate.avi",
        [
            Walk(crops["parker"], start=int(0.5 * s), frames=2 * s, w0=60, w1=160),
            Walk(crops["parker"], start=int(9.0 * s), frames=2 * s, w0=60, w1=160),
            Walk(crops["yao"], start=int(11.5 * s), frames=2 * s, w0=60, w1=160),
        ],
        seconds=14.0,
    )
    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "gate.avi", "realtime": True}])
    enroll(config, "YAO", photos["yaoming.jpg"])
    parker_photo = tmp_path / "parker.jpg"
    cv2.imwrite(str(parker_photo), cv2.resize(crops["parker"], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC))
    events = Events(config)
    run = kiosk(config, "run", "--exit-on-eof", quiet=False)
    try:
        assert events.wait_for(lambda ev: any(e.type == "reject" for e in ev.events), 30)
        cfg = load_config(config)
        transport = Transport(cfg, role="test")
        pid = control_request(transport, {"cmd": "status"})["pid"]
        transport.close()
        os.kill(pid, signal.SIGKILL)
        enroll(config, "PARKER", parker_photo)
        # A new verifier (another pid) reports within a few seconds.
        assert events.wait_for(
            lambda ev: any(h.get("component") == "verifier" and h.get("pid") not in (None, pid) for h in ev.health), 20
        )
        out, err = run.communicate(timeout=60)
    finally:
        events.poll(0.3)
        events.close()
        stop(run)
    assert run.returncode == 0
    assert "verifier exited with signal 9" in err
    decisions = [(e["type"], e["subject_id"], e["reason"]) for e in audit(config)]
    assert decisions == [("reject", None, "no_match"), ("accept", "PARKER", None), ("accept", "YAO", None)]


def test_run_shuts_down_cleanly_on_sigterm(tmp_path, crops):
    make_video(tmp_path / "loop.avi", [Walk(crops["parker"], start=0, frames=30, w0=60, w1=90)], seconds=1.0)
    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "loop.avi", "loop": True}])
    events = Events(config)
    run = kiosk(config, "run")
    try:
        assert events.wait_for(lambda ev: any(h.get("component") == "verifier" for h in ev.health), 30)
        children = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        for pid in [str(run.pid), *children]:  # no core dump of a process that holds templates and frames
            limits = [line for line in open(f"/proc/{pid}/limits") if line.startswith("Max core file size")]
            assert limits and limits[0].split()[4:6] == ["0", "0"], limits
        run.send_signal(signal.SIGTERM)
        assert run.wait(15) == 0
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        events.close()
        stop(run)


def test_image_folder_and_video_sources(tmp_path, crops):
    from kiosk.config import CameraConfig
    from kiosk.services.capture import ImageFolderSource, VideoSource, open_source

    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), crops["parker"])
    (folder / "notes.txt").write_text("not an image")
    (folder / "004.jpg").write_text("corrupt")  # skipped with a warning, not a crash
    cfg = load_config(write_config(tmp_path, [{"id": "c", "gate": "G", "source": "shots"}]))
    src = open_source(cfg.cameras[0], cfg)
    assert isinstance(src, ImageFolderSource) and not src.live and src.fps == 10.0
    assert src.open()
    got = [src.read() for _ in range(5)]
    assert [g is not None for g in got] == [True, True, True, False, False]
    make_video(tmp_path / "v.avi", [Walk(crops["parker"], start=0, frames=5, w0=60, w1=60)], seconds=5 / FPS)
    video = open_source(CameraConfig(id="v", gate="G", source=str(tmp_path / "v.avi")), cfg)
    assert isinstance(video, VideoSource) and not video.live and video.open()
    assert video.fps == pytest.approx(30.0)
    assert sum(video.read() is not None for _ in range(7)) == 5
    assert open_source(CameraConfig(id="d", gate="G", source=0), cfg).live
    assert open_source(CameraConfig(id="u", gate="G", source="rtsp://cam.local/stream"), cfg).live


def test_restarted_verifier_recalls_recent_accepts(tmp_path, engine):
    """A verifier restarted while a passenger is still in view must not open the gate for them twice."""
    from kiosk.pipeline.tracking import Track
    from kiosk.services.verifier import Verifier
    from kiosk.store.gallery import Match

    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": 0}])
    now = time.time()
    lines = [
        {"type": "accept", "gate_id": "A1", "subject_id": "YAO", "captured_at": now - 2},
        {"type": "accept", "gate_id": "A1", "subject_id": "OLD", "captured_at": now - 3600},
    ]
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{truncated")
    verifier = Verifier(load_config(config), engine=engine)
    try:

        def walk(subject: str, tid: int):
            track = Track(tid, "cam-a1", np.zeros(4, np.float32), now)
            return [
                verifier.core.policy.observe(track, "A1", Match(subject, subject, 0.9, None, -1.0), now + i * 0.1)
                for i in range(3)
            ][-1]

        assert walk("YAO", 1) is None  # accepted 2 s ago by the previous process
        assert walk("OLD", 2).type == "accept"  # an hour ago: a new transaction
    finally:
        verifier.close()
