"""The deciding step: one frame of each of several cameras through every stage, each over all faces of all
cameras as one table (`StepFaces`, a row per face, narrowed by masks from stage to stage):

detect -> track -> select (which faces need an embedding) -> align -> quality -> ration (at most
`max_embeddings_per_frame`) -> embed (one batch) -> identity check -> match (one batched 1:N search, see
`kiosk.pipeline.matching`) -> decide.

What it decides are `Verdict`s: plain decisions with the flight the gate boards, for the gatekeeper.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np

from kiosk.config import PolicyConfig
from kiosk.messaging.messages import Frame
from kiosk.pipeline.camera import CameraState, Site, Verdict
from kiosk.pipeline.core_metrics import Throughput
from kiosk.pipeline.intake import IdleWatch
from kiosk.pipeline.matching import Matcher
from kiosk.pipeline.policy import Decision, DecisionPolicy
from kiosk.pipeline.step_faces import StepFaces
from kiosk.pipeline.tracking import Track
from kiosk.vision.engine import FaceModels
from kiosk.vision.faces import Faces
from kiosk.vision.models.recognizer import align_faces
from kiosk.vision.quality import measure

log = logging.getLogger("kiosk.pipeline.core")  # the core's log lines keep the name they had

RECHECK_EVERY = 10  # frames of a decided track between identity checks
RECHECK_OVERDUE = 2 * RECHECK_EVERY  # a check this late goes before undecided faces (no starvation)
SAME_PERSON = 0.25  # a track whose new face scores below this against its last one is someone else


class _Stages:
    """Milliseconds per stage of one step: `lap(stage)` adds the time since the last lap to `stage`."""

    def __init__(self, transport_ms: float) -> None:
        self.times: dict[str, float] = {"transport": transport_ms}
        self._since = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = self.times.get(stage, 0.0) + (now - self._since) * 1000
        self._since = now


class Decider:
    """Frames in, `Verdict`s out (`process`); also the decisions of tracks that end (`ended`) and of those
    the clock decides (`verdict`). Keeps what a step leaves for the status: `steps`, `faces_total`, the
    stage times of the last step, when the first frame was captured and the last step done."""

    def __init__(
        self,
        settings: PolicyConfig,
        policy: DecisionPolicy,
        engine: FaceModels,
        cameras: dict[str, CameraState],
        site: Site,
        idle: IdleWatch,
        throughput: Throughput,
    ) -> None:
        self.min_face_px = settings.min_face_px
        self.max_embeddings_per_frame = settings.max_embeddings_per_frame
        self.policy = policy
        self.engine = engine
        self.cameras = cameras
        self.site = site
        self.idle = idle
        self.throughput = throughput
        self.metrics = throughput.metrics
        self.matcher = Matcher(policy, engine, site)
        self.steps = 0
        self.faces_total = 0
        self.first_captured_at: float | None = None
        self.last_done_at: float | None = None
        self.last_times: dict[str, float] = {}  # ms per stage of the last step

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
        self._mark_embedded(rows)
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
            self.throughput.processed(cam, frame, now)
            self.metrics.faces.labels(camera=cam.camera_id).inc(len(faces))
            faces = faces[faces.widths >= self.min_face_px]
            self.idle.detected(cam, frame, faces, now, detect_ms)
            assigned, ended = cam.tracker.update(faces, frame.header.clock)
            verdicts += self.ended(cam, ended, now)
            if cam.gate_id in self.site.watched:  # someone watches this gate: keep the frame for a preview
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

    def _mark_embedded(self, rows: StepFaces) -> None:
        """The tracks of the faces selected this step: their crop, and when they were embedded (for the next
        selection and rationing). The step is counted."""
        for track, crop in zip(rows.tracks, rows.aligned(), strict=True):
            track.face_crop = crop.copy()
            track.last_embedded = self.steps
            track.embedded_hits = track.hits
            track.times_embedded += 1
        self.steps += 1

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
                verdicts += self.ended(cam, [track], now)
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
        matches, outsiders = self.matcher.match(rows, gates, claims)
        stages.lap("match")
        lives = self.matcher.liveness(frames, rows)
        if self.matcher.pad_on:
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
                verdicts.append(self.verdict(cams[i], track, decision, now))
        stages.lap("decide")
        return verdicts

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

    def ended(self, cam: CameraState, tracks: list[Track], now: float) -> list[Verdict]:
        """The decisions of tracks that ended (left the scene, their source ended, someone else in their place)."""
        out = []
        for track in tracks:
            decision = self.policy.track_ended(track)
            if decision is not None:
                out.append(self.verdict(cam, track, decision, now))
        return out

    def verdict(self, cam: CameraState, track: Track, d: Decision, now: float) -> Verdict:
        """The decision as the core made it, with the flight the gate boards; the gatekeeper checks it."""
        d = dataclasses.replace(d, flight_id=self.site.flights.flight_of(cam.gate_id))
        return Verdict(cam, track, d, now, track.face_crop)
