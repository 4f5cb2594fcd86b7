"""Evidence of life from the face's shape in motion: when it moves, does it move as a head or as a flat piece?

A printed photo, an ID card or a photo filling the frame is flat. However it is held, tilted or brought closer, its
landmarks move exactly as the points of a plane under a perspective camera do: one homography maps a frame's
landmarks onto another's. A head is not flat: as it moves, it turns a little, the nose moves across the cheeks and
the face outline slides over the ears (parallax), and the jaw moves when it speaks; no homography explains that.

Each frame of a track is compared with the earlier reference frame it has moved furthest from. Where the face has
moved at least MOVED inter-ocular distances (mean displacement of the points that do not move with expression: the
face outline, the nose, the eye corners), the best homography between the two is fitted on those points and what it
leaves unexplained (RMS, inter-ocular distances) is that frame's residual. Once MOVED_FRAMES frames have moved, the
median residual is the track's: at SOLID or above, and NOISE_RATIO times the track's own frame-to-frame residual
(landmarks that jitter on a blurred face must not pass for a head), the face moved as a head does ('live').

Measured (docs/liveness.md, `evaluate-pad` with the check's scores): simulated clean photos and prints, moved,
tilted and brought close by a trembling hand (24 clips of the tuning set), median residual 0.0025-0.009 at their
highest (a plane's motion is a homography, so perspective and close-ups add nothing); real people who moved their
heads on real video 0.006-0.071. SOLID sits above every rigid one of the tuning set with a margin. Held out: clean
photos stayed under 0.01, but bent prints turned reached 0.015-0.022 (one of 89 was called live; its texture refused
it): a curved sheet is not a plane, so this is weaker evidence than a blink.

It never accuses (a real head moving straight at the camera can look nearly flat: 0.006) and says nothing of a face
that keeps still (a person may): a still face needs the motion check's blink or word. What it does not stop:
anything that really is 3D or bends (a mask, a print curved and turned), and a replayed video of a person who moved
(a screen shows the recorded head's parallax); those need the texture models, which must also say live before this
check can help make a track live.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The motion check's measures of the same landmarks: its reference frames (the first, then every REF_EVERY-th, at
# most MAX_REFS), its noise floor (NOISE_RATIO times the median of the last MAX_NOISE frame-to-frame residuals, once
# NOISE_FITS are in) and its smallest face (MIN_WIDTH px).
from kiosk.vision.expression_check import (
    LEFT_EYE,
    MAX_NOISE,
    MAX_REFS,
    MIN_WIDTH,
    NOISE_FITS,
    NOISE_RATIO,
    REF_EVERY,
    RIGHT_EYE,
    RIGID,
    expression_change,
)

MOVED = 0.1  # inter-ocular distances: the face moved this far from a reference frame (mean over the rigid points)
MOVED_FRAMES = 5  # frames that moved before the track's residual is judged
SOLID = 0.015  # median residual (inter-ocular distances) at which the face moved as a head
MAX_RESIDUALS = 90  # moved frames kept for the median (the latest): a track's memory stays bounded


@dataclass
class PlanarEvidence:
    """One track's residuals, frame by frame; live stands once the moved frames' median reaches SOLID."""

    refs: list[np.ndarray] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)  # of the frames that moved
    noise: list[float] = field(default_factory=list)  # from one measured frame to the next
    last: np.ndarray | None = None
    frames: int = 0  # frames measured (faces at least MIN_WIDTH wide)
    reach: float = 0.0  # the furthest the face moved from a reference (inter-ocular distances)

    def add(self, landmarks: np.ndarray | None, width: float = float("inf")) -> None:
        """One frame's 106 landmarks (image pixels); `width`: the face box's width in pixels."""
        if landmarks is None or width < MIN_WIDTH or not np.isfinite(landmarks).all():
            return
        cur = np.asarray(landmarks, np.float64)
        iod = float(np.linalg.norm(cur[list(LEFT_EYE)].mean(0) - cur[list(RIGHT_EYE)].mean(0)))
        if iod > 1e-6 and self.refs:
            moved = [float(np.linalg.norm(cur[RIGID] - ref[RIGID], axis=1).mean()) / iod for ref in self.refs]
            far = int(np.argmax(moved))
            self.reach = max(self.reach, moved[far])
            if moved[far] >= MOVED:
                change = expression_change(self.refs[far], cur)
                if change is not None:
                    self.residuals.append(change.rigid_residual)
                    del self.residuals[:-MAX_RESIDUALS]
        if self.last is not None:
            step = expression_change(self.last, cur)
            if step is not None:
                self.noise.append(step.rigid_residual)
                del self.noise[:-MAX_NOISE]
        self.last = cur
        if not self.refs or (self.frames % REF_EVERY == 0 and len(self.refs) < MAX_REFS):
            self.refs.append(cur)
        self.frames += 1

    @property
    def residual(self) -> float | None:
        """The median residual of the frames that moved, once MOVED_FRAMES have."""
        return float(np.median(self.residuals)) if len(self.residuals) >= MOVED_FRAMES else None

    @property
    def floor(self) -> float | None:
        """NOISE_RATIO times the median frame-to-frame residual, once NOISE_FITS are in."""
        return NOISE_RATIO * float(np.median(self.noise)) if len(self.noise) >= NOISE_FITS else None

    @property
    def live(self) -> bool:
        residual, floor = self.residual, self.floor
        return residual is not None and floor is not None and residual >= max(SOLID, floor)

    @property
    def score(self) -> float | None:
        """0-1: 0.5 at SOLID, lower for a flatter motion; None until MOVED_FRAMES frames have moved."""
        residual = self.residual
        return None if residual is None else min(1.0, 0.5 * residual / SOLID)

    def as_dict(self) -> dict[str, object]:
        residual = self.residual
        return {
            "verdict": "live" if self.live else None,
            "frames": self.frames,
            "moved_frames": len(self.residuals),
            "reach": round(self.reach, 3),
            "residual": None if residual is None else round(residual, 4),
            "noise": round(float(np.median(self.noise)), 4) if self.noise else None,
        }
