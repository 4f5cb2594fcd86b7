"""`Faces`: one frame's faces as parallel arrays, the value every stage passes on."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


def box_intersections(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For boxes a (N, 4) and b (M, 4): pairwise intersection areas (N, M), areas of a (N, 1) and b (1, M)."""
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    return inter, area_a, area_b


@dataclass(frozen=True)
class Faces:
    """Detected faces of one image.

    boxes: (N, 4) float32 x1, y1, x2, y2 in image pixels.
    scores: (N,) float32 detector confidence.
    kps: (N, 5, 2) float32 keypoints: left eye, right eye, nose, mouth left, mouth right.
    embeddings: (N, D) float32 L2-normalised, or None before embedding.
    """

    boxes: np.ndarray
    scores: np.ndarray
    kps: np.ndarray
    embeddings: np.ndarray | None = None

    @classmethod
    def empty(cls) -> Faces:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __getitem__(self, index: int | slice | np.ndarray) -> Faces:
        idx = np.atleast_1d(np.arange(len(self))[index])
        emb = None if self.embeddings is None else self.embeddings[idx]
        return Faces(self.boxes[idx], self.scores[idx], self.kps[idx], emb)

    def with_embeddings(self, embeddings: np.ndarray) -> Faces:
        return replace(self, embeddings=embeddings)

    @property
    def widths(self) -> np.ndarray:
        return self.boxes[:, 2] - self.boxes[:, 0]

    @property
    def heights(self) -> np.ndarray:
        return self.boxes[:, 3] - self.boxes[:, 1]

    @property
    def inter_eye(self) -> np.ndarray:
        """Distance between the eye keypoints, in pixels."""
        return np.linalg.norm(self.kps[:, 1] - self.kps[:, 0], axis=1)

    def largest(self) -> Faces:
        """The face with the largest box (empty if there is none)."""
        if len(self) == 0:
            return self
        return self[int(np.argmax(self.widths * self.heights))]
