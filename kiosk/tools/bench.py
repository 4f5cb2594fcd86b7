"""`kiosk bench`: the real pipeline on a video, timed; optionally against the obvious insightface loop.

The pipeline run is real: a verifier process and a capture process
(`realtime: false`, so no frame is dropped) talking over ZeroMQ with the
config's security, decisions published. Model loading and process start
are excluded: the clock runs from the first frame's capture to the end of
processing of the last one.

`--compare insightface` runs what a user would write with the insightface
package on the same video and model files: per frame SCRFD at 640x640,
`norm_crop` and ArcFace per face, a gallery match per face. Its per-frame
matches go through the same tracker and decision policy, so the two runs'
accepted subjects can be compared both ways.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import yaml

from kiosk.config import KioskConfig, load_config, models_section
from kiosk.errors import RuntimeFailure, UsageError
from kiosk.messaging.channels import EventChannel, wait_until_eof
from kiosk.messaging.messages import EVENT_TOPIC, HEALTH_TOPIC, CaptureHealth, Event, Heartbeat
from kiosk.messaging.status import Quantiles, VerifierStatus, quantiles_json
from kiosk.messaging.transport import Transport, control_request, init_keys, loopback_endpoints
from kiosk.store.gallery import open_gallery
from kiosk.store.sealing import key_source

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

    from kiosk.boarding.gates import GateFlights
    from kiosk.store.gallery import GalleryMatrix

log = logging.getLogger(__name__)

CAMERA, GATE = "bench", "BENCH"


def _bench_config(cfg: KioskConfig, cameras: list[tuple[str, str, Path]], folder: Path, realtime: bool) -> Path:
    """A config for the bench's own verifier and captures: the user's gallery, models, policy and liveness;
    its own loopback endpoints, keys and audit file. `cameras`: (camera id, gate id, video) each."""
    key_file = key_source(cfg).path  # the user's template key (None: from the environment, inherited)
    data = {
        "gallery": {
            "path": str(cfg.gallery.path),
            "url": cfg.gallery.url,
            "password_file": str(cfg.gallery.password_file) if cfg.gallery.password_file else None,
        },
        "models": models_section(cfg),
        "cameras": [
            {"id": cid, "gate": gate, "source": str(video.resolve()), "realtime": realtime}
            for cid, gate, video in cameras
        ],
        "transport": loopback_endpoints(),
        "security": {
            "curve": cfg.security.curve,
            "keys_dir": str(folder / "keys"),
            "template_key_file": str(key_file) if key_file else None,
        },
        "policy": asdict(cfg.policy),
        "pad": asdict(cfg.pad),  # liveness on or off as configured: its cost is part of what is measured
        "audit": {"path": str(folder / "events.jsonl")},
        "metrics": {"port": 0},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    if cfg.security.curve:
        init_keys(folder / "keys")
    return path


def run_pipeline(cfg: KioskConfig, video: Path, timeout_s: float = 1800, realtime: bool = False) -> dict[str, Any]:
    """Time the real pipeline on `video`; returns the bench figures.

    With `realtime` the video is paced at its frame rate like a live camera
    (frames the verifier cannot take are dropped): the run measures latency.
    """
    with tempfile.TemporaryDirectory(prefix="kiosk-bench-") as tmp:  # keys and audit: gone afterwards
        run = _run_cameras(cfg, [(CAMERA, GATE, video)], Path(tmp), timeout_s, realtime)
    status, events, health = (
        VerifierStatus.from_json(run["status"]),
        run["events"],
        run["capture_health"].get(CAMERA, {}),
    )
    frames = status.frames_processed
    seconds = _span(status) if frames else 0.0
    stages = {"decode": health.get("decode_ms", {})}
    stages.update(_stages(status))
    return {
        "mode": "realtime" if realtime else "replay",
        "frames": frames,
        "dropped": {"capture": health.get("drops", 0), "verifier_stale": status.cameras[CAMERA].dropped},
        "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 2) if seconds else 0.0,
        "faces_per_frame": round(status.faces_detected / frames, 3) if frames else 0.0,
        "providers": list(status.providers),
        "stages_ms": stages,
        "frame_latency_ms": _rounded(status.frame_latency_ms, 1, with_n=False),
        "decisions": [
            {
                "type": e.type,
                "subject_id": e.subject_id,
                "reason": e.reason,
                "seq": e.seq,
                "score": e.score,
                "latency_ms": e.latency_ms,
            }
            for e in events
        ],
        "accepted": sorted({e.subject_id for e in events if e.type == "accept" and e.subject_id}),
        "decision_latency_ms": _quantiles([e.latency_ms for e in events if e.latency_ms is not None]),
        "cpu": run["cpu"],
        "gallery": status.gallery.to_json() if status.gallery else {},
    }


def _span(status: VerifierStatus) -> float:
    """Seconds from the first frame's capture to the last frame done."""
    if status.first_captured_at is None or status.last_done_at is None:
        return 0.0
    return float(status.last_done_at - status.first_captured_at)


