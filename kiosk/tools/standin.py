"""A bona fide stand-in: a photo's head turned in 3D, for tests and the demo that need a passenger accepted
with liveness on.

A video made by moving a photo is, for liveness, a print attack: a flat card. The stand-in instead warps the
photo as a head would look turning: a triangle mesh through the face's 106 landmarks, each vertex given a
depth from a generic head shape (a rounded face front, the nose standing out along its ridge), rotated in
3D and drawn back to front. What it proves: the verifier's liveness plumbing accepts a face whose landmarks
move with the parallax of a 3D head. What it does not prove: anything about a real person in front of a real
camera (no skin texture, no real depth, no blinking); BPCER needs real video.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def _head_depth(pts: np.ndarray, face: np.ndarray, eyes: np.ndarray, nose: np.ndarray) -> np.ndarray:
    """Depth (towards the camera, pixels) of image points on a generic head: a rounded face front that falls
    off towards the cheeks and the chin, and a nose ridge rising from between the eyes to the tip."""
    x1, y1, x2, y2 = face
    w = max(1.0, x2 - x1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    u = (pts[:, 0] - cx) / (0.55 * w)
    v = (pts[:, 1] - cy) / (0.75 * w)
    front = 0.42 * w * np.sqrt(np.clip(1 - u ** 2, 0, None)) * np.clip(1 - v ** 4, 0, None)
    top = eyes.mean(axis=0)
    axis = nose - top
    length = max(1.0, float(np.linalg.norm(axis)))
    along = np.clip(((pts - top) @ axis) / length ** 2, 0, 1.15)
    rel = pts - top
    across = np.abs(axis[0] * rel[:, 1] - axis[1] * rel[:, 0]) / length / (0.11 * w)
    ridge = 0.2 * w * along * np.clip(1 - across, 0, None) * np.where(along > 1, (1.15 - along) / 0.15, 1)
    return front + ridge


@dataclass
class HeadTurn:
    """A person crop (see scenes.person_crop) that can be drawn with the head turned."""

    image: np.ndarray
    points: np.ndarray  # (V, 2) mesh vertices in the crop
    depth: np.ndarray  # (V,) depth of each vertex; 0 for the fixed frame around the head
    triangles: np.ndarray  # (T, 3) vertex indices
    centre: np.ndarray  # rotation centre in the crop (the face's centre)

    @classmethod
    def from_landmarks(cls, crop: np.ndarray, landmarks: np.ndarray, face: np.ndarray, eyes: np.ndarray,
                       nose: np.ndarray) -> HeadTurn:
        """`landmarks` (106, 2), `face` box, `eyes` (2, 2) and `nose` (2,) keypoints, all in crop pixels."""
        h, w = crop.shape[:2]
        fw = face[2] - face[0]
        centre = np.array([(face[0] + face[2]) / 2, (face[1] + face[3]) / 2], np.float64)
        angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        ring = centre + np.stack([np.cos(angles) * 0.78 * fw, np.sin(angles) * 0.95 * fw], axis=1)  # around the head
        edge = np.array([[0, 0], [w / 2, 0], [w - 1, 0], [w - 1, h / 2], [w - 1, h - 1], [w / 2, h - 1],
                         [0, h - 1], [0, h / 2]], np.float64)
        inner = np.asarray(landmarks, np.float64)
        points = np.concatenate([inner, np.clip(ring, 0, [w - 1, h - 1]), edge])
        depth = np.concatenate([_head_depth(inner, face, eyes, nose), np.zeros(len(ring) + len(edge))])
        sub = cv2.Subdiv2D((-1, -1, w + 2, h + 2))
        for p in points:
            sub.insert((float(p[0]), float(p[1])))
        tris = []
        for t in sub.getTriangleList().reshape(-1, 3, 2):
            idx = [int(np.argmin(((points - q) ** 2).sum(1))) for q in t]
            if len(set(idx)) == 3:
                tris.append(idx)
        return cls(crop, points, depth, np.array(tris, np.int64), centre)

    def render(self, yaw: float, pitch: float) -> np.ndarray:
        """The crop with the head turned by `yaw` and `pitch` (radians), orthographic, back to front."""
        rel = self.points - self.centre
        x, y, z = rel[:, 0], rel[:, 1], self.depth
        cy_, sy_ = np.cos(yaw), np.sin(yaw)
        x, z = x * cy_ + z * sy_, -x * sy_ + z * cy_
        cp, sp = np.cos(pitch), np.sin(pitch)
        y, z = y * cp - z * sp, y * sp + z * cp
        moved = np.where(self.depth[:, None] > 0, np.stack([x, y], axis=1) + self.centre, self.points)
        out = self.image.copy()
        h, w = out.shape[:2]
        for t in self.triangles[np.argsort(z[self.triangles].mean(axis=1))]:
            src, dst = self.points[t].astype(np.float32), moved[t].astype(np.float32)
            x0, y0 = np.floor(dst.min(axis=0)).astype(int)
            x1, y1 = np.ceil(dst.max(axis=0)).astype(int) + 1
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            if x1 <= x0 or y1 <= y0:
                continue
            m = cv2.getAffineTransform(src, dst - np.array([x0, y0], np.float32))
            patch = cv2.warpAffine(self.image, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT)
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillConvexPoly(mask, np.round(dst - [x0, y0]).astype(np.int32), 1)
            region = out[y0:y1, x0:x1]
            region[mask > 0] = patch[mask > 0]
        return out


def head_turn(crop: np.ndarray, detector: object, landmarks: object) -> HeadTurn:
    """A HeadTurn of a person crop: its largest face found by `detector` (ScrfdDetector), its 106 landmarks by
    `landmarks` (LandmarkModel). ValueError if the crop shows no face."""
    faces = detector.detect(crop)  # type: ignore[attr-defined]
    if len(faces) == 0:
        raise ValueError("no face in the person crop")
    face = faces.largest()
    points = landmarks.predict(crop, face.boxes)[0]  # type: ignore[attr-defined]
    return HeadTurn.from_landmarks(crop, points, face.boxes[0], face.kps[0, :2], face.kps[0, 2])
