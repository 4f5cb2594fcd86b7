"""The liveness checks: one class per cue, all named in `CHECKS`.

Every quality frame of a track brings a `PadObservation` (what the models and image measures saw of that face);
each check of the track takes it and keeps its own evidence. A check says:

- `attack`: it has strong evidence of a presentation attack (each check's own rule, with the face size and
  sharpness it needs; see each class). One accusation rejects the track.
- `live`: its evidence says live. Only a check that `vouches` can make a track live.
- None: not enough evidence, or evidence too weak either way. Weak evidence never accuses.

A check that is `required` must have gathered its evidence (a verdict, or enough frames to be unsure) before the
track can be called live: the texture models are required, so a model that fails on every frame leaves the accept
waiting, and failing closed.

Each vouching check gives evidence of one kind, its `cue`: `image` (the texture models: what the surface looks
like) or `movement` (the face moves as a living one: a blink, the lips, the brows: the motion check; or, when it
moves, it moves as a head and not as a flat piece: the planar check; the depth check's linearised head parallax is
reported but does not vouch, see DepthCheck). The two are independent: a print or a photo filling the frame can look
live to the texture models and never moves but rigidly, as a plane; a replayed video moves as its person did and the
texture models see the screen.

Fusion (kiosk.vision.liveness.TrackLiveness): attack if any check accuses; live only on strong evidence of every
kind: for each cue among the track's vouching checks, one of them says live, every required check has its evidence
and the track has `pad.min_frames` frames (so the accusers have had theirs); else no verdict yet, and the accept
waits, then fails closed (`liveness_unverified`). No check asks for a head turn: a passenger standing still blinks
and moves the lips within a second or two, and the texture models see skin.

A new cue is one class (subclass `LivenessCheck`, give it a `name`) plus its name in `pad.checks`: a built-in one
here, listed in CHECKS; a site's own anywhere on the import path, named there as `module:Class`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from kiosk.config import PadConfig
from kiosk.vision.depth_check import DepthEvidence
from kiosk.vision.expression_check import ExpressionEvidence
from kiosk.vision.planar_check import PlanarEvidence


@dataclass(frozen=True)
class BorderView:
    """Long straight edges around one face (a card's or a phone's border, or the scene's), in face units.

    `lines`: (K, 3) angle (radians, 0-pi), signed distance of the line from the face centre and length, both in
    face widths; `face`: the face's centre x, y and width in image pixels."""

    lines: np.ndarray
    face: tuple[float, float, float]


@dataclass(frozen=True)
class PadObservation:
    """One face in one frame, as the liveness checks see it."""

    landmarks: np.ndarray | None  # (106, 2) image pixels; None if the landmark model failed
    texture: float | None = None  # mean probability of "real" over models.pad; None without models, NaN on failure
    chroma: float = 0.0  # screen_signs()
    width: float = 0.0  # face box width, px
    border: BorderView | None = None  # border_lines(); None where not measured
    inside: bool = True  # the face box lies inside the frame, INSIDE_MARGIN of its width from every edge


INSIDE_MARGIN = 0.05


def inside_frame(box: np.ndarray, width: int, height: int) -> bool:
    """Whether the face box (x1, y1, x2, y2) keeps INSIDE_MARGIN of its width from every edge of the frame: the
    landmarks of a face the edge cuts are guesses, and they wobble as the edge moves across it."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    m = INSIDE_MARGIN * (x2 - x1)
    return x1 >= m and y1 >= m and x2 <= width - 1 - m and y2 <= height - 1 - m


class LivenessCheck:
    """One cue. Subclasses set `name` (the `pad.checks` entry) and keep their evidence in `add()`."""

    name: ClassVar[str] = ""
    vouches: ClassVar[bool] = False  # its 'live' can make a track live
    cue: ClassVar[str] = "image"  # the kind of evidence its 'live' is: a track needs a live of every kind
    required: ClassVar[bool] = False  # a track is not live until this check has its evidence

    def __init__(self, cfg: PadConfig) -> None:
        self.cfg = cfg
        self.frames = 0

    @classmethod
    def active(cls, textured: bool) -> bool:
        """Whether the check runs with this install (the texture check needs models)."""
        return True

    def add(self, obs: PadObservation) -> None:
        self.frames += 1

    @property
    def verdict(self) -> str | None:
        return None

    @property
    def has_evidence(self) -> bool:
        """For a required check: enough evidence gathered to be counted (a verdict, or sure it is unsure)."""
        return self.verdict is not None

    @property
    def score(self) -> float | None:
        """0-1, above 0.5 leans live; None where the check has no graded evidence."""
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "frames": self.frames}


class TextureCheck(LivenessCheck):
    """The texture models (MiniFASNet, shipped; `models.pad`): the mean probability of "real" over the track's
    frames. Live at `pad.threshold` or above, and steadily so: nine frames in ten (the 10th percentile) no more than
    STEADY_DIP under it; an attack below `pad.attack_below` (print grain, a screen's pixel grid and glare are what these
    models see; the real replays we have score 0.00-0.03, the real people 0.29-1.00); in between, unsure: no
    verdict, the accept waits and fails closed. Only frames of a face at least TEXTURE_MIN_WIDTH px wide count (the
    smallest faces the models were checked on in real video; on smaller ones their scores of our simulated prints
    swing from 0 to 0.9), and at least TEXTURE_FRAMES of them.

    Why steadily: a screen or a glossy print that the models see as skin in some frames they see as a screen in
    others, as its reflections and moire come and go with the hand (the real iPhone replay we hold: 0.42-0.995
    frame by frame, 10th percentile 0.41); a real face's score is steady (every real person the default config
    accepts: 10th percentile 0.87 or more at the decision). A mean that a good stretch lifts over the threshold is
    doubtful evidence: it waits."""

    name = "texture"
    vouches = True
    required = True

    def __init__(self, cfg: PadConfig) -> None:
        super().__init__(cfg)
        self.scores: list[float] = []

    @classmethod
    def active(cls, textured: bool) -> bool:
        return textured

    def add(self, obs: PadObservation) -> None:
        super().add(obs)
        if obs.texture is not None and math.isfinite(obs.texture) and obs.width >= TEXTURE_MIN_WIDTH:
            self.scores.append(float(obs.texture))

    @property
    def score(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    @property
    def steady(self) -> float | None:
        """The 10th percentile of the frames' scores: what nine frames in ten reach."""
        return float(np.percentile(self.scores, 10)) if self.scores else None

    @property
    def verdict(self) -> str | None:
        if len(self.scores) < TEXTURE_FRAMES:
            return None
        mean = self.score or 0.0
        if mean >= self.cfg.threshold:
            return "live" if (self.steady or 0.0) >= self.cfg.threshold - STEADY_DIP else None
        return "attack" if mean < self.cfg.attack_below else None

    @property
    def has_evidence(self) -> bool:
        return len(self.scores) >= TEXTURE_FRAMES

    def as_dict(self) -> dict[str, Any]:
        score = self.score
        steady = self.steady
        return {
            "verdict": self.verdict,
            "frames": len(self.scores),
            "score": None if score is None else round(score, 4),
            "steady": None if steady is None else round(steady, 4),
        }


