"""Presentation attack detection (liveness): the built-in depth check and learned models, per track.

Every face of a transaction brings a `PadObservation`: its 106 landmarks (for the built-in depth check,
kiosk.vision.depth_check: does it move as a head or as a flat card?), its fine-grained colour (the screen
check: a re-captured screen's sub-pixel grid and moire) and, where `models.pad` names any, the learned
models' probability that it is real. `TrackLiveness` gathers a track's observations and gives its verdict:
an attack as soon as one check says so, live once the depth check (and the models) say so, else none yet.

Learned models: `models.pad` names one or more ONNX files; each is recognised from its graph: one image
input of 1x3xSxS (S = 80 for Silent-Face-Anti-Spoofing's MiniFASNetV1/V2/V1SE/V2SE, 128 for the 2-class
MiniFAS variants) and one output of 2 or 3 class scores with "real" at index 1. A face is cut out as those models were
trained: the detector's box enlarged about its centre by the model's scale (2.7, 4.0, ...; kept inside the
frame), resized to SxS, in the model's channel order, float 0-255 without normalisation. The scores (softmax
probability of "real") of several files are averaged.

What these models judge is image texture (print grain, a screen's pixel grid, moire): a photo pasted
digitally into a video has none of that and is scored live. None is shipped or downloaded: an operator
gets one and its licence (Silent-Face-Anti-Spoofing: Apache-2.0) and names its path.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from kiosk.config import KioskConfig, PadConfig, PadModelConfig
from kiosk.errors import ModelError
from kiosk.vision.depth_check import DepthEvidence
from kiosk.vision.landmarks import LandmarkModel, find_landmark_model
from kiosk.vision.models import runtime
from kiosk.vision.models.pack import _dims, _load, _real_inputs

log = logging.getLogger(__name__)

REAL_INDEX = 1
KNOWN_SCALES = {"minifasnetv2": 2.7, "minifasnetv1se": 4.0, "minifasnetv1": 2.7, "minifasnetv2se": 4.0}
_SCALE_PREFIX = re.compile(r"^(\d+(?:\.\d+)?)_")


def scale_from_name(path: Path) -> float | None:
    """Silent-Face's files say their crop scale: `2.7_80x80_MiniFASNetV2.onnx`; known names otherwise."""
    m = _SCALE_PREFIX.match(path.name)
    if m:
        return float(m.group(1))
    return KNOWN_SCALES.get(path.stem.lower())


def crop_box(box: np.ndarray, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The face box (x1, y1, x2, y2) enlarged about its centre by `scale` (less where the frame is too
    small), shifted to lie inside the frame: the crop the MiniFASNet models were trained on."""
    x1, y1, x2, y2 = (float(v) for v in box)
    bw, bh = max(1.0, x2 - x1), max(1.0, y2 - y1)
    s = min(scale, (height - 1) / bh, (width - 1) / bw)
    nw, nh = bw * s, bh * s
    cx, cy = x1 + bw / 2, y1 + bh / 2
    left, top = cx - nw / 2, cy - nh / 2
    left = min(max(0.0, left), width - 1 - nw)
    top = min(max(0.0, top), height - 1 - nh)
    return int(left), int(top), int(left + nw), int(top + nh)


@dataclass
class PadModel:
    path: Path
    session: object
    input_name: str
    size: int
    classes: int
    scale: float
    colour: str

    @property
    def name(self) -> str:
        return self.path.name

    def crops(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        out = np.empty((len(boxes), 3, self.size, self.size), np.float32)
        for i, box in enumerate(boxes):
            x1, y1, x2, y2 = crop_box(box, self.scale, w, h)
            patch = cv2.resize(image[y1:y2 + 1, x1:x2 + 1], (self.size, self.size))
            if self.colour == "rgb":
                patch = patch[:, :, ::-1]
            out[i] = patch.transpose(2, 0, 1)
        return out

    def score(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N,) probability that each face is real."""
        x = self.crops(image, boxes)
        logits = np.concatenate([self.session.run(None, {self.input_name: x[i:i + 1]})[0]  # type: ignore[attr-defined]
                                 for i in range(len(x))]) if len(x) else np.zeros((0, self.classes), np.float32)
        logits = logits.reshape(len(x), -1).astype(np.float64)
        if logits.shape[1] != self.classes or not np.isfinite(logits).all():
            raise RuntimeError(f"{self.name}: unexpected output {logits.shape}")
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e[:, REAL_INDEX] / e.sum(axis=1)).astype(np.float32)


