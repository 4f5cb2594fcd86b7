"""The built-in liveness check: does the face move as a 3D head, or as a flat card?

A printed photo or a phone held up to the camera is flat. However it is moved, tilted or brought closer, its
landmarks move as the points of one plane do: the new positions are a projective map (homography) of the old.
A head is not flat: as it turns, the nose moves across the cheeks and the face outline (parallax), which no
map of a plane reproduces. Two frames of a track are compared by fitting, by least squares over the 106
landmarks,

    new = A old + t - new (p . old) + depth v

(a homography, linearised, plus a parallax term: each landmark's depth on a generic head times a 2D vector v
common to all points). Under a weak-perspective camera a rigid head turning by an angle gives |v| ~ sin(angle);
a flat card gives v ~ 0 whatever it does, while its turn still shows in A (one axis foreshortened). So:

- a frame whose fit to an earlier frame of the track shows parallax (|v| >= LIVE_PARALLAX, significant
  against the fit's own residual) is a "3D" frame; LIVE_FRAMES of them in a row: the face moved as a head does;
- a frame that shows the face turned (foreshortened by FLAT_FORESHORTENING or more) with no parallax is a
  "flat" frame (counted, reported); it accuses only when it is strong: ACCUSE_FRAMES frames of a face at least
  ACCUSE_MIN_WIDTH px wide turned by some 23 degrees (ACCUSE_FORESHORTENING) with no parallax. Real faces talking
  or turning a little give "flat" frames at 0.02-0.064 on real camera video (0.054 at most on the clips the
  limits were tuned on; README "Liveness"), so a small turn is no evidence of a card.
- Fits whose residual is large (landmarks that do not agree with any smooth motion: a screen's moire, blur)
  count for neither. A face that never turns gives no verdict here; the texture models decide.

What it does not stop: anything that really is 3D or moves as a head (a replayed video of the passenger on a
screen whose recording turned, a mask, a bent print curved like a face); those need the texture models or an
attended gate; nor a card turned less than about 23 degrees (the border and texture checks are there for that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Depth of each of the 106 landmarks on a generic head (face widths, towards the camera, mean 0): an ellipsoid
# face front with the nose standing out, evaluated on a frontal face's landmarks (contour 0-32 at the back).
PRIOR = np.array(
    [
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.30,
        -0.27,
        -0.26,
        -0.30,
        -0.30,
        -0.30,
        0.14,
        0.13,
        0.08,
        0.11,
        0.16,
        0.13,
        0.18,
        0.13,
        0.10,
        0.15,
        -0.06,
        0.03,
        0.09,
        0.15,
        0.13,
        -0.02,
        0.05,
        0.14,
        0.11,
        0.10,
        0.06,
        0.10,
        0.08,
        0.06,
        0.10,
        0.07,
        0.06,
        0.11,
        0.09,
        0.17,
        0.21,
        0.15,
        0.11,
        0.15,
        0.21,
        0.14,
        0.10,
        0.14,
        0.21,
        0.18,
        0.22,
        0.32,
        0.19,
        0.30,
        0.26,
        0.31,
        0.37,
        0.38,
        0.18,
        0.29,
        0.25,
        0.30,
        0.36,
        0.43,
        0.12,
        0.12,
        0.17,
        0.15,
        0.09,
        0.12,
        0.05,
        0.11,
        0.14,
        0.08,
        0.14,
        0.10,
        0.04,
        -0.04,
        -0.17,
        0.12,
        0.07,
        -0.00,
        -0.11,
    ]
)
PRIOR = PRIOR - PRIOR.mean()

MAX_NOISE_LIVE = 0.015  # residual RMS (in units of the landmarks' RMS radius) above which a fit shows no parallax
MAX_NOISE_FLAT = 0.012  # ... and above which it shows no flatness either
MIN_CHI2 = 60.0  # significance of the parallax vector against the fit's residual (chi-square, 2 dof)
LIVE_PARALLAX = 0.10  # |v| of a "3D" frame: a head turned by some 6 degrees or more
FLAT_PARALLAX = 0.04  # |v| below which a turned face is a "flat" frame
FLAT_FORESHORTENING = 0.02  # 1 - (short axis / long axis) of the affine part: a turn of about 11 degrees
LIVE_FRAMES = 4  # consecutive 3D frames: parallax that lasts, not a landmark glitch
ACCUSE_FORESHORTENING = 0.08  # a flat frame this foreshortened (a turn of about 23 degrees) is strong evidence
ACCUSE_FRAMES = 4  # ... and this many of them accuse
ACCUSE_MIN_WIDTH = 100.0  # px: on smaller faces the landmarks are too coarse to accuse
MAX_REFS = 6  # earlier frames each new frame is compared with
REF_EVERY = 3  # every third frame becomes a reference, until MAX_REFS


@dataclass(frozen=True)
class PairFit:
    """How frame b's landmarks follow from frame a's."""

    parallax: float  # |v|
    chi2: float  # significance of v
    foreshortening: float  # 1 - short/long axis of the affine part: an out-of-plane turn of acos(1 - this)
    noise: float  # residual RMS


def normalise(points: np.ndarray) -> np.ndarray:
    """Landmarks centred on their mean and scaled to unit RMS radius: fits are in units of the face's size."""
    p = np.asarray(points, np.float64)
    centred = p - p.mean(axis=0)
    return centred / max(1e-9, float(np.sqrt((centred**2).sum(axis=1).mean())))