TEXTURE_FRAMES = 5
TEXTURE_MIN_WIDTH = 90.0
STEADY_DIP = 0.15  # how far under pad.threshold the 10th percentile of a live track's scores may lie (TextureCheck)


class _LandmarkCheck(LivenessCheck):
    """A movement check over the face's 106 landmarks: its `evidence` object takes each frame's landmarks."""

    vouches = True
    cue = "movement"
    evidence: DepthEvidence | ExpressionEvidence | PlanarEvidence
    # whether a face the frame's edge cuts is measured (inside_frame): its landmarks are guesses, and they wobble as
    # the edge moves across it
    measures_cut_faces: ClassVar[bool] = True

    def __init__(self, cfg: PadConfig) -> None:
        super().__init__(cfg)
        self.cut_frames = 0  # frames of a face the frame's edge cuts, not measured

    def add(self, obs: PadObservation) -> None:
        if not obs.inside and not self.measures_cut_faces:
            self.frames += 1
            self.cut_frames += 1
            return
        super().add(obs)
        if obs.landmarks is not None:
            self.evidence.add(obs.landmarks, obs.width)

    @property
    def score(self) -> float | None:
        return self.evidence.score if self.evidence.frames else None

    def as_dict(self) -> dict[str, Any]:
        return self.evidence.as_dict()