def classify_pad(model: object) -> tuple[int, int] | None:
    """(input size, classes) of a MiniFASNet-like graph, or None."""
    inputs = _real_inputs(model)  # type: ignore[arg-type]
    outputs = list(model.graph.output)  # type: ignore[attr-defined]
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    shape, out = _dims(inputs[0]), _dims(outputs[0])
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[2] not in (80, 128):
        return None
    if len(out) != 2 or out[1] not in (2, 3):
        return None
    return int(shape[2]), int(out[1])


SCREEN_CHROMA = 12.0  # fine-grained colour (std of high-passed Cr + Cb) of a frame with a screen's signs
SCREEN_FRAMES = 3  # such frames that make a track a screen


def screen_signs(image: np.ndarray, box: np.ndarray) -> float:
    """How much fine-grained colour the face shows: the standard deviation of the high-passed chroma (Cr + Cb)
    over the inner face box. A screen re-captured by a camera shows its sub-pixel grid and moire as coloured
    fringes; skin seen directly has next to none (measured: bona fide stand-ins and photo walk-ups up to 9,
    simulated screens 5-16 typical and 15-40 in their worst frames). A noisy camera in dim light adds chroma
    noise: see README "Liveness"."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    dx, dy = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
    h, w = image.shape[:2]
    left, top = int(max(0, x1 + dx)), int(max(0, y1 + dy))
    right, bottom = int(min(w, x2 - dx)), int(min(h, y2 - dy))
    if right - left < 8 or bottom - top < 8:
        return 0.0
    ycc = cv2.cvtColor(image[top:bottom, left:right], cv2.COLOR_BGR2YCrCb).astype(np.float32)
    return float(sum((ycc[..., c] - cv2.GaussianBlur(ycc[..., c], (0, 0), 2.0)).std() for c in (1, 2)))


@dataclass(frozen=True)
class PadObservation:
    """One face in one frame, as the liveness checks see it."""

    landmarks: np.ndarray | None  # (106, 2) image pixels; None if the landmark model failed
    texture: float | None = None  # mean probability of "real" over models.pad; None without models, NaN on failure
    chroma: float = 0.0  # screen_signs()


@dataclass
class TrackLiveness:
    """A track's liveness evidence and verdict (the verifier's policy and `kiosk-enroll evaluate-pad` both use
    it, so what is measured is what decides)."""

    cfg: PadConfig
    textured: bool  # models.pad names at least one model
    texture: list = field(default_factory=list)
    depth: DepthEvidence = field(default_factory=DepthEvidence)
    screen_frames: int = 0
    frames: int = 0

    def add(self, obs: PadObservation | None) -> None:
        if obs is None:
            return
        self.frames += 1
        self.screen_frames += obs.chroma >= SCREEN_CHROMA
        if obs.landmarks is not None:
            self.depth.add(obs.landmarks)
        if obs.texture is not None and math.isfinite(obs.texture):
            self.texture.append(float(obs.texture))

    @property
    def texture_score(self) -> float | None:
        return sum(self.texture) / len(self.texture) if self.texture else None

    @property
    def texture_verdict(self) -> str | None:
        if len(self.texture) < self.cfg.min_frames:
            return None
        return "attack" if (self.texture_score or 0.0) < self.cfg.threshold else "live"

    @property
    def screen_verdict(self) -> str | None:
        """The screen check only accuses: 'attack' or None."""
        return "attack" if self.screen_frames >= SCREEN_FRAMES else None

    def verdicts(self) -> dict[str, str | None]:
        out = {"depth": self.depth.verdict, "screen": self.screen_verdict}
        if self.textured:
            out["texture"] = self.texture_verdict
        return out

    @staticmethod
    def _combined(v: dict[str, str | None]) -> str | None:
        if "attack" in v.values():
            return "attack"
        return "live" if all(x == "live" for k, x in v.items() if k != "screen") else None

    @property
    def verdict(self) -> str | None:
        """'attack' as soon as one check says so; 'live' once the depth check (and the models, if any) say so."""
        return self._combined(self.verdicts())

    @property
    def builtin_verdict(self) -> str | None:
        """The same, from the built-in checks alone (depth, screen): what the models are measured against."""
        return self._combined({"depth": self.depth.verdict, "screen": self.screen_verdict})

    @property
    def decided_by(self) -> list[str]:
        """The checks whose verdict is the track's (every check for 'live', the accusers for 'attack')."""
        verdict = self.verdict
        return [name for name, v in self.verdicts().items() if verdict is not None and v == verdict]

    @property
    def score(self) -> float | None:
        """The weakest check's score (0-1, above 0.5 leans live): the depth check's share of 3D frames, the
        models' mean probability of "real"; None while no frame brought any evidence."""
        scores = ([self.depth.score] if self.depth.frames else []) + \
            ([self.texture_score] if self.texture_score is not None else [])
        return min(scores) if scores else None

    def checks(self) -> dict[str, object]:
        """What each check saw, for the decision event."""
        out: dict[str, object] = {"decided_by": self.decided_by, "depth": self.depth.as_dict(),
                                  "screen": {"verdict": self.screen_verdict, "frames": self.screen_frames}}
        if self.textured:
            score = self.texture_score
            out["texture"] = {"verdict": self.texture_verdict, "frames": len(self.texture),
                              "score": None if score is None else round(score, 4)}
        return out


