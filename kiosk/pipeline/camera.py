"""What the parts of the core share: each camera's state, the site as the service last set it (the gallery
view, the gates a console watches), and the decision record (`Verdict`) the core hands the gatekeeper."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from kiosk.boarding.gates import GateFlights
from kiosk.messaging.messages import Eof, Frame
from kiosk.pipeline.policy import Decision
from kiosk.pipeline.tracking import Track, Tracker

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


@dataclass
class Site:
    """What the service changes between steps and every part of the core reads: the gallery view (`adopt`
    swaps it) and the gates a console watches (their last frame is kept, their captures never told to idle)."""

    flights: GateFlights
    watched: set[str] = field(default_factory=set)


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
