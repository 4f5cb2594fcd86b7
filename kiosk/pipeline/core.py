"""The verifier's core: frames in, decisions out, with no sockets, files or threads.

`offer()` queues what arrived per camera (a real-time camera keeps only its
newest frame; an end-of-source marker is never dropped with stale frames),
`step(now)` takes at most one frame per camera and runs the named stages on
all of them at once, `tick(now)` applies the clock (decision timeouts,
tracks ageing out when a camera stalls), `control()` takes claims. Each
returns the `Verdict`s it decided: plain decisions, which the gatekeeper
(`kiosk.pipeline.gatekeeper`) checks against the gallery, the boarding
store and the audit log before any gate hears of them; the service around
both (`kiosk.services.verifier`) owns the sockets, the audit log, the
gallery file and the heartbeat.

Stages of a step, each over all faces of all cameras as arrays:
detect -> track -> select (which faces need an embedding) -> align ->
quality -> ration (at most `max_embeddings_per_frame`) -> embed (one
batch) -> identity check -> match (one batched 1:N search) -> decide.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

import numpy as np

from kiosk.boarding.gates import GateFlights
from kiosk.boarding.matrix import GalleryMatrix, Match
from kiosk.config import KioskConfig
from kiosk.messaging.messages import Eof, Frame, IdleHint
from kiosk.pipeline.policy import Decision, DecisionPolicy
from kiosk.pipeline.tracking import Track, Tracker
from kiosk.vision.engine import FaceModels
from kiosk.vision.faces import Faces
from kiosk.vision.liveness import PadObservation
from kiosk.vision.models.recognizer import align_faces
from kiosk.vision.quality import measure
from kiosk.vision.scene_change import thumbnail, unchanged

log = logging.getLogger(__name__)

REPLAY_BACKLOG = 8  # frames a replay camera may have waiting before the shell stops reading (back-pressure)
RECHECK_EVERY = 10  # frames of a decided track between identity checks
RECHECK_OVERDUE = 2 * RECHECK_EVERY  # a check this late goes before undecided faces (no starvation)
SAME_PERSON = 0.25  # a track whose new face scores below this against its last one is someone else
CAMERA_SILENT_S = 3.0  # a camera with no frame for this long is reported down


Arrival = Union[Frame, Eof]


@dataclass
class CameraState:
    camera_id: str
    gate_id: str
    realtime: bool
    tracker: Tracker
    pending: deque = field(default_factory=deque)  # Frame | Eof, oldest first
    frames_in: int = 0
    processed: int = 0
    stale: int = 0  # dropped because a newer frame of the camera came
    too_old: int = 0  # dropped because it was older than policy.max_frame_age_ms
    not_boarding: int = 0  # dropped unprocessed: the gate boards no flight (boarding.require_flight)
    eof: bool = False
    last_clock: float = 0.0  # frame clock (media or capture time) of the last frame
    last_wall: float = 0.0  # when that frame was processed
    last_frame_at: float = 0.0  # wall time the last frame arrived
    capture_status: str = ""  # what the capture's last health message said ("ok", "reconnecting", "eof")
    capture_error: str = ""
    view: tuple | None = None  # (frame, face boxes, tracks) of the last frame of a watched gate (console)
    idle_skipped: int = 0  # frames not detected: empty scene, unchanged (policy.idle_change)
    idle_ref: np.ndarray | None = None  # thumbnail of the last frame detected with no face in it
    idle_ref_clock: float = 0.0  # its frame clock
    hinted_idle: bool = False  # the capture was last told its scene is empty (IdleHint)
    wakes: deque = field(default_factory=lambda: deque(maxlen=64))  # (seq, ms): a face found at an empty gate

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
            return "down", f"no frame for {silent:.0f} s" + (
                f" (last error: {self.capture_error})" if self.capture_error else ""
            )
        return "up", ""

    def frames_waiting(self) -> int:
        return sum(isinstance(item, Frame) for item in self.pending)


@dataclass(frozen=True)
class Verdict:
    """A decision of the core, with the camera and track it is about and when it was made (for the gatekeeper)."""

    camera: CameraState
    track: Track
    decision: Decision
    at: float  # wall clock of the step (or tick) that decided it
    crop: np.ndarray | None = None  # the aligned face the decision was last matched on, if any

    @property
    def track_id(self) -> int:
        return self.track.track_id


class _Count(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Counter(_Count, Protocol):
    def labels(self, **labels: str) -> _Count: ...


class _Level(Protocol):
    def set(self, value: float) -> None: ...


class _Gauge(Protocol):
    def labels(self, **labels: str) -> _Level: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class CoreMetrics(Protocol):
    """What the core counts (kiosk.services.metrics.VerifierMetrics is the real one)."""

    frames_in: _Counter
    frames_stale: _Counter
    frames_too_old: _Counter
    frames_not_boarding: _Counter
    frames_idle: _Counter
    frames_processed: _Counter
    faces: _Counter
    embeddings_deferred: _Count
    gate_boarding: _Gauge
    wake_latency: _Histogram

    def observe_frame(self, ms: float) -> None: ...
    def observe_deciding_frame(self, ms: float) -> None: ...
    def observe_stage(self, stage: str, ms: float) -> None: ...


@dataclass
class StepFaces:
    """All faces of one step, as parallel arrays over faces (the frames' faces concatenated)."""

    faces: Faces
    frame: np.ndarray  # (N,) index of the face's frame in the step
    tracks: list[Track]

    @classmethod
    def join(cls, per_frame: list[Faces], tracks: list[list[Track]]) -> StepFaces:
        counts = [len(f) for f in per_frame]
        if sum(counts):
            faces = Faces(
                np.concatenate([f.boxes for f in per_frame]),
                np.concatenate([f.scores for f in per_frame]),
                np.concatenate([f.kps for f in per_frame]),
            )
        else:
            faces = Faces.empty()
        return cls(faces, np.repeat(np.arange(len(per_frame)), counts), [t for ts in tracks for t in ts])


class VerifierCore:
    """The verifier's rules, fed arrivals and a clock; see the module docstring."""

    def __init__(
        self, cfg: KioskConfig, engine: FaceModels, matrix: GalleryMatrix | GateFlights, *, metrics: CoreMetrics
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.flights = (
            matrix
            if isinstance(matrix, GateFlights)
            else GateFlights(matrix, require_flight=cfg.boarding.require_flight)
        )
        self.metrics = metrics
        self.policy = DecisionPolicy(cfg.policy, cfg.pad, textured=bool(cfg.models.pad))
        self.pad_errors = 0
        self.cameras = {
            c.id: CameraState(c.id, c.gate, c.realtime, Tracker(c.id, max_age_s=cfg.policy.track_max_age_s))
            for c in cfg.cameras
        }
        self.steps = 0
        self.faces_total = 0
        self.preview_gates: set[str] = set()  # gates a console watches: their last frame is kept (cam.view)
        self.hints: list[IdleHint] = []  # for the captures, published and cleared by the service
        self.first_captured_at: float | None = None
        self.last_done_at: float | None = None
        self.last_times: dict[str, float] = {}  # ms per stage of the last step
        self.last_error = ""  # "liveness: ..." when a liveness model failed
        self._fps_window: deque = deque(maxlen=20000)
        self._set_gate_metrics()

    @property
    def matrix(self) -> GalleryMatrix:
        """Everyone enrolled (the 1:N search matrix)."""
        return self.flights.full

    @matrix.setter
    def matrix(self, matrix: GalleryMatrix) -> None:
        self.adopt(GateFlights(matrix, require_flight=self.cfg.boarding.require_flight))

    def adopt(self, flights: GateFlights) -> None:
        """A new gallery view. A gate whose flight changed (opened, closed, another flight) starts afresh:
        its tracks end without a decision, so nobody half-decided for one flight is decided for the next."""
        old = self.flights
        self.flights = flights
        for cam in self.cameras.values():
            if old.flight_of(cam.gate_id) != flights.flight_of(cam.gate_id) and cam.tracker.tracks:
                for track in cam.tracker.end_all():
                    self.policy.state(track).decided = True
                log.info(
                    "gate %s: now %s; camera %s's tracks dropped",
                    cam.gate_id,
                    f"boarding {flights.flight_of(cam.gate_id)}" if flights.flight_of(cam.gate_id) else "not boarding",
                    cam.camera_id,
                )
        self._set_gate_metrics()

    def _set_gate_metrics(self) -> None:
        for gate in {c.gate_id for c in self.cameras.values()}:
            self.metrics.gate_boarding.labels(gate=gate).set(1.0 if self.flights.flight_of(gate) else 0.0)

    # -- input -----------------------------------------------------------------
    def offer(self, item: Arrival, now: float) -> None:
        """Queue an arrival. A real-time camera keeps only its newest frame (the stale ones are counted);
        an end-of-source marker always stays queued."""
        if isinstance(item, Eof):
            self.cameras[item.camera_id].pending.append(item)
            return
        cam = self.cameras[item.header.camera_id]
        cam.frames_in += 1
        cam.last_frame_at = now
        self.metrics.frames_in.labels(camera=cam.camera_id).inc()
        if cam.realtime:
            stale = cam.frames_waiting()
            if stale:
                cam.stale += stale
                self.metrics.frames_stale.labels(camera=cam.camera_id).inc(stale)
                cam.pending = deque(p for p in cam.pending if isinstance(p, Eof))
        cam.pending.append(item)

    def backlog_full(self) -> bool:
        """A replay camera has enough waiting: read no more until it is processed (the capture waits)."""
        return any(len(c.pending) >= REPLAY_BACKLOG for c in self.cameras.values() if not c.realtime)

    def has_pending(self) -> bool:
        return any(cam.pending for cam in self.cameras.values())

    # -- work ------------------------------------------------------------------
    def _too_old(self, cam: CameraState, captured_at: float, now: float) -> bool:
        """A live camera's frame from before a stall: what it shows may no longer be who stands there."""
        return cam.realtime and (now - captured_at) * 1000 > self.cfg.policy.max_frame_age_ms

    def step(self, now: float) -> list[Verdict]:
        """Take at most one frame per camera (end-of-source markers on the way are handled; a live camera's
        frame too old to act on is dropped and counted) and process them."""
        verdicts: list[Verdict] = []
        batch: list[Frame] = []
        wait = self._deciding_wait()
        for cam in self.cameras.values():
            if cam.camera_id in wait:
                continue
            while cam.pending:
                item = cam.pending.popleft()
                if isinstance(item, Eof):
                    cam.eof = True
                    verdicts += self._ended(cam, cam.tracker.end_all(), now)
                    log.info("camera %s: end of source; %d frames processed", cam.camera_id, cam.processed)
                    continue
                if self.flights.idle(cam.gate_id):  # nobody's biometrics at a gate that boards nothing
                    cam.not_boarding += 1
                    self.metrics.frames_not_boarding.labels(camera=cam.camera_id).inc()
                    cam.last_clock, cam.last_wall = item.header.clock, now
                    continue
                if self._too_old(cam, item.header.captured_at, now):
                    cam.too_old += 1
                    self.metrics.frames_too_old.labels(camera=cam.camera_id).inc()
                    if cam.too_old == 1 or cam.too_old % 100 == 0:
                        log.warning(
                            "camera %s: dropped a frame captured %.0f ms ago (policy.max_frame_age_ms %.0f; %d so far)",
                            cam.camera_id,
                            (now - item.header.captured_at) * 1000,
                            self.cfg.policy.max_frame_age_ms,
                            cam.too_old,
                        )
                    continue
                if self._idle(cam, item):  # judged (an empty scene, unchanged): counted as processed
                    cam.idle_skipped += 1
                    cam.processed += 1
                    self._fps_window.append(now)
                    self.metrics.frames_idle.labels(camera=cam.camera_id).inc()
                    self.metrics.frames_processed.labels(camera=cam.camera_id).inc()
                    cam.last_clock, cam.last_wall = item.header.clock, now
                    if cam.gate_id in self.preview_gates:  # a watched gate's live view goes on moving
                        cam.view = (item, np.zeros((0, 4), np.float32), [])
                    break
                batch.append(item)
                break
        if batch:
            verdicts += self.process(batch, now)
        return verdicts

    def _deciding_wait(self) -> set[str]:
        """The cameras that sit this step out: of those with a frame waiting and a person being decided (their
        frames cost an embedding and the liveness models), all but the `policy.deciding_cameras_per_step`
        processed longest ago. On a CPU a step's cost grows with its faces, so two gates deciding in one step
        make both wait for both; one at a time, each waits for at most the other's step and then takes its
        newest frame. A camera that sits out keeps only its newest frame meanwhile, as always."""
        limit = self.cfg.policy.deciding_cameras_per_step
        if not limit:
            return set()
        deciding = [
            cam
            for cam in self.cameras.values()
            if cam.frames_waiting() and any(self.policy.needs_frames(tr) for tr in cam.tracker.tracks)
        ]
        if len(deciding) <= limit:
            return set()
        deciding.sort(key=lambda cam: cam.last_wall)
        return {cam.camera_id for cam in deciding[limit:]}

    def _idle(self, cam: CameraState, frame: Frame) -> bool:
        """Skip the detector for this frame? Only with no open track, within idle_detect_every_s of the last
        empty detection, and when no cell of a 32x24 grey thumbnail moved by idle_change grey levels since
        (a person stepping in moves many cells by tens at once; sensor noise, averaged over a cell, by less
        than 2). A frame that is detected keeps its thumbnail for the next comparison."""
        threshold = self.cfg.policy.idle_change
        if threshold <= 0 or cam.tracker.tracks or cam.idle_ref is None:
            cam.idle_ref = None
            return False
        if frame.header.clock - cam.idle_ref_clock >= self.cfg.policy.idle_detect_every_s:
            return False
        return unchanged(thumbnail(frame.image), cam.idle_ref, threshold)

    def _hint(self, cam: CameraState, frame: Frame, empty: bool) -> None:
        """Tell a live camera's capture after each detection of an empty scene that it may hold back the
        frames that look like this one (each such detection renews the hint; a capture lets it lapse after
        a few safety-net intervals), and once that it may not when a face or a track is there. A watched gate
        stays at the full rate (its live view moves)."""
        idle = empty and cam.realtime and cam.gate_id not in self.preview_gates
        if idle or cam.hinted_idle:
            self._tell(cam, idle, frame.header.seq, frame.header.clock)

    def wake(self, gates: set[str]) -> None:
        """The cameras of `gates` (a console started watching) send every frame again."""
        for cam in self.cameras.values():
            if cam.hinted_idle and cam.gate_id in gates:
                self._tell(cam, False, 0, 0.0)

    def _tell(self, cam: CameraState, idle: bool, seq: int, clock: float) -> None:
        self.hints.append(
            IdleHint(cam.camera_id, idle, seq, clock, self.cfg.policy.idle_change, self.cfg.policy.idle_detect_every_s)
        )
        cam.hinted_idle = idle

    def process(self, frames: list[Frame], now: float) -> list[Verdict]:
        """One frame of each of several cameras through every stage."""
        clock = time.perf_counter
        times: dict[str, float] = {}

        def add(stage: str, since: float) -> float:
            t = clock()
            times[stage] = times.get(stage, 0.0) + (t - since) * 1000
            return t

        verdicts: list[Verdict] = []
        deciding_frames: set[int] = set()  # frames of this step with a face being decided
        times["transport"] = max(max(0.0, (f.received_at - f.header.captured_at) * 1000) for f in frames)
        t = clock()
        found = self.engine.detector.detect_batch([f.image for f in frames], self.cfg.policy.min_face_px)
        t = add("detect", t)
        cams = [self.cameras[f.header.camera_id] for f in frames]
        kept: list[Faces] = []
        tracks: list[list[Track]] = []
        for frame, cam, faces in zip(frames, cams, found):
            cam.processed += 1
            cam.last_clock, cam.last_wall = frame.header.clock, now
            self._fps_window.append(now)
            self.metrics.frames_processed.labels(camera=cam.camera_id).inc()
            self.metrics.faces.labels(camera=cam.camera_id).inc(len(faces))
            faces = faces[faces.widths >= self.cfg.policy.min_face_px]
            if cam.idle_ref is not None and len(faces):  # the gate was empty at the last detection: woken
                ms = (now - frame.header.captured_at) * 1000 + times["detect"]
                cam.wakes.append((frame.header.seq, round(ms, 1)))
                self.metrics.wake_latency.observe(ms / 1000)
            if self.cfg.policy.idle_change > 0:  # what the next frames of an empty scene are compared with
                empty = not len(faces) and not cam.tracker.tracks
                cam.idle_ref = thumbnail(frame.image) if empty else None
                cam.idle_ref_clock = frame.header.clock
                self._hint(cam, frame, empty)
            assigned, ended = cam.tracker.update(faces, frame.header.clock)
            verdicts += self._ended(cam, ended, now)
            if cam.gate_id in self.preview_gates:  # someone watches this gate: keep the frame for a preview
                cam.view = (frame, faces.boxes, assigned)
            kept.append(faces)
            tracks.append(assigned)
        step = StepFaces.join(kept, tracks)
        self.faces_total += sum(len(f) for f in found)
        t = add("track", t)

        # select: undecided tracks every frame, decided ones every RECHECK_EVERY frames (a new person in
        # their place?)
        undecided = np.array([self.policy.needs_frames(tr) for tr in step.tracks], bool)
        since = np.array([tr.hits - tr.embedded_hits for tr in step.tracks], np.int64)
        want = np.flatnonzero(undecided | (since >= RECHECK_EVERY))
        t = add("select", t)
        crops = np.zeros((0, 112, 112, 3), np.uint8)
        if len(want):
            sel = step.faces[want]
            # `want` is ascending and faces are concatenated frame by frame, so the crops line up with `sel`.
            crops = np.concatenate(
                [align_faces(frames[i].image, sel.kps[step.frame[want] == i]) for i in range(len(frames))]
            )
            t = add("align", t)
            ok = self.policy.quality_ok(measure(sel, crops))
            want, crops = want[ok], crops[ok]
            t = add("quality", t)
            want, crops = self._ration(step, want, crops, undecided, since)
            t = add("select", t)
        for row, k in enumerate(want):
            step.tracks[k].face_crop = crops[row].copy()
            step.tracks[k].last_embedded = self.steps
            step.tracks[k].embedded_hits = step.tracks[k].hits
            step.tracks[k].times_embedded += 1
        self.steps += 1
        if len(want):
            emb = self.engine.recognizer.embed(crops)
            t = add("embed", t)
            decided, deciding_frames = self._match_and_decide(frames, cams, step, want, emb, now, add, t)
            verdicts += decided
        self.last_times = times
        done = time.time()
        if self.first_captured_at is None:
            self.first_captured_at = min(f.header.captured_at for f in frames)
        self.last_done_at = done
        for i, f in enumerate(frames):
            self.metrics.observe_frame((done - f.header.captured_at) * 1000)
            if i in deciding_frames:  # the latency a decision on this frame would have had
                self.metrics.observe_deciding_frame((done - f.header.captured_at) * 1000)
        for stage, ms in times.items():
            self.metrics.observe_stage(stage, ms)
        return verdicts

    def _ration(
        self, step: StepFaces, want: np.ndarray, crops: np.ndarray, undecided: np.ndarray, since: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """At most `max_embeddings_per_frame` faces: an overdue identity check first, then undecided tracks,
        the longest-waiting first, then the one embedded least often (turns go round a crowd), then the
        largest face (the passenger at the front)."""
        cap = self.cfg.policy.max_embeddings_per_frame
        if not cap or len(want) <= cap:
            return want, crops
        overdue = ~undecided[want] & (since[want] >= RECHECK_OVERDUE)
        waited = np.array([step.tracks[k].last_embedded for k in want])
        turns = np.array([step.tracks[k].times_embedded for k in want])
        width = step.faces.widths[want]
        keep = np.lexsort((-width, turns, waited, ~undecided[want], ~overdue))[:cap]  # last key sorts first
        self.metrics.embeddings_deferred.inc(len(want) - cap)
        keep.sort()
        return want[keep], crops[keep]

    def _match_and_decide(
        self,
        frames: list[Frame],
        cams: list[CameraState],
        step: StepFaces,
        want: np.ndarray,
        emb: np.ndarray,
        now: float,
        add: Callable[[str, float], float],
        t: float,
    ) -> tuple[list[Verdict], set[int]]:
        """Match and decide the embedded faces; also which of the step's frames had a face being decided."""
        verdicts: list[Verdict] = []
        deciding: list[tuple[int, Track]] = []  # (row of emb, track) that need a match
        for row, k in enumerate(want):
            track = step.tracks[k]
            cam, header = cams[step.frame[k]], frames[step.frame[k]].header
            if track.embedding is not None and float(emb[row] @ track.embedding) < SAME_PERSON:
                log.info(
                    "camera %s: track %d changed person; starting a new transaction", cam.camera_id, track.track_id
                )
                new = cam.tracker.split(track, header.clock)
                verdicts += self._ended(cam, [track], now)
                track = step.tracks[k] = new
            track.embedding = emb[row]
            if self.policy.needs_frames(track):
                deciding.append((row, track))
        if not deciding:
            return verdicts, set()
        # match: claims (1:1) bound at a track's first quality frame; everyone else in one search per gallery
        # (a boarding gate's flight, or everyone), then the faces at boarding gates that matched nobody on
        # their flight once more against everyone (someone at the wrong gate?)
        gates = [cams[step.frame[want[row]]].gate_id for row, _ in deciding]
        claims = [self.policy.claim_for(tr, gate, now) for (row, tr), gate in zip(deciding, gates)]
        matches: list[Match | None] = [None] * len(deciding)
        by_gallery: dict[int, tuple[GalleryMatrix, list[int]]] = {}
        for i, (claim, gate) in enumerate(zip(claims, gates)):
            if claim is None:
                m = self.flights.matrix_for(gate)
                by_gallery.setdefault(id(m), (m, []))[1].append(i)
        for m, rows in by_gallery.values():
            for i, found in zip(rows, m.search(emb[[deciding[i][0] for i in rows]])):
                matches[i] = found
        for i, claim in enumerate(claims):
            if claim is not None:
                matches[i] = self.matrix.search(emb[deciding[i][0] : deciding[i][0] + 1], only=claim.subject_id)[0]
        outsiders: list[Match | None] = [None] * len(deciding)
        strays = [
            i
            for i, (claim, gate, m) in enumerate(zip(claims, gates, matches))
            if claim is None and self.flights.flight_of(gate) and not self.policy.match_ok(m)
        ]  # type: ignore
        if strays:
            for i, found in zip(strays, self.matrix.search(emb[[deciding[i][0] for i in strays]])):
                if self.policy.match_ok(found) and not self.flights.on_flight(gates[i], found.subject_id):
                    outsiders[i] = found
        t = add("match", t)
        lives = self._liveness(frames, step, [want[row] for row, _ in deciding])
        if self.engine.pad is not None and self.policy.pad is not None:
            t = add("pad", t)
        for (row, track), match, outsider, live in zip(deciding, matches, outsiders, lives):
            k = want[row]
            cam, header = cams[step.frame[k]], frames[step.frame[k]].header
            assert match is not None
            decision = self.policy.observe(
                track,
                cam.gate_id,
                match,
                header.captured_at,
                header.seq,
                clock=header.clock,
                outsider=outsider,
                live=live,
            )
            if decision is not None:
                verdicts.append(self._verdict(cam, track, decision, now))
        add("decide", t)
        return verdicts, {int(step.frame[want[row]]) for row, _ in deciding}

    def _liveness(self, frames: list[Frame], step: StepFaces, faces: list[int]) -> list[PadObservation | None]:
        """The liveness observation of each of these faces (indices into the step), None with liveness off or
        where a model failed: the track then has no evidence from this frame, waits and fails closed."""
        pad = self.engine.pad
        out: list[PadObservation | None] = [None] * len(faces)
        if pad is None or self.policy.pad is None:
            return out
        idx = np.array(faces, np.int64)
        for i in np.unique(step.frame[idx]) if len(idx) else []:
            pos = np.flatnonzero(step.frame[idx] == i)
            try:
                observed = pad.observe(frames[int(i)].image, step.faces.boxes[idx[pos]])
            except Exception as exc:  # noqa: BLE001 - a broken model must never let an accept through
                self.pad_errors += 1
                self.last_error = f"liveness: {exc}"
                if self.pad_errors == 1 or self.pad_errors % 100 == 0:
                    log.error(
                        "liveness model failed (%d so far): %s; accepts wait and fail closed", self.pad_errors, exc
                    )
                continue
            for p_, obs in zip(pos, observed):
                out[int(p_)] = obs
        return out

    def tick(self, now: float) -> list[Verdict]:
        """What the clock decides: transactions past `decision_timeout_s`, and the tracks of a live camera that
        stalled (no frame) ageing out as its frame clock would."""
        verdicts: list[Verdict] = []
        for cam in self.cameras.values():
            # The frame clock now: a live camera's runs with the wall clock, a replay's only with its frames.
            clock = cam.last_clock + (now - cam.last_wall if cam.realtime and cam.last_wall else 0.0)
            for track in cam.tracker.tracks:
                decision = self.policy.check_timeout(track, clock)
                if decision is not None:
                    verdicts.append(self._verdict(cam, track, decision, now))
            if cam.realtime and not cam.pending and cam.tracker.tracks and cam.last_wall:
                _, ended = cam.tracker.update(Faces.empty(), clock)
                verdicts += self._ended(cam, ended, now)
        return verdicts

    def end_all(self, now: float) -> list[Verdict]:
        """Decide what is left of every track (the service is stopping)."""
        return [v for cam in self.cameras.values() for v in self._ended(cam, cam.tracker.end_all(), now)]

    def control(self, request: dict[str, Any], now: float) -> dict[str, Any]:
        """A claim: the next transaction at a gate is a 1:1 check against one enrolled subject."""
        cmd = request.get("cmd")
        if cmd != "claim":
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        gate, subject = request.get("gate_id"), request.get("subject_id")
        ttl = request.get("ttl_s", self.cfg.policy.claim_ttl_s)
        gates = {c.gate_id for c in self.cameras.values()}
        if not isinstance(gate, str) or gate not in gates:
            return {"ok": False, "error": f"unknown gate {gate!r} (gates: {sorted(gates)})"}
        if not isinstance(subject, str) or subject not in self.matrix.subject_ids:
            return {"ok": False, "error": f"subject {subject!r} is not enrolled"}
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl <= 86400:
            return {"ok": False, "error": "ttl_s must be a number of seconds from 0 to 86400"}
        claim = self.policy.add_claim(gate, subject, float(ttl), now)
        return {"ok": True, "gate_id": gate, "subject_id": subject, "expires_at": claim.expires_at}

    def fps(self, now: float, window_s: float = 5.0) -> float:
        return sum(1 for t in self._fps_window if now - t <= window_s) / window_s

    # -- decisions -------------------------------------------------------------
    def _ended(self, cam: CameraState, tracks: list[Track], now: float) -> list[Verdict]:
        out = []
        for track in tracks:
            decision = self.policy.track_ended(track)
            if decision is not None:
                out.append(self._verdict(cam, track, decision, now))
        return out

    def _verdict(self, cam: CameraState, track: Track, d: Decision, now: float) -> Verdict:
        """The decision as the core made it, with the flight the gate boards; the gatekeeper checks it."""
        d = dataclasses.replace(d, flight_id=self.flights.flight_of(cam.gate_id))
        return Verdict(cam, track, d, now, track.face_crop)
