"""Evidence of life from the face's own movement: does it blink, move its mouth or its brows, or is it one rigid
piece?

A printed photo, an ID card in a sleeve, a photo filling the frame, a rigid mask: however they are held, tilted
or brought closer, their landmarks move as the points of one plane (or one rigid shape) do. A person, even one who
stands still and looks at the camera, blinks, moves the lips and the brows. Two frames of a track are compared by
fitting the best homography (a plane's every possible motion under a perspective camera) from the earlier frame's
106 landmarks to the later's, on the points that do not move with expression (the face outline, the nose, the eye
corners), and measuring what the plane's motion does not explain, in inter-ocular distances:

- the eyelids: the change of the gap between the upper and the lower lid (three pairs per eye), mean of the six;
- the mouth: the larger change of the inner and the outer lip gaps;
- the brows: the change of each brow's distance to its eye, mean of the two.

A frame is an "expression" frame when one of these, against any of the track's reference frames, reaches its limit
(EYE, MOUTH, BROW) and stands out against the track's own landmark noise (NOISE_RATIO times the median residual of
the rigid points from one frame to the next): landmark jitter on a blurred or moiré-laden face must not pass for a
blink. EVIDENCE_FRAMES such
frames on a face at least MIN_WIDTH px wide: the face moves as a living one does.

The limits sit above what rigid faces gave, with a margin (README "Liveness"): 50 simulated prints moved and tilted
by hand, and real print and cut-out print attacks re-filmed by phones (five frames each, over large tilts), reached
0.032 (eyes), 0.13 (mouth, the inner lips' jitter on small faces) and 0.072 (brows, a print tilted far).

What it does not stop: a replayed video (it shows the recorded person's real movement), a screen (its sub-pixel
grid makes the landmarks jitter enough to pass on simulated screens), a flexible mask whose wearer moves the mouth;
those need the texture models. What it costs: a real person who keeps still without a blink for the whole wait
is not vouched for, and the accept then fails closed (an agent checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from kiosk.vision import landmarks
from kiosk.vision.landmarks import (
    CONTOUR,
    EYE_CORNERS,
    LOWER_LIDS,
    NOSE,
    UPPER_LIDS,
)

RIGID = np.array(CONTOUR + NOSE + EYE_CORNERS)  # the points expression does not move
LIDS = np.array(list(zip(UPPER_LIDS, LOWER_LIDS, strict=True)))  # (upper, lower) lid pairs
LIPS = np.array([(62, 60), (71, 53)])  # inner and outer (upper, lower) lip pairs
# lists: numpy takes a tuple as one index per axis
LEFT_EYE, RIGHT_EYE = list(landmarks.LEFT_EYE), list(landmarks.RIGHT_EYE)
LEFT_BROW, RIGHT_BROW = list(landmarks.LEFT_BROW), list(landmarks.RIGHT_BROW)

EYE = 0.04  # eyelid gap change, inter-ocular distances (a blink is 0.1-0.3)
MOUTH = 0.14
BROW = 0.09
NOISE_RATIO = 3.0  # ... and this many times the track's median rigid-point residual
NOISE_FITS = 4  # frame-to-frame fits needed before the noise is known
EVIDENCE_FRAMES = 3
MIN_WIDTH = 80.0  # px: smaller faces' landmarks are too coarse for a blink
MAX_REFS = 6
REF_EVERY = 10  # frames between references (the first frame is one)
MAX_NOISE = 64  # residuals kept for the median


def _gaps(points: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)


def _brow_height(points: np.ndarray) -> float:
    return float(
        (
            np.linalg.norm(points[LEFT_BROW].mean(0) - points[LEFT_EYE].mean(0))
            + np.linalg.norm(points[RIGHT_BROW].mean(0) - points[RIGHT_EYE].mean(0))
        )
        / 2
    )


@dataclass(frozen=True)
class ExpressionChange:
    """What a plane's motion from one frame to another does not explain (inter-ocular distances)."""

    eye: float
    mouth: float
    brow: float
    rigid_residual: float  # RMS residual of the rigid points: the landmarks' own noise (and a head's parallax)


