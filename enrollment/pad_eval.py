"""`kiosk-enroll evaluate-pad LABELS.csv`: presentation attack detection measured as ISO/IEC 30107-3 does.

Each labelled video (`video,label`: `bona_fide`, or an attack type such as `print`, `screen`, `replay`) is played
through the verifier's own per-frame rules: faces at least `policy.min_face_px` wide are detected, tracked and
put through the quality gate, and every quality frame of a track feeds the gate's decision policy
(kiosk.pipeline.policy, with kiosk.vision.liveness.TrackLiveness) as if the face matched an enrolled passenger
from its first frame. So each track that becomes a transaction (`policy.accept_frames` quality frames) is one
presentation, judged as the gate would judge it, in frame time: accepted (liveness said live), refused
`presentation_attack`, or refused `liveness_unverified` (no verdict within `pad.max_wait_s` of the identity,
or by the end of the track). A clip with two people is two presentations.

- APCER (per attack type): the share of that type's attack presentations accepted.
- BPCER: the share of bona fide presentations refused (either reason); how many of them `liveness_unverified`.
- The liveness wait: for accepted bona fide presentations, frame time from the identity (the accept_frames-th
  quality frame) to the accept.
- `--sweep`: the same presentations replayed at texture thresholds from 0.05 to 0.95 (the other checks' verdicts
  held as recorded), and the highest threshold with BPCER at most 1% and 5%, where there are enough bona fide
  presentations to measure it (100 and 20 at least).
A video in which no presentation was found is listed, not counted in the rates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from enrollment.csvfile import read_rows
from kiosk.config import KioskConfig
from kiosk.errors import UsageError
from kiosk.pipeline.policy import DecisionPolicy
from kiosk.pipeline.tracking import Track, Tracker
from kiosk.store.gallery import Match
from kiosk.vision.engine import FaceEngine
from kiosk.vision.liveness import PadEngine, TrackLiveness
from kiosk.vision.liveness_checks import LivenessCheck, PadObservation, TextureCheck
from kiosk.vision.models.recognizer import align_faces
from kiosk.vision.quality import measure

BONA_FIDE = "bona_fide"
MAX_FRAMES = 600  # per video: twenty seconds at 30 fps is more than any transaction
OUTCOMES = {"accept": "accepted", "presentation_attack": "attack", "liveness_unverified": "unverified"}
GATE = "EVAL"
SWEEP = [round(0.05 * i, 2) for i in range(1, 20)]


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
class Presentation:
    """One track of a video, as the gate judged it."""

    track_id: int
    outcome: str  # 'accepted', 'attack', 'unverified'
    decided_by: list[str]
    frames: int  # quality frames up to the decision
    wait_s: float | None  # frame time from the identity to the decision (None: decided before the identity)
    texture: float | None  # the texture models' mean score at the decision
    checks: dict[str, Any]
    # for the sweep: each quality frame's time, whether it brought an observation (a model can fail) and its
    # texture score, and after each observation the other checks' (name, verdict, vouches)
    clocks: list[float] = field(default_factory=list, repr=False)
    observed: list[bool] = field(default_factory=list, repr=False)
    textures: list[float | None] = field(default_factory=list, repr=False)
    widths: list[float] = field(default_factory=list, repr=False)
    others: list[list[tuple[str, str | None, bool, bool]]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"track": self.track_id, "outcome": self.outcome, "decided_by": self.decided_by,
                "frames": self.frames, "wait_s": None if self.wait_s is None else round(self.wait_s, 3),
                "texture": None if self.texture is None else round(self.texture, 4), "checks": self.checks}


class _Recorded(LivenessCheck):
    """A check replayed from what it said frame by frame (the sweep varies the texture check only)."""

    required = True  # what it said of its evidence is replayed too (True for a check that is not required)

    def __init__(self, cfg: Any, name: str, vouches: bool, verdicts: list[str | None], evidence: list[bool]) -> None:
        super().__init__(cfg)
        self.name, self.vouches, self.said, self.evidence = name, vouches, verdicts, evidence  # type: ignore[misc]

    @property
    def verdict(self) -> str | None:
        return self.said[self.frames - 1] if self.frames else None

    @property
    def has_evidence(self) -> bool:
        return self.evidence[self.frames - 1] if self.frames else True


def _policy(cfg: KioskConfig, textured: bool, liveness: Any = None) -> DecisionPolicy:
    # Every frame is a quality frame of the one enrolled passenger: only liveness decides.
    policy = dataclasses.replace(cfg.policy, reject_after_frames=10 ** 6, decision_timeout_s=3600.0,
                                 repeat_accept_s=0.0)
    return DecisionPolicy(policy, cfg.pad, textured=textured, liveness=liveness)


MATCH = Match("bona-fide-passenger", "", 1.0, None, -1.0)


class _Judge:
    """The gate's rules over one video's tracks, recording what the sweep needs."""

    def __init__(self, cfg: KioskConfig, textured: bool) -> None:
        self.cfg = cfg
        self.policy = _policy(cfg, textured)
        self.tracks: dict[int, Presentation] = {}  # decided
        self.pending: dict[int, Presentation] = {}  # undecided

    def observe(self, track: Track, obs: PadObservation | None, clock: float, seq: int) -> None:
        if track.track_id in self.tracks:
            return
        rec = self.pending.setdefault(track.track_id, Presentation(track.track_id, "", [], 0, None, None, {}))
        rec.clocks.append(clock)
        rec.observed.append(obs is not None)
        rec.textures.append(None if obs is None else obs.texture)
        rec.widths.append(0.0 if obs is None else obs.width)
        decision = self.policy.observe(track, GATE, MATCH, clock, seq, clock=clock, live=obs)
        live = self.policy.state(track).live
        if live is not None and obs is not None:
            rec.others.append([(c.name, c.verdict, c.vouches, c.has_evidence or not c.required)
                               for c in live.checks if c.name != "texture"])
        self._decided(track, decision, clock)

    def _decided(self, track: Track, decision: Any, clock: float) -> None:
        if decision is None:
            return
        rec = self.pending.pop(track.track_id)
        live = self.policy.state(track).live
        n = self.cfg.policy.accept_frames
        ready = rec.clocks[n - 1] if len(rec.clocks) >= n else None
        rec.outcome = OUTCOMES.get(decision.reason or decision.type, decision.reason or decision.type)
        rec.decided_by = list((decision.liveness_checks or {}).get("decided_by") or [])
        rec.frames = len(rec.clocks)
        rec.wait_s = None if ready is None else max(0.0, clock - ready)
        rec.texture = live.texture_score if live is not None else None
        rec.checks = decision.liveness_checks or {}
        self.tracks[track.track_id] = rec

    def ended(self, track: Track, clock: float) -> None:
        if track.track_id in self.tracks or track.track_id not in self.pending:
            return
        decision = self.policy.track_ended(track)
        if decision is None:
            self.pending.pop(track.track_id, None)  # not a transaction (too few quality frames)
            return
        self._decided(track, decision, clock)

    def tick(self, tracks: list[Track], clock: float) -> None:
        for track in tracks:
            if track.track_id not in self.tracks and track.track_id in self.pending:
                self._decided(track, self.policy.check_timeout(track, clock), clock)


def judge_video(engine: FaceEngine, pad: PadEngine, cfg: KioskConfig, path: Path) -> list[Presentation]:
    """Every presentation (track that became a transaction) of the video, judged as the gate would."""
    if not path.is_file():
        raise UsageError(f"{path}: no such video file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise UsageError(f"{path}: cannot be opened as a video")
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if 1.0 <= fps <= 240.0 else 30.0
    judge = _Judge(cfg, bool(pad.models))
    tracker = Tracker("eval", max_age_s=cfg.policy.track_max_age_s)
    clock = 0.0
    try:
        for seq in range(MAX_FRAMES):
            ok, frame = cap.read()
            if not ok:
                break
            clock = seq / fps
            faces = engine.detector.detect(frame, cfg.policy.min_face_px)  # at the scale the gate detects
            faces = faces[faces.widths >= cfg.policy.min_face_px]
            assigned, ended = tracker.update(faces, clock)
            for track in ended:
                judge.ended(track, clock)
            if len(faces):
                good = np.flatnonzero(judge.policy.quality_ok(measure(faces, align_faces(frame, faces.kps))))
                undecided = [j for j in good if assigned[j].track_id not in judge.tracks]
                try:
                    seen: list[PadObservation | None] = list(pad.observe(frame, faces.boxes[undecided])) \
                        if undecided else []
                except Exception:  # noqa: BLE001 - as in the verifier: a failing model brings no evidence
                    seen = [None] * len(undecided)
                for j, obs in zip(undecided, seen):
                    judge.observe(assigned[j], obs, clock, seq)
            judge.tick(tracker.tracks, clock)
    finally:
        cap.release()
    for track in tracker.end_all():
        judge.ended(track, clock)
    return list(judge.tracks.values())


def replay(cfg: KioskConfig, p: Presentation, threshold: float) -> str:
    """The presentation's outcome had the texture threshold been `threshold` (the other checks as recorded)."""
    pad = dataclasses.replace(cfg.pad, threshold=threshold, attack_below=min(cfg.pad.attack_below, threshold))
    trial = dataclasses.replace(cfg, pad=pad)
    names = [(n, v) for n, _, v, _ in p.others[0]] if p.others else []

    def liveness(track: Track) -> TrackLiveness:
        recorded = [_Recorded(pad, name, vouches, [frame[i][1] for frame in p.others],
                              [frame[i][3] for frame in p.others]) for i, (name, vouches) in enumerate(names)]
        return TrackLiveness(pad, True, [TextureCheck(pad), *recorded])

    policy = _policy(trial, True, liveness)
    track = Track(p.track_id, "eval", np.zeros(4, np.float32), 0.0)
    decision = None
    for i, (clock, seen, texture, width) in enumerate(zip(p.clocks, p.observed, p.textures, p.widths)):
        obs = PadObservation(None, texture, width=width) if seen else None
        decision = policy.observe(track, GATE, MATCH, clock, i, clock=clock, live=obs)
        if decision is not None:
            break
    if decision is None:
        decision = policy.track_ended(track)
    if decision is None:
        return "unverified"
    return OUTCOMES.get(decision.reason or decision.type, decision.reason or decision.type)


