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

Stages of a step, each over all faces of all cameras as one table
(`StepFaces`, a row per face, narrowed by masks from stage to stage):
detect -> track -> select (which faces need an embedding) -> align ->
quality -> ration (at most `max_embeddings_per_frame`) -> embed (one
batch) -> identity check -> match (one batched 1:N search) -> decide.

The core takes its own sections of the configuration (`policy`, the
`cameras`, `pad`), never the whole of it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

import numpy as np

from kiosk.boarding.gates import GateFlights
from kiosk.boarding.matrix import GalleryMatrix, Match
from kiosk.config import CameraConfig, PadConfig, PolicyConfig
from kiosk.messaging.messages import Eof, Frame, IdleHint
from kiosk.pipeline.policy import Claim, Decision, DecisionPolicy
from kiosk.pipeline.step_faces import StepFaces
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


Arrival: TypeAlias = Frame | Eof
View: TypeAlias = tuple[Frame, np.ndarray, list[Track]]  # a frame, its face boxes, its tracks


@dataclass
class CameraState:
    camera_id: str
    gate_id: str
    realtime: bool
    tracker: Tracker
    pending: deque[Arrival] = field(default_factory=deque)  # oldest first
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
    view: View | None = None  # the last frame of a watched gate (console)
    idle_skipped: int = 0  # frames not detected: empty scene, unchanged (policy.idle_change)
    idle_ref: np.ndarray | None = None  # thumbnail of the last frame detected with no face in it
    idle_ref_clock: float = 0.0  # its frame clock
    hinted_idle: bool = False  # the capture was last told its scene is empty (IdleHint)
    wakes: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=64))  # (seq, ms): woken

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
    """What the core counts (kiosk.services.metrics.VerifierMetrics is the real one). Read-only members, so
    that any counter with these methods will do."""

    @property
    def frames_in(self) -> _Counter: ...
    @property
    def frames_stale(self) -> _Counter: ...
    @property
    def frames_too_old(self) -> _Counter: ...
    @property
    def frames_not_boarding(self) -> _Counter: ...
    @property
    def frames_idle(self) -> _Counter: ...
    @property
    def frames_processed(self) -> _Counter: ...
    @property
    def faces(self) -> _Counter: ...
    @property
    def embeddings_deferred(self) -> _Count: ...
    @property
    def gate_boarding(self) -> _Gauge: ...
    @property
    def wake_latency(self) -> _Histogram: ...

    def observe_frame(self, ms: float) -> None: ...
    def observe_deciding_frame(self, ms: float) -> None: ...
    def observe_stage(self, stage: str, ms: float) -> None: ...


@dataclass(frozen=True)
class IdleRule:
    """When a frame of an empty scene skips the detector (policy.idle_change, policy.idle_detect_every_s; a
    change of 0 detects every frame), and what an idle hint tells a capture."""

    change: float
    detect_every_s: float

    @property
    def on(self) -> bool:
        return self.change > 0

    def skip(self, cam: CameraState, frame: Frame) -> bool:
        """Skip the detector for this frame? Only with no open track, within detect_every_s of the last empty
        detection, and when no cell of a 32x24 grey thumbnail moved by `change` grey levels since (a person
        stepping in moves many cells by tens at once; sensor noise, averaged over a cell, by less than 2). A
        frame that is detected keeps its thumbnail for the next comparison."""
        if not self.on or cam.tracker.tracks or cam.idle_ref is None:
            cam.idle_ref = None
            return False
        if frame.header.clock - cam.idle_ref_clock >= self.detect_every_s:
            return False
        return unchanged(thumbnail(frame.image), cam.idle_ref, self.change)

    def hint(self, cam: CameraState, idle: bool, seq: int, clock: float) -> IdleHint:
        return IdleHint(cam.camera_id, idle, seq, clock, self.change, self.detect_every_s)


class _Stages:
    """Milliseconds per stage of one step: `lap(stage)` adds the time since the last lap to `stage`."""

    def __init__(self, transport_ms: float) -> None:
        self.times: dict[str, float] = {"transport": transport_ms}
        self._since = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = self.times.get(stage, 0.0) + (now - self._since) * 1000
        self._since = now


