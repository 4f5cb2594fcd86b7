"""`kiosk demo`: the whole pipeline boarding a flight, on what the installed packages ship.

1. Enrolls Yao Ming from the sample portrait on flight LH123, and a player
   cut out of `gdp.jpg` on flight BA456, into a fresh demo gallery; gate A1
   boards LH123 (`boarding.require_flight: true`, as at an airport).
2. Makes a gate video: Yao Ming walks up and leaves, then the BA456
   passenger walks up (at the wrong gate), then Yao Ming comes back.
3. Runs the real system on it (`kiosk run --exit-on-eof`: capture and
   verifier processes, ZeroMQ with CurveZMQ), prints each event as it
   arrives, and ends by itself: Yao Ming boards, the other passenger is
   turned away as `wrong_flight`, Yao Ming again as `already_boarded`.
4. Writes a preview image: each passenger at the moment of the decision.

The video is made by moving photos: for presentation attack detection
(liveness) that is a print attack, not a live passenger.
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
from kiosk.store.flights import SqliteBoardingStore
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
OTHER = ("pax-ba456", "BA456 passenger")
FLIGHT, OTHER_FLIGHT = "LH123", "BA456"


def demo_people(engine: FaceEngine) -> tuple[np.ndarray, np.ndarray]:
    """Person crops: Yao Ming, and the right-most player of gdp.jpg (looking at the camera)."""
    yao = read_image(sample_photo("yaoming.jpg"))
    gdp = read_image(sample_photo("gdp.jpg"))
    yao_face = engine.detector.detect(yao).largest()
    gdp_faces = engine.detector.detect(gdp)
    other = gdp_faces[int(np.argmax(gdp_faces.boxes[:, 0]))]
    return person_crop(yao, yao_face.boxes[0]), person_crop(gdp, other.boxes[0])


def demo_scene(engine: FaceEngine) -> tuple[list[Walk], int]:
    yao, other = demo_people(engine)
    s = int(FPS)
    walks = [
        Walk(yao, start=s, frames=4 * s, w0=30, w1=190),
        Walk(other, start=6 * s, frames=4 * s, w0=30, w1=170),
        Walk(yao, start=11 * s, frames=4 * s, w0=30, w1=190),
    ]
    return walks, 16 * s


def write_demo_config(out: Path, base: KioskConfig) -> Path:
    cfg = {
        "gallery": {"path": "gallery.db"},
        "models": models_section(base),  # the demo's processes run the models the operator configured
        "cameras": [{"id": "cam-a1", "gate": "A1", "source": "gate-a1.avi", "realtime": True}],
        "transport": loopback_endpoints(),
        "security": {"curve": True, "keys_dir": "keys"},
        "audit": {"path": "events.jsonl"},
        "metrics": {"port": 0},
        "boarding": {"require_flight": True},
        # Yao Ming comes back 6 s after boarding: inside the default 10 s a re-found passenger is not decided again.
        "policy": {"repeat_accept_s": 3.0},
    }
    path = out / "kiosk.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def describe(event: Event) -> str:
    if event.type == "accept":
        return (f"ACCEPT  gate {event.gate_id} ({event.flight_id}): {event.subject_id} ({event.display_name}) score {event.score:.3f} "
                f"after {event.frames} frames, {event.latency_ms:.0f} ms after capture")
    if event.type == "reject":
        score = event.score if event.score is None else round(event.score, 3)
        why = {"wrong_flight": f" {event.subject_id} is on {', '.join(event.on_flights or []) or 'another flight'}",
               "already_boarded": f" {event.subject_id} boarded at gate {event.boarded_gate_id} "
                                  f"{time.strftime('%H:%M:%S', time.localtime(event.boarded_at or 0))}"}
        return (f"REJECT  gate {event.gate_id} ({event.flight_id}): {event.reason}{why.get(event.reason or '', '')} "
                f"(score {score}) after {event.frames} frames, {event.latency_ms:.0f} ms after capture")
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
    _, other = demo_people(engine)
    other_photo = out / "pax-ba456.jpg"  # their "passport photo": the crop, enlarged
    cv2.imwrite(str(other_photo), cv2.resize(other, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC))
    departs = time.time() + 3 * 3600
    with Gallery(cfg.resolve(cfg.gallery.path)) as gallery:
        store = SqliteBoardingStore(gallery)
        for (sid, name), photo, flight in ((SUBJECT, sample_photo("yaoming.jpg"), FLIGHT),
                                           (OTHER, other_photo, OTHER_FLIGHT)):
            template = reference_template(engine, photo, cfg.enrollment)
            gallery.enroll(sid, name, template.embedding[None, :], engine.model_id, qualities=[template.quality])
            store.add_flight(flight, departs)
            store.add_passengers(flight, [sid])
            print(f"enrolled {sid} ({name}) on flight {flight} from {photo.name}")
        store.open_gate("A1", FLIGHT)
    print(f"gate A1 boards flight {FLIGHT} (boarding.require_flight: true)")
    walks, total = demo_scene(engine)
    frames = render(walks, total)
    video = write_video(out / "gate-a1.avi", frames, FPS)
    print(f"made {video.name}: {total / FPS:.0f} s at {FPS:.0f} fps; Yao Ming walks up, then a passenger of "
          f"{OTHER_FLIGHT}, then Yao Ming again")
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
    got = [(e.type, e.reason, e.subject_id) for e in events if e.type in ("accept", "reject")]
    good = proc.returncode == 0 and got == [("accept", None, SUBJECT[0]), ("reject", "wrong_flight", OTHER[0]),
                                            ("reject", "already_boarded", SUBJECT[0])]
    print("demo " + (f"done: {SUBJECT[1]} boarded {FLIGHT} once, the {OTHER_FLIGHT} passenger was turned away "
                     "(wrong_flight), and so was the boarded passenger coming back (already_boarded)" if good
                     else "ended with unexpected decisions"))
    return good