class DepthCheck(_LandmarkCheck):
    """Does the face move as a head or as a flat card (kiosk.vision.depth_check)? An attack only on strong evidence
    (a large face turned some 23 degrees with no parallax, over several frames: depth_check.ACCUSE_*). Real faces
    talking and turning a little look flat-ish: a small turn is no evidence either way.

    It reports a head's parallax ('live') but does not vouch: its linearised plane fit read parallax into rigid
    faces seen close up in perspective (held-out simulated attacks: 3 of 33 clean photos filling the frame and 3 of
    52 prints, all moved only rigidly), so its turn is no evidence of life; the motion and planar checks are (the
    planar check fits a homography, which a plane's motion under perspective is exactly)."""

    name = "depth"
    vouches = False
    evidence: DepthEvidence

    def __init__(self, cfg: PadConfig) -> None:
        super().__init__(cfg)
        self.evidence = DepthEvidence()

    @property
    def verdict(self) -> str | None:
        return self.evidence.verdict


class MotionCheck(_LandmarkCheck):
    """Does the face move as a living one (a blink, the lips, the brows), or as one rigid piece
    (kiosk.vision.expression_check)? Live once it has seen expression frames; never an accusation (a person may
    keep still): a track it has not vouched for waits, and its accept fails closed. It is the one check that
    vouches for movement by default. A face the frame's edge cuts is not measured (inside_frame): held-out
    simulated photos of a group, another face half out of the frame, wobbled enough to pass for a blink."""

    name = "motion"
    measures_cut_faces = False

    def __init__(self, cfg: PadConfig) -> None:
        super().__init__(cfg)
        self.evidence = ExpressionEvidence()

    def as_dict(self) -> dict[str, Any]:
        return {**self.evidence.as_dict(), "cut_frames": self.cut_frames}

    @property
    def verdict(self) -> str | None:
        return "live" if self.evidence.live else None


class PlanarCheck(_LandmarkCheck):
    """When the face moves, does it move as a head or as a flat piece (kiosk.vision.planar_check)? Live once the
    frames that moved far enough are, in the median, further from a plane's motion than any rigid photo or print
    gave. Nothing of a face that keeps still; never an accusation. It vouches for movement as the motion check
    does: a person who turns or nods a little, or walks up, without a blink or a word in the wait, is vouched for
    here; a photo or card moved by hand is not. A face the frame's edge cuts is not measured (inside_frame)."""

    name = "planar"
    measures_cut_faces = False
    evidence: PlanarEvidence

    def __init__(self, cfg: PadConfig) -> None:
        super().__init__(cfg)
        self.evidence = PlanarEvidence()

    @property
    def verdict(self) -> str | None:
        return "live" if self.evidence.live else None


class ScreenCheck(LivenessCheck):
    """A re-captured screen's sub-pixel grid and moire show as fine coloured fringes (screen_signs): SCREEN_FRAMES
    frames at SCREEN_CHROMA or more accuse. Real faces on our real clips stay at 3.8 or less (webcam in a dark room
    included), so 12 is strong evidence. It never vouches."""

    name = "screen"

    def __init__(self, cfg: PadConfig) -> None:
        super().__init__(cfg)
        self.fringed = 0
        self.peak = 0.0

    def add(self, obs: PadObservation) -> None:
        super().add(obs)
        self.peak = max(self.peak, obs.chroma)
        self.fringed += obs.chroma >= SCREEN_CHROMA

    @property
    def verdict(self) -> str | None:
        return "attack" if self.fringed >= SCREEN_FRAMES else None

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "frames": self.fringed, "peak": round(self.peak, 2)}


SCREEN_CHROMA = 12.0
SCREEN_FRAMES = 3


