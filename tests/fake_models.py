"""Fast stand-ins for the face models, for the verifier core's frame-by-frame rules (kiosk.vision.engine.FaceModels).

A "person" is a textured patch of one colour on a plain grey background (90). The fake detector finds every
region that differs from the background by more than 30 grey levels (sensor noise never does) and puts the five
keypoints where the ArcFace template has them, so the real alignment makes a crop of the patch; the fake
recognizer turns a crop's mean colour into that colour's own random unit vector (two people: about
orthogonal; one person on every frame: the same vector). Microseconds a frame instead of milliseconds, and
no model file: what the tests then check is the core's rules, not the models (the pipeline tests run those).
"""

from __future__ import annotations

import cv2
import numpy as np

from kiosk.store.gallery import GalleryMatrix
from kiosk.vision.faces import Faces
from kiosk.vision.models.recognizer import ARCFACE_TEMPLATE

BACKGROUND = 90
# Colours of the people (BGR), each channel at the middle of a 32-level bin and far from the background.
COLOURS = [(208, 48, 16), (16, 208, 48), (48, 16, 208), (208, 208, 16), (16, 208, 208), (208, 16, 208)]
DIM = 512


def person(index: int, width: int = 200) -> np.ndarray:
    """Person `index`'s patch (width x 1.25 width), textured (+-12 grey levels) so it passes the sharpness gate."""
    rng = np.random.default_rng(index)
    h = round(width * 1.25)
    texture = rng.integers(-12, 13, (h, width, 1))
    return np.clip(np.array(COLOURS[index], np.int16) + texture, 0, 255).astype(np.uint8)


def _vector(key: tuple[int, int, int]) -> np.ndarray:
    v = np.random.default_rng(key).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeDetector:
    min_area = 400
    step = 4  # looks at every 4th pixel each way: boxes to 4 px, at a fraction of a millisecond a frame

    def detect(self, image: np.ndarray, min_face_px: int = 0) -> Faces:
        k = self.step
        small = np.ascontiguousarray(image[::k, ::k])
        mask = (cv2.absdiff(small, np.full_like(small, BACKGROUND)).max(axis=2) > 30).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        boxes, kps = [], []
        for x, y, w, h, area in stats[1:n] * (k, k, k, k, k * k):
            if area < self.min_area:
                continue
            side = float(min(w, h))  # the "face": a square at the top of the patch
            boxes.append((x, y, x + side, y + side))
            kps.append(ARCFACE_TEMPLATE / 112.0 * side + (x, y))
        if not boxes:
            return Faces.empty()
        return Faces(np.array(boxes, np.float32), np.full(len(boxes), 0.9, np.float32), np.array(kps, np.float32))

    def detect_batch(self, images: list[np.ndarray], min_face_px: int = 0) -> list[Faces]:
        return [self.detect(image, min_face_px) for image in images]


class FakeRecognizer:
    dim = DIM

    def embed(self, crops: np.ndarray) -> np.ndarray:
        if not len(crops):
            return np.zeros((0, DIM), np.float32)
        means = crops[:, 32:80, 32:80].reshape(len(crops), -1, 3).mean(axis=1)
        return np.stack([_vector(tuple(int(c) // 32 for c in mean)) for mean in means])


class FakeEngine:
    """FaceModels without liveness (the core tests run with pad off, as the fakes cannot tell a print)."""

    model_id = "fake-colour"
    dim = DIM
    providers = ["fake"]

    def __init__(self) -> None:
        self.detector = FakeDetector()
        self.recognizer = FakeRecognizer()
        self.pad = None

    def template(self, index: int) -> np.ndarray:
        """Person `index`'s enrolled template."""
        return _vector(tuple(c // 32 for c in COLOURS[index]))

    def gallery(self, people: dict[str, int]) -> GalleryMatrix:
        """A search matrix of these subjects (id -> person index)."""
        return GalleryMatrix.from_templates(
            self.model_id, self.dim, [(sid, sid.title(), self.template(i)) for sid, i in people.items()], revision=1
        )