def _rounded(q: Quantiles | None, digits: int, with_n: bool) -> dict[str, float]:
    """A latency window's figures rounded (`{}`: no sample), with or without its sample count."""
    return {k: round(v, digits) for k, v in quantiles_json(q).items() if with_n or k != "n"}


def _stages(status: VerifierStatus) -> dict[str, dict[str, float]]:
    return {k: {"p50": round(q.p50, 3), "p99": round(q.p99, 3)} for k, q in status.stages_ms.items() if q}


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": round(float(np.percentile(values, 50)), 1), "p99": round(float(np.percentile(values, 99)), 1)}


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process, from /proc (None where it is gone or there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_cameras(
    cfg: KioskConfig,
    cameras: list[tuple[str, str, Path]],
    folder: Path,
    timeout_s: float,
    realtime: bool,
    warm_up_s: float = 2.0,
) -> dict[str, Any]:
    """A verifier and one capture per camera, run until every file source ended and was processed. Returns the
    verifier's last status, the events, each capture's last health message, and the CPU share of a core each
    process used from `warm_up_s` after the captures started until the first source ended (steady state:
    neither process start nor the end of a file)."""
    import subprocess
    import sys

    bench_cfg_path = _bench_config(cfg, cameras, folder, realtime)
    bench_cfg = load_config(bench_cfg_path)
    base = [sys.executable, "-m", "kiosk.cli", "-q", "-c", str(bench_cfg_path)]
    transport = Transport(bench_cfg, role="bench")
    inbox = EventChannel(
        transport.event_subscriber([EVENT_TOPIC, HEALTH_TOPIC]),
        lambda why: log.warning("bench: malformed message: %s", why),
    )
    ids = [cid for cid, _gate, _video in cameras]
    verifier = subprocess.Popen(base + ["verify"])  # noqa: S603 - this interpreter's own kiosk CLI, our arguments
    captures: dict[str, subprocess.Popen] = {}
    run = _CameraRun(inbox, transport, verifier, captures, warm_up_s)
    try:
        _wait_for_verifier(inbox, verifier)
        for cid in ids:
            captures[cid] = subprocess.Popen(base + ["capture", "--camera", cid])  # noqa: S603 - as the verifier
        run.start()
        if not wait_until_eof(run.ask, ids, timeout_s=timeout_s, every_s=0.05, while_waiting=run.absorb):
            raise RuntimeFailure(f"bench: not done after {timeout_s:.0f}s")
        time.sleep(0.3)
        run.absorb(100)
    finally:
        for proc in [*captures.values(), verifier]:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        inbox.sock.close()
        transport.close()
    if run.status is None:  # wait_until_eof returned True, so a status was asked (and answered)
        raise RuntimeFailure("bench: the verifier never answered `status`")
    return {"status": run.status, "events": run.events, "capture_health": run.health, "cpu": run.cpu_shares()}


def _wait_for_verifier(inbox: EventChannel, verifier: subprocess.Popen) -> None:
    """Until the verifier's first heartbeat: its model load is not timed, and the captures start after it."""
    deadline = time.monotonic() + 120
    while not isinstance(inbox.recv(100), Heartbeat):
        if verifier.poll() is not None or time.monotonic() > deadline:
            raise RuntimeFailure("bench: the verifier did not start")


class _CameraRun:
    """What a camera run hears (events, the captures' health, the verifier's status) and the CPU time its
    processes use over the steady-state window: from `warm_up_s` after the captures started until the first
    source ended."""

    def __init__(
        self,
        inbox: EventChannel,
        transport: Transport,
        verifier: subprocess.Popen,
        captures: dict[str, subprocess.Popen],
        warm_up_s: float,
    ) -> None:
        self.inbox = inbox
        self.transport = transport
        self.verifier = verifier
        self.captures = captures  # filled by the caller before start()
        self.warm_up_s = warm_up_s
        self.events: list[Event] = []
        self.health: dict[str, dict[str, Any]] = {}
        self.status: dict[str, Any] | None = None
        self.started = 0.0
        self.procs: dict[str, subprocess.Popen] = {}
        self.cpu_from: dict[str, float] = {}  # process -> CPU seconds at the start of the window
        self.cpu_last: dict[str, tuple[float, float]] = {}  # process -> (CPU seconds, monotonic) at its last reading
        self.window_start: float | None = None  # monotonic start of the CPU window

    def start(self) -> None:
        """The captures have started: the warm-up counts from now."""
        self.started = time.monotonic()
        self.procs = {"verifier": self.verifier, **{f"capture {cid}": p for cid, p in self.captures.items()}}

    def absorb(self, wait_ms: int = 0) -> None:
        """Take the waiting messages (events, the captures' health) and read the processes' CPU time."""
        while (message := self.inbox.recv(wait_ms)) is not None:
            if isinstance(message, Event):
                self.events.append(message)
            elif isinstance(message, CaptureHealth) and message.camera_id in self.captures:
                self.health[message.camera_id] = message.body
        now = time.monotonic()
        ended = any(h.get("status") == "eof" for h in self.health.values())
        if self.window_start is None and now - self.started >= self.warm_up_s:
            self.window_start = now
            for name, proc in self.procs.items():
                if (cpu := _cpu_seconds(proc.pid)) is not None:
                    self.cpu_from[name] = cpu
        if self.window_start is not None and not ended:
            for name, proc in self.procs.items():
                if name in self.cpu_from and (cpu := _cpu_seconds(proc.pid)) is not None:
                    self.cpu_last[name] = (cpu, now)

    def ask(self) -> dict[str, Any] | None:
        """The verifier's status once every capture has exited (None before: wait_until_eof asks again)."""
        if any(p.poll() is None for p in self.captures.values()):
            return None
        self.status = control_request(self.transport, {"cmd": "status"})
        return self.status

    def cpu_shares(self) -> dict[str, dict[str, float]]:
        """Each process's share of a core over the window (left out where the window was under a second)."""
        cpu = {}
        for name, (seconds, at) in self.cpu_last.items():
            span = at - (self.window_start if self.window_start is not None else at)  # (set before any reading)
            if span >= 1.0:
                cpu[name] = {"core_share": round((seconds - self.cpu_from[name]) / span, 3), "over_s": round(span, 1)}
        return cpu


def _probe(video: Path) -> tuple[int, int, float, int]:
    """(width, height, fps, frames) of a video, with a sane frame rate."""
    probe = cv2.VideoCapture(str(video))
    w, h = int(probe.get(cv2.CAP_PROP_FRAME_WIDTH)), int(probe.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = probe.get(cv2.CAP_PROP_FPS) or 30.0
    frames = int(probe.get(cv2.CAP_PROP_FRAME_COUNT)) or int(fps * 10)
    probe.release()
    return w, h, (fps if 1.0 <= fps <= 240.0 else 30.0), frames


class _EmptyGate:
    """An empty gate area at a size: a still scene (floor, wall, a barrier each side) with fresh sensor noise
    (sigma 2 grey levels) on every frame."""

    def __init__(self, w: int, h: int) -> None:
        scene = np.empty((h, w, 3), np.uint8)
        scene[:] = (150, 160, 170)  # wall
        scene[int(h * 0.7) :] = (90, 95, 100)  # floor
        cv2.rectangle(scene, (int(w * 0.1), int(h * 0.45)), (int(w * 0.3), int(h * 0.95)), (60, 60, 200), -1)
        cv2.rectangle(scene, (int(w * 0.7), int(h * 0.45)), (int(w * 0.9), int(h * 0.95)), (60, 60, 200), -1)
        self.scene = cv2.GaussianBlur(scene, (0, 0), 3).astype(np.int16)
        rng = np.random.default_rng(0)
        self._noise = [rng.normal(0, 2, (h, w, 3)).astype(np.int16) for _ in range(8)]

    def frame(self, i: int) -> np.ndarray:
        return np.clip(self.scene + self._noise[i % len(self._noise)], 0, 255).astype(np.uint8)


def _writer(path: Path, fps: float, w: int, h: int) -> cv2.VideoWriter:
    out = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    if not out.isOpened():
        raise RuntimeFailure(f"bench: cannot write {path}")
    return out


def idle_video(like: Path, path: Path) -> Path:
    """An empty gate area as long as `like`, at its size and frame rate, as an MJPG file like a USB camera's
    stream. No face is ever in it."""
    w, h, fps, frames = _probe(like)
    gate, out = _EmptyGate(w, h), _writer(path, fps, w, h)
    for i in range(frames):
        out.write(gate.frame(i))
    out.release()
    return path


ENTER_LEAD_S = 2.0  # the busy cameras' gate is empty this long ...
ENTER_SLIDE_S = 0.4  # ... then the video's frames slide in from the right edge over this long


def enter_video(video: Path, path: Path) -> tuple[Path, int, int]:
    """A busy camera's file: the empty gate area for ENTER_LEAD_S, then `video` slides in from the side over
    ENTER_SLIDE_S (its person steps into view), then plays to its end; MJPG. Returns the file, the index of
    the first frame of the slide, and the number of frames."""
    w, h, fps, _ = _probe(video)
    gate, out = _EmptyGate(w, h), _writer(path, fps, w, h)
    lead, slide = round(ENTER_LEAD_S * fps), max(1, round(ENTER_SLIDE_S * fps))
    for i in range(lead):
        out.write(gate.frame(i))
    cap = cv2.VideoCapture(str(video))
    k = 0
    while True:
        ok, image = cap.read()
        if not ok:
            break
        if image.shape[:2] != (h, w):
            image = cv2.resize(image, (w, h))
        if k < slide:  # the video's left part shows at the right edge, then more of it, over the empty gate
            shift = int(round(w * (1 - (k + 1) / slide)))
            over = gate.scene.astype(np.uint8).copy()
            over[:, shift:] = image[:, : w - shift]
            image = over
        out.write(image)
        k += 1
    cap.release()
    out.release()
    return path, lead, lead + k


def first_face(cfg: KioskConfig, video: Path, start: int, frames: int) -> int | None:
    """The index of the first frame from `start` (within `frames` of it) in which the detector finds a face at
    least policy.min_face_px wide: when a face could first be found, had every frame been detected."""
    from kiosk.vision.engine import FaceEngine

    detector = FaceEngine.from_config(cfg).detector
    cap = cv2.VideoCapture(str(video))
    cap.set(cv2.CAP_PROP_POS_FRAMES, start)
    try:
        for i in range(start, start + frames):
            ok, image = cap.read()
            if not ok:
                return None
            (faces,) = detector.detect_batch([image], cfg.policy.min_face_px)
            if len(faces) and (faces.widths >= cfg.policy.min_face_px).any():
                return i
    finally:
        cap.release()
    return None


def run_cameras(cfg: KioskConfig, video: Path, cameras: int, busy: int, timeout_s: float = 1800) -> dict[str, Any]:
    """`cameras` live cameras on one verifier, in real time: `busy` of them show an empty gate area and then
    `video` stepping in (enter_video), the others the empty gate area throughout. Per camera: frames offered,
    processed, skipped as idle, dropped as stale (a newer frame came before the verifier could take it),
    decisions and their latency, who was accepted, how late the stepping-in face was found; and the CPU share
    of a core each process used."""
    with tempfile.TemporaryDirectory(prefix="kiosk-bench-") as tmp:
        folder = Path(tmp)
        entering, lead, _ = enter_video(video, folder / "enter.avi") if busy else (video, 0, 0)
        empty = idle_video(entering, folder / "idle.avi") if busy < cameras else video
        # When the person's face could first be found (every frame detected): what a wake is measured from.
        truth = first_face(cfg, entering, lead, 4 * round(ENTER_SLIDE_S * _probe(video)[2])) if busy else None
        specs = [(f"cam{i + 1}", f"G{i + 1}", entering if i < busy else empty) for i in range(cameras)]
        run = _run_cameras(cfg, specs, folder, timeout_s, realtime=True)
    fps = _probe(video)[2]
    status, events = VerifierStatus.from_json(run["status"]), run["events"]
    per_camera = []
    for cid, gate, source in specs:
        cam = status.cameras[cid]
        mine = [e for e in events if e.camera_id == cid]
        h = run["capture_health"].get(cid, {})
        offered = cam.frames_in
        sent, held, capture_dropped = int(h.get("sent", offered)), int(h.get("held", 0)), int(h.get("drops", 0))
        delivered = sent + held + capture_dropped
        wake = (
            next(((seq, ms) for seq, ms in cam.wakes if seq >= lead), None)
            if source == entering and truth is not None
            else None
        )
        per_camera.append(
            {
                "camera": cid,
                "gate": gate,
                "busy": source == entering,
                "sent": sent,
                "held": held,
                "capture_dropped": capture_dropped,
                "frames_in": offered,
                "processed": cam.processed,
                "idle_skipped": cam.idle_skipped,
                "stale": cam.dropped,
                "too_old": cam.too_old,
                # Of the frames the camera delivered (sent, held back as idle, or dropped at the capture).
                "stale_share": round((cam.dropped + cam.too_old) / delivered, 4) if delivered else 0.0,
                "decisions": len(mine),
                "accepts": sum(e.type == "accept" for e in mine),
                "accepted": sorted({e.subject_id for e in mine if e.type == "accept" and e.subject_id}),
                "decision_latency_ms": _quantiles([e.latency_ms for e in mine if e.latency_ms is not None]),
                # The person stepping in: frames between the first one a face could be found in and the one it was
                # found in, and the time from the capture of the former to the end of the detection of the latter.
                "wake": {"frames_late": wake[0] - truth, "ms": round((wake[0] - truth) * 1000 / fps + wake[1], 1)}
                if wake and truth is not None  # (a wake is looked for only with a truth)
                else None,
            }
        )
    latency = [e.latency_ms for e in events if e.latency_ms is not None]
    return {
        "mode": "cameras",
        "video": str(video),
        "cameras": cameras,
        "busy": busy,
        "first_face_frame": truth,
        "providers": list(status.providers),
        "per_camera": per_camera,
        "frame_latency_ms": _rounded(status.frame_latency_ms, 1, with_n=False),
        "decision_latency_ms": _quantiles(latency),
        "deciding_frame_latency_ms": _rounded(status.deciding_frame_latency_ms, 1, with_n=True),
        "stages_ms": _stages(status),
        "cpu": run["cpu"],
    }


def format_cameras(r: dict[str, Any]) -> str:
    lines = [
        f"{r['cameras']} live cameras, {r['busy']} playing {r['video']} (after {ENTER_LEAD_S:.0f} s of an empty "
        f"gate area, stepping in from the side), the others an empty gate area; "
        f"providers {', '.join(r['providers'])}",
        "camera  gate  busy   sent   held  stale  share  idle-skipped  decisions  accepts  decision p50/p99 ms  "
        "wake ms  accepted",
    ]
    for c in r["per_camera"]:
        dl = c["decision_latency_ms"]
        lines.append(
            f"{c['camera']:<7} {c['gate']:<5} {'yes' if c['busy'] else 'no':<4} {c['sent']:>6} "
            f"{c['held']:>6} "
            f"{c['stale'] + c['too_old']:>6} {c['stale_share']:>6.1%} {c['idle_skipped']:>13} "
            f"{c['decisions']:>10} {c['accepts']:>8}  "
            f"{(str(dl['p50']) + ' / ' + str(dl['p99'])) if dl else '-':>19}  "
            f"{c['wake']['ms'] if c['wake'] else '-':>7}  {c['accepted']}"
        )
    fl, dl = r["frame_latency_ms"], r["decision_latency_ms"]
    if fl:
        lines.append(f"capture-to-processed per frame: p50 {fl['p50']:.0f} ms, p99 {fl['p99']:.0f} ms")
    if dl:
        lines.append(f"capture-to-decision, all cameras: p50 {dl['p50']:.0f} ms, p99 {dl['p99']:.0f} ms")
    df = r["deciding_frame_latency_ms"]
    if df:  # every frame a decision could have come from: many more samples than the decisions themselves
        lines.append(
            f"capture-to-processed, frames with a face being decided: p50 {df['p50']:.0f} ms, "
            f"p99 {df['p99']:.0f} ms over {df['n']:.0f} frames"
        )
    return "\n".join(lines + _stage_lines(r["stages_ms"]) + _cpu_lines(r["cpu"]))


def _stage_lines(stages: dict[str, dict[str, float]]) -> list[str]:
    return ["stage          p50 ms    p99 ms"] + [
        f"  {stage:<12}{q['p50']:>8.2f}  {q['p99']:>8.2f}" for stage, q in stages.items() if q
    ]


def _cpu_lines(cpu: dict[str, dict[str, float]]) -> list[str]:
    return [f"cpu {name}: {c['core_share']:.1%} of a core (over {c['over_s']:.0f} s)" for name, c in cpu.items()]


def run_obvious_loop(cfg: KioskConfig, video: Path) -> dict[str, Any]:
    """The loop a user writes with insightface: detect 640x640, norm_crop + embed per face, match."""
    try:
        from insightface.model_zoo import get_model
        from insightface.utils.face_align import norm_crop
    except ImportError:
        raise UsageError(
            "--compare insightface needs the insightface package (uv sync installs it with the dev "
            "group; pip: pip install --no-deps insightface)"
        ) from None
    from kiosk.pipeline.policy import DecisionPolicy
    from kiosk.pipeline.tracking import Tracker
    from kiosk.vision.engine import FaceEngine
    from kiosk.vision.models import runtime

    engine = FaceEngine.from_config(cfg)  # for the pack's file paths and the gallery's model id
    providers = runtime.plan_providers(cfg.models.providers).providers
    det = get_model(str(engine.pack.detector.path), providers=providers)
    det.prepare(-1, input_size=(640, 640), det_thresh=cfg.models.det_threshold)
    rec = get_model(str(engine.pack.recognizer.path), providers=providers)
    rec.prepare(-1)
    with open_gallery(cfg) as gallery:
        matrix = gallery.matrix(engine.model_id, engine.dim)
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise UsageError(f"--video {video}: cannot open")
    policy, tracker = DecisionPolicy(cfg.policy), Tracker(CAMERA, max_age_s=cfg.policy.track_max_age_s)
    fps_src = cap.get(cv2.CAP_PROP_FPS) or 30.0
    frames = faces_total = 0
    accepted: set[str] = set()
    t0 = time.perf_counter()
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        boxes, kpss = det.detect(frame, input_size=(640, 640))
        feats = [rec.get_feat(norm_crop(frame, kps))[0] for kps in kpss]
        matches = []
        for feat in feats:
            feat = feat / np.linalg.norm(feat)
            matches.append(matrix.search(feat[None, :])[0])
        frames += 1
        faces_total += len(boxes)
        # The same tracking and decision rules, on every face of every frame.
        from kiosk.vision.faces import Faces

        faces = Faces(
            boxes[:, :4].astype(np.float32),
            boxes[:, 4].astype(np.float32),
            np.asarray(kpss, np.float32).reshape(-1, 5, 2),
        )
        keep = faces.widths >= cfg.policy.min_face_px
        tracks, _ = tracker.update(faces[keep], frames / fps_src)
        for track, match in zip(tracks, [m for m, k in zip(matches, keep, strict=True) if k], strict=True):
            d = policy.observe(track, GATE, match, time.time(), frames)
            if d is not None and d.type == "accept" and d.subject_id:
                accepted.add(d.subject_id)
    seconds = time.perf_counter() - t0
    return {
        "frames": frames,
        "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 2) if seconds else 0.0,
        "faces_per_frame": round(faces_total / frames, 3) if frames else 0.0,
        "accepted": sorted(accepted),
    }


def _check_video(cfg: KioskConfig, video: Path) -> None:
    if not video.is_file():
        raise UsageError(f"--video {video}: no such file")
    probe = cv2.VideoCapture(str(video))
    ok = probe.isOpened() and probe.read()[0]
    probe.release()
    if not ok:
        raise UsageError(f"--video {video}: not a video OpenCV can read")
    open_gallery(cfg, create=False).close()  # the gallery to match against must exist


def run_bench(cfg: KioskConfig, video: Path, compare: str | None, realtime: bool = False) -> dict[str, Any]:
    _check_video(cfg, video)
    result = run_pipeline(cfg, video, realtime=realtime)
    result["video"] = str(video)
    if compare == "insightface":
        ref = run_obvious_loop(cfg, video)
        result["compare"] = {
            "insightface": ref,
            "ratio": round(result["fps"] / ref["fps"], 2) if ref["fps"] else None,
            **compare_accepts(result["accepted"], ref["accepted"]),
        }
    return result


def compare_accepts(pipeline: list[str], reference: list[str]) -> dict[str, Any]:
    """The two runs' accepted subjects compared both ways: an extra accept of ours is as much a difference
    as a lost one, and two runs that accepted nobody agree on nothing worth reporting as agreement."""
    ours, theirs = set(pipeline), set(reference)
    return {
        "same_accepted_subjects": ours == theirs and bool(ours),
        "accepted_by_both": sorted(ours & theirs),
        "accepted_only_by_pipeline": sorted(ours - theirs),
        "accepted_only_by_reference": sorted(theirs - ours),
    }


def format_text(r: dict[str, Any]) -> str:
    lines = [
        f"video {r['video']} ({r['mode']}): {r['frames']} frames processed in {r['seconds']:.2f} s = "
        f"{r['fps']:.1f} fps ({r['faces_per_frame']:.2f} faces/frame), providers {', '.join(r['providers'])}",
        f"dropped: {r['dropped']['capture']} at the capture, {r['dropped']['verifier_stale']} stale at the verifier",
    ] + _stage_lines(r["stages_ms"])
    fl = r["frame_latency_ms"]
    if fl:
        lines.append(f"capture-to-processed per frame: p50 {fl['p50']:.0f} ms, p99 {fl['p99']:.0f} ms")
    dl = r["decision_latency_ms"]
    lines.append(
        f"decisions: {len(r['decisions'])} "
        f"({sum(d['type'] == 'accept' for d in r['decisions'])} accept), accepted {r['accepted']}"
        + (f"; capture-to-decision p50 {dl['p50']:.0f} ms, p99 {dl['p99']:.0f} ms" if dl else "")
    )
    lines += _cpu_lines(r.get("cpu", {}))
    if "compare" in r:
        c = r["compare"]
        ref = c["insightface"]
        lines.append(
            f"insightface loop: {ref['frames']} frames in {ref['seconds']:.2f} s = {ref['fps']:.1f} fps; "
            f"accepted {ref['accepted']}"
        )
        lines.append(
            f"ratio: {c['ratio']}x; same accepted subjects: {c['same_accepted_subjects']} "
            f"(both {c['accepted_by_both']}, only the pipeline {c['accepted_only_by_pipeline']}, "
            f"only the reference {c['accepted_only_by_reference']})"
        )
    return "\n".join(lines)


def main_bench(
    cfg: KioskConfig,
    video: Path,
    compare: str | None,
    as_json: bool,
    realtime: bool = False,
    cameras: int = 0,
    busy: int = 0,
) -> int:
    if cameras:
        _check_video(cfg, video)
        result = run_cameras(cfg, video, cameras, busy)
        print(json.dumps(result) if as_json else format_cameras(result))
        return 0
    result = run_bench(cfg, video, compare, realtime)
    print(json.dumps(result) if as_json else format_text(result))
    return 0


def run_search_scale(sizes: list[int], dim: int = 512, queries: int = 200) -> dict[str, Any]:
    """1:N search time per query against synthetic galleries of each size (one template per subject)."""
    from kiosk.store.gallery import GalleryMatrix

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        emb = rng.standard_normal((n, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ids = [f"s{i}" for i in range(n)]
        t0 = time.perf_counter()
        matrix = GalleryMatrix("synthetic", dim, ids, ids, emb, np.arange(n), 0).prepare()
        build_s = time.perf_counter() - t0
        picks = rng.choice(n, queries)
        q = emb[picks] + rng.standard_normal((queries, dim)).astype(np.float32) / np.float32(np.sqrt(dim))
        q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        matrix.search(q[:1])
        times, hits = [], 0
        for i in range(queries):
            t = time.perf_counter()
            (m,) = matrix.search(q[i : i + 1])
            times.append((time.perf_counter() - t) * 1000)
            hits += m.subject_id == ids[picks[i]]
        t = time.perf_counter()
        for i in range(min(queries, 50)):
            (q[i : i + 1] @ emb.T).argmax()
        full_ms = (time.perf_counter() - t) / min(queries, 50) * 1000
        rows.append(
            {
                "templates": n,
                "p50_ms": round(float(np.percentile(times, 50)), 3),
                "p99_ms": round(float(np.percentile(times, 99)), 3),
                "full_scan_ms": round(full_ms, 3),
                "prefilter": matrix.prefiltered,
                "build_s": round(build_s, 3),
                "top1_correct": hits / queries,
            }
        )
    return {"search_scale": rows, "dim": dim, "queries": queries}


def run_flight_scale(
    passengers: int, enrolled: int, dim: int = 512, queries: int = 200, threshold: float = 0.40, margin: float = 0.06
) -> dict[str, Any]:
    """Matching at a gate boarding a flight of `passengers` inside an airport gallery of `enrolled`
    (synthetic templates, one per subject), next to plain 1:N against everyone: per query, the flight's
    passenger (1:few), someone enrolled for another flight (1:few finds nobody, then the whole gallery is
    searched for the wrong-flight check) and a stranger (both searches, nobody found)."""
    from kiosk.boarding.gates import GateFlights
    from kiosk.store.gallery import GalleryMatrix

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((enrolled, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"s{i}" for i in range(enrolled)]
    full = GalleryMatrix("synthetic", dim, ids, ids, emb, np.arange(enrolled), 0).prepare()
    t0 = time.perf_counter()
    view = GateFlights.build(full, {"A1": "F1"}, {"F1": set(ids[:passengers])}, False)
    build_ms = (time.perf_counter() - t0) * 1000

    def ok(m: Any) -> bool:
        return m.subject_id is not None and m.score >= threshold and m.margin >= margin

    # (the draws from rng in this order: the figures of a run are the same every time)
    on_flight = rng.choice(passengers, queries)
    elsewhere = rng.choice(np.arange(passengers, enrolled), queries) if enrolled > passengers else None
    full.search(_synthetic_queries(rng, emb, on_flight, queries, dim)[:1])  # warm-up
    cases = [
        ("passenger_at_their_gate", _synthetic_queries(rng, emb, on_flight, queries, dim), True, on_flight),
        ("passenger_at_their_gate_1toN", _synthetic_queries(rng, emb, on_flight, queries, dim), False, on_flight),
        ("stranger", _synthetic_queries(rng, emb, None, queries, dim), True, None),
    ]
    if elsewhere is not None:
        cases.insert(
            2, ("other_flight_passenger", _synthetic_queries(rng, emb, elsewhere, queries, dim), True, elsewhere)
        )
    rows: dict[str, Any] = {}
    for name, q, flight, truth in cases:
        times, found = _timed_searches(q, full, view if flight else None, ok)
        rows[name] = _case_row(times, found, truth, ids, ok)
    return {
        "flight_scale": {
            "passengers": passengers,
            "enrolled": enrolled,
            "dim": dim,
            "queries": queries,
            "flight_view_build_ms": round(build_ms, 2),
            "cases": rows,
        }
    }


def _synthetic_queries(
    rng: np.random.Generator, emb: np.ndarray, picks: np.ndarray | None, queries: int, dim: int
) -> np.ndarray:
    """Unit-length queries: noisy copies of the picked subjects' templates, or (picks None) strangers."""
    base = emb[picks] if picks is not None else rng.standard_normal((queries, dim)).astype(np.float32)
    q = base + rng.standard_normal((queries, dim)).astype(np.float32) / np.float32(np.sqrt(dim)) * (
        1.0 if picks is not None else 0.0
    )
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _timed_searches(
    queries: np.ndarray, full: GalleryMatrix, view: GateFlights | None, ok: Callable[[Any], bool]
) -> tuple[list[float], list[Any]]:
    """Each query's search time (ms) and best match. With the gate's flight view: 1:few, then where that finds
    nobody the whole gallery, as the verifier does (is it someone on another flight?); without: plain 1:N."""
    times, found = [], []
    for i in range(len(queries)):
        t = time.perf_counter()
        if view is not None:
            (m,) = view.matrix_for("A1").search(queries[i : i + 1])
            if not ok(m):
                (m,) = full.search(queries[i : i + 1])
        else:
            (m,) = full.search(queries[i : i + 1])
        times.append((time.perf_counter() - t) * 1000)
        found.append(m)
    return times, found


def _case_row(
    times: list[float], found: list[Any], truth: np.ndarray | None, ids: list[str], ok: Callable[[Any], bool]
) -> dict[str, Any]:
    """One case's figures: latency quantiles, and the share identified right (known subjects) or matched at all
    (strangers: a false match)."""
    right = [
        ok(m) and truth is not None and m.subject_id == ids[t]
        for m, t in zip(found, truth if truth is not None else [0] * len(found), strict=True)
    ]
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3),
        "identified": round(sum(right) / len(found), 3) if truth is not None else None,
        "false_match": round(sum(ok(m) for m in found) / len(found), 3) if truth is None else None,
    }