class BorderCheck(LivenessCheck):
    """A printed photo or a phone held up has a border: straight edges around the face that move with it, while
    the scene's edges stay where they are. A frame shows an attached edge when a long straight edge outside the
    face is found at the same place relative to the face in an earlier frame of the track, the face has moved across
    that line since (so a still line of the scene would have shown elsewhere), and no still line explains it.
    BORDER_FRAMES such frames accuse. No evidence while the face does not move relative to the scene; it never
    vouches. On our real clips no bona fide frame showed an attached edge; the real replays did (phone bezels).

    Required: a track that has shown an attached edge, but fewer than BORDER_FRAMES, waits for this check (it is not
    live) until the edge is either confirmed (attack) or has not been seen for BORDER_CLEAR frames. Weak evidence
    never accuses, but it stops a texture score from accepting a card whose edges are just starting to show; a
    track that never shows an attached edge (every bona fide one we have) does not wait at all."""

    name = "border"
    required = True

    def __init__(self, cfg: PadConfig) -> None:
        super().__init__(cfg)
        self.history: list[BorderView] = []
        self.attached_frames = 0
        self.last_attached = 0  # self.frames when an attached edge was last seen

    def add(self, obs: PadObservation) -> None:
        super().add(obs)
        view = obs.border
        if view is None:
            return
        if any(attached_edges(view, earlier) for earlier in self.history[-BORDER_LOOKBACK::BORDER_STRIDE]):
            self.attached_frames += 1
            self.last_attached = self.frames
        self.history.append(view)
        del self.history[:-BORDER_LOOKBACK]

    @property
    def verdict(self) -> str | None:
        return "attack" if self.attached_frames >= BORDER_FRAMES else None

    @property
    def has_evidence(self) -> bool:
        return not self.attached_frames or self.verdict is not None or self.frames - self.last_attached >= BORDER_CLEAR

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "frames": self.attached_frames, "waiting": not self.has_evidence}


BORDER_FRAMES = 4
BORDER_CLEAR = 15  # frames without an attached edge after which a few earlier ones count for nothing (0.5 s at 30 fps)
BORDER_LOOKBACK = 30  # earlier frames a frame is compared with (every BORDER_STRIDE-th): slow motion adds up
BORDER_STRIDE = 3
BORDER_ANGLE = math.radians(4.0)  # the same line: angle within this
BORDER_OFFSET = 0.04  # ... and distance from the face centre within this (face widths)
BORDER_MOVED = 2.5 * BORDER_OFFSET  # the face moved across a line this far: a still line would show elsewhere


def attached_edges(now: BorderView, earlier: BorderView) -> int:
    """How many of `now`'s lines moved with the face since `earlier` (see BorderCheck)."""
    if not len(now.lines) or not len(earlier.lines):
        return 0
    cx, cy, w = now.face
    px, py, pw = earlier.face
    theta, rho = now.lines[:, 0], now.lines[:, 1]
    nx, ny = -np.sin(theta), np.cos(theta)
    # where each line would have been, in the earlier frame's face units, had it stood still in the image
    still = (rho * w + (cx - px) * nx + (cy - py) * ny) / pw
    moved = np.abs(still - rho) >= BORDER_MOVED
    d_angle = np.abs(((earlier.lines[None, :, 0] - theta[:, None] + np.pi / 2) % np.pi) - np.pi / 2) < BORDER_ANGLE
    with_face = (d_angle & (np.abs(earlier.lines[None, :, 1] - rho[:, None]) < BORDER_OFFSET)).any(axis=1)
    with_scene = (d_angle & (np.abs(earlier.lines[None, :, 1] - still[:, None]) < BORDER_OFFSET)).any(axis=1)
    return int((moved & with_face & ~with_scene).sum())


BORDER_NORM = 64.0  # the face's width in the analysed patch, px
BORDER_HALF = 1.7  # the patch reaches this many face widths from the face centre
BORDER_MIN_LENGTH = 0.8  # face widths: longer than any curve of a head or its hair looks straight
_LSD = None


