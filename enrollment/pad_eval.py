"""`kiosk-enroll evaluate-pad LABELS.csv`: presentation attack detection measured as ISO/IEC 30107-3 does.

The labels file lists videos and still images (`video,label` or `file,label`; label `bona_fide` or an attack type
such as `print`, `screen`, `replay`; optional `subject` and `source`). Each labelled video is played through the
verifier's own per-frame rules: faces at least `policy.min_face_px` wide are detected (at the gate's scale), tracked
and put through the quality gate, and every quality frame of a track feeds the gate's decision policy
(kiosk.pipeline.policy, with kiosk.vision.liveness.TrackLiveness) as if the face matched an enrolled passenger
from its first frame. So each track that becomes a transaction (`policy.accept_frames` quality frames) is one
presentation, judged as the gate would judge it, in frame time: accepted (liveness said live), refused
`presentation_attack`, or refused `liveness_unverified` (no verdict within `pad.max_wait_s` of the identity,
or by the end of the track). A clip with two people is two presentations.

Stills (a path ending .jpg .jpeg .png .bmp .webp) are scored as a short still clip: the stills of one source, label
and subject (each still alone where there is no subject) are played in file-name order, each held `--still-hold`
frames (default 6) at 30 fps, through the same judge; the clip's track is one presentation (two if the tracker
splits it). An image that cannot be read is an error naming its line, as a missing video is.

- APCER (per attack type): the share of that type's attack presentations accepted.
- BPCER: the share of bona fide presentations refused (either reason); how many of them `liveness_unverified`.
- Each rate with its exact one-sided 95% upper bound (Clopper-Pearson: the p at which k or fewer errors in n have
  probability 5%; 3/n nearly, with no error).
- Per source (the `source` column; else the path's first folder below the labels file; else the folder the file
  is in): the same figures. Per check (the decision's `liveness_checks`) and label: its score at the decision
  (0-1, above 0.5 leans live) as min/median/max, and how often it said live, attack or nothing.
- The liveness wait: for accepted bona fide presentations, frame time from the identity (the accept_frames-th
  quality frame) to the accept.
- With texture models, presentations are replayed at other texture thresholds (the other checks' verdicts held as
  recorded, whatever the checks; each track is recorded past its decision for as long as a replay could still
  decide, `pad.max_wait_s` after the identity): BPCER at APCER 0 (at the lowest threshold of 0.05, 0.10 .. 0.95,
  0.97, 0.99 that accepts no attack presentation), pooled and per source, and with two sources or more the
  leave-one-source-out table: the threshold fitted on all sources but one (that lowest threshold plus `--margin`, at
  most 0.99), measured on the one left out; its last row, fitted and measured on every source, is for reference
  only.
- `--sweep`: the texture thresholds 0.05 to 0.95, and the highest with BPCER at most 1% and 5%, where there are
  enough bona fide presentations to measure it (100 and 20 at least).
A video or still clip in which no presentation was found is listed, not counted in the rates.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from enrollment.csvfile import read_rows
from kiosk.config import KioskConfig
from kiosk.errors import ImageError, UsageError
from kiosk.pipeline.policy import DecisionPolicy
from kiosk.pipeline.tracking import Track, Tracker
from kiosk.store.gallery import Match
from kiosk.vision.engine import FaceEngine
from kiosk.vision.images import read_image
from kiosk.vision.liveness import PadEngine, TrackLiveness
from kiosk.vision.liveness_checks import LivenessCheck, PadObservation, TextureCheck
from kiosk.vision.models.recognizer import align_faces
from kiosk.vision.quality import measure

BONA_FIDE = "bona_fide"
MAX_FRAMES = 600  # per video: twenty seconds at 30 fps is more than any transaction
OUTCOMES = {"accept": "accepted", "presentation_attack": "attack", "liveness_unverified": "unverified"}
GATE = "EVAL"
SWEEP = [round(0.05 * i, 2) for i in range(1, 20)]
FIT_GRID = [*SWEEP, 0.97, 0.99]  # the thresholds the leave-one-source-out fit and BPCER at APCER 0 choose from
MARGIN = 0.1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
STILL_HOLD = 6  # frames each still is shown for
STILL_FPS = 30.0
CONFIDENCE = 0.95
BOUND = "one-sided 95% upper bound, exact (Clopper-Pearson)"


@dataclass
class LabelledFile:
    """One row of the labels file: a video, or a still image."""

    line: int
    path: Path
    label: str
    source: str = ""
    subject: str = ""

    @property
    def still(self) -> bool:
        return self.path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class StillClip:
    """The stills of one source, label and subject (or one still without a subject), in file-name order."""

    label: str
    source: str
    subject: str
    rows: list[LabelledFile]

    @property
    def line(self) -> int:
        return min(r.line for r in self.rows)

    @property
    def path(self) -> Path:
        return self.rows[0].path


Sample = LabelledFile | StillClip


def _source(labels: Path, written: str) -> str:
    """The path's first folder below the labels file; else the name of the folder the file is in."""
    rel = Path(written)
    base = labels.resolve().parent
    if rel.is_absolute():
        try:
            rel = rel.resolve().relative_to(base)
        except ValueError:
            return rel.parent.name or base.name
    parts = [p for p in rel.parts if p != "."]
    if len(parts) >= 2 and parts[0] != "..":
        return parts[0]
    return (base / rel).resolve().parent.name or labels.stem