class PadEngine:
    """The landmark model of the built-in check and every configured liveness model (averaged)."""

    def __init__(self, models: list[PadModel], landmarks: LandmarkModel | None = None) -> None:
        self.models = models
        self.landmarks = landmarks

    @classmethod
    def from_config(cls, cfg: KioskConfig, plan: runtime.ProviderPlan, threads: int = 0) -> PadEngine:
        models = []
        for i, entry in enumerate(cfg.models.pad):
            spec = entry if isinstance(entry, PadModelConfig) else PadModelConfig(path=entry)
            path = cfg.resolve(spec.path)
            model, _digest = _load(path)
            kind = classify_pad(model)
            if kind is None:
                raise ModelError(f"models.pad[{i}]: {path} does not look like a liveness model (expected one "
                                 "1x3x80x80 or 1x3x128x128 input and one output of 2 or 3 classes)")
            scale = spec.scale if spec.scale is not None else scale_from_name(path)
            if scale is None:
                raise ModelError(f"models.pad[{i}]: {path}: give its crop scale ({{path: ..., scale: 2.7}}): the "
                                 "file name does not say it")
            session = runtime.create_session(model.SerializeToString(), str(path), plan, threads=threads)
            models.append(PadModel(path, session, _real_inputs(model)[0].name, kind[0], kind[1], scale,
                                   spec.colour))
            log.info("liveness model %s: %dx%d input, %d classes, crop scale %.1f, %s", path.name, kind[0],
                     kind[0], kind[1], scale, spec.colour.upper())
        root = cfg.resolve(Path(cfg.models.pack)) if cfg.models.pack != "default" else None
        landmarks = LandmarkModel.load(find_landmark_model(root), plan, threads)
        return cls(models, landmarks)

    def observe(self, image: np.ndarray, boxes: np.ndarray) -> list[PadObservation]:
        """Each face's landmarks and (with models) texture score. Raises if a model fails: the caller then has
        no evidence for these faces, and their accepts wait and fail closed."""
        points = self.landmarks.predict(image, boxes) if self.landmarks is not None else [None] * len(boxes)
        texture = self.score(image, boxes)[0] if self.models else [None] * len(boxes)
        return [PadObservation(p, None if t is None else float(t), screen_signs(image, box))
                for p, t, box in zip(points, texture, boxes)]

    def score(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(N,) mean probability of "real" over the models, and each model's own."""
        each = {m.name: m.score(image, boxes) for m in self.models}
        mean = np.mean(np.stack(list(each.values())), axis=0) if each else np.zeros(len(boxes), np.float32)
        return mean.astype(np.float32), each