class VerifierCore:
    """The verifier's rules, fed arrivals and a clock; see the module docstring.

    It takes its own sections of the config: `policy`, the `cameras`, and for liveness `pad` with whether
    `models.pad` names texture models (`textured`). `flights` is the gallery view; a bare matrix is a site
    without flights (every gate matches against everyone)."""

    def __init__(
        self,
        policy: PolicyConfig,
        cameras: Sequence[CameraConfig],
        engine: FaceModels,
        flights: GateFlights | GalleryMatrix,
        *,
        pad: PadConfig | None,
        textured: bool,
        metrics: CoreMetrics,
    ) -> None:
        self.engine = engine
        self.flights = flights if isinstance(flights, GateFlights) else GateFlights(flights)
        self.metrics = metrics
        self.policy = DecisionPolicy(policy, pad, textured=textured)
        # The policy settings the core itself applies, read once.
        self.min_face_px = policy.min_face_px
        self.max_frame_age_ms = policy.max_frame_age_ms
        self.deciding_cameras_per_step = policy.deciding_cameras_per_step
        self.max_embeddings_per_frame = policy.max_embeddings_per_frame
        self.claim_ttl_s = policy.claim_ttl_s
        self.idle = IdleRule(policy.idle_change, policy.idle_detect_every_s)
        self.pad_errors = 0
        self.cameras = {
            c.id: CameraState(c.id, c.gate, c.realtime, Tracker(c.id, max_age_s=policy.track_max_age_s))
            for c in cameras
        }
        self.steps = 0
        self.faces_total = 0
        self.preview_gates: set[str] = set()  # gates a console watches: their last frame is kept (cam.view)
        self.hints: list[IdleHint] = []  # for the captures, published and cleared by the service
        self.first_captured_at: float | None = None
        self.last_done_at: float | None = None
        self.last_times: dict[str, float] = {}  # ms per stage of the last step
        self.last_error = ""  # "liveness: ..." when a liveness model failed
        self._fps_window: deque[float] = deque(maxlen=20000)
        self._set_gate_metrics()

    @property
    def matrix(self) -> GalleryMatrix:
        """Everyone enrolled (the 1:N search matrix)."""
        return self.flights.full

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
        return cam.realtime and (now - captured_at) * 1000 > self.max_frame_age_ms

    def step(self, now: float) -> list[Verdict]:
        """Take at most one frame per camera (end-of-source markers on the way are handled; a live camera's
        frame too old to act on is dropped and counted) and process them."""
        verdicts: list[Verdict] = []
        batch: list[Frame] = []
        wait = self._deciding_wait()
        for cam in self.cameras.values():
            if cam.camera_id not in wait:
                frame = self._next_frame(cam, now, verdicts)
                if frame is not None:
                    batch.append(frame)
        if batch:
            verdicts += self.process(batch, now)
        return verdicts

    def _next_frame(self, cam: CameraState, now: float, verdicts: list[Verdict]) -> Frame | None:
        """The camera's next frame to process, if any; what comes before it is handled on the way (an end of
        source ends its tracks into `verdicts`; a frame at a gate boarding nothing, one too old to act on, or
        one of an unchanged empty scene is counted and passed over; the last ends the camera's turn)."""
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
                self._drop_too_old(cam, item, now)
                continue
            if self.idle.skip(cam, item):  # judged (an empty scene, unchanged): counted as processed
                self._count_idle(cam, item, now)
                return None
            return item
        return None

    def _drop_too_old(self, cam: CameraState, frame: Frame, now: float) -> None:
        cam.too_old += 1
        self.metrics.frames_too_old.labels(camera=cam.camera_id).inc()
        if cam.too_old == 1 or cam.too_old % 100 == 0:
            log.warning(
                "camera %s: dropped a frame captured %.0f ms ago (policy.max_frame_age_ms %.0f; %d so far)",
                cam.camera_id,
                (now - frame.header.captured_at) * 1000,
                self.max_frame_age_ms,
                cam.too_old,
            )

    def _count_idle(self, cam: CameraState, frame: Frame, now: float) -> None:
        cam.idle_skipped += 1
        cam.processed += 1
        self._fps_window.append(now)
        self.metrics.frames_idle.labels(camera=cam.camera_id).inc()
        self.metrics.frames_processed.labels(camera=cam.camera_id).inc()
        cam.last_clock, cam.last_wall = frame.header.clock, now
        if cam.gate_id in self.preview_gates:  # a watched gate's live view goes on moving
            cam.view = (frame, np.zeros((0, 4), np.float32), [])

    def _deciding_wait(self) -> set[str]:
        """The cameras that sit this step out: of those with a frame waiting and a person being decided (their
        frames cost an embedding and the liveness models), all but the `policy.deciding_cameras_per_step`
        processed longest ago. On a CPU a step's cost grows with its faces, so two gates deciding in one step
        make both wait for both; one at a time, each waits for at most the other's step and then takes its
        newest frame. A camera that sits out keeps only its newest frame meanwhile, as always."""
        limit = self.deciding_cameras_per_step
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
        self.hints.append(self.idle.hint(cam, idle, seq, clock))
        cam.hinted_idle = idle

    def process(self, frames: list[Frame], now: float) -> list[Verdict]:
        """One frame of each of several cameras through every stage."""
        stages = _Stages(max(max(0.0, (f.received_at - f.header.captured_at) * 1000) for f in frames))
        found = self.engine.detector.detect_batch([f.image for f in frames], self.min_face_px)
        stages.lap("detect")
        cams = [self.cameras[f.header.camera_id] for f in frames]
        verdicts: list[Verdict] = []
        step = self._track(frames, cams, found, now, stages.times["detect"], verdicts)
        stages.lap("track")
        rows = self._select(frames, step, stages)
        for track, crop in zip(rows.tracks, rows.aligned(), strict=True):
            track.face_crop = crop.copy()
            track.last_embedded = self.steps
            track.embedded_hits = track.hits
            track.times_embedded += 1
        self.steps += 1
        deciding_frames: set[int] = set()  # frames of this step with a face being decided
        if len(rows):
            rows = rows.with_embeddings(self.engine.recognizer.embed(rows.aligned()))
            stages.lap("embed")
            deciding = self._check_identity(frames, cams, rows, now, verdicts)
            if len(deciding):
                verdicts += self._match_and_decide(frames, cams, deciding, now, stages)
                deciding_frames = {int(i) for i in deciding.frames_present}
        self._observe_latency(frames, deciding_frames, stages.times)
        return verdicts

    def _track(
        self,
        frames: list[Frame],
        cams: list[CameraState],
        found: Sequence[Faces],
        now: float,
        detect_ms: float,
        verdicts: list[Verdict],
    ) -> StepFaces:
        """Each frame's faces (those wide enough) to its camera's tracker; the step's faces as one table. Tracks
        that ended go to `verdicts`."""
        kept: list[Faces] = []
        tracks: list[list[Track]] = []
        for frame, cam, faces in zip(frames, cams, found, strict=True):
            cam.processed += 1
            cam.last_clock, cam.last_wall = frame.header.clock, now
            self._fps_window.append(now)
            self.metrics.frames_processed.labels(camera=cam.camera_id).inc()
            self.metrics.faces.labels(camera=cam.camera_id).inc(len(faces))
            faces = faces[faces.widths >= self.min_face_px]
            if cam.idle_ref is not None and len(faces):  # the gate was empty at the last detection: woken
                ms = (now - frame.header.captured_at) * 1000 + detect_ms
                cam.wakes.append((frame.header.seq, round(ms, 1)))
                self.metrics.wake_latency.observe(ms / 1000)
            if self.idle.on:  # what the next frames of an empty scene are compared with
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
        self.faces_total += sum(len(f) for f in found)
        return StepFaces.join(kept, tracks)

    def _select(self, frames: list[Frame], step: StepFaces, stages: _Stages) -> StepFaces:
        """The faces to embed this step, with their aligned crops: undecided tracks every frame, decided ones
        every RECHECK_EVERY frames (a new person in their place?), of quality, within the rationing cap."""
        undecided = np.array([self.policy.needs_frames(tr) for tr in step.tracks], bool)
        since = np.array([tr.hits - tr.embedded_hits for tr in step.tracks], np.int64)
        rows = step[undecided | (since >= RECHECK_EVERY)]
        stages.lap("select")
        if not len(rows):
            return rows.with_crops(np.zeros((0, 112, 112, 3), np.uint8))
        # Rows keep the step's order, frame by frame, so the crops of frame after frame line up with them.
        crops = np.concatenate(
            [align_faces(frames[i].image, rows.faces.kps[rows.frame == i]) for i in range(len(frames))]
        )
        stages.lap("align")
        rows = rows.with_crops(crops)[self.policy.quality_ok(measure(rows.faces, crops))]
        stages.lap("quality")
        rows = self._ration(rows)
        stages.lap("select")
        return rows

    def _ration(self, rows: StepFaces) -> StepFaces:
        """At most `max_embeddings_per_frame` faces: an overdue identity check first, then undecided tracks,
        the longest-waiting first, then the one embedded least often (turns go round a crowd), then the
        largest face (the passenger at the front)."""
        cap = self.max_embeddings_per_frame
        if not cap or len(rows) <= cap:
            return rows
        undecided = np.array([self.policy.needs_frames(tr) for tr in rows.tracks], bool)
        since = np.array([tr.hits - tr.embedded_hits for tr in rows.tracks], np.int64)
        overdue = ~undecided & (since >= RECHECK_OVERDUE)
        waited = np.array([tr.last_embedded for tr in rows.tracks])
        turns = np.array([tr.times_embedded for tr in rows.tracks])
        keep = np.lexsort((-rows.faces.widths, turns, waited, ~undecided, ~overdue))[:cap]  # last key sorts first
        self.metrics.embeddings_deferred.inc(len(rows) - cap)
        keep.sort()
        return rows[keep]

    def _check_identity(
        self, frames: list[Frame], cams: list[CameraState], rows: StepFaces, now: float, verdicts: list[Verdict]
    ) -> StepFaces:
        """Each embedded face against its track's last one: a track whose face is now someone else's ends (into
        `verdicts`) and a new one goes on from this face. The rows whose track is still being decided."""
        tracks: list[Track] = []
        for track, i, embedding in zip(rows.tracks, rows.frame, rows.embedded(), strict=True):
            if track.embedding is not None and float(embedding @ track.embedding) < SAME_PERSON:
                cam = cams[i]
                log.info(
                    "camera %s: track %d changed person; starting a new transaction", cam.camera_id, track.track_id
                )
                new = cam.tracker.split(track, frames[i].header.clock)
                verdicts += self._ended(cam, [track], now)
                track = new
            track.embedding = embedding
            tracks.append(track)
        rows = rows.with_tracks(tracks)
        return rows[np.array([self.policy.needs_frames(tr) for tr in rows.tracks], bool)]

    def _match_and_decide(
        self, frames: list[Frame], cams: list[CameraState], rows: StepFaces, now: float, stages: _Stages
    ) -> list[Verdict]:
        """Match the faces being decided and take each to its track's decision."""
        gates = [cams[i].gate_id for i in rows.frame]
        claims = [self.policy.claim_for(tr, gate, now) for tr, gate in zip(rows.tracks, gates, strict=True)]
        matches, outsiders = self._match(rows, gates, claims)
        stages.lap("match")
        lives = self._liveness(frames, rows)
        if self.engine.pad is not None and self.policy.pad is not None:
            stages.lap("pad")
        verdicts: list[Verdict] = []
        for track, i, match, outsider, live in zip(rows.tracks, rows.frame, matches, outsiders, lives, strict=True):
            header = frames[i].header
            decision = self.policy.observe(
                track,
                cams[i].gate_id,
                match,
                header.captured_at,
                header.seq,
                clock=header.clock,
                outsider=outsider,
                live=live,
            )
            if decision is not None:
                verdicts.append(self._verdict(cams[i], track, decision, now))
        stages.lap("decide")
        return verdicts

    def _match(
        self, rows: StepFaces, gates: list[str], claims: list[Claim | None]
    ) -> tuple[list[Match], list[Match | None]]:
        """Each face's match: under a claim (bound at a track's first quality frame) 1:1; else in one search per
        gallery (a boarding gate's flight, or everyone). Also, for the faces at boarding gates that matched
        nobody on their flight, their match among everyone when that is someone not on the flight (at the
        wrong gate?)."""
        emb = rows.embedded()
        found: dict[int, Match] = {}
        by_gallery: dict[int, tuple[GalleryMatrix, list[int]]] = {}
        for i, (claim, gate) in enumerate(zip(claims, gates, strict=True)):
            if claim is None:
                gallery = self.flights.matrix_for(gate)
                by_gallery.setdefault(id(gallery), (gallery, []))[1].append(i)
        for gallery, picked in by_gallery.values():
            found.update(zip(picked, gallery.search(emb[picked]), strict=True))
        for i, claim in enumerate(claims):
            if claim is not None:
                found[i] = self.matrix.search(emb[i : i + 1], only=claim.subject_id)[0]
        matches = [found[i] for i in range(len(rows))]
        outsiders: list[Match | None] = [None] * len(rows)
        strays = [
            i
            for i, (claim, gate, match) in enumerate(zip(claims, gates, matches, strict=True))
            if claim is None and self.flights.flight_of(gate) and not self.policy.match_ok(match)
        ]
        if strays:
            for i, anyone in zip(strays, self.matrix.search(emb[strays]), strict=True):
                if self.policy.match_ok(anyone) and not self.flights.on_flight(gates[i], anyone.subject_id):
                    outsiders[i] = anyone
        return matches, outsiders

    def _liveness(self, frames: list[Frame], rows: StepFaces) -> list[PadObservation | None]:
        """The liveness observation of each face, None with liveness off or where a model failed: the track
        then has no evidence from this frame, waits and fails closed."""
        pad = self.engine.pad
        out: list[PadObservation | None] = [None] * len(rows)
        if pad is None or self.policy.pad is None:
            return out
        for i in rows.frames_present:
            pos = np.flatnonzero(rows.frame == i)
            try:
                observed = pad.observe(frames[int(i)].image, rows.faces.boxes[pos])
            except Exception as exc:  # noqa: BLE001 - a broken model must never let an accept through
                self.pad_errors += 1
                self.last_error = f"liveness: {exc}"
                if self.pad_errors == 1 or self.pad_errors % 100 == 0:
                    log.error(
                        "liveness model failed (%d so far): %s; accepts wait and fail closed", self.pad_errors, exc
                    )
                continue
            for p, obs in zip(pos, observed, strict=True):
                out[int(p)] = obs
        return out

    def _observe_latency(self, frames: list[Frame], deciding_frames: set[int], times: dict[str, float]) -> None:
        """The step's stage times and each frame's latency (and, for a frame with a face being decided, the
        latency a decision on it would have had)."""
        self.last_times = times
        done = time.time()
        if self.first_captured_at is None:
            self.first_captured_at = min(f.header.captured_at for f in frames)
        self.last_done_at = done
        for i, f in enumerate(frames):
            self.metrics.observe_frame((done - f.header.captured_at) * 1000)
            if i in deciding_frames:
                self.metrics.observe_deciding_frame((done - f.header.captured_at) * 1000)
        for stage, ms in times.items():
            self.metrics.observe_stage(stage, ms)

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

    def control(self, request: Mapping[str, object], now: float) -> dict[str, object]:
        """A claim: the next transaction at a gate is a 1:1 check against one enrolled subject."""
        cmd = request.get("cmd")
        if cmd != "claim":
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        gate, subject = request.get("gate_id"), request.get("subject_id")
        ttl = request.get("ttl_s", self.claim_ttl_s)
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