def read_labels(path: Path) -> list[LabelledFile]:
    """The rows of a labels file: `video,label` or `file,label`, optional `subject` and `source`."""
    rows = []
    hint = "video,label or file,label (optional: subject, source)"
    found = read_rows(path, {"label"}, hint)
    if found and not {"video", "file"} & found[0][1].keys():
        raise UsageError(f"{path}: the header must name the columns {hint}; found {list(found[0][1])}")
    for line, row in found:
        label = row.get("label", "").strip().lower()
        written = row.get("video") or row.get("file") or ""
        if not label or not written:
            raise UsageError(
                f"{path}: line {line}: needs a video or still image file and a label (bona_fide or an attack type)"
            )
        source = row.get("source") or _source(path, written)
        rows.append(LabelledFile(line, path.parent / written, label, source, row.get("subject", "")))
    if not rows:
        raise UsageError(f"{path}: no labelled video or still")
    return rows


def samples(rows: list[LabelledFile]) -> list[Sample]:
    """What is judged, in the order of the labels file: each video, and each clip of stills (those of one source,
    label and subject; a still without a subject alone), its stills in file-name order."""
    out: list[Sample] = []
    clips: dict[tuple[str, str, str], StillClip] = {}
    for row in rows:
        if not row.still:
            out.append(row)
        elif not row.subject:
            out.append(StillClip(row.label, row.source, "", [row]))
        else:
            key = (row.source, row.label, row.subject)
            if key not in clips:
                clips[key] = StillClip(row.label, row.source, row.subject, [])
                out.append(clips[key])
            clips[key].rows.append(row)
    for clip in clips.values():
        clip.rows.sort(key=lambda r: (r.path.name, r.line))
    return out


def check_files(rows: list[LabelledFile]) -> None:
    """UsageError naming the line of the first file that is not there (before any is judged)."""
    for row in rows:
        if not row.path.is_file():
            raise UsageError(f"line {row.line}: {row.path}: no such {'image' if row.still else 'video'} file")


@dataclass
class Presentation:
    """One track of a video or still clip, as the gate judged it."""

    track_id: int
    outcome: str  # 'accepted', 'attack', 'unverified'
    decided_by: list[str]
    frames: int  # quality frames up to the decision
    wait_s: float | None  # frame time from the identity to the decision (None: decided before the identity)
    texture: float | None  # the texture models' mean score at the decision
    checks: dict[str, Any]
    source: str = ""
    label: str = ""
    scores: dict[str, float | None] = field(default_factory=dict, repr=False)  # each check's score at the decision
    # for the replays: each quality frame's time, whether it brought an observation (a model can fail) and its
    # texture score, and after each observation the other checks' (name, verdict, vouches, has evidence)
    clocks: list[float] = field(default_factory=list, repr=False)
    observed: list[bool] = field(default_factory=list, repr=False)
    textures: list[float | None] = field(default_factory=list, repr=False)
    widths: list[float] = field(default_factory=list, repr=False)
    others: list[list[tuple[str, str | None, bool, bool]]] = field(default_factory=list, repr=False)
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # each check's class settings

    def as_dict(self) -> dict[str, Any]:
        return {
            "track": self.track_id,
            "outcome": self.outcome,
            "decided_by": self.decided_by,
            "frames": self.frames,
            "wait_s": None if self.wait_s is None else round(self.wait_s, 3),
            "texture": None if self.texture is None else round(self.texture, 4),
            "checks": self.checks,
        }

    def check_score(self, name: str) -> float | None:
        """The check's score at the decision: its report's `score`, else the check's own."""
        reported = self.checks.get(name)
        score = reported.get("score") if isinstance(reported, dict) else None
        score = self.scores.get(name) if score is None else score
        return None if score is None or not math.isfinite(score) else float(score)


# The class settings of a check that the fusion reads (name, vouches, and whatever else LivenessCheck declares as a
# ClassVar, such as the kind of evidence it gives), recorded with the check and set again on its replay.
KIND = [k for k, v in LivenessCheck.__annotations__.items() if str(v).startswith("ClassVar") and k != "required"]


def _kind(check: LivenessCheck) -> dict[str, Any]:
    return {k: getattr(check, k) for k in KIND if hasattr(check, k)}


class _Recorded(LivenessCheck):
    """A check replayed from what it said frame by frame (the replays vary the texture check only), with its
    class settings (`kind`: vouches and the like) as recorded."""

    required = True  # what it said of its evidence is replayed too (True for a check that is not required)

    def __init__(
        self,
        cfg: Any,
        name: str,
        vouches: bool,
        verdicts: list[str | None],
        evidence: list[bool],
        kind: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cfg)
        for key, value in (kind or {}).items():
            setattr(self, key, value)
        self.name, self.vouches, self.said, self.evidence = name, vouches, verdicts, evidence  # type: ignore[misc]

    @property
    def verdict(self) -> str | None:
        return self.said[self.frames - 1] if self.frames else None

    @property
    def has_evidence(self) -> bool:
        return self.evidence[self.frames - 1] if self.frames else True


