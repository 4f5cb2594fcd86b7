"""`kiosk verify`: frames in, gate decisions out.

Each step takes at most one frame per camera (the newest for a real-time
camera, the next one for a replay), detects faces in one batch across
cameras, tracks them per camera, embeds only faces of undecided tracks
that pass the quality gate (one batch), matches them against the gallery
and lets the policy decide. Decisions go out on `event.<gate>` and into the
audit JSONL; heartbeats on `health.verifier`; claims arrive on the control
socket; gallery changes are picked up by polling its revision.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zmq

from kiosk.cli_support import serve
from kiosk.config import KioskConfig
from kiosk.engine import FaceEngine
from kiosk.errors import ConfigError
from kiosk.faces import Faces
from kiosk.gallery import Gallery, GalleryMatrix
from kiosk.messages import (EOF_TOPIC, FRAME_TOPIC, HEALTH_TOPIC, BadMessage, Event, FrameHeader, decode_frame,
                            decode_json, encode_json)
from kiosk.metrics import VerifierMetrics
from kiosk.metrics import serve as serve_metrics
from kiosk.models.recognizer import align_faces
from kiosk.policy import Decision, DecisionPolicy
from kiosk.quality import measure
from kiosk.tracking import Track, Tracker
from kiosk.transport import FRAME_HWM, Transport

log = logging.getLogger(__name__)

GALLERY_POLL_S = 1.0
REPLAY_BACKLOG = 8
RECHECK_EVERY = 10  # frames of a decided track between identity checks
SAME_PERSON = 0.25  # a track whose new face scores below this against its last one is someone else
BAD_LOG_EVERY_S = 10.0
CAMERA_SILENT_S = 3.0  # a camera with no frame for this long is reported down


@dataclass
class CameraState:
    camera_id: str
    gate_id: str
    realtime: bool
    tracker: Tracker
    pending: deque = field(default_factory=deque)
    frames_in: int = 0
    processed: int = 0
    stale: int = 0
    eof: bool = False
    last_clock: float = 0.0  # frame clock (media or capture time) of the last frame
    last_wall: float = 0.0  # when that frame was processed
    last_frame_at: float = 0.0  # wall time the last frame arrived
    capture_status: str = ""  # what the capture's last health message said ("ok", "reconnecting", "eof")
    capture_error: str = ""

    def state(self, now: float) -> tuple[str, str]:
        """("up" | "down" | "ended", why): what an operator needs to know about this camera now."""
        if self.eof:
            return "ended", "end of the file source"
        if self.capture_status == "reconnecting":
            return "down", self.capture_error or "the capture is reconnecting to the camera"
        if not self.last_frame_at:
            return "down", "no frame received yet (is its capture running?)"
        silent = now - self.last_frame_at
        if silent > CAMERA_SILENT_S:
            return "down", f"no frame for {silent:.0f} s" + (f" (last error: {self.capture_error})"
                                                           if self.capture_error else "")
        return "up", ""


@dataclass
class StageTimes:
    """Milliseconds per stage of the last step (for bench and metrics)."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, ms: float) -> None:
        self.values[stage] = self.values.get(stage, 0.0) + ms