def fit_pair(a: np.ndarray, b: np.ndarray) -> PairFit:
    """Least squares of b = A a + t - b (p . a) + PRIOR v over the landmarks (both normalised)."""
    n = len(a)
    m = np.zeros((2 * n, 10))
    x, y = a[:, 0], a[:, 1]
    m[0::2, 0], m[0::2, 1], m[0::2, 4] = x, y, 1.0
    m[1::2, 2], m[1::2, 3], m[1::2, 5] = x, y, 1.0
    m[0::2, 6], m[0::2, 7] = -b[:, 0] * x, -b[:, 0] * y
    m[1::2, 6], m[1::2, 7] = -b[:, 1] * x, -b[:, 1] * y
    m[0::2, 8] = m[1::2, 9] = PRIOR
    rhs = b.reshape(-1)
    sol, *_ = np.linalg.lstsq(m, rhs, rcond=None)
    resid = rhs - m @ sol
    var = float(resid @ resid) / (2 * n - 10)
    v = sol[8:10]
    try:
        cov = var * np.linalg.inv(m.T @ m)[8:10, 8:10]
        chi2 = float(v @ np.linalg.solve(cov, v)) if var > 0 else float("inf")
    except np.linalg.LinAlgError:
        chi2 = 0.0
    s = np.linalg.svd(sol[:4].reshape(2, 2), compute_uv=False)
    return PairFit(float(np.linalg.norm(v)), chi2, 1.0 - float(s[1] / max(s[0], 1e-9)), float(np.sqrt(var)))


@dataclass
class DepthEvidence:
    """One track's evidence, frame by frame. Live stands once reached; an accusation needs strong flat frames."""

    refs: list = field(default_factory=list)
    frames: int = 0
    live_frames: int = 0
    flat_frames: int = 0  # weak: turned a little with no parallax (real faces do this too)
    strong_flat_frames: int = 0  # turned by ACCUSE_FORESHORTENING or more with no parallax, on a large face
    run: int = 0  # consecutive 3D frames up to now
    best_parallax: float = 0.0
    live: bool = False  # moved as a head (LIVE_FRAMES 3D frames in a row)

    def add(self, landmarks: np.ndarray, width: float = float("inf")) -> None:
        """One frame's 106 landmarks; `width`: the face box's width in pixels."""
        cur = normalise(landmarks)
        fits = [fit_pair(r, cur) for r in self.refs]
        telling = [f.parallax for f in fits if f.noise <= MAX_NOISE_LIVE and f.chi2 >= MIN_CHI2]
        self.best_parallax = max([self.best_parallax, *telling])
        if any(v >= LIVE_PARALLAX for v in telling):
            self.live_frames += 1
            self.run += 1
        else:
            self.run = 0
            flat = [f.foreshortening for f in fits if f.noise <= MAX_NOISE_FLAT and f.parallax < FLAT_PARALLAX]
            if any(v >= FLAT_FORESHORTENING for v in flat):
                self.flat_frames += 1
            if width >= ACCUSE_MIN_WIDTH and any(v >= ACCUSE_FORESHORTENING for v in flat):
                self.strong_flat_frames += 1
        self.live = self.live or self.run >= LIVE_FRAMES
        if self.frames % REF_EVERY == 0 and len(self.refs) < MAX_REFS:
            self.refs.append(cur)
        self.frames += 1

    @property
    def verdict(self) -> str | None:
        """'live' (moved as a head), 'attack' (turned far as a flat card), None (no strong evidence)."""
        if self.live:
            return "live"
        return "attack" if self.strong_flat_frames >= ACCUSE_FRAMES else None

    @property
    def score(self) -> float:
        """Share of the telling frames that were 3D (0.5 with none): above 0.5 leans live."""
        return (self.live_frames + 1) / (self.live_frames + self.flat_frames + 2)

    def as_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "frames": self.frames,
            "live_frames": self.live_frames,
            "flat_frames": self.flat_frames,
            "strong_flat_frames": self.strong_flat_frames,
            "parallax": round(self.best_parallax, 4),
        }