def _policy(cfg: KioskConfig, textured: bool, liveness: Any = None) -> DecisionPolicy:
    # Every frame is a quality frame of the one enrolled passenger: only liveness decides.
    policy = dataclasses.replace(cfg.policy, reject_after_frames=10**6, decision_timeout_s=3600.0, repeat_accept_s=0.0)
    return DecisionPolicy(policy, cfg.pad, textured=textured, liveness=liveness)


MATCH = Match("bona-fide-passenger", "", 1.0, None, -1.0)


class _Judge:
    """The gate's rules over one video's tracks, recording what the replays need: every quality frame of a track
    up to its decision, and after it (the checks fed on, no longer deciding) for as long as a replay at another
    threshold could still decide: until `pad.max_wait_s` after the identity (accept_frames-th quality frame)."""

    def __init__(self, cfg: KioskConfig, textured: bool) -> None:
        self.cfg = cfg
        self.policy = _policy(cfg, textured)
        self.tracks: dict[int, Presentation] = {}  # decided
        self.pending: dict[int, Presentation] = {}  # undecided
        self.done: set[int] = set()  # decided and recorded as far as a replay needs

    def wants(self, track: Track) -> bool:
        """Whether the track's next quality frame is judged or recorded."""
        return track.track_id not in self.done

    def observe(self, track: Track, obs: PadObservation | None, clock: float, seq: int) -> None:
        if track.track_id in self.done:
            return
        decided = self.tracks.get(track.track_id)
        if decided is not None:
            self._after(track, decided, obs, clock)
            return
        rec = self.pending.setdefault(track.track_id, Presentation(track.track_id, "", [], 0, None, None, {}))
        decision = self.policy.observe(track, GATE, MATCH, clock, seq, clock=clock, live=obs)
        self._record(track, rec, obs, clock)
        self._decided(track, decision, clock)

    def _record(self, track: Track, rec: Presentation, obs: PadObservation | None, clock: float) -> None:
        rec.clocks.append(clock)
        rec.observed.append(obs is not None)
        rec.textures.append(None if obs is None else obs.texture)
        rec.widths.append(0.0 if obs is None else obs.width)
        live = self.policy.state(track).live
        if live is not None and obs is not None:
            rec.others.append(
                [
                    (c.name, c.verdict, c.vouches, c.has_evidence or not c.required)
                    for c in live.checks
                    if c.name != "texture"
                ]
            )
            if not rec.kinds:
                rec.kinds = {c.name: _kind(c) for c in live.checks if c.name != "texture"}

    def _after(self, track: Track, rec: Presentation, obs: PadObservation | None, clock: float) -> None:
        """A quality frame after the decision: the checks see it as they would have undecided, for the replays."""
        n = self.cfg.policy.accept_frames
        if len(rec.clocks) >= n and clock - rec.clocks[n - 1] > self.cfg.pad.max_wait_s:
            self.done.add(track.track_id)
            return
        live = self.policy.state(track).live
        if live is not None:
            live.add(obs)
        self._record(track, rec, obs, clock)

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
        rec.scores = {c.name: c.score for c in live.checks} if live is not None else {}
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


def judge_frames(
    engine: FaceEngine, pad: PadEngine, cfg: KioskConfig, frames: Iterable[tuple[float, np.ndarray]]
) -> list[Presentation]:
    """Every presentation (track that became a transaction) of (frame time, BGR frame)s, judged as the gate would.
    A frame given again as the same array (a still held) is analysed once: detection, quality and the liveness
    measures are the same, the tracker and the policy see every frame."""
    judge = _Judge(cfg, bool(pad.models))
    tracker = Tracker("eval", max_age_s=cfg.policy.track_max_age_s)
    clock = 0.0
    last: np.ndarray | None = None
    seen: dict[int, PadObservation | None] = {}
    for seq, (clock, frame) in enumerate(frames):
        if frame is not last:
            last, seen = frame, {}
            faces = engine.detector.detect(frame, cfg.policy.min_face_px)  # at the scale the gate detects
            faces = faces[faces.widths >= cfg.policy.min_face_px]
            good = (
                np.flatnonzero(judge.policy.quality_ok(measure(faces, align_faces(frame, faces.kps))))
                if len(faces)
                else np.zeros(0, int)
            )
        assigned, ended = tracker.update(faces, clock)
        for track in ended:
            judge.ended(track, clock)
        undecided = [int(j) for j in good if judge.wants(assigned[j])]  # or decided, recorded for the replays
        new = [j for j in undecided if j not in seen]
        if new:
            try:
                seen.update(zip(new, pad.observe(frame, faces.boxes[new]), strict=True))
            except Exception:  # noqa: BLE001 - as in the verifier: a failing model brings no evidence
                seen.update((j, None) for j in new)
        for j in undecided:
            judge.observe(assigned[j], seen[j], clock, seq)
        judge.tick(tracker.tracks, clock)
    for track in tracker.end_all():
        judge.ended(track, clock)
    return list(judge.tracks.values())


