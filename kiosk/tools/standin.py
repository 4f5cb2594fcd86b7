"""A bona fide stand-in: a photo's head turned in 3D, blinking and moving its mouth, for tests and the demo that
need a passenger accepted with liveness on.

A video made by moving a photo rigidly (sliding, scaling, tilting it as one piece) is, for liveness, a print
attack: a flat card. The stand-in instead warps the photo as a face would look: a triangle mesh through the
face's 106 landmarks, each vertex given a depth from a generic head shape (a rounded face front, the nose
standing out along its ridge), rotated in 3D and drawn back to front; and, for expression, the upper eyelids
drawn down onto the lower ones (a blink: the skin above the eye stretched over it) and the lower lip and chin
lowered (the mouth opening onto a dark gap). `Expressions` is a per-frame schedule of blinks and mouth
movements, `natural_expressions` one for a person standing in front of the camera.

What the demo and the tests can count on (tests/test_standin.py measures it on the sample portrait
yaoming.jpg): the detector finds the stand-in in every frame, the 106-landmark model follows its blink (the
eyes' opening drops by about two thirds when shut) and its mouth, and a standing stand-in (scenes.standing)
holds its box still to 2 px except while a word drops its chin. On gdp.jpg's players, whose eyes are a few shadowed
pixels in that photo, the landmark model sees only 15-20 % of a blink: use the portrait for blink evidence.

What it proves: the verifier's liveness plumbing accepts a face whose landmarks move non-rigidly (eyelids, the
mouth) or with the parallax of a 3D head, given live texture evidence (the shipped texture models score such a
rendering of a photo 0.5-0.9, doubtful at the shipped threshold, so the tests give it with a test texture
model, and `kiosk demo` judges on movement alone and says so). What it does not prove:
anything about a real person in front of a real camera (no skin, no real depth, a blink drawn by stretching
the photo's own eyelid), so nothing about real passengers' BPCER; nor anything about attacks -- the stand-in is
pasted into the video as no one in front of a camera can paste anything (printed or shown on a screen, it is a
print or a replay attack). Both need real video.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # (the stand-in itself runs no model)
    from kiosk.vision.landmarks import LandmarkModel
    from kiosk.vision.models.detector import ScrfdDetector

from kiosk.vision.landmarks import (
    CHIN,
    CONTOUR,
    LEFT_BROW,
    LEFT_EYE,
    LOWER_LIDS,
    MOUTH,
    POINTS,
    RIGHT_BROW,
    RIGHT_EYE,
    UPPER_LIDS,
)

# More of InsightFace's 2d106det layout (kiosk.vision.landmarks has the parts; checked on the sample portrait
# yaoming.jpg): 34/38 and 88/92 lie on the pupils. Mouth: outer corners 52 and 61, inner corners 65 and 69, inner
# upper lip 66, 62, 70 over the inner lower lip 54, 60, 57, outer lower lip 55, 56, 53, 59, 58.
EYES = (((35, 39), (33, 36, 37), (34, 38)), ((89, 93), (87, 90, 91), (88, 92)))  # corners, lower lid, pupil
MOUTH_CORNERS = (52, 61, 65, 69)
INNER_UPPER_LIP = (66, 62, 70)
INNER_LOWER_LIP = (54, 60, 57)
LOWER_LIP = (54, 60, 57, 55, 56, 53, 59, 58)
BROWS = LEFT_BROW + RIGHT_BROW
MOUTH_GAP_BGR = (28, 30, 66)  # dark red-brown: the inside of an open mouth
CORNER_DROP = 0.35  # share of the jaw's drop that the mouth corners follow


def _head_depth(pts: np.ndarray, face: np.ndarray, eyes: np.ndarray, nose: np.ndarray) -> np.ndarray:
    """Depth (towards the camera, pixels) of image points on a generic head: a rounded face front that falls
    off towards the cheeks and the chin, and a nose ridge rising from between the eyes to the tip."""
    x1, y1, x2, y2 = face
    w = max(1.0, x2 - x1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    u = (pts[:, 0] - cx) / (0.55 * w)
    v = (pts[:, 1] - cy) / (0.75 * w)
    front = 0.42 * w * np.sqrt(np.clip(1 - u**2, 0, None)) * np.clip(1 - v**4, 0, None)
    top = eyes.mean(axis=0)
    axis = nose - top
    length = max(1.0, float(np.linalg.norm(axis)))
    along = np.clip(((pts - top) @ axis) / length**2, 0, 1.15)
    rel = pts - top
    across = np.abs(axis[0] * rel[:, 1] - axis[1] * rel[:, 0]) / length / (0.11 * w)
    ridge = 0.2 * w * along * np.clip(1 - across, 0, None) * np.where(along > 1, (1.15 - along) / 0.15, 1)
    return front + ridge


@dataclass(frozen=True)
class Expressions:
    """A stand-in's face over the frames of its walk (frame 0 = the walk's first): how far its eyes are shut
    (0-1) and its jaw dropped (face heights), for HeadTurn.render. Past the end: a neutral face."""

    blink: tuple[float, ...]
    mouth: tuple[float, ...]

    def at(self, i: int) -> tuple[float, float]:
        """(blink, mouth) at frame `i` of the walk."""
        blink = self.blink[i] if 0 <= i < len(self.blink) else 0.0
        mouth = self.mouth[i] if 0 <= i < len(self.mouth) else 0.0
        return blink, mouth


BLINK = (0.45, 0.9, 1.0, 0.75, 0.4, 0.15)  # one blink at 30 fps: shut fast, open slower (~0.2 s)
FIRST_BLINK_S = (0.05, 0.4)  # the first blink starts in this span: over within the first 0.6 s
BLINK_EVERY_S = (1.5, 3.0)
FIRST_WORD_S = (0.5, 1.2)
WORD_EVERY_S = (1.5, 3.5)
WORD_S = (0.25, 0.45)
WORD_OPEN = (0.03, 0.07)  # jaw drop of a word, face heights


def natural_expressions(
    frames: int,
    fps: float = 30.0,
    seed: int = 0,
    words: bool = True,
    blink_every_s: tuple[float, float] = BLINK_EVERY_S,
) -> Expressions:
    """A person standing at the gate: a blink of about 0.2 s every 1.5-3 s (the first within 0.6 s, so a
    short clip has one) and, with `words`, now and then a word (one or two syllables of a slightly opened
    mouth; the first within 0.5-1.2 s), at seeded random times. The eyes and the mouth are what moves: a
    liveness check that wants non-rigid motion sees it, with no head turn and no walk. A word drops the chin,
    so the face's box grows downwards for it (a few px at 150 px faces); without words the box holds still.
    `blink_every_s`: the span the time between two blinks is drawn from."""
    rng = np.random.default_rng(seed)
    blink = np.zeros(frames)
    mouth = np.zeros(frames)
    shape = np.interp(
        np.linspace(0, len(BLINK) - 1, max(2, round(len(BLINK) * fps / 30.0))), np.arange(len(BLINK)), BLINK
    )
    t = rng.uniform(*FIRST_BLINK_S)
    while (start := round(t * fps)) < frames:
        end = min(frames, start + len(shape))
        blink[start:end] = np.maximum(blink[start:end], shape[: end - start])
        t += rng.uniform(*blink_every_s)
    t = rng.uniform(*FIRST_WORD_S) if words else float(frames) / fps
    while (start := round(t * fps)) < frames:
        n = max(2, round(rng.uniform(*WORD_S) * fps))
        syllables = int(rng.integers(1, 3))
        word = rng.uniform(*WORD_OPEN) * np.abs(np.sin(np.pi * syllables * (np.arange(n) + 0.5) / n))
        end = min(frames, start + n)
        mouth[start:end] = np.maximum(mouth[start:end], word[: end - start])
        t += rng.uniform(*WORD_EVERY_S)
    return Expressions(tuple(float(v) for v in blink), tuple(float(v) for v in mouth))


@dataclass
class HeadTurn:
    """A person crop (see scenes.person_crop) that can be drawn with the head turned, the eyes shut and the mouth
    open."""

    image: np.ndarray
    points: np.ndarray  # (V, 2) mesh vertices in the crop
    depth: np.ndarray  # (V,) depth of each vertex; 0 for the fixed frame around the head
    triangles: np.ndarray  # (T, 3) vertex indices
    centre: np.ndarray  # rotation centre in the crop (the face's centre)
    # vertex displacements (V, 2) at a full blink / a jaw dropped by one face height, built on first use from the
    # first 106 vertices (from_landmarks puts the landmarks there)
    _blink: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _jaw: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_landmarks(
        cls, crop: np.ndarray, landmarks: np.ndarray, face: np.ndarray, eyes: np.ndarray, nose: np.ndarray
    ) -> HeadTurn:
        """`landmarks` (106, 2), `face` box, `eyes` (2, 2) and `nose` (2,) keypoints, all in crop pixels."""
        h, w = crop.shape[:2]
        fw = face[2] - face[0]
        centre = np.array([(face[0] + face[2]) / 2, (face[1] + face[3]) / 2], np.float64)
        angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        ring = centre + np.stack([np.cos(angles) * 0.78 * fw, np.sin(angles) * 0.95 * fw], axis=1)  # around the head
        edge = np.array(
            [[0, 0], [w / 2, 0], [w - 1, 0], [w - 1, h / 2], [w - 1, h - 1], [w / 2, h - 1], [0, h - 1], [0, h / 2]],
            np.float64,
        )
        inner = np.asarray(landmarks, np.float64)
        points = np.concatenate([inner, np.clip(ring, 0, [w - 1, h - 1]), edge])
        depth = np.concatenate([_head_depth(inner, face, eyes, nose), np.zeros(len(ring) + len(edge))])
        sub = cv2.Subdiv2D((-1, -1, w + 2, h + 2))
        for p in points:
            sub.insert((float(p[0]), float(p[1])))
        tris = []
        for t in np.asarray(sub.getTriangleList()).reshape(-1, 3, 2):
            idx = [int(np.argmin(((points - q) ** 2).sum(1))) for q in t]
            if len(set(idx)) == 3:
                tris.append(idx)
        return cls(crop, points, depth, np.array(tris, np.int64), centre)

    def render(self, yaw: float = 0.0, pitch: float = 0.0, blink: float = 0.0, mouth: float = 0.0) -> np.ndarray:
        """The crop with the head turned by `yaw` and `pitch` (radians), orthographic, back to front; the eyes
        closed by `blink` (0 open, 1 shut) and the jaw dropped by `mouth` face heights (brow to chin; a word is
        about 0.03-0.08), the mouth's opening filled dark."""
        blink = float(np.clip(blink, 0.0, 1.0)) if blink >= 1e-3 else 0.0
        mouth = float(mouth) if mouth >= 1e-4 else 0.0  # (a hair-thin gap would draw a dark line)
        pts = self.points
        if blink or mouth:
            blink_move, jaw_move = self._expression_basis()
            pts = pts + blink * blink_move + mouth * jaw_move
        moved, z = _turned(pts, self.depth, self.centre, yaw, pitch)
        out = self.image.copy()
        h, w = out.shape[:2]
        for t in self.triangles[np.argsort(z[self.triangles].mean(axis=1))]:
            src, dst = self.points[t].astype(np.float32), moved[t].astype(np.float32)
            d = dst[1:] - dst[0]
            if abs(float(d[0, 0] * d[1, 1] - d[0, 1] * d[1, 0])) < 0.5:
                continue  # shut (an eye's inside under its lid): warpAffine cannot invert a flat triangle
            x0, y0 = np.floor(dst.min(axis=0)).astype(int)
            x1, y1 = np.ceil(dst.max(axis=0)).astype(int) + 1
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            if x1 <= x0 or y1 <= y0:
                continue
            m = cv2.getAffineTransform(src, dst - np.array([x0, y0], np.float32))
            patch = cv2.warpAffine(
                self.image, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillConvexPoly(mask, np.round(dst - [x0, y0]).astype(np.int32), 1)
            region = out[y0:y1, x0:x1]
            region[mask > 0] = patch[mask > 0]
        if mouth:
            self._fill_mouth(out, mouth, yaw, pitch)
        return out

    def _expression_basis(self) -> tuple[np.ndarray, np.ndarray]:
        """The blink's and the jaw's vertex displacements, from the 106 landmarks (the first vertices); made
        once."""
        if self._blink is not None and self._jaw is not None:
            return self._blink, self._jaw
        if len(self.points) < POINTS:
            raise ValueError("expressions need a mesh through the 106 landmarks (HeadTurn.from_landmarks)")
        lm = self.points[:POINTS]
        blink = np.zeros_like(self.points)
        for up, low in zip(UPPER_LIDS, LOWER_LIDS, strict=True):
            blink[up] = lm[low] - lm[up]
        for corners, lower, pupils in EYES:  # the pupils go under the lid too: onto the lower lid's line
            line = lm[list(corners + lower)]
            line = line[np.argsort(line[:, 0])]
            for i in pupils:
                blink[i, 1] = np.interp(lm[i, 0], line[:, 0], line[:, 1]) - lm[i, 1]
        jaw = np.zeros_like(self.points)
        height = max(1.0, float(lm[CHIN, 1] - lm[list(BROWS), 1].min()))
        corner_y = float(lm[list(MOUTH_CORNERS), 1].mean())
        for i in CONTOUR:  # the jaw line: still beside the mouth's corners, all the way down at the chin
            jaw[i, 1] = np.clip((lm[i, 1] - corner_y) / max(1.0, lm[CHIN, 1] - corner_y), 0.0, 1.0)
        jaw[list(LOWER_LIP), 1] = 1.0
        jaw[list(MOUTH_CORNERS), 1] = CORNER_DROP
        self._blink, self._jaw = blink, jaw * height
        return self._blink, self._jaw

    def _fill_mouth(self, out: np.ndarray, mouth: float, yaw: float, pitch: float) -> None:
        """The gap the dropped jaw opens between the lips, drawn dark: warping alone would stretch the lips (and
        any teeth the photo shows) over it. The gap runs from the line between the inner lips, as the upper lip
        holds it, down to the same line moved with the lower lip."""
        lm = self.points[:POINTS]
        seam = (lm[list(INNER_UPPER_LIP)] + lm[list(INNER_LOWER_LIP)]) / 2
        left, right = lm[65], lm[69]
        _, jaw = self._expression_basis()  # (made by render before it draws the mouth)
        drop = mouth * jaw[INNER_LOWER_LIP[1], 1]
        corner = mouth * jaw[65, 1]
        upper = np.concatenate([[left + [0, corner]], seam, [right + [0, corner]]])
        lower = seam[::-1] + [0, drop]
        ring = np.concatenate([upper, lower])
        depth = np.concatenate(
            [
                [self.depth[65]],
                (self.depth[list(INNER_UPPER_LIP)] + self.depth[list(INNER_LOWER_LIP)]) / 2,
                [self.depth[69]],
            ]
        )
        depth = np.concatenate([depth, depth[1:-1][::-1]])
        turned = _turned(ring, depth, self.centre, yaw, pitch)[0]
        scale = 4  # the polygon to a quarter pixel (shift=2), then a soft edge
        x0, y0 = np.maximum(0, np.floor(turned.min(axis=0)).astype(int) - 3)
        x1, y1 = np.minimum(out.shape[1::-1], np.ceil(turned.max(axis=0)).astype(int) + 4)
        if x1 <= x0 or y1 <= y0:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [np.round((turned - [x0, y0]) * scale).astype(np.int32)], 255, cv2.LINE_AA, 2)
        alpha = cv2.GaussianBlur(mask, (0, 0), 0.7).astype(np.float32)[:, :, None] / 255
        region = out[y0:y1, x0:x1].astype(np.float32)
        shade = np.array(MOUTH_GAP_BGR, np.float32)
        out[y0:y1, x0:x1] = np.round(region * (1 - alpha) + shade * alpha).astype(np.uint8)


