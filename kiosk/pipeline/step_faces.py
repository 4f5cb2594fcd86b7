"""`StepFaces`: the faces of one step as one table, a row per face, so that what is known of a face (its box,
its frame, its track, its aligned crop, its embedding) cannot drift apart from the rest of its row.

Columns have one length, checked when a table is made; `table[mask]` (a boolean array over the rows) and
`table[indices]` (an integer array) give the table of those rows, every column sliced alike. The stages of
a step narrow the table (the faces that need an embedding, those of quality, those within the rationing
cap, those being decided) instead of carrying index arrays into parallel lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from kiosk.pipeline.tracking import Track
from kiosk.vision.faces import Faces


@dataclass(frozen=True)
class StepFaces:
    """One row per face of a step (the frames' faces concatenated frame by frame)."""

    faces: Faces  # boxes, detector scores, keypoints
    frame: np.ndarray  # (N,) int: index of the face's frame in the step
    tracks: tuple[Track, ...]  # the track the face was assigned to
    crops: np.ndarray | None = None  # (N, 112, 112, 3) uint8 aligned faces, once aligned
    embeddings: np.ndarray | None = None  # (N, D) float32, once embedded

    def __post_init__(self) -> None:
        n = len(self.frame)
        if self.frame.ndim != 1:
            raise ValueError(f"StepFaces.frame must be one-dimensional, got shape {self.frame.shape}")
        lengths = {"faces": len(self.faces), "tracks": len(self.tracks)}
        for name in ("crops", "embeddings"):
            column = getattr(self, name)
            if column is not None:
                lengths[name] = int(column.shape[0])
        wrong = {name: length for name, length in lengths.items() if length != n}
        if wrong:
            raise ValueError(
                f"StepFaces columns must have one row per face: frame has {n} rows, "
                + ", ".join(f"{name} {length}" for name, length in wrong.items())
            )

    @classmethod
    def join(cls, per_frame: Sequence[Faces], tracks: Sequence[Sequence[Track]]) -> StepFaces:
        """The table of a step's frames: their faces and the tracks assigned to them, frame by frame."""
        if len(per_frame) != len(tracks):
            raise ValueError(f"StepFaces.join: {len(per_frame)} frames of faces but {len(tracks)} of tracks")
        counts = [len(f) for f in per_frame]
        if sum(counts):
            faces = Faces(
                np.concatenate([f.boxes for f in per_frame]),
                np.concatenate([f.scores for f in per_frame]),
                np.concatenate([f.kps for f in per_frame]),
            )
        else:
            faces = Faces.empty()
        frame = np.repeat(np.arange(len(per_frame)), counts)
        return cls(faces, frame, tuple(t for ts in tracks for t in ts))

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, rows: np.ndarray) -> StepFaces:
        """The rows a boolean mask (one entry per row) or an array of row indices picks, in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise ValueError(f"StepFaces mask must have one entry per row ({len(self)}), got shape {rows.shape}")
            index = np.flatnonzero(rows)
        elif rows.size == 0 or np.issubdtype(rows.dtype, np.integer):
            index = rows.astype(np.int64).reshape(-1)
        else:
            raise TypeError(f"StepFaces rows are picked by a boolean mask or integer indices, not {rows.dtype}")
        return StepFaces(
            self.faces[index],
            self.frame[index],
            tuple(self.tracks[i] for i in index),
            None if self.crops is None else self.crops[index],
            None if self.embeddings is None else self.embeddings[index],
        )

    def aligned(self) -> np.ndarray:
        """The crops column; an error where these rows were never aligned."""
        if self.crops is None:
            raise ValueError("StepFaces: these rows have no aligned crops")
        return self.crops

    def embedded(self) -> np.ndarray:
        """The embeddings column; an error where these rows were never embedded."""
        if self.embeddings is None:
            raise ValueError("StepFaces: these rows have no embeddings")
        return self.embeddings

    def with_crops(self, crops: np.ndarray) -> StepFaces:
        return replace(self, crops=crops)

    def with_embeddings(self, embeddings: np.ndarray) -> StepFaces:
        return replace(self, embeddings=embeddings)

    def with_tracks(self, tracks: Sequence[Track]) -> StepFaces:
        return replace(self, tracks=tuple(tracks))

    @property
    def frames_present(self) -> np.ndarray:
        """The step's frames that have a row here, ascending."""
        return np.unique(self.frame)