@dataclass
class PadReport:
    cfg: KioskConfig
    models: list[str]
    checks: list[str]
    results: dict[str, list[Presentation]] = field(default_factory=dict)  # label -> presentations
    no_face: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)

    def add(self, line: int, video: Path, label: str, presentations: list[Presentation]) -> None:
        self.results.setdefault(label, []).extend(presentations)
        self.videos.append({"line": line, "video": str(video), "label": label,
                            "presentations": [p.as_dict() for p in presentations]})

    def _rates(self, outcome: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """(bona fide figures, per attack type figures) with `outcome(presentation)` giving each outcome."""
        bona = [outcome(p) for p in self.results.get(BONA_FIDE, [])]
        refused = sum(o != "accepted" for o in bona)
        b = {"presentations": len(bona), "rejected": refused, "bpcer": refused / len(bona) if bona else None,
             "unverified": sum(o == "unverified" for o in bona),
             "unverified_rate": sum(o == "unverified" for o in bona) / len(bona) if bona else None,
             "judged_attack": sum(o == "attack" for o in bona)}
        attacks = {}
        for label, ps in sorted(self.results.items()):
            if label == BONA_FIDE:
                continue
            out = [outcome(p) for p in ps]
            accepted = sum(o == "accepted" for o in out)
            attacks[label] = {"presentations": len(out), "accepted": accepted,
                              "apcer": accepted / len(out) if out else None,
                              "judged_attack": sum(o == "attack" for o in out),
                              "unverified": sum(o == "unverified" for o in out)}
        return b, attacks

    def as_dict(self, sweep: bool = False) -> dict[str, Any]:
        pad = self.cfg.pad
        bona, attacks = self._rates(lambda p: p.outcome)
        bona["videos"] = sum(1 for v in self.videos if v["label"] == BONA_FIDE and v["presentations"])
        waits = sorted(p.wait_s for p in self.results.get(BONA_FIDE, []) if p.outcome == "accepted"
                       and p.wait_s is not None)
        out: dict[str, Any] = {
            "threshold": pad.threshold, "attack_below": pad.attack_below, "min_frames": pad.min_frames,
            "max_wait_s": pad.max_wait_s, "checks": self.checks, "models": self.models,
            "bona_fide": bona, "attacks": attacks,
            "liveness_wait_s": {"median": _quantile(waits, 0.5), "p95": _quantile(waits, 0.95), "n": len(waits)},
            "at_bpcer": {}, "no_face": self.no_face, "videos": self.videos,
        }
        if sweep and self.models:
            curve = []
            for t in SWEEP:
                b, a = self._rates(lambda p, t=t: replay(self.cfg, p, t))
                curve.append({"threshold": t, "bpcer": b["bpcer"], "unverified": b["unverified"],
                              "apcer": {k: v["apcer"] for k, v in a.items()}})
            out["sweep"] = curve
            n = bona["presentations"]
            for target in (0.01, 0.05):
                ok = [row for row in curve if row["bpcer"] is not None and row["bpcer"] <= target]
                out["at_bpcer"][f"{target:g}"] = None if n < math.ceil(1 / target) or not ok else ok[-1]
        return out


def _quantile(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.quantile(values, q)), 3)