def _turned(
    pts: np.ndarray, depth: np.ndarray, centre: np.ndarray, yaw: float, pitch: float
) -> tuple[np.ndarray, np.ndarray]:
    """Points rotated about `centre` by `yaw` then `pitch`, orthographic (those of depth 0, the frame around the
    head, stay), and their depth after the turn."""
    rel = pts - centre
    x, y, z = rel[:, 0], rel[:, 1], depth
    cy_, sy_ = np.cos(yaw), np.sin(yaw)
    x, z = x * cy_ + z * sy_, -x * sy_ + z * cy_
    cp, sp = np.cos(pitch), np.sin(pitch)
    y, z = y * cp - z * sp, y * sp + z * cp
    return np.where(depth[:, None] > 0, np.stack([x, y], axis=1) + centre, pts), z


def head_turn(crop: np.ndarray, detector: ScrfdDetector, landmarks: LandmarkModel) -> HeadTurn:
    """A HeadTurn of a person crop: its largest face found by `detector` (ScrfdDetector), its 106 landmarks by
    `landmarks` (LandmarkModel). ValueError if the crop shows no face."""
    faces = detector.detect(crop)
    if len(faces) == 0:
        raise ValueError("no face in the person crop")
    face = faces.largest()
    points = landmarks.predict(crop, face.boxes)[0]
    return HeadTurn.from_landmarks(crop, points, face.boxes[0], face.kps[0, :2], face.kps[0, 2])