def judge_video(engine: FaceEngine, pad: PadEngine, cfg: KioskConfig, path: Path) -> list[Presentation]:
    """Every presentation (track that became a transaction) of the video, judged as the gate would."""
    if not path.is_file():
        raise UsageError(f"{path}: no such video file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise UsageError(f"{path}: cannot be opened as a video")
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if 1.0 <= fps <= 240.0 else 30.0

    def frames() -> Iterator[tuple[float, np.ndarray]]:
        for seq in range(MAX_FRAMES):
            ok, frame = cap.read()
            if not ok:
                return
            yield seq / fps, frame

    try:
        return judge_frames(engine, pad, cfg, frames())
    finally:
        cap.release()


def read_still(row: LabelledFile) -> np.ndarray:
    """The still as a BGR image, read as enrollment reads a photo (kiosk.vision.images: size and pixel bounds,
    EXIF orientation, alpha over white); UsageError naming its line if it is missing or cannot be read."""
    if not row.path.is_file():
        raise UsageError(f"line {row.line}: {row.path}: no such image file")
    try:
        return read_image(row.path)
    except ImageError as exc:
        raise UsageError(f"line {row.line}: {row.path}: cannot be read as an image ({exc})") from None


def judge_stills(
    engine: FaceEngine, pad: PadEngine, cfg: KioskConfig, clip: StillClip, hold: int = STILL_HOLD
) -> list[Presentation]:
    """The clip's stills played in order, each held `hold` frames at 30 fps, judged as a video is."""
    images = [read_still(row) for row in clip.rows]  # every still read before any is judged

    def frames() -> Iterator[tuple[float, np.ndarray]]:
        for i, image in enumerate(images):
            for k in range(hold):
                yield (i * hold + k) / STILL_FPS, image

    return judge_frames(engine, pad, cfg, frames())


def judge(
    engine: FaceEngine, pad: PadEngine, cfg: KioskConfig, sample: Sample, hold: int = STILL_HOLD
) -> list[Presentation]:
    """A video's or still clip's presentations; UsageError ('line N: ...') if a file cannot be read."""
    if isinstance(sample, StillClip):
        return judge_stills(engine, pad, cfg, sample, hold)
    try:
        return judge_video(engine, pad, cfg, sample.path)
    except UsageError as exc:
        raise UsageError(f"line {sample.line}: {exc}") from None


def replay(cfg: KioskConfig, p: Presentation, threshold: float) -> str:
    """The presentation's outcome had the texture threshold been `threshold` (the other checks, whatever their
    names, as recorded)."""
    pad = dataclasses.replace(cfg.pad, threshold=threshold, attack_below=min(cfg.pad.attack_below, threshold))
    trial = dataclasses.replace(cfg, pad=pad)
    names = [(n, v) for n, _, v, _ in p.others[0]] if p.others else []

    def liveness(track: Track) -> TrackLiveness:
        recorded = [
            _Recorded(
                pad,
                name,
                vouches,
                [frame[i][1] for frame in p.others],
                [frame[i][3] for frame in p.others],
                p.kinds.get(name),
            )
            for i, (name, vouches) in enumerate(names)
        ]
        return TrackLiveness(pad, True, [TextureCheck(pad), *recorded])

    policy = _policy(trial, True, liveness)
    track = Track(p.track_id, "eval", np.zeros(4, np.float32), 0.0)
    decision = None
    for i, (clock, seen, texture, width) in enumerate(zip(p.clocks, p.observed, p.textures, p.widths, strict=True)):
        obs = PadObservation(None, texture, width=width) if seen else None
        decision = policy.observe(track, GATE, MATCH, clock, i, clock=clock, live=obs)
        if decision is not None:
            break
    if decision is None:
        decision = policy.track_ended(track)
    if decision is None:
        return "unverified"
    return OUTCOMES.get(decision.reason or decision.type, decision.reason or decision.type)


def upper_bound(errors: int, n: int, confidence: float = CONFIDENCE) -> float | None:
    """The exact one-sided upper confidence bound (Clopper-Pearson) of an error rate seen as `errors` in `n`: the
    rate p at which `errors` or fewer in `n` have probability 1 - confidence (the beta quantile
    B(confidence; errors + 1, n - errors), found by bisection on the binomial sum, which is the regularised
    incomplete beta). None for n = 0."""
    if n <= 0:
        return None
    if errors >= n:
        return 1.0
    alpha = 1.0 - confidence
    log_choose = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(errors + 1)]

    def at_most(p: float) -> float:  # P(X <= errors) for X ~ Binomial(n, p): falls as p grows
        lp, lq = math.log(p), math.log1p(-p)
        return sum(math.exp(c + i * lp + (n - i) * lq) for i, c in enumerate(log_choose))

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid <= 0.0 or mid >= 1.0:
            break
        if at_most(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


Keep = Callable[[Presentation], bool]


def from_source(source: str) -> Keep:
    """The presentations of one source."""
    return lambda p: p.source == source


def not_from(source: str) -> Keep:
    """The presentations of every source but one (a leave-one-source-out fit)."""
    return lambda p: p.source != source


@dataclass
class PadReport:
    cfg: KioskConfig
    models: list[str]
    checks: list[str]
    results: dict[str, list[Presentation]] = field(default_factory=dict)  # label -> presentations
    no_face: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)  # one entry per video or still clip
    hold: int = STILL_HOLD
    margin: float = MARGIN
    _replayed: dict[tuple[int, float], str] = field(default_factory=dict, repr=False)

    def add(self, sample: Sample, presentations: list[Presentation]) -> None:
        """A judged video or still clip (listed under no_face, not counted, when it brought no presentation)."""
        entry: dict[str, Any] = {
            "line": sample.line,
            "video": str(sample.path),
            "label": sample.label,
            "source": sample.source,
        }
        if isinstance(sample, StillClip):
            entry.update(
                {
                    "lines": [r.line for r in sample.rows],
                    "stills": [str(r.path) for r in sample.rows],
                    "subject": sample.subject,
                    "hold": self.hold,
                }
            )
        if not presentations:
            self.no_face.append(entry)
            return
        for p in presentations:
            p.source, p.label = sample.source, sample.label
        self.results.setdefault(sample.label, []).extend(presentations)
        self.videos.append({**entry, "presentations": [p.as_dict() for p in presentations]})

    def sources(self) -> list[str]:
        """The sources of the presentations, in the order of the labels file."""
        return list(dict.fromkeys(v["source"] for v in self.videos))

    def outcome(self, p: Presentation, threshold: float) -> str:
        """`replay`, once per presentation and threshold."""
        key = (id(p), threshold)
        if key not in self._replayed:
            self._replayed[key] = replay(self.cfg, p, threshold)
        return self._replayed[key]

    def _rates(
        self,
        outcome: Callable[[Presentation], str],
        keep: Keep | None = None,
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """(bona fide figures, per attack type figures) of the presentations `keep` keeps, with
        `outcome(presentation)` giving each outcome; attack types without such a presentation left out."""
        bona = [outcome(p) for p in self.results.get(BONA_FIDE, []) if keep is None or keep(p)]
        refused = sum(o != "accepted" for o in bona)
        b = {
            "presentations": len(bona),
            "rejected": refused,
            "bpcer": refused / len(bona) if bona else None,
            "bpcer_upper95": upper_bound(refused, len(bona)),
            "unverified": sum(o == "unverified" for o in bona),
            "unverified_rate": sum(o == "unverified" for o in bona) / len(bona) if bona else None,
            "judged_attack": sum(o == "attack" for o in bona),
        }
        attacks = {}
        for label, ps in sorted(self.results.items()):
            if label == BONA_FIDE:
                continue
            out = [outcome(p) for p in ps if keep is None or keep(p)]
            if not out and keep is not None:
                continue
            accepted = sum(o == "accepted" for o in out)
            attacks[label] = {
                "presentations": len(out),
                "accepted": accepted,
                "apcer": accepted / len(out) if out else None,
                "apcer_upper95": upper_bound(accepted, len(out)),
                "judged_attack": sum(o == "attack" for o in out),
                "unverified": sum(o == "unverified" for o in out),
            }
        return b, attacks

    def _measured(self, outcome: Callable[[Presentation], str], keep: Keep | None) -> dict[str, Any]:
        """The per-source figures: bona fide refused and unverified, accepted per attack type, with bounds."""
        b, a = self._rates(outcome, keep)
        return {
            "bona_fide": {k: b[k] for k in ("presentations", "rejected", "bpcer", "bpcer_upper95", "unverified")},
            "attacks": {
                t: {k: v[k] for k in ("presentations", "accepted", "apcer", "apcer_upper95")} for t, v in a.items()
            },
        }

    def _by_label(self) -> list[tuple[str, list[Presentation]]]:
        return sorted(self.results.items(), key=lambda kv: (kv[0] != BONA_FIDE, kv[0]))

    def _attacks(self, keep: Keep) -> list[Presentation]:
        return [p for label, ps in self.results.items() if label != BONA_FIDE for p in ps if keep(p)]

    def lowest_stopping(self, keep: Keep) -> float | None:
        """The lowest texture threshold of FIT_GRID at which none of the kept attack presentations is accepted."""
        attacks = self._attacks(keep)
        return next((t for t in FIT_GRID if not any(self.outcome(p, t) == "accepted" for p in attacks)), None)

    def _fit(self, keep: Keep) -> dict[str, Any]:
        low = self.lowest_stopping(keep)
        fitted = FIT_GRID[-1] if low is None else min(round(low + self.margin, 6), FIT_GRID[-1])
        return {"training_attacks": len(self._attacks(keep)), "lowest_stopping": low, "fitted_threshold": fitted}

    def loso(self) -> dict[str, Any] | None:
        """Leave-one-source-out: the texture threshold fitted on all sources but one, measured on that one; the
        last row ('all') fitted and measured on every source (the same data: for reference only). None with
        fewer than two sources or without texture models."""
        sources = self.sources()
        if len(sources) < 2 or not self.models:
            return None
        rows = []
        for held in sources:
            fit = self._fit(not_from(held))
            t = fit["fitted_threshold"]
            rows.append(
                {
                    "held_out": held,
                    "same_data": False,
                    **fit,
                    **self._measured(partial(self.outcome, threshold=t), from_source(held)),
                }
            )
        fit = self._fit(lambda p: True)
        t = fit["fitted_threshold"]
        rows.append(
            {"held_out": "all", "same_data": True, **fit, **self._measured(partial(self.outcome, threshold=t), None)}
        )
        return {
            "margin": self.margin,
            "grid": FIT_GRID,
            "rows": rows,
            "fit": "the lowest threshold of the grid at which no attack presentation of the training sources "
            "is accepted, plus the margin, at most 0.99 (0.99 where none stops them all)",
        }

    def at_apcer0(self) -> dict[str, Any] | None:
        """BPCER at APCER 0: at the lowest texture threshold of FIT_GRID that accepts no attack presentation,
        pooled and per source (each at its own), beside the configured threshold's figures. None without texture
        models."""
        if not self.models:
            return None
        b, a = self._rates(lambda p: p.outcome)
        configured = {
            "threshold": self.cfg.pad.threshold,
            "bpcer": b["bpcer"],
            "bpcer_upper95": b["bpcer_upper95"],
            "apcer_max": max((v["apcer"] for v in a.values() if v["apcer"] is not None), default=None),
        }
        return {
            "configured": configured,
            "pooled": self._apcer0_point(lambda p: True),
            "per_source": {s: self._apcer0_point(from_source(s)) for s in self.sources()},
        }

    def _apcer0_point(self, keep: Keep) -> dict[str, Any]:
        """BPCER of the kept bona fide presentations at the lowest threshold that stops every kept attack."""
        t = self.lowest_stopping(keep)
        attacks = len(self._attacks(keep))
        if t is None:  # nothing measured
            n = len([p for p in self.results.get(BONA_FIDE, []) if keep(p)])
            return {
                "threshold": None,
                "attacks": attacks,
                "presentations": n,
                "rejected": None,
                "bpcer": None,
                "bpcer_upper95": None,
                "unverified": None,
            }
        return {
            "threshold": t,
            "attacks": attacks,
            **self._measured(lambda p: self.outcome(p, t), keep)["bona_fide"],
        }

    def as_dict(self, sweep: bool = False) -> dict[str, Any]:
        pad = self.cfg.pad
        bona, attacks = self._rates(lambda p: p.outcome)
        bona["videos"] = sum(1 for v in self.videos if v["label"] == BONA_FIDE and "stills" not in v)
        bona["still_clips"] = sum(1 for v in self.videos if v["label"] == BONA_FIDE and "stills" in v)
        waits = sorted(
            p.wait_s for p in self.results.get(BONA_FIDE, []) if p.outcome == "accepted" and p.wait_s is not None
        )
        clips = [v for v in self.videos + self.no_face if "stills" in v]
        out: dict[str, Any] = {
            "threshold": pad.threshold,
            "attack_below": pad.attack_below,
            "min_frames": pad.min_frames,
            "max_wait_s": pad.max_wait_s,
            "checks": self.checks,
            "models": self.models,
            "bona_fide": bona,
            "attacks": attacks,
            "bound": BOUND,
            "liveness_wait_s": {"median": _quantile(waits, 0.5), "p95": _quantile(waits, 0.95), "n": len(waits)},
            "stills": {
                "images": sum(len(v["stills"]) for v in clips),
                "clips": len(clips),
                "hold_frames": self.hold,
                "fps": STILL_FPS,
                "scored_as": "still clip: the stills of one source, label and subject in "
                "file-name order (a still without a subject alone), each held for hold_frames frames, "
                "judged as a video",
            },
            "sources": {s: self._measured(lambda p: p.outcome, from_source(s)) for s in self.sources()},
            "check_scores": check_scores(self._by_label()),
            "at_apcer0": self.at_apcer0(),
            "loso": self.loso(),
            "at_bpcer": {},
            "no_face": self.no_face,
            "videos": self.videos,
        }
        if sweep and self.models:
            out["sweep"] = curve = self._sweep()
            n = bona["presentations"]
            for target in (0.01, 0.05):
                ok = [row for row in curve if row["bpcer"] is not None and row["bpcer"] <= target]
                out["at_bpcer"][f"{target:g}"] = None if n < math.ceil(1 / target) or not ok else ok[-1]
        return out

    def _sweep(self) -> list[dict[str, Any]]:
        """BPCER and each attack type's APCER, every presentation replayed at each texture threshold of SWEEP."""
        curve = []
        for t in SWEEP:
            b, a = self._rates(partial(self.outcome, threshold=t))
            curve.append(
                {
                    "threshold": t,
                    "bpcer": b["bpcer"],
                    "unverified": b["unverified"],
                    "apcer": {k: v["apcer"] for k, v in a.items()},
                }
            )
        return curve


def check_scores(by_label: list[tuple[str, list[Presentation]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each check's distribution alone: per check (of the decisions' liveness_checks) and label, its score at the
    decision where it has one (n, min, median, max) and how often it said live, attack or nothing."""
    everyone = [p for _, ps in by_label for p in ps]
    names = list(dict.fromkeys(k for p in everyone for k in p.checks if k != "decided_by"))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        per_label = {}
        for label, ps in by_label:
            mine = [p for p in ps if name in p.checks]
            if not mine:
                continue
            scores = sorted(s for s in (p.check_score(name) for p in mine) if s is not None)
            said = Counter(
                str((p.checks[name] if isinstance(p.checks[name], dict) else {}).get("verdict")) for p in mine
            )
            per_label[label] = {
                "n": len(mine),
                "scored": len(scores),
                "min": round(scores[0], 4) if scores else None,
                "median": round(float(np.median(scores)), 4) if scores else None,
                "max": round(scores[-1], 4) if scores else None,
                "verdicts": {("none" if k == "None" else k): v for k, v in sorted(said.items())},
            }
        out[name] = per_label
    return out


def _quantile(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.quantile(values, q)), 3)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _rate(errors: int, n: int, rate: Any, upper: Any) -> str:
    return f"{_pct(rate)} ({errors} of {n}; 95% upper {_pct(upper)})"


def _measured_text(source: str, m: dict[str, Any]) -> list[str]:
    b = m["bona_fide"]
    bona = (
        (
            f"BPCER {_rate(b['rejected'], b['presentations'], b['bpcer'], b['bpcer_upper95'])}, "
            f"{b['unverified']} liveness_unverified"
        )
        if b["presentations"]
        else "no bona fide presentation"
    )
    return [f"  {source}: {bona}"] + [
        f"    APCER {k}: {_rate(v['accepted'], v['presentations'], v['apcer'], v['apcer_upper95'])}"
        for k, v in m["attacks"].items()
    ]


def _name(entry: dict[str, Any]) -> str:
    """A video's path, or a still clip's subject (or still) and how many stills, in 44 characters."""
    name = entry["video"]
    if "stills" in entry:
        n = len(entry["stills"])
        name = f"{entry.get('subject') or Path(name).name} ({n} still{'s' * (n > 1)})"
    return name if len(name) <= 44 else "..." + name[-41:]


def text(report: dict[str, Any]) -> list[str]:
    """The table of every presentation (per video or still clip), the totals with their bounds, and the per-source,
    per-check, BPCER at APCER 0 and leave-one-source-out figures."""
    lines = _table_text(report) + _settings_text(report) + _totals_text(report) + _sweep_text(report)
    lines.append("per source:")
    for source, m in report["sources"].items():
        lines += _measured_text(source, m)
    lines += _check_scores_text(report["check_scores"])
    zero = report.get("at_apcer0")
    if zero is not None:
        lines += _apcer0_text(zero)
    loso = report.get("loso")
    if loso is not None:
        lines += _loso_text(loso)
    elif len(report["sources"]) >= 2:
        lines.append("leave-one-source-out: n/a (no texture models: there is no texture threshold to fit)")
    return lines


def _table_text(report: dict[str, Any]) -> list[str]:
    """A row per presentation, under its video or still clip; those with no presentation named, not counted."""
    lines = [
        f"{'line':>4}  {'video':44}  {'label':10} {'track':>5} {'frames':>6}  {'outcome':10} "
        f"{'decided by':14} {'texture':>7} {'steady':>6} {'wait s':>6}"
    ]
    for v in report["videos"]:
        name = _name(v)
        for p in v["presentations"]:
            tex = "-" if p["texture"] is None else f"{p['texture']:.3f}"
            steady = (p["checks"].get("texture") or {}).get("steady")  # the 10th percentile (TextureCheck)
            steady_text = "-" if steady is None else f"{steady:.3f}"
            wait = "-" if p["wait_s"] is None else f"{p['wait_s']:.2f}"
            lines.append(
                f"{v['line']:>4}  {name:44}  {v['label'][:10]:10} {p['track']:>5} {p['frames']:>6}  "
                f"{p['outcome']:10} {','.join(p['decided_by']) or '-':14} {tex:>7} {steady_text:>6} {wait:>6}"
            )
    for item in report["no_face"]:
        lines.append(f"{item['line']:>4}  {_name(item):44}  {item['label'][:10]:10}  no presentation: not counted")
    return lines


def _settings_text(report: dict[str, Any]) -> list[str]:
    """What was measured: the checks, the models and thresholds, and how stills were scored."""
    models = ", ".join(report["models"]) or "none"
    lines = [
        f"checks {', '.join(report['checks'])}; texture models {models}; live at {report['threshold']:g}, "
        f"attack below {report['attack_below']:g}, {report['min_frames']} frames, wait "
        f"{report['max_wait_s']:g} s"
    ]
    stills = report["stills"]
    if stills["clips"]:
        lines.append(
            f"stills: {stills['images']} images scored as {stills['clips']} still clips (the stills of one "
            f"source, label and subject in file-name order), each still held {stills['hold_frames']} "
            f"frames at {stills['fps']:g} fps"
        )
    return lines


def _totals_text(report: dict[str, Any]) -> list[str]:
    """BPCER and each attack type's APCER over everything, with their bounds, and the liveness wait."""
    b = report["bona_fide"]
    where = [f"{b['videos']} videos"] if b["videos"] or not b["still_clips"] else []
    where += [f"{b['still_clips']} still clips"] if b["still_clips"] else []
    lines = [
        f"BPCER {_pct(b['bpcer'])} ({b['rejected']} of {b['presentations']} bona fide presentations in "
        f"{' and '.join(where)} refused: {b['judged_attack']} presentation_attack, {b['unverified']} "
        f"liveness_unverified = {_pct(b['unverified_rate'])}); 95% upper {_pct(b['bpcer_upper95'])}"
    ]
    for label, a in report["attacks"].items():
        lines.append(
            f"APCER {label}: {_pct(a['apcer'])} ({a['accepted']} of {a['presentations']} accepted; "
            f"{a['judged_attack']} presentation_attack, {a['unverified']} liveness_unverified); 95% upper "
            f"{_pct(a['apcer_upper95'])}"
        )
    lines.append(f"95% upper: the {report['bound']}")
    w = report["liveness_wait_s"]
    if w["n"]:
        lines.append(
            f"liveness wait after the identity (accepted bona fide, frame time): median {w['median']:.2f} s, "
            f"p95 {w['p95']:.2f} s over {w['n']}"
        )
    return lines


def _sweep_text(report: dict[str, Any]) -> list[str]:
    """With --sweep: the rates at each texture threshold, and the thresholds for BPCER 1% and 5%."""
    lines = []
    for row in report.get("sweep", []):
        lines.append(
            f"  texture threshold {row['threshold']:.2f}: BPCER {_pct(row['bpcer'])} "
            f"({row['unverified']} unverified); " + ", ".join(f"APCER {k} {_pct(v)}" for k, v in row["apcer"].items())
        )
    for target, row in report["at_bpcer"].items():
        need = math.ceil(1 / float(target))
        lines.append(
            f"texture threshold for BPCER {100 * float(target):g}%: "
            + (
                f"n/a (needs at least {need} bona fide presentations and a threshold that reaches it)"
                if row is None
                else f"{row['threshold']:.2f}; " + ", ".join(f"APCER {k} {_pct(v)}" for k, v in row["apcer"].items())
            )
        )
    return lines


def _check_scores_text(check_scores: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Each check's scores and verdicts alone, per label: which check tells attacks from bona fide."""
    lines = ["each check alone, at the decision (score 0-1, above 0.5 leans live: min / median / max; verdicts):"]
    for name, per_label in check_scores.items():
        for label, d in per_label.items():
            said = ", ".join(f"{k} {v}" for k, v in d["verdicts"].items())
            score = (
                f"score {_num(d['min'])} / {_num(d['median'])} / {_num(d['max'])} over {d['scored']}"
                if d["scored"]
                else "no score"
            )
            lines.append(f"  {name:10} {label[:14]:14} n {d['n']:>4}: {score}; {said}")
    return lines


def _apcer0_text(zero: dict[str, Any]) -> list[str]:
    """BPCER at APCER 0, pooled and per source, beside the configured threshold's figures."""
    c = zero["configured"]
    lines = [
        f"BPCER at APCER 0 (at the lowest texture threshold of 0.05-0.99 that accepts no attack "
        f"presentation; configured {c['threshold']:g}: BPCER {_pct(c['bpcer'])}, highest APCER "
        f"{_pct(c['apcer_max'])}):"
    ]
    for name, point in [("all sources", zero["pooled"]), *zero["per_source"].items()]:
        if point["threshold"] is None:
            lines.append(f"  {name}: n/a (no threshold up to 0.99 stops all {point['attacks']} attack presentations)")
        elif not point["presentations"]:
            lines.append(f"  {name}: at {point['threshold']:.2f}: no bona fide presentation")
        else:
            bpcer = _rate(point["rejected"], point["presentations"], point["bpcer"], point["bpcer_upper95"])
            lines.append(
                f"  {name}: at {point['threshold']:.2f} ({point['attacks']} attack presentations): "
                f"BPCER {bpcer}, {point['unverified']} liveness_unverified"
            )
    return lines


def _loso_text(loso: dict[str, Any]) -> list[str]:
    """The leave-one-source-out table: a row per source held out, then the row fitted on every source."""
    lines = [
        f"leave-one-source-out: the texture threshold fitted on the other sources (the lowest of "
        f"0.05-0.99 at which none of their attack presentations is accepted, + margin "
        f"{loso['margin']:g}, at most 0.99), measured on the source held out:",
        f"  {'held out':16} {'fitted':>6}  {'BPCER (95% upper)':24} {'unverif.':>8}  APCER per attack type (95% upper)",
    ]
    lines += [_loso_row_text(row) for row in loso["rows"]]
    lines.append(
        "  * all: fitted and measured on the same data (every source): for reference only, not an "
        "estimate for a new source"
    )
    if any(row["lowest_stopping"] is None for row in loso["rows"]):
        lines.append("  ! no threshold up to 0.99 stopped every training attack presentation: measured at 0.99")
    return lines


def _loso_row_text(row: dict[str, Any]) -> str:
    """One row of the leave-one-source-out table ('!': no threshold stopped every training attack)."""
    b = row["bona_fide"]
    bpcer = (
        f"{_pct(b['bpcer'])} ({_pct(b['bpcer_upper95'])}) {b['rejected']}/{b['presentations']}"
        if b["presentations"]
        else "no bona fide"
    )
    apcer = (
        "; ".join(
            f"{k} {_pct(v['apcer'])} ({_pct(v['apcer_upper95'])}) {v['accepted']}/{v['presentations']}"
            for k, v in row["attacks"].items()
        )
        or "no attack"
    )
    held = row["held_out"] + ("*" if row["same_data"] else "")
    fitted = f"{row['fitted_threshold']:.2f}" + ("" if row["lowest_stopping"] is not None else "!")
    return f"  {held[:16]:16} {fitted:>6}  {bpcer:24} {b['unverified']:>8}  {apcer}"
