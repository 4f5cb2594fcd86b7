"""Per-camera face tracking: a person walking up is one transaction, not thirty.

Greedy IoU matching of this frame's faces to the camera's live tracks, with
a centre-distance fallback for fast approach (boxes grow quickly as a
person walks up). Plain objects, no sockets: fed frame by frame in tests.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from kiosk.vision.faces import Faces, box_intersections


@dataclass
class Track:
    """One face over time. `state` belongs to the decision policy."""

    track_id: int
    camera_id: str
    box: np.ndarray
    last_seen: float
    hits: int = 1
    state: object = None
    ended: bool = False
    embedding: np.ndarray | None = None  # the face's latest embedding, for the identity check
    last_embedded: int = -1  # verifier step of the last embedding (fair rationing)
    embedded_hits: int = 0  # `hits` at the last embedding (when the next identity check is due)
    times_embedded: int = 0  # embeddings so far (fair rationing: the fewest go first among equals)
    face_crop: np.ndarray | None = None  # the aligned face last embedded (the console shows it per decision)
    outcome: tuple[str, str | None, str | None, float | None] | None = None  # decided: type, subject, reason, score

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter, area_a, area_b = box_intersections(a, b)
    iou: np.ndarray = inter / np.maximum(area_a + area_b - inter, 1e-6)
    return iou


@dataclass
class Tracker:
    """Tracks of one camera. `update(faces, t)` -> the track of each face, and the tracks that ended."""

    camera_id: str
    min_iou: float = 0.2
    max_age_s: float = 1.0
    tracks: list[Track] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def update(self, faces: Faces, t: float) -> tuple[list[Track], list[Track]]:
        live = self.tracks
        assigned: list[Track | None] = [None] * len(faces)
        if live and len(faces):
            prev = np.stack([tr.box for tr in live])
            iou = iou_matrix(faces.boxes, prev)
            # Centre distance relative to the track's size: catches a fast-growing face.
            c_new = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
            c_old = (prev[:, :2] + prev[:, 2:]) / 2
            size = np.maximum(prev[:, 2] - prev[:, 0], 1.0)
            near = np.linalg.norm(c_new[:, None] - c_old[None], axis=2) / size[None, :]
            score = np.where(iou >= self.min_iou, 1.0 + iou, np.where(near < 0.5, 1.0 - near, 0.0))
            while True:
                best, old = np.unravel_index(np.argmax(score), score.shape)
                if score[best, old] <= 0:
                    break
                track = live[old]
                track.box = faces.boxes[best].copy()
                track.last_seen = t
                track.hits += 1
                assigned[best] = track
                score[best, :] = 0
                score[:, old] = 0
        tracks: list[Track] = []
        for i, found in enumerate(assigned):
            if found is None:
                found = Track(next(self._ids), self.camera_id, faces.boxes[i].copy(), t)
                self.tracks.append(found)
            tracks.append(found)
        ended = [tr for tr in self.tracks if t - tr.last_seen > self.max_age_s]
        for tr in ended:
            tr.ended = True
        self.tracks = [tr for tr in self.tracks if not tr.ended]
        return tracks, ended

    def split(self, track: Track, t: float) -> Track:
        """End `track` (another person now stands where it was) and start a new one in its place."""
        track.ended = True
        self.tracks = [tr for tr in self.tracks if tr is not track]
        new = Track(next(self._ids), self.camera_id, track.box.copy(), t)
        self.tracks.append(new)
        return new

    def end_all(self) -> list[Track]:
        ended, self.tracks = self.tracks, []
        for tr in ended:
            tr.ended = True
        return ended
