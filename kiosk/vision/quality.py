"""Face quality measures from keypoints and aligned crops, vectorised over faces.

Used by enrollment (is this photo good enough for a reference template?) and
by the verifier's per-frame quality gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from kiosk.vision.faces import Faces


@dataclass(frozen=True)
class Quality:
    """Per-face measures, arrays of shape (N,).

    width: face box width in px; inter_eye: eye distance in px;
    sharpness: variance of the Laplacian of the aligned 112x112 grey crop
    (scale-free because the crop is normalised); yaw: nose offset from the
    eyes' midline in units of the eye distance (0 frontal, ~0.5 at about 45
    degrees); roll: eye-line angle in degrees.
    """

    width: np.ndarray
    inter_eye: np.ndarray
    score: np.ndarray
    sharpness: np.ndarray
    yaw: np.ndarray
    roll: np.ndarray


def sharpness(crops: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of each aligned crop's centre (eyes to mouth)."""
    if len(crops) == 0:
        return np.zeros(0, np.float32)
    out = np.empty(len(crops), np.float32)
    for i, crop in enumerate(crops):
        grey = cv2.cvtColor(crop[24:104, 24:88], cv2.COLOR_BGR2GRAY)
        out[i] = cv2.Laplacian(grey, cv2.CV_32F).var()
    return out


def pose(kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(yaw, roll) estimates from 5 keypoints; see `Quality`."""
    left, right, nose = kps[:, 0], kps[:, 1], kps[:, 2]
    eye_vec = right - left
    eye_dist = np.maximum(np.linalg.norm(eye_vec, axis=1), 1e-6)
    roll = np.degrees(np.arctan2(eye_vec[:, 1], eye_vec[:, 0]))
    mid = (left + right) / 2
    # Signed distance of the nose from the eyes' perpendicular bisector.
    yaw = ((nose - mid) * eye_vec).sum(axis=1) / eye_dist**2
    return yaw.astype(np.float32), roll.astype(np.float32)


def measure(faces: Faces, crops: np.ndarray) -> Quality:
    yaw, roll = pose(faces.kps)
    return Quality(
        width=faces.widths,
        inter_eye=faces.inter_eye,
        score=faces.scores,
        sharpness=sharpness(crops),
        yaw=yaw,
        roll=roll,
    )
