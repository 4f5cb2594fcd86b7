"""`kiosk demo`: the whole pipeline boarding a flight, on what the installed packages ship.

1. Enrolls Yao Ming from the sample portrait on flight LH123, and a player
   cut out of `gdp.jpg` on flight BA456, into a fresh demo gallery; gate A1
   boards LH123 (`boarding.require_flight: true`, as at an airport).
2. Makes a gate video: someone holds up a printed photo of Yao Ming; then
   Yao Ming walks up, then the BA456 passenger (at the wrong gate), then a
   stranger (the other player, not enrolled), then Yao Ming comes back.
   Everyone walking up turns the head a little and blinks (about once a second: the demo is short).
3. Runs the real system on it (`kiosk run --exit-on-eof`: capture and
   verifier processes, ZeroMQ with CurveZMQ, liveness on), prints each event
   as it arrives, and ends by itself: the print is refused
   `liveness_unverified` (it never moved as a living face), Yao Ming boards,
   the other passenger is turned away `wrong_flight`, the stranger
   `no_match`, Yao Ming again `already_boarded`.
4. Writes a preview image: each presentation at the moment of the decision.

Liveness in the demo is judged on movement alone (`pad.checks: [depth,
motion, screen]`, `models.pad: []`): the demo's people are renderings of a
photo (bona fide stand-ins, kiosk/tools/standin.py: the photo warped as a
head turning, blinking and speaking, blended into the frame), and the shipped
texture models rightly doubt them (they score them 0.5-0.9, under
`pad.threshold`), so with them no one in the demo would board. Without the
texture models a face is live on a blink, the lips or the brows; the printed
photo is refused because it only ever moves as one rigid piece. That stops
prints and photos, not a replayed video: a real gate runs the texture models
too (the default config does) and a site must never drop them. The stand-ins
are not real video: README "Liveness" has what real passengers and real
attacks give.
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
from kiosk.messaging.channels import EventChannel
from kiosk.messaging.messages import Event
from kiosk.messaging.transport import Transport, init_keys, loopback_endpoints
from kiosk.store.flights import SqliteBoardingStore
from kiosk.store.gallery import open_gallery
from kiosk.tools.attacks import render_attack
from kiosk.tools.scenes import Walk, person_crop, render, write_video
from kiosk.tools.standin import head_turn, natural_expressions
from kiosk.vision.engine import FaceEngine
from kiosk.vision.images import read_image
from kiosk.vision.landmarks import LandmarkModel, find_landmark_model
from kiosk.vision.models.pack import sample_photo

log = logging.getLogger(__name__)

FPS = 30.0
LIVENESS = (
    "liveness: judged on movement alone (a blink, the lips, the brows). The demo's people are renderings of "
    "a photo, which the shipped texture models rightly doubt, so they are off here (models.pad: []); the "
    "printed photo is refused because it never moves as a living face. A real gate runs the texture models "
    "too, and a site must never drop them."
)
SUBJECT = ("yao-ming", "Yao Ming")
OTHER = ("pax-ba456", "BA456 passenger")
FLIGHT, OTHER_FLIGHT = "LH123", "BA456"
PRINT_REASON = "liveness_unverified"  # the print never blinks: no movement evidence in time
EXPECTED = [
    ("reject", PRINT_REASON, None),
    ("accept", None, SUBJECT[0]),
    ("reject", "wrong_flight", OTHER[0]),
    ("reject", "no_match", None),
    ("reject", "already_boarded", SUBJECT[0]),
]


def demo_people(engine: FaceEngine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Person crops: Yao Ming, the right-most player of gdp.jpg (looking at the camera), the left-most one."""
    yao = read_image(sample_photo("yaoming.jpg"))
    gdp = read_image(sample_photo("gdp.jpg"))
    yao_face = engine.detector.detect(yao).largest()
    gdp_faces = engine.detector.detect(gdp)
    gdp_faces = gdp_faces[gdp_faces.widths >= 48]
    other = gdp_faces[int(np.argmax(gdp_faces.boxes[:, 0]))]
    stranger = gdp_faces[int(np.argmin(gdp_faces.boxes[:, 0]))]
    return (person_crop(yao, yao_face.boxes[0]), person_crop(gdp, other.boxes[0]), person_crop(gdp, stranger.boxes[0]))