class Verifier:
    def __init__(self, cfg: KioskConfig, engine: FaceEngine | None = None) -> None:
        if not cfg.cameras:
            raise ConfigError(f"{cfg.source or 'config'}: cameras: the verifier needs at least one camera")
        self.cfg = cfg
        self.engine = engine or FaceEngine.from_config(cfg)
        self.gallery = Gallery(cfg.resolve(cfg.gallery.path))
        self.matrix = self.gallery.matrix(self.engine.model_id, self.engine.dim).prepare()
        self._loader: threading.Thread | None = None
        self._loaded: GalleryMatrix | None = None
        self.policy = DecisionPolicy(cfg.policy)
        self.cameras = {c.id: CameraState(c.id, c.gate, c.realtime,
                                          Tracker(c.id, max_age_s=cfg.policy.track_max_age_s))
                        for c in cfg.cameras}
        self.metrics = VerifierMetrics({c.id: c.gate for c in cfg.cameras})
        self.metrics.gallery_stale.set_function(lambda: 1.0 if self._gallery_error else 0.0)
        self.metrics.watch_cameras(lambda cam_id: self.cameras[cam_id].state(time.time())[0] != "down",
                                   self.cameras)
        self.transport = Transport(cfg, role="verifier")
        self.frames = self.transport.frame_receiver()
        self.events = self.transport.event_publisher()
        self.control = self.transport.control_server()
        audit_path = cfg.resolve(cfg.audit.path)
        audit_path.parent.mkdir(parents=True, exist_ok=True)
        self._recall_accepts(audit_path)
        self.audit: TextIO = open(audit_path, "a", encoding="utf-8")
        self._stop = threading.Event()
        self._gallery_error = ""  # why the search matrix may be behind the gallery (a failed reload)
        self._bad = 0
        self._last_bad_log = 0.0
        self._last_error = ""
        self._last_heartbeat = 0.0
        self._last_gallery_poll = time.monotonic()
        self._fps_window: deque = deque(maxlen=20000)
        self.faces_total = 0
        self._step_count = 0
        self.first_captured_at: float | None = None
        self.last_done_at: float | None = None
        self._metrics_server = serve_metrics(self.metrics.registry, cfg.metrics.port) if cfg.metrics.port else None
        self.metrics.gallery_subjects.set(len(self.matrix))
        self.metrics.gallery_templates.set(self.matrix.template_count)
        for prov in self.engine.providers:
            self.metrics.provider_info.labels(provider=prov).set(1)
        log.info("verifier ready: %d camera(s), gallery %d subjects / %d templates, %s", len(self.cameras),
                 len(self.matrix), self.matrix.template_count, self.engine.provider_note)
        if not len(self.matrix):
            log.warning("gallery %s has no subject for this model: every passenger will be rejected until "
                        "someone is enrolled", self.gallery.path)

    def _recall_accepts(self, audit_path: Path, tail_bytes: int = 1 << 20) -> None:
        """Remember the recent accepts of a previous run (the audit log's tail), so a verifier restarted
        while a passenger is still in view does not open the gate for them twice."""
        if not audit_path.exists():
            return
        horizon = time.time() - self.cfg.policy.repeat_accept_s
        with open(audit_path, "rb") as fh:
            fh.seek(max(0, audit_path.stat().st_size - tail_bytes))
            lines = fh.read().decode("utf-8", "replace").splitlines()
        recalled = 0
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut by the tail window or a crash mid-write
            if (isinstance(e, dict) and e.get("type") == "accept" and isinstance(e.get("captured_at"), (int, float))
                    and e["captured_at"] >= horizon and e.get("subject_id")):
                self.policy.remember_accept(str(e.get("gate_id")), str(e["subject_id"]), float(e["captured_at"]))
                recalled += 1
        if recalled:
            log.info("recalled %d accept(s) of the last %.0fs from %s", recalled, self.cfg.policy.repeat_accept_s,
                     audit_path)

    # -- lifecycle -------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        self._heartbeat(force=True)
        while not self._stop.is_set():
            self.step(timeout_ms=50)
        return 0

    def close(self) -> None:
        for cam in self.cameras.values():
            self._end_tracks(cam, cam.tracker.end_all(), time.time())
        lat = self.metrics.recent_frame.quantiles()
        dec = self.metrics.recent_decision.quantiles()
        log.info("verifier stopping: %d frames processed (%d stale dropped), %d bad messages; frame latency "
                 "p50 %.0f ms p99 %.0f ms; decision latency p50 %.0f ms p99 %.0f ms over %d decisions",
                 sum(c.processed for c in self.cameras.values()), sum(c.stale for c in self.cameras.values()),
                 self._bad, lat.get("p50", 0), lat.get("p99", 0), dec.get("p50", 0), dec.get("p99", 0),
                 int(dec.get("n", 0)))
        self._heartbeat(force=True, status="stopping")
        self.audit.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.gallery.close()
        self.transport.close()

    # -- the loop --------------------------------------------------------------
    def step(self, timeout_ms: int = 50) -> None:
        poller = zmq.Poller()
        poller.register(self.frames, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        ready = dict(poller.poll(0 if self._has_pending() else timeout_ms))
        if self.control in ready:
            self._handle_control()
        if self.frames in ready or self._has_pending():
            self._drain()
        batch = self._take_batch()
        if batch:
            self._process(batch)
        now = time.time()
        self._housekeeping(now)

    def _has_pending(self) -> bool:
        return any(cam.pending for cam in self.cameras.values())

    def _drain(self) -> None:
        """Read waiting messages; real-time cameras keep only their newest frame."""
        budget = FRAME_HWM + 2 * len(self.cameras)
        while budget > 0:
            if any(len(c.pending) >= REPLAY_BACKLOG for c in self.cameras.values() if not c.realtime):
                break  # back-pressure: leave the rest in the socket, the capture waits
            try:
                parts = self.frames.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            budget -= 1
            self._receive([p.bytes if i < 2 else p.buffer for i, p in enumerate(parts)])

    def _bad_message(self, why: str) -> None:
        self._bad += 1
        self._last_error = why
        self.metrics.bad_messages.inc()
        now = time.monotonic()
        if now - self._last_bad_log >= BAD_LOG_EVERY_S:
            self._last_bad_log = now
            log.warning("dropped a malformed message (%d so far): %s", self._bad, why)

    def _receive(self, parts: list[Any]) -> None:
        topic = bytes(parts[0]).decode("utf-8", "replace") if parts else ""
        try:
            if topic.startswith(FRAME_TOPIC):
                header, image = decode_frame(parts)
                cam = self.cameras.get(header.camera_id)
                if cam is None:
                    raise BadMessage(f"frame from unknown camera {header.camera_id!r}")
                cam.frames_in += 1
                cam.last_frame_at = time.time()
                self.metrics.frames_in.labels(camera=cam.camera_id).inc()
                if cam.realtime and cam.pending:
                    cam.stale += len(cam.pending)
                    self.metrics.frames_stale.labels(camera=cam.camera_id).inc(len(cam.pending))
                    cam.pending.clear()
                cam.pending.append((header, image, time.time()))
            elif topic.startswith(HEALTH_TOPIC):
                _, body = decode_json(parts, "health")
                cam_id = str(body.get("camera_id", ""))
                if cam_id not in self.cameras or topic != f"{HEALTH_TOPIC}capture.{cam_id}":
                    raise BadMessage(f"health message {topic[:60]!r} is not from a configured camera")
                self.events.send_multipart(encode_json(topic, body))  # relay capture health
                cam = self.cameras[cam_id]
                cam.capture_status = str(body.get("status", ""))[:40]
                cam.capture_error = str(body.get("last_error", ""))[:300]
                self.metrics.captures.update(cam_id, body)
            elif topic.startswith(EOF_TOPIC):
                _, body = decode_json(parts, "eof")
                cam = self.cameras.get(str(body.get("camera_id")))
                if cam is None:
                    raise BadMessage(f"eof from unknown camera {body.get('camera_id')!r}")
                cam.pending.append(("eof", None, time.time()))
            else:
                raise BadMessage(f"unknown topic {topic[:40]!r}")
        except (BadMessage, ValueError, TypeError, OverflowError, RecursionError) as exc:
            self._bad_message(f"{exc.__class__.__name__}: {exc}"[:300])

    def _take_batch(self) -> list[tuple[CameraState, FrameHeader, np.ndarray, float]]:
        batch = []
        for cam in self.cameras.values():
            while cam.pending:
                header, image, received = cam.pending.popleft()
                if header == "eof":
                    cam.eof = True
                    self._end_tracks(cam, cam.tracker.end_all(), time.time())
                    log.info("camera %s: end of source; %d frames processed", cam.camera_id, cam.processed)
                    continue
                batch.append((cam, header, image, received))
                break
        return batch

    def _process(self, batch: list[tuple[CameraState, FrameHeader, np.ndarray, float]]) -> StageTimes:
        times = StageTimes()
        now = time.time()
        times.add("transport", max(max(0.0, (received - header.captured_at) * 1000)
                                    for _, header, _, received in batch))
        t0 = time.perf_counter()
        images = [img for _, _, img, _ in batch]
        found = self.engine.detector.detect_batch(images)
        t1 = time.perf_counter()
        times.add("detect", (t1 - t0) * 1000)
        todo: list[tuple[CameraState, FrameHeader, Track, int]] = []
        crops_all: list[np.ndarray] = []
        widths: list[float] = []
        clock = time.perf_counter
        for (cam, header, image, _), faces in zip(batch, found):
            cam.processed += 1
            self.metrics.frames_processed.labels(camera=cam.camera_id).inc()
            self.metrics.faces.labels(camera=cam.camera_id).inc(len(faces))
            self._fps_window.append(now)
            cam.last_clock, cam.last_wall = header.clock, now
            t = clock()
            faces = faces[faces.widths >= self.cfg.policy.min_face_px]
            tracks, ended = cam.tracker.update(faces, header.clock)
            times.add("track", (clock() - t) * 1000)
            t = clock()
            self._end_tracks(cam, ended, now)
            times.add("publish", (clock() - t) * 1000)
            # Undecided tracks every frame; decided ones now and then, to notice a new person in their place.
            want = [i for i, tr in enumerate(tracks)
                    if self.policy.needs_frames(tr) or tr.hits % RECHECK_EVERY == 0]
            if not want:
                continue
            t = clock()
            sel = faces[np.asarray(want)]
            crops = align_faces(image, sel.kps)
            t_quality = clock()
            ok = self.policy.quality_ok(measure(sel, crops))
            times.add("align", (t_quality - t) * 1000)
            times.add("quality", (clock() - t_quality) * 1000)
            for k, i in enumerate(want):
                if ok[k]:
                    todo.append((cam, header, tracks[i], len(crops_all)))
                    crops_all.append(crops[k])
                    widths.append(float(sel.widths[k]))
        t = clock()
        cap = self.cfg.policy.max_embeddings_per_frame
        if cap and len(todo) > cap:
            todo, crops_all = self._ration(todo, crops_all, widths, cap)
        for _, _, track, _ in todo:
            track.last_embedded = self._step_count
        self._step_count += 1
        t2 = clock()
        times.add("select", (t2 - t) * 1000)
        if todo:
            emb = self.engine.recognizer.embed(np.stack(crops_all))
            t3 = time.perf_counter()
            times.add("embed", (t3 - t2) * 1000)
            for cam, header, track, idx in todo:
                if track.embedding is not None and float(emb[idx] @ track.embedding) < SAME_PERSON:
                    log.info("camera %s: track %d changed person; starting a new transaction", cam.camera_id,
                             track.track_id)
                    new = cam.tracker.split(track, header.clock)
                    self._end_tracks(cam, [track], now)
                    track = new
                track.embedding = emb[idx]
                if not self.policy.needs_frames(track):
                    continue
                t_match = time.perf_counter()
                claim = self.policy.claim_for(track, cam.gate_id, now)
                match = self.matrix.search(emb[idx:idx + 1], only=claim.subject_id if claim else None)[0]
                t_decide = time.perf_counter()
                decision = self.policy.observe(track, cam.gate_id, match, header.captured_at, header.seq,
                                               clock=header.clock)
                t_publish = time.perf_counter()
                times.add("match", (t_decide - t_match) * 1000)
                times.add("decide", (t_publish - t_decide) * 1000)
                if decision is not None:
                    self._publish(cam, track, decision)
                    times.add("publish", (time.perf_counter() - t_publish) * 1000)
        done = time.time()
        self.faces_total += sum(len(f) for f in found)
        if self.first_captured_at is None:
            self.first_captured_at = min(h.captured_at for _, h, _, _ in batch)
        self.last_done_at = done
        for _, header, _, _ in batch:
            self.metrics.observe_frame((done - header.captured_at) * 1000)
        for stage, ms in times.values.items():
            self.metrics.observe_stage(stage, ms)
        return times

    def _ration(self, todo: list, crops: list[np.ndarray], widths: list[float], cap: int) -> tuple[list, list]:
        """Keep `cap` faces to embed this step: undecided tracks first, the longest-waiting first, then the
        largest face (the passenger at the front). Bounds a step's time when a crowd walks in."""
        def priority(k: int) -> tuple:
            track = todo[k][2]
            return (not self.policy.needs_frames(track), track.last_embedded, -widths[k])

        keep = sorted(range(len(todo)), key=priority)[:cap]
        self.metrics.embeddings_deferred.inc(len(todo) - cap)
        new_todo = [(c, h, t, j) for j, (c, h, t, _) in enumerate(todo[k] for k in keep)]
        return new_todo, [crops[k] for k in keep]

    def _end_tracks(self, cam: CameraState, tracks: list[Track], now: float) -> None:
        for track in tracks:
            decision = self.policy.track_ended(track)
            if decision is not None:
                self._publish(cam, track, decision)

    def _confirm(self, d: Decision) -> Decision:
        """An accept only for a subject enrolled and unexpired right now, asked of the gallery itself (one
        indexed read): a removal or expiry counts even while the search matrix is stale (a failed reload).
        Fail closed: a gallery that cannot answer turns the accept into a reject."""
        if d.type != "accept" or d.subject_id is None:
            return d
        try:
            if self.gallery.enrolled(d.subject_id):
                return d
            reason = "not_enrolled"
            log.warning("track matched %s, who is no longer enrolled (or expired): rejected", d.subject_id)
        except Exception as exc:  # noqa: BLE001 - any gallery failure must reject, never accept
            reason = "gallery_unavailable"
            self._last_error = f"gallery: {exc}"
            log.error("cannot confirm %s in the gallery (%s): rejected", d.subject_id, exc)
        return dataclasses.replace(d, type="reject", reason=reason)

    def _publish(self, cam: CameraState, track: Track, d: Decision) -> Event:
        d = self._confirm(d)
        decided_at = time.time()
        event = Event(type=d.type, gate_id=cam.gate_id, camera_id=cam.camera_id, track_id=track.track_id,
                      subject_id=d.subject_id, display_name=d.display_name,
                      score=None if d.score is None else round(d.score, 4),
                      threshold=self.cfg.policy.accept_threshold, reason=d.reason, frames=d.frames,
                      captured_at=d.captured_at, decided_at=decided_at,
                      latency_ms=round((decided_at - d.captured_at) * 1000, 1), seq=d.seq)
        self.events.send_multipart([event.topic(), event.to_json()])
        self.audit.write(event.to_json().decode() + "\n")
        self.audit.flush()
        self.metrics.decisions.labels(gate=cam.gate_id, type=d.type, reason=d.reason or "").inc()
        self.metrics.observe_decision(cam.gate_id, event.latency_ms or 0.0)
        log.info("%s gate=%s camera=%s track=%d subject=%s score=%s reason=%s frames=%d latency=%.0fms",
                 d.type.upper(), cam.gate_id, cam.camera_id, track.track_id, d.subject_id, event.score, d.reason,
                 d.frames, event.latency_ms or 0.0)
        return event

    # -- periodic --------------------------------------------------------------
    def _housekeeping(self, now: float) -> None:
        for cam in self.cameras.values():
            # The frame clock now: a live camera's runs with the wall clock, a replay's only with its frames.
            clock = cam.last_clock + (now - cam.last_wall if cam.realtime and cam.last_wall else 0.0)
            for track in cam.tracker.tracks:
                decision = self.policy.check_timeout(track, clock)
                if decision is not None:
                    self._publish(cam, track, decision)
            if cam.realtime and not cam.pending and cam.tracker.tracks and cam.last_wall:
                # No frames (camera gone or stalled): let tracks age out as the frame clock would.
                _, ended = cam.tracker.update(Faces.empty(), cam.last_clock + (now - cam.last_wall))
                self._end_tracks(cam, ended, now)
        if self._loader is not None and not self._loader.is_alive():
            self._loader.join()
            self._adopt()
        mono = time.monotonic()
        if mono - self._last_gallery_poll >= GALLERY_POLL_S:
            self._last_gallery_poll = mono
            self._reload_gallery()
        self._heartbeat()

    def _reload_gallery(self, wait: bool = False) -> None:
        """Pick up gallery changes. The new matrix is built in a thread (a large one takes a second) and
        swapped in when ready, so frames keep flowing; `wait` blocks until it is in."""
        loader = self._loader
        if loader is not None:
            if loader.is_alive() and not wait:
                return
            loader.join()
            self._adopt()
        try:
            revision = self.gallery.revision()
        except Exception as exc:  # noqa: BLE001 - a locked or broken DB must not stop the gate
            self._last_error = self._gallery_error = f"gallery: {exc}"
            log.warning("gallery revision check failed: %s", exc)
            return
        expired = self.matrix.next_expiry is not None and time.time() >= self.matrix.next_expiry
        if revision == self.matrix.revision and not expired:
            return
        self._loader = threading.Thread(target=self._load_matrix, name="gallery-loader", daemon=True)
        self._loader.start()
        if wait:
            self._loader.join()
            self._adopt()

    def _load_matrix(self) -> None:
        try:
            with Gallery(self.gallery.path) as gallery:  # its own connection: this runs in a thread
                self._loaded = gallery.matrix(self.engine.model_id, self.engine.dim).prepare()
        except Exception as exc:  # noqa: BLE001 - keep serving the old matrix
            self._last_error = self._gallery_error = f"gallery reload: {exc}"
            log.warning("gallery reload failed, keeping revision %d: %s", self.matrix.revision, exc)

    def _adopt(self) -> None:
        loaded, self._loaded, self._loader = self._loaded, None, None
        if loaded is None:
            return
        self.matrix = loaded
        self._gallery_error = ""
        self.metrics.gallery_subjects.set(len(loaded))
        self.metrics.gallery_templates.set(loaded.template_count)
        log.info("gallery reloaded: revision %d, %d subjects, %d templates", loaded.revision, len(loaded),
                 loaded.template_count)

    def status(self) -> dict[str, Any]:
        now = time.time()
        fps = sum(1 for t in self._fps_window if now - t <= 5.0) / 5.0
        states = {c.camera_id: c.state(now) for c in self.cameras.values()}
        down = sorted(cid for cid, (state, _) in states.items() if state == "down")
        return {
            "component": "verifier", "status": "degraded" if down else "ok", "cameras_down": down,
            "pid": os.getpid(), "providers": self.engine.providers,
            "fps": round(fps, 2), "drops": sum(c.stale for c in self.cameras.values()),
            "queue_depth": sum(len(c.pending) for c in self.cameras.values()),
            "bad_messages": self._bad, "last_error": self._last_error,
            "frame_latency_ms": self.metrics.recent_frame.quantiles(),
            "stages_ms": {stage: window.quantiles() for stage, window in self.metrics.recent_stage.items()},
            "frames_processed": sum(c.processed for c in self.cameras.values()),
            "faces_detected": self.faces_total,
            "first_captured_at": self.first_captured_at, "last_done_at": self.last_done_at,
            "decision_latency_ms": self.metrics.recent_decision.quantiles(),
            "gallery": {"subjects": len(self.matrix), "templates": self.matrix.template_count,
                        "stale": bool(self._gallery_error), "error": self._gallery_error,
                        "revision": self.matrix.revision},
            "cameras": {c.camera_id: {"gate_id": c.gate_id, "state": states[c.camera_id][0],
                                      "last_error": states[c.camera_id][1], "frames_in": c.frames_in,
                                      "processed": c.processed, "dropped": c.stale, "eof": c.eof,
                                      "tracks": len(c.tracker.tracks),
                                      "last_frame_age_s": round(now - c.last_frame_at, 1) if c.last_frame_at
                                      else None}
                        for c in self.cameras.values()},
            "claims": {g: c.subject_id for g, c in self.policy.claims.items()},
        }

    def _heartbeat(self, force: bool = False, status: str | None = None) -> None:
        mono = time.monotonic()
        if not force and mono - self._last_heartbeat < self.cfg.heartbeat.interval_s:
            return
        self._last_heartbeat = mono
        body = self.status()
        if status is not None:
            body["status"] = status
        body["sent_at"] = time.time()
        self.events.send_multipart(encode_json(HEALTH_TOPIC + "verifier", body))

    def _handle_control(self) -> None:
        try:
            request = json.loads(self.control.recv())
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            reply = self._control(request)
        except (ValueError, RecursionError) as exc:
            self._bad_message(f"control: {exc}"[:300])
            reply = {"ok": False, "error": f"bad request: {exc}"}
        self.control.send_json(reply)

    def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "claim":
            gate, subject = req.get("gate_id"), req.get("subject_id")
            ttl = req.get("ttl_s", self.cfg.policy.claim_ttl_s)
            gates = {c.gate_id for c in self.cameras.values()}
            if not isinstance(gate, str) or gate not in gates:
                return {"ok": False, "error": f"unknown gate {gate!r} (gates: {sorted(gates)})"}
            if not isinstance(subject, str) or subject not in self.matrix.subject_ids:
                self._reload_gallery(wait=True)
                if subject not in self.matrix.subject_ids:
                    return {"ok": False, "error": f"subject {subject!r} is not enrolled"}
            if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl <= 86400:
                return {"ok": False, "error": "ttl_s must be a number of seconds from 0 to 86400"}
            claim = self.policy.add_claim(gate, subject, float(ttl), time.time())
            return {"ok": True, "gate_id": gate, "subject_id": subject, "expires_at": claim.expires_at}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def run_verifier(cfg: KioskConfig) -> int:
    return serve(Verifier(cfg))
