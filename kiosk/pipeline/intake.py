"""The core's frame intake: what arrived, queued per camera, and which frames a step takes.

A real-time camera keeps only its newest frame (the stale ones are counted); an end-of-source marker is
never dropped with them. A step takes at most one frame per camera (`FrameIntake.take`); on the way it
passes over, counting each, a frame at a gate that boards nothing, a live camera's frame too old to act on,
and a frame of an unchanged empty scene (the idle rule, `IdleWatch`, which also tells the captures when
their scene is empty so that they may hold such frames back).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from kiosk.config import PolicyConfig
from kiosk.messaging.messages import Eof, Frame, IdleHint
from kiosk.pipeline.camera import Arrival, CameraState, Site, Verdict
from kiosk.pipeline.core_metrics import CoreMetrics, Throughput
from kiosk.pipeline.policy import DecisionPolicy
from kiosk.pipeline.tracking import Track
from kiosk.vision.faces import Faces
from kiosk.vision.scene_change import thumbnail, unchanged

log = logging.getLogger("kiosk.pipeline.core")  # the core's log lines keep the name they had

REPLAY_BACKLOG = 8  # frames a replay camera may have waiting before the shell stops reading (back-pressure)

EndTracks = Callable[[CameraState, list[Track], float], list[Verdict]]  # the decisions of tracks that ended


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


class IdleWatch:
    """The idle rule over time: what each detection leaves for the next comparison, how long a gate that was
    empty took to wake, and the hints for the captures (`hints`, published and cleared by the service)."""

    def __init__(self, rule: IdleRule, site: Site, metrics: CoreMetrics) -> None:
        self.rule = rule
        self.site = site
        self.metrics = metrics
        self.hints: list[IdleHint] = []

    def detected(self, cam: CameraState, frame: Frame, faces: Faces, now: float, detect_ms: float) -> None:
        """A frame was detected and `faces` (those wide enough) found in it."""
        if cam.idle_ref is not None and len(faces):  # the gate was empty at the last detection: woken
            ms = (now - frame.header.captured_at) * 1000 + detect_ms
            cam.wakes.append((frame.header.seq, round(ms, 1)))
            self.metrics.wake_latency.observe(ms / 1000)
        if self.rule.on:  # what the next frames of an empty scene are compared with
            empty = not len(faces) and not cam.tracker.tracks
            cam.idle_ref = thumbnail(frame.image) if empty else None
            cam.idle_ref_clock = frame.header.clock
            self._hint(cam, frame, empty)

    def _hint(self, cam: CameraState, frame: Frame, empty: bool) -> None:
        """Tell a live camera's capture after each detection of an empty scene that it may hold back the
        frames that look like this one (each such detection renews the hint; a capture lets it lapse after
        a few safety-net intervals), and once that it may not when a face or a track is there. A watched gate
        stays at the full rate (its live view moves)."""
        idle = empty and cam.realtime and cam.gate_id not in self.site.watched
        if idle or cam.hinted_idle:
            self._tell(cam, idle, frame.header.seq, frame.header.clock)

    def wake(self, cameras: Mapping[str, CameraState], gates: set[str]) -> None:
        """The cameras of `gates` (a console started watching) send every frame again."""
        for cam in cameras.values():
            if cam.hinted_idle and cam.gate_id in gates:
                self._tell(cam, False, 0, 0.0)

    def _tell(self, cam: CameraState, idle: bool, seq: int, clock: float) -> None:
        self.hints.append(self.rule.hint(cam, idle, seq, clock))
        cam.hinted_idle = idle


class FrameIntake:
    """The per-camera queues: `offer` fills them, `take` gives a step its frames. An end of source ends the
    camera's tracks through `end_tracks`, whose decisions `take` returns with the frames."""

    def __init__(
        self,
        settings: PolicyConfig,
        policy: DecisionPolicy,
        cameras: Mapping[str, CameraState],
        site: Site,
        idle: IdleWatch,
        throughput: Throughput,
        end_tracks: EndTracks,
    ) -> None:
        self.max_frame_age_ms = settings.max_frame_age_ms
        self.deciding_cameras_per_step = settings.deciding_cameras_per_step
        self.policy = policy
        self.cameras = cameras
        self.site = site
        self.idle = idle
        self.throughput = throughput
        self.metrics = throughput.metrics
        self.end_tracks = end_tracks

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

    def take(self, now: float) -> tuple[list[Frame], list[Verdict]]:
        """At most one frame per camera, of the cameras not sitting this step out; and the decisions of the
        tracks that ended on the way (an end of source)."""
        verdicts: list[Verdict] = []
        batch: list[Frame] = []
        wait = self._deciding_wait()
        for cam in self.cameras.values():
            if cam.camera_id not in wait:
                frame = self._next_frame(cam, now, verdicts)
                if frame is not None:
                    batch.append(frame)
        return batch, verdicts

    def _too_old(self, cam: CameraState, captured_at: float, now: float) -> bool:
        """A live camera's frame from before a stall: what it shows may no longer be who stands there."""
        return cam.realtime and (now - captured_at) * 1000 > self.max_frame_age_ms

    def _next_frame(self, cam: CameraState, now: float, verdicts: list[Verdict]) -> Frame | None:
        """The camera's next frame to process, if any; what comes before it is handled on the way (an end of
        source ends its tracks into `verdicts`; a frame at a gate boarding nothing, one too old to act on, or
        one of an unchanged empty scene is counted and passed over; the last ends the camera's turn)."""
        while cam.pending:
            item = cam.pending.popleft()
            if isinstance(item, Eof):
                cam.eof = True
                verdicts += self.end_tracks(cam, cam.tracker.end_all(), now)
                log.info("camera %s: end of source; %d frames processed", cam.camera_id, cam.processed)
                continue
            if self.site.flights.idle(cam.gate_id):  # nobody's biometrics at a gate that boards nothing
                cam.not_boarding += 1
                self.metrics.frames_not_boarding.labels(camera=cam.camera_id).inc()
                cam.last_clock, cam.last_wall = item.header.clock, now
                continue
            if self._too_old(cam, item.header.captured_at, now):
                self._drop_too_old(cam, item, now)
                continue
            if self.idle.rule.skip(cam, item):  # judged (an empty scene, unchanged): counted as processed
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
        self.metrics.frames_idle.labels(camera=cam.camera_id).inc()
        self.throughput.processed(cam, frame, now)
        if cam.gate_id in self.site.watched:  # a watched gate's live view goes on moving
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