def expression_change(ref: np.ndarray, cur: np.ndarray) -> ExpressionChange | None:
    """Fit the homography ref -> cur on the rigid points; None where it cannot be fitted."""
    ref = np.asarray(ref, np.float64)
    cur = np.asarray(cur, np.float64)
    h, _ = cv2.findHomography(ref[RIGID].astype(np.float32), cur[RIGID].astype(np.float32), 0)
    if h is None or not np.isfinite(h).all():
        return None
    pred = cv2.perspectiveTransform(ref[None].astype(np.float32), h)[0].astype(np.float64)
    scale = float(np.linalg.norm(cur[LEFT_EYE].mean(0) - cur[RIGHT_EYE].mean(0)))
    if not np.isfinite(pred).all() or scale < 1e-6:
        return None
    eye = abs(float(np.mean(_gaps(cur, LIDS) - _gaps(pred, LIDS))))
    mouth = float(np.max(np.abs(_gaps(cur, LIPS) - _gaps(pred, LIPS))))
    brow = abs(_brow_height(cur) - _brow_height(pred))
    rigid = float(np.sqrt(((cur[RIGID] - pred[RIGID]) ** 2).sum(axis=1).mean()))
    return ExpressionChange(eye / scale, mouth / scale, brow / scale, rigid / scale)


@dataclass
class ExpressionEvidence:
    """One track's evidence, frame by frame; live stands once reached. It never accuses: keeping still is no
    evidence of an attack."""

    refs: list = field(default_factory=list)
    residuals: list = field(default_factory=list)  # the rigid points' residual from one measured frame to the next
    last: np.ndarray | None = None
    frames: int = 0  # frames measured (faces at least MIN_WIDTH wide)
    evidence_frames: int = 0
    peak: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the largest eye, mouth, brow change seen
    cue: str | None = None  # which of them first showed ('eye', 'mouth', 'brow')

    def add(self, landmarks: np.ndarray, width: float = float("inf")) -> None:
        """One frame's 106 landmarks (image pixels); `width`: the face box's width in pixels."""
        if width < MIN_WIDTH or landmarks is None or not np.isfinite(landmarks).all():
            return
        cur = np.asarray(landmarks, np.float64)
        changes = [c for c in (expression_change(r, cur) for r in self.refs) if c is not None]
        step = expression_change(self.last, cur) if self.last is not None else None
        if step is not None:  # frame to frame: the landmarks' jitter, not a head's turn that adds up over frames
            self.residuals.append(step.rigid_residual)
            del self.residuals[:-MAX_NOISE]
        self.last = cur
        if changes:
            self.peak = (
                max(self.peak[0], *(c.eye for c in changes)),
                max(self.peak[1], *(c.mouth for c in changes)),
                max(self.peak[2], *(c.brow for c in changes)),
            )
        if len(self.residuals) >= NOISE_FITS:
            floor = NOISE_RATIO * float(np.median(self.residuals))
            for c in changes:
                shown = [
                    name
                    for name, value, limit in (("eye", c.eye, EYE), ("mouth", c.mouth, MOUTH), ("brow", c.brow, BROW))
                    if value >= max(limit, floor)
                ]
                if shown:
                    self.evidence_frames += 1
                    self.cue = self.cue or shown[0]
                    break
        if not self.refs or (self.frames % REF_EVERY == 0 and len(self.refs) < MAX_REFS):
            self.refs.append(cur)
        self.frames += 1

    @property
    def live(self) -> bool:
        return self.evidence_frames >= EVIDENCE_FRAMES

    @property
    def score(self) -> float:
        """0.5 with no movement, towards 1 as expression frames come in (1 at EVIDENCE_FRAMES and beyond)."""
        return 0.5 + 0.5 * min(1.0, self.evidence_frames / EVIDENCE_FRAMES)

    def as_dict(self) -> dict[str, object]:
        return {
            "verdict": "live" if self.live else None,
            "frames": self.frames,
            "expression_frames": self.evidence_frames,
            "cue": self.cue,
            "peak": {"eye": round(self.peak[0], 4), "mouth": round(self.peak[1], 4), "brow": round(self.peak[2], 4)},
            "noise": round(float(np.median(self.residuals)), 4) if self.residuals else None,
        }