def eye_opening(landmarks: np.ndarray) -> float:
    """How open the eyes are in 106 landmarks, scale-free: the mean gap between the paired upper and lower lid
    points of both eyes over the distance from the eyes' midpoint to the mouth's centre (about 0.05-0.1 open,
    near 0 shut). For checking that the landmark model follows a blink."""
    lm = np.asarray(landmarks, np.float64)
    gap = np.linalg.norm(lm[list(UPPER_LIDS)] - lm[list(LOWER_LIDS)], axis=1).mean()
    eyes = (lm[list(LEFT_EYE)].mean(axis=0) + lm[list(RIGHT_EYE)].mean(axis=0)) / 2
    return float(gap / max(1e-6, np.linalg.norm(lm[list(MOUTH)].mean(axis=0) - eyes)))


def mouth_opening(landmarks: np.ndarray) -> float:
    """The gap between the inner lips' middles (62 over 60) in 106 landmarks, over the same eyes-to-mouth
    distance as eye_opening."""
    lm = np.asarray(landmarks, np.float64)
    eyes = (lm[list(LEFT_EYE)].mean(axis=0) + lm[list(RIGHT_EYE)].mean(axis=0)) / 2
    return float(np.linalg.norm(lm[62] - lm[60]) / max(1e-6, np.linalg.norm(lm[list(MOUTH)].mean(axis=0) - eyes)))