def demo_frames(engine: FaceEngine) -> list[np.ndarray]:
    """The gate video: a print attack (2.5 s), then four people walking up, their heads turning, blinking."""
    marks = (
        engine.pad.landmarks
        if engine.pad is not None and engine.pad.landmarks is not None
        else LandmarkModel.load(find_landmark_model(None))
    )
    yao, other, stranger = demo_people(engine)
    s = int(FPS)
    attack_at, attack = s // 2, int(2.5 * s)
    photo = read_image(sample_photo("yaoming.jpg"))
    card = render_attack(
        "print", photo, engine.detector.detect(photo).largest().boxes[0], seed=1, seconds=attack / FPS, fps=FPS
    )
    turns = {
        name: (crop, head_turn(crop, engine.detector, marks))
        for name, crop in (("yao", yao), ("other", other), ("stranger", stranger))
    }  # Yao walks up twice
    walks = [
        Walk(
            turns[name][0],
            start=start * s // 2,
            frames=4 * s,
            w0=30,
            w1=w1,
            turn=turns[name][1],
            turn_deg=15,
            expression=natural_expressions(4 * s, FPS, seed=seed, blink_every_s=(0.8, 1.2)),
        )
        for seed, (name, start, w1) in enumerate(
            (("yao", 8, 190), ("other", 18, 170), ("stranger", 28, 170), ("yao", 38, 190)), start=1
        )
    ]
    frames = render(walks, 47 * s // 2)
    frames[attack_at : attack_at + attack] = card
    return frames


def write_demo_config(out: Path, base: KioskConfig) -> Path:
    cfg = {
        "gallery": {"path": "gallery.db"},
        # the demo's processes run the models the operator configured, less the texture models (see LIVENESS)
        "models": {**models_section(base), "pad": []},
        "cameras": [{"id": "cam-a1", "gate": "A1", "source": "gate-a1.avi", "realtime": True}],
        "transport": loopback_endpoints(),
        "security": {"curve": True, "keys_dir": "keys"},
        "audit": {"path": "events.jsonl"},
        "metrics": {"port": 0},
        "boarding": {"require_flight": True},
        # Yao Ming comes back 10 s after boarding: at the default 10 s a re-found passenger might not be decided again.
        "policy": {"repeat_accept_s": 3.0},
        # Movement evidence only: the demo's people are renderings of a photo, which the texture models doubt.
        "pad": {"enabled": True, "checks": ["depth", "motion", "screen"]},
    }
    path = out / "kiosk.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def describe(event: Event) -> str:
    if event.type == "accept":
        return (
            f"ACCEPT  gate {event.gate_id} ({event.flight_id}): {event.subject_id} ({event.display_name}) "
            f"score {event.score:.3f} after {event.frames} frames, {event.latency_ms:.0f} ms after capture"
        )
    if event.type == "reject":
        score = event.score if event.score is None else round(event.score, 3)
        checks = event.liveness_checks or {}
        why = {
            "presentation_attack": f" (the {' and '.join(checks.get('decided_by') or ['liveness'])} check)",
            "liveness_unverified": " (no liveness verdict in time)",
            "wrong_flight": f" {event.subject_id} is on {', '.join(event.on_flights or []) or 'another flight'}",
            "already_boarded": f" {event.subject_id} boarded at gate {event.boarded_gate_id} "
            f"{time.strftime('%H:%M:%S', time.localtime(event.boarded_at or 0))}",
        }
        return (
            f"REJECT  gate {event.gate_id} ({event.flight_id}): {event.reason}{why.get(event.reason or '', '')} "
            f"(score {score}) after {event.frames} frames, {event.latency_ms:.0f} ms after capture"
        )
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
    enroll_demo_passengers(cfg, engine, out)
    frames = demo_frames(engine)
    video = write_video(out / "gate-a1.avi", frames, FPS)
    print(
        f"made {video.name}: {len(frames) / FPS:.0f} s at {FPS:.0f} fps; a printed photo of Yao Ming held up, "
        f"then Yao Ming walks up, a passenger of {OTHER_FLIGHT}, a stranger, and Yao Ming again"
    )
    print(LIVENESS)
    print(f"running the pipeline (kiosk run --exit-on-eof, CurveZMQ on, liveness on) with config {config_path}")
    events, returncode = watch_run(cfg, config_path)
    return report(out, frames, events, returncode)


def enroll_demo_passengers(cfg: KioskConfig, engine: FaceEngine, out: Path) -> None:
    """Enroll Yao Ming on LH123 and the other player on BA456 (from a crop saved as their photo), and open gate
    A1 for LH123, so the run has one passenger to board and one at the wrong gate."""
    _, other, _ = demo_people(engine)
    other_photo = out / "pax-ba456.jpg"  # their "passport photo": the crop, enlarged
    cv2.imwrite(str(other_photo), cv2.resize(other, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC))
    departs = time.time() + 3 * 3600
    with open_gallery(cfg, create=True) as gallery:
        store = SqliteBoardingStore(gallery)
        for (sid, name), photo, flight in (
            (SUBJECT, sample_photo("yaoming.jpg"), FLIGHT),
            (OTHER, other_photo, OTHER_FLIGHT),
        ):
            template = reference_template(engine, photo, cfg.enrollment)
            gallery.enroll(sid, name, template.embedding[None, :], engine.model_id, qualities=[template.quality])
            store.add_flight(flight, departs)
            store.add_passengers(flight, [sid])
            print(f"enrolled {sid} ({name}) on flight {flight} from {photo.name}")
        store.open_gate("A1", FLIGHT)
    print(f"gate A1 boards flight {FLIGHT} (boarding.require_flight: true)")


def watch_run(cfg: KioskConfig, config_path: Path) -> tuple[list[Event], int | None]:
    """Run `kiosk run --exit-on-eof` as a child process and print each event as it arrives; stop it after 120 s
    so a stuck run cannot hang the demo. The events heard and the run's exit status."""
    init_keys(cfg.security.keys_dir)
    transport = Transport(cfg, role="demo")
    inbox = EventChannel(
        transport.event_subscriber(["event."]), lambda why: log.warning("ignored a malformed event: %s", why)
    )
    argv = [sys.executable, "-m", "kiosk.cli", "-q", "-c", str(config_path), "run", "--exit-on-eof"]
    proc = subprocess.Popen(argv)  # noqa: S603 - this interpreter running kiosk, no shell
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
    return events, proc.returncode


def report(out: Path, frames: list[np.ndarray], events: list[Event], returncode: int | None) -> bool:
    """Count the events and the audit lines, write the preview, and say whether the decisions were the expected
    ones (True)."""
    audit = (
        [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
        if (out / "events.jsonl").exists()
        else []
    )
    image = preview(frames, events, out)
    accepts = [e for e in events if e.type == "accept"]
    rejects = [e for e in events if e.type == "reject"]
    print(
        f"{len(events)} events ({len(accepts)} accept, {len(rejects)} reject); audit log {out / 'events.jsonl'} "
        f"({len(audit)} lines)"
    )
    if image:
        print(f"preview: {image}")
    got = [(e.type, e.reason, e.subject_id) for e in events if e.type in ("accept", "reject")]
    good = returncode == 0 and got == EXPECTED
    print(
        "demo "
        + (
            f"done: the printed photo was refused ({PRINT_REASON}: it never moved as a living face), "
            f"{SUBJECT[1]} boarded {FLIGHT} "
            f"once, the {OTHER_FLIGHT} passenger was turned away (wrong_flight), the stranger too "
            "(no_match), and so was the boarded passenger coming back (already_boarded)"
            if good
            else "ended with unexpected decisions"
        )
    )
    return good