def text(report: dict[str, Any]) -> list[str]:
    """The per-video table and the totals."""
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [f"{'line':>4}  {'video':44}  {'label':10} {'track':>5} {'frames':>6}  {'outcome':10} "
             f"{'decided by':14} {'texture':>7} {'wait s':>6}"]
    for v in report["videos"]:
        name = v["video"] if len(v["video"]) <= 44 else "..." + v["video"][-41:]
        for p in v["presentations"]:
            tex = "-" if p["texture"] is None else f"{p['texture']:.3f}"
            wait = "-" if p["wait_s"] is None else f"{p['wait_s']:.2f}"
            lines.append(f"{v['line']:>4}  {name:44}  {v['label'][:10]:10} {p['track']:>5} {p['frames']:>6}  "
                         f"{p['outcome']:10} {','.join(p['decided_by']) or '-':14} {tex:>7} {wait:>6}")
    for item in report["no_face"]:
        lines.append(f"{item['line']:>4}  {item['video'][-44:]:44}  {item['label'][:10]:10}  no presentation: "
                     "not counted")
    b = report["bona_fide"]
    models = ", ".join(report["models"]) or "none"
    lines.append(f"checks {', '.join(report['checks'])}; texture models {models}; live at {report['threshold']:g}, "
                 f"attack below {report['attack_below']:g}, {report['min_frames']} frames, wait "
                 f"{report['max_wait_s']:g} s")
    lines.append(f"BPCER {pct(b['bpcer'])} ({b['rejected']} of {b['presentations']} bona fide presentations in "
                 f"{b['videos']} videos refused: {b['judged_attack']} presentation_attack, {b['unverified']} "
                 f"liveness_unverified = {pct(b['unverified_rate'])})")
    for label, a in report["attacks"].items():
        lines.append(f"APCER {label}: {pct(a['apcer'])} ({a['accepted']} of {a['presentations']} accepted; "
                     f"{a['judged_attack']} presentation_attack, {a['unverified']} liveness_unverified)")
    w = report["liveness_wait_s"]
    if w["n"]:
        lines.append(f"liveness wait after the identity (accepted bona fide, frame time): median {w['median']:.2f} s, "
                     f"p95 {w['p95']:.2f} s over {w['n']}")
    for row in report.get("sweep", []):
        lines.append(f"  texture threshold {row['threshold']:.2f}: BPCER {pct(row['bpcer'])} "
                     f"({row['unverified']} unverified); " + ", ".join(
                         f"APCER {k} {pct(v)}" for k, v in row["apcer"].items()))
    for target, row in report["at_bpcer"].items():
        need = math.ceil(1 / float(target))
        lines.append(f"texture threshold for BPCER {100 * float(target):g}%: " + (
            f"n/a (needs at least {need} bona fide presentations and a threshold that reaches it)" if row is None
            else f"{row['threshold']:.2f}; " + ", ".join(f"APCER {k} {pct(v)}" for k, v in row["apcer"].items())))
    return lines
