"""`kiosk-enroll evaluate-pad LABELS.csv`: presentation attack detection measured as ISO/IEC 30107-3 does.

Each labelled video (`video,label`: `bona_fide`, or an attack type such as `print`, `screen`, `replay`) is
judged the way the verifier judges a track (kiosk.vision.liveness.TrackLiveness, the same code): the largest
face of each frame (at least `policy.min_face_px` wide) is observed by the built-in checks and the configured
`models.pad`; the first verdict reached stands. A video is classified bona fide only if that verdict is live;
an attack verdict, or none by the end of the video (the gate's `liveness_unverified`), classifies it an
attack. Unlike the gate, the whole video is waited for, not `pad.max_wait_s` after an identity match.

- APCER (per attack type): the share of that type's attack presentations classified bona fide.
- BPCER: the share of bona fide presentations classified attacks.
- With models: the models' thresholds that give BPCER 1% and 5% (and each type's APCER there), the built-in
  checks' verdicts held fixed, where there are enough bona fide videos to measure them (100 and 20 at
  least); otherwise null.
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
from kiosk.config import PadConfig
from kiosk.errors import UsageError
from kiosk.vision.engine import FaceEngine
from kiosk.vision.liveness import PadEngine, TrackLiveness

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


@dataclass
class VideoResult:
    verdict: str | None  # the first verdict reached: 'live', 'attack', or None by the end
    decided_by: list[str]
    builtin: str | None  # the verdict of the built-in checks alone (depth, screen)
    texture: float | None  # the models' mean score over the video (None without models)
    frames: int
    checks: dict[str, Any]


def judge_video(engine: FaceEngine, pad: PadEngine, cfg: PadConfig, path: Path,
                min_face_px: float) -> VideoResult | None:
    """The liveness verdict on the video's largest face; None if no frame shows a face."""
    if not path.is_file():
        raise UsageError(f"{path}: no such video file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise UsageError(f"{path}: cannot be opened as a video")
    live = TrackLiveness(cfg, bool(pad.models))
    first: tuple[str | None, list[str]] = (None, [])
    first_builtin: str | None = None
    errors = 0
    try:
        for _ in range(MAX_FRAMES):
            ok, frame = cap.read()
            if not ok:
                break
            faces = engine.detector.detect(frame)
            faces = faces[faces.widths >= min_face_px]
            if not len(faces):
                continue
            try:
                obs = pad.observe(frame, faces.largest().boxes)[0]
            except Exception:  # noqa: BLE001 - as in the verifier: a failing model brings no evidence
                errors += 1
                continue
            live.add(obs)
            if first[0] is None and live.verdict is not None:
                first = (live.verdict, live.decided_by)
            if first_builtin is None:
                first_builtin = live.builtin_verdict
    finally:
        cap.release()
    if live.frames == 0 and not errors:
        return None
    return VideoResult(first[0], first[1], first_builtin, live.texture_score, live.frames,
                       {**live.checks(), "model_errors": errors})


@dataclass
class PadReport:
    threshold: float
    models: list[str]
    results: dict[str, list[VideoResult]] = field(default_factory=dict)  # label -> results
    no_face: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)  # each judged video: line, video, label, verdict...

    def add(self, line: int, video: Path, label: str, result: VideoResult) -> None:
        self.results.setdefault(label, []).append(result)
        self.videos.append({"line": line, "video": str(video), "label": label, "verdict": result.verdict,
                            "decided_by": result.decided_by, "frames": result.frames,
                            "texture": None if result.texture is None else round(result.texture, 4),
                            "checks": result.checks})

    @staticmethod
    def _live(r: VideoResult, t: float | None) -> bool:
        """Classified bona fide: as judged, or (t given) with the models' threshold at t."""
        if t is None:
            return r.verdict == "live"
        return r.builtin == "live" and r.texture is not None and r.texture >= t

    def _apcer(self, t: float | None) -> dict[str, dict[str, Any]]:
        out = {}
        for label, rs in sorted(self.results.items()):
            if label == BONA_FIDE:
                continue
            accepted = sum(self._live(r, t) for r in rs)
            out[label] = {"videos": len(rs), "accepted": accepted, "apcer": accepted / len(rs),
                          "judged_attack": sum(r.verdict == "attack" for r in rs),
                          "no_verdict": sum(r.verdict is None for r in rs)}
        return out

    def as_dict(self) -> dict[str, Any]:
        bona = self.results.get(BONA_FIDE, [])
        rejected = sum(not self._live(r, None) for r in bona)
        out: dict[str, Any] = {
            "threshold": self.threshold,
            "models": self.models,
            "bona_fide": {"videos": len(bona), "rejected": rejected,
                          "bpcer": rejected / len(bona) if bona else None},
            "attacks": self._apcer(None),
            "at_bpcer": {},
            "no_face": self.no_face,
            "videos": self.videos,
        }
        scores = sorted(r.texture for r in bona if r.builtin == "live" and r.texture is not None)
        for target in (0.01, 0.05):
            key = f"{target:g}"
            k = int(math.floor(target * len(bona))) - (len(bona) - len(scores))  # rejections left for the models
            if not self.models or len(bona) < math.ceil(1 / target) or k < 0 or not scores:
                out["at_bpcer"][key] = None
                continue
            t = scores[min(k, len(scores) - 1)]  # the highest threshold that rejects at most target x n
            out["at_bpcer"][key] = {"threshold": t, "bpcer": sum(not self._live(r, t) for r in bona) / len(bona),
                                    "attacks": self._apcer(t)}
        return out


def text(report: dict[str, Any]) -> list[str]:
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    b = report["bona_fide"]
    models = ", ".join(report["models"]) or "none"
    lines = [f"built-in checks + models ({models}, threshold {report['threshold']:.3f}): BPCER {pct(b['bpcer'])} "
             f"({b['rejected']} of {b['videos']} bona fide videos rejected)"]
    for label, a in report["attacks"].items():
        lines.append(f"  APCER {label}: {pct(a['apcer'])} ({a['accepted']} of {a['videos']} accepted as bona fide; "
                     f"{a['judged_attack']} judged attacks, {a['no_verdict']} no verdict)")
    for target, row in report["at_bpcer"].items():
        if row is None:
            lines.append(f"models' threshold for BPCER {target}: n/a (needs models.pad and at least "
                         f"{math.ceil(1 / float(target))} bona fide videos the built-in checks pass)")
        else:
            lines.append(f"models' threshold for BPCER {target}: {row['threshold']:.3f}; " + ", ".join(
                f"APCER {label} {pct(a['apcer'])}" for label, a in row["attacks"].items()))
    for item in report["no_face"]:
        lines.append(f"  no face in line {item['line']} ({item['video']}): not counted")
    return lines
