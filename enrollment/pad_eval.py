"""`kiosk-enroll evaluate-pad LABELS.csv`: presentation attack detection measured as ISO/IEC 30107-3 does.

Each labelled video (`video,label`: `bona_fide`, or an attack type such as `print`, `screen`, `replay`) is
scored the way the verifier scores a track: the largest face of each frame (at least `policy.min_face_px`
wide) through the configured `models.pad`, averaged over the video. A video whose score is below
`pad.threshold` is classified an attack.

- APCER (per attack type): the share of that type's attack presentations classified bona fide.
- BPCER: the share of bona fide presentations classified attacks.
- The thresholds that give BPCER 1% and 5% (and each type's APCER there), where there are enough bona fide
  videos to measure them (100 and 20 at least); otherwise null.
A video in which no face was found is listed, not counted in the rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from enrollment.csvfile import read_rows
from kiosk.errors import UsageError
from kiosk.vision.engine import FaceEngine
from kiosk.vision.liveness import PadEngine

BONA_FIDE = "bona_fide"
MAX_FRAMES = 300  # per video: ten seconds at 30 fps is more than any transaction


@dataclass
class LabelledVideo:
    line: int
    path: Path
    label: str


def read_labels(path: Path) -> list[LabelledVideo]:
    rows = []
    for line, row in read_rows(path, {"video", "label"}, "video,label"):
        label = row.get("label", "").strip().lower()
        if not label or not row.get("video"):
            raise UsageError(f"{path}: line {line}: needs a video and a label (bona_fide or an attack type)")
        rows.append(LabelledVideo(line, path.parent / row["video"], label))
    if not rows:
        raise UsageError(f"{path}: no labelled video")
    return rows


def video_score(engine: FaceEngine, pad: PadEngine, path: Path, min_face_px: float) -> tuple[float | None, int]:
    """(mean liveness of the largest face over the video's frames, frames scored); None without a face."""
    if not path.is_file():
        raise UsageError(f"{path}: no such video file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise UsageError(f"{path}: cannot be opened as a video")
    scores: list[float] = []
    try:
        for _ in range(MAX_FRAMES):
            ok, frame = cap.read()
            if not ok:
                break
            faces = engine.detector.detect(frame)
            faces = faces[faces.widths >= min_face_px]
            if len(faces):
                mean, _ = pad.score(frame, faces.largest().boxes)
                scores.append(float(mean[0]))
    finally:
        cap.release()
    return (float(np.mean(scores)) if scores else None), len(scores)


@dataclass
class PadReport:
    threshold: float
    scores: dict[str, list[float]]  # label -> video scores
    no_face: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)  # each scored video: line, video, label, score

    def _apcer(self, t: float) -> dict[str, dict[str, Any]]:
        return {label: {"videos": len(s), "accepted": int(sum(v >= t for v in s)),
                        "apcer": float(np.mean([v >= t for v in s])) if s else None}
                for label, s in sorted(self.scores.items()) if label != BONA_FIDE}

    def as_dict(self) -> dict[str, Any]:
        bona = sorted(self.scores.get(BONA_FIDE, []))
        out: dict[str, Any] = {
            "threshold": self.threshold,
            "bona_fide": {"videos": len(bona), "rejected": int(sum(v < self.threshold for v in bona)),
                          "bpcer": float(np.mean([v < self.threshold for v in bona])) if bona else None},
            "attacks": self._apcer(self.threshold),
            "at_bpcer": {},
            "no_face": self.no_face,
            "videos": self.videos,
        }
        for target in (0.01, 0.05):
            key = f"{target:g}"
            if len(bona) < math.ceil(1 / target):
                out["at_bpcer"][key] = None
                continue
            # The highest threshold that rejects at most target x n bona fide videos.
            k = int(math.floor(target * len(bona)))
            t = bona[k]
            out["at_bpcer"][key] = {"threshold": t, "bpcer": float(np.mean([v < t for v in bona])),
                                    "attacks": self._apcer(t)}
        return out


def text(report: dict[str, Any]) -> list[str]:
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    b = report["bona_fide"]
    lines = [f"threshold {report['threshold']:.3f}: BPCER {pct(b['bpcer'])} ({b['rejected']} of {b['videos']} bona "
             "fide videos rejected)"]
    for label, a in report["attacks"].items():
        lines.append(f"  APCER {label}: {pct(a['apcer'])} ({a['accepted']} of {a['videos']} accepted as bona fide)")
    for target, row in report["at_bpcer"].items():
        if row is None:
            lines.append(f"threshold for BPCER {target}: n/a (needs at least {math.ceil(1 / float(target))} bona fide "
                         "videos)")
        else:
            lines.append(f"threshold for BPCER {target}: {row['threshold']:.3f}; " + ", ".join(
                f"APCER {label} {pct(a['apcer'])}" for label, a in row["attacks"].items()))
    for item in report["no_face"]:
        lines.append(f"  no face in line {item['line']} ({item['video']}): not counted")
    return lines
