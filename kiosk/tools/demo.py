"""`kiosk demo`: the whole pipeline on what the installed packages ship.

1. Enrolls Yao Ming from the sample portrait into a fresh demo gallery.
2. Makes a gate video: Yao Ming walks up to the camera and leaves, then a
   person who is not enrolled (a player cut out of `gdp.jpg`) walks up.
3. Runs the real system on it (`kiosk run --exit-on-eof`: capture and
   verifier processes, ZeroMQ with CurveZMQ), prints each event as it
   arrives, and ends by itself.
4. Writes a preview image: each passenger at the moment of the decision.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from enrollment.photos import reference_template
from kiosk.config import KioskConfig, load_config, models_section
from kiosk.vision.engine import FaceEngine
from kiosk.store.gallery import Gallery
from kiosk.vision.images import read_image
from kiosk.messaging.channels import EventChannel
from kiosk.messaging.messages import Event
from kiosk.vision.models.pack import sample_photo
from kiosk.tools.scenes import Walk, person_crop, render, write_video
from kiosk.messaging.transport import Transport, init_keys, loopback_endpoints

log = logging.getLogger(__name__)

FPS = 30.0
SUBJECT = ("yao-ming", "Yao Ming")


def demo_scene(engine: FaceEngine) -> tuple[list[Walk], int]:
    yao = read_image(sample_photo("yaoming.jpg"))
    gdp = read_image(sample_photo("gdp.jpg"))
    yao_face = engine.detector.detect(yao).largest()
    gdp_faces = engine.detector.detect(gdp)
    stranger = gdp_faces[int(np.argmax(gdp_faces.boxes[:, 0]))]  # the right-most player, looking at the camera
    s = int(FPS)
    walks = [
        Walk(person_crop(yao, yao_face.boxes[0]), start=s, frames=4 * s, w0=30, w1=190),
        Walk(person_crop(gdp, stranger.boxes[0]), start=6 * s, frames=4 * s, w0=30, w1=170),
    ]
    return walks, 11 * s


def write_demo_config(out: Path, base: KioskConfig) -> Path:
    cfg = {
        "gallery": {"path": "gallery.db"},
        "models": models_section(base),  # the demo's processes run the models the operator configured
        "cameras": [{"id": "cam-a1", "gate": "A1", "source": "gate-a1.avi", "realtime": True}],
        "transport": loopback_endpoints(),
        "security": {"curve": True, "keys_dir": "keys"},
        "audit": {"path": "events.jsonl"},
        "metrics": {"port": 0},
    }
    path = out / "kiosk.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def describe(event: Event) -> str:
    if event.type == "accept":
        return (f"ACCEPT  gate {event.gate_id}: {event.subject_id} ({event.display_name}) score {event.score:.3f} "
                f"after {event.frames} frames, {event.latency_ms:.0f} ms after capture")
    if event.type == "reject":
        return (f"REJECT  gate {event.gate_id}: {event.reason} (best score {event.score if event.score is None else round(event.score, 3)}) "
                f"after {event.frames} frames, {event.latency_ms:.0f} ms after capture")
    return f"{event.type.upper()} gate {event.gate_id}"


def preview(frames: list[np.ndarray], events: list[Event], out: Path) -> Path | None:
    """Side by side: the frame each decision was taken on, with the verdict."""
    panels = []
    for ev in events:
        if ev.seq is None or not 0 <= ev.seq < len(frames):
            continue
        panel = frames[ev.seq].copy()
        ok = ev.type == "accept"
        colour = (0, 170, 0) if ok else (0, 0, 220)
        text = f"ACCEPT {ev.subject_id} {ev.score:.2f}" if ok else f"REJECT {ev.reason}"
        cv2.rectangle(panel, (0, 0), (panel.shape[1] - 1, panel.shape[0] - 1), colour, 8)
        cv2.putText(panel, text, (16, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, colour, 2, cv2.LINE_AA)
        panels.append(panel)
    if not panels:
        return None
    path = out / "preview.jpg"
    cv2.imwrite(str(path), np.hstack(panels))
    return path


def run_demo(base: KioskConfig, out: Path) -> bool:
    """True when the run ended with exactly the expected decisions."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("gallery.db", "gallery.db-wal", "gallery.db-shm", "events.jsonl"):
        (out / stale).unlink(missing_ok=True)
    config_path = write_demo_config(out, base)
    cfg = load_config(config_path)
    engine = FaceEngine.from_config(cfg)
    template = reference_template(engine, sample_photo("yaoming.jpg"), cfg.enrollment)
    with Gallery(cfg.resolve(cfg.gallery.path)) as gallery:
        gallery.enroll(SUBJECT[0], SUBJECT[1], template.embedding[None, :], engine.model_id,
                       qualities=[template.quality])
    print(f"enrolled {SUBJECT[0]} ({SUBJECT[1]}) from the sample portrait yaoming.jpg")
    walks, total = demo_scene(engine)
    frames = render(walks, total)
    video = write_video(out / "gate-a1.avi", frames, FPS)
    print(f"made {video.name}: {total / FPS:.0f} s at {FPS:.0f} fps; Yao Ming walks up, then a passenger "
          "who is not enrolled")
    print(f"running the pipeline (kiosk run --exit-on-eof, CurveZMQ on) with config {config_path}")

    init_keys(cfg.resolve(cfg.security.keys_dir))
    transport = Transport(cfg, role="demo")
    inbox = EventChannel(transport.event_subscriber(["event."]),
                         lambda why: log.warning("ignored a malformed event: %s", why))
    proc = subprocess.Popen([sys.executable, "-m", "kiosk.cli", "-q", "-c", str(config_path), "run",
                             "--exit-on-eof"])
    events: list[Event] = []
    t_start = time.time()
    try:
        while True:
            ev = inbox.recv(200)
            if isinstance(ev, Event):
                events.append(ev)
                print("  " + describe(ev), flush=True)
            elif proc.poll() is not None:
                break
            if time.time() - t_start > 120:
                proc.terminate()
                print("demo: the run did not end in 120 s; stopped it", file=sys.stderr)
                break
        proc.wait(10)
    finally:
        inbox.sock.close()
        transport.close()
    audit = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "events.jsonl").exists() else []
    image = preview(frames, events, out)
    accepts = [e for e in events if e.type == "accept"]
    rejects = [e for e in events if e.type == "reject"]
    print(f"{len(events)} events ({len(accepts)} accept, {len(rejects)} reject); audit log {out / 'events.jsonl'} "
          f"({len(audit)} lines)")
    if image:
        print(f"preview: {image}")
    good = (proc.returncode == 0 and len(accepts) == 1 and accepts[0].subject_id == SUBJECT[0]
            and len(rejects) >= 1 and all(e.subject_id != SUBJECT[0] for e in rejects))
    print("demo " + ("done: the enrolled passenger was accepted once, the other one rejected" if good
                     else "ended with unexpected decisions"))
    return good