def border_lines(image: np.ndarray, box: np.ndarray) -> BorderView:
    """Long straight edges (OpenCV's line segment detector) in a patch around the face, outside the face itself
    and away from the frame's edge, in face units (see BorderView)."""
    global _LSD
    if _LSD is None:
        _LSD = cv2.createLineSegmentDetector()
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    w = max(1.0, x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    k = BORDER_NORM / w
    size = int(2 * BORDER_HALF * BORDER_NORM)
    m = np.array([[k, 0, size / 2 - cx * k], [0, k, size / 2 - cy * k]])
    patch = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
    # each colour channel on its own: a card's edge against a wall of its photo's brightness but another colour
    # (a brown photo on a purple wall) is there in blue or red and nearly gone in grey
    channels = cv2.split(patch) if patch.ndim == 3 else [patch]
    h_img, w_img = image.shape[:2]
    lines = np.concatenate([_channel_lines(_LSD.detect(c)[0], cx, cy, w, k, w_img, h_img) for c in channels])
    return BorderView(lines, (cx, cy, w))


def _channel_lines(
    found: np.ndarray | None, cx: float, cy: float, w: float, k: float, w_img: int, h_img: int
) -> np.ndarray:
    """One channel's segments, pieces of one line joined, as (angle, distance, length) in face units."""
    if found is None:
        return np.zeros((0, 3))
    seg = found.reshape(-1, 4).astype(np.float64)
    ax, ay, bx, by = seg[:, 0], seg[:, 1], seg[:, 2], seg[:, 3]
    length = np.hypot(bx - ax, by - ay) / BORDER_NORM
    mx, my = (ax + bx) / 2 / BORDER_NORM - BORDER_HALF, (ay + by) / 2 / BORDER_NORM - BORDER_HALF
    # the segment's middle in the image: inside the frame, not on its edge (the replicated border makes lines)
    ix, iy = cx + mx * w, cy + my * w
    margin = 3.0 / k
    keep = (
        (length >= BORDER_PIECE)
        & ~((np.abs(mx) < 0.6) & (np.abs(my) < 0.7))
        & (ix > margin)
        & (iy > margin)
        & (ix < w_img - 1 - margin)
        & (iy < h_img - 1 - margin)
    )
    theta = np.arctan2(by - ay, bx - ax) % np.pi
    rho = mx * -np.sin(theta) + my * np.cos(theta)
    lines = join_collinear(np.stack([theta, rho, length], axis=1)[keep])
    return lines[lines[:, 2] >= BORDER_MIN_LENGTH]


BORDER_PIECE = 0.25  # face widths: shorter segments are not joined into a line


def join_collinear(lines: np.ndarray) -> np.ndarray:
    """Segments on one straight line joined into one, its length their sum: the line segment detector breaks a
    card's edge wherever the scene behind it turns from darker to lighter than the photo (seen on simulated
    prints held up against a plain wall: two halves of 0.7 face widths, neither long enough alone)."""
    order = np.argsort(-lines[:, 2])
    lines = lines[order]
    used = np.zeros(len(lines), bool)
    out = []
    for i in range(len(lines)):
        if used[i]:
            continue
        d_angle = np.abs(((lines[:, 0] - lines[i, 0] + np.pi / 2) % np.pi) - np.pi / 2) < BORDER_ANGLE
        same = ~used & d_angle & (np.abs(lines[:, 1] - lines[i, 1]) < BORDER_OFFSET)
        used |= same
        out.append((lines[i, 0], lines[i, 1], float(lines[same, 2].sum())))
    return np.array(out, np.float64).reshape(-1, 3)


CHECKS: dict[str, type[LivenessCheck]] = {
    c.name: c for c in (TextureCheck, DepthCheck, MotionCheck, PlanarCheck, ScreenCheck, BorderCheck)
}


def check_class(name: str) -> type[LivenessCheck]:
    """A built-in check by name, or a site's own as `module:Class` (raises ValueError, saying why)."""
    if name in CHECKS:
        return CHECKS[name]
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ValueError(f"unknown liveness check {name!r}: expected one of {', '.join(CHECKS)} or module:Class")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"liveness check {name!r} cannot be loaded: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, LivenessCheck)):
        raise ValueError(f"liveness check {name!r} is not a kiosk.vision.liveness_checks.LivenessCheck")
    return cls
