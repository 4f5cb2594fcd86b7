"""Presentation attack detection (liveness): the texture models, the image measures, and a track's verdict.

Every face of a transaction brings a `PadObservation` (kiosk.vision.liveness_checks): the texture models'
probability that it is real, its 106 landmarks (the motion check: does it blink and move its lips and brows, or
move as one rigid piece? the planar check: when it moves, does it move as a head or as a flat piece? the depth
check: is it a card turned far?), its fine-grained colour (the screen check) and, where the border check runs, the
long straight edges around it. `TrackLiveness` runs the checks `pad.checks` names over a track's observations and
fuses their verdicts: live needs strong evidence of both kinds, image (texture) and movement (the motion or the
planar check) (liveness_checks says how).

Texture models: the default install ships MiniFASNetV2 (crop scale 2.7) and MiniFASNetV1SE (4.0) from
Silent-Face-Anti-Spoofing (minivision-ai, Apache-2.0; ONNX export of the yakhyo/face-anti-spoofing project) in
kiosk/vision/models/minifasnet/ with their LICENSE and NOTICE; `models.pad: [default]` names them, other files
replace or join them. Each file is recognised from its graph: one image input of 1x3xSxS (S = 80 for
MiniFASNetV1/V2/V1SE/V2SE, 128 for the 2-class MiniFAS variants) and one output of 2 or 3 class scores with "real"
at index 1. A face is cut out as those models were trained: the detector's box enlarged about its centre by the
model's scale (kept inside the frame), resized to SxS, in the model's channel order, float 0-255 without
normalisation. The probabilities of "real" of several files are averaged.

What these models judge is image texture (print grain, a screen's pixel grid, moire): a photo pasted digitally
into a video has none of that and is scored live; the movement checks are there for a card or a photo held up.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

from kiosk.config import DEFAULT_PAD_MODELS, KioskConfig, PadConfig, PadModelConfig
from kiosk.errors import ConfigError, ModelError
from kiosk.vision.landmarks import LandmarkModel, find_landmark_model
from kiosk.vision.liveness_checks import LivenessCheck, PadObservation, border_lines, check_class, inside_frame
from kiosk.vision.models import runtime
from kiosk.vision.models.pack import _dims, _load, _real_inputs
from kiosk.vision.models.recognizer import batch_free_model

log = logging.getLogger(__name__)

__all__ = [
    "PadEngine",
    "PadModel",
    "PadObservation",
    "TrackLiveness",
    "crop_box",
    "fuse",
    "scale_from_name",
    "screen_signs",
    "shipped_pad_models",
]

REAL_INDEX = 1
KNOWN_SCALES = {"minifasnetv2": 2.7, "minifasnetv1se": 4.0, "minifasnetv1": 2.7, "minifasnetv2se": 4.0}
_SCALE_PREFIX = re.compile(r"^(\d+(?:\.\d+)?)_")
SHIPPED_DIR = Path(__file__).parent / "models" / "minifasnet"
SHIPPED_FILES = ("MiniFASNetV2.onnx", "MiniFASNetV1SE.onnx")


def shipped_pad_models() -> list[Path]:
    """The texture models inside the package (`models.pad: [default]`)."""
    return [SHIPPED_DIR / name for name in SHIPPED_FILES]


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
    session: ort.InferenceSession
    input_name: str
    size: int
    classes: int
    scale: float
    colour: str
    batched: bool = False  # the session takes a batch of faces (its graph's batch dimension was freed)

    @property
    def name(self) -> str:
        return self.path.name

    def crops(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        out = np.empty((len(boxes), 3, self.size, self.size), np.float32)
        for i, box in enumerate(boxes):
            x1, y1, x2, y2 = crop_box(box, self.scale, w, h)
            patch = cv2.resize(image[y1 : y2 + 1, x1 : x2 + 1], (self.size, self.size))
            if self.colour == "rgb":
                patch = patch[:, :, ::-1]
            out[i] = patch.transpose(2, 0, 1)
        return out

    def score(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N,) probability that each face is real."""
        x = self.crops(image, boxes)
        if not len(x):
            return np.zeros(0, np.float32)
        if self.batched:  # all faces of the frame in one run
            logits = self.session.run(None, {self.input_name: x})[0]
        else:
            logits = np.concatenate([self.session.run(None, {self.input_name: x[i : i + 1]})[0] for i in range(len(x))])
        logits = np.asarray(logits).reshape(len(x), -1).astype(np.float64)
        if logits.shape[1] != self.classes or not np.isfinite(logits).all():
            raise RuntimeError(f"{self.name}: unexpected output {logits.shape}")
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e[:, REAL_INDEX] / e.sum(axis=1)).astype(np.float32)


def classify_pad(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(input size, classes) of a MiniFASNet-like graph, or None."""
    inputs = _real_inputs(model)
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    shape, out = _dims(inputs[0]), _dims(outputs[0])
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or shape[2] not in (80, 128):
        return None
    if len(out) != 2 or out[1] not in (2, 3):
        return None
    return int(shape[2]), int(out[1])


def screen_signs(image: np.ndarray, box: np.ndarray) -> float:
    """How much fine-grained colour the face shows: the standard deviation of the high-passed chroma (Cr + Cb)
    over the inner face box. A screen re-captured by a camera shows its sub-pixel grid and moire as coloured
    fringes; skin seen directly has next to none (measured: real people on real camera video 0.8-3.8, a webcam in
    a dark room included; simulated screens 5-16 typical and 15-40 in their worst frames)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    dx, dy = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
    h, w = image.shape[:2]
    left, top = int(max(0, x1 + dx)), int(max(0, y1 + dy))
    right, bottom = int(min(w, x2 - dx)), int(min(h, y2 - dy))
    if right - left < 8 or bottom - top < 8:
        return 0.0
    ycc = cv2.cvtColor(image[top:bottom, left:right], cv2.COLOR_BGR2YCrCb).astype(np.float32)
    return float(sum((ycc[..., c] - cv2.GaussianBlur(ycc[..., c], (0, 0), 2.0)).std() for c in (1, 2)))


class TrackLiveness:
    """A track's liveness checks (`pad.checks`) and their fused verdict; the verifier's policy and `kiosk-enroll
    evaluate-pad` both use it, so what is measured is what decides. See kiosk.vision.liveness_checks."""

    def __init__(self, cfg: PadConfig, textured: bool, checks: list[LivenessCheck] | None = None) -> None:
        """`textured`: texture models are configured; `checks`: the track's check objects (default: a new one of
        each class `pad.checks` names)."""
        self.cfg = cfg
        self.checks = checks if checks is not None else [cls(cfg) for cls in check_classes(cfg, textured)]
        self.frames = 0

    def add(self, obs: PadObservation | None) -> None:
        if obs is None:
            return
        self.frames += 1
        for check in self.checks:
            check.add(obs)

    @property
    def verdict(self) -> str | None:
        """'attack' as soon as one check accuses; 'live' once, for each kind of evidence, a vouching check says live,
        every required check has its evidence and `pad.min_frames` frames are in (the accusers have had their say);
        else None."""
        return fuse(self.checks, self.frames, self.cfg.min_frames)

    @property
    def texture_score(self) -> float | None:
        return next((c.score for c in self.checks if c.name == "texture"), None)

    @property
    def decided_by(self) -> list[str]:
        """The checks whose verdict is the track's: the accusers of an attack, the vouchers of a live."""
        verdict = self.verdict
        return [
            c.name
            for c in self.checks
            if verdict is not None and c.verdict == verdict and (verdict == "attack" or c.vouches)
        ]

    @property
    def score(self) -> float | None:
        """The weakest check's score (0-1, above 0.5 leans live); None while no check has a graded score."""
        scores = [s for s in (c.score for c in self.checks) if s is not None]
        return min(scores) if scores else None

    def report(self) -> dict[str, object]:
        """What each check saw, for the decision event."""
        return {"decided_by": self.decided_by, **{c.name: c.as_dict() for c in self.checks}}


def fuse(checks: list[LivenessCheck], frames: int, min_frames: int) -> str | None:
    """The fusion rule of TrackLiveness.verdict, over any checks (evaluate-pad replays recorded ones): attack on one
    accusation; live only when, for every kind of evidence (`cue`) among the vouching checks, one of them says live,
    every required check has its evidence and `min_frames` frames are in; else None (doubtful: wait)."""
    verdicts = [c.verdict for c in checks]
    if "attack" in verdicts:
        return "attack"
    if frames < min_frames or not all(c.has_evidence for c in checks if c.required):
        return None
    cues = {c.cue for c in checks if c.vouches}
    vouched = {c.cue for c, v in zip(checks, verdicts, strict=True) if c.vouches and v == "live"}
    return "live" if cues and vouched == cues else None


class PadEngine:
    """The texture models (averaged), the landmark model of the depth check, and the image measures: what every
    observation of a face carries."""

    def __init__(
        self, models: list[PadModel], landmarks: LandmarkModel | None = None, checks: tuple[str, ...] = ()
    ) -> None:
        self.models = models
        self.landmarks = landmarks
        self.checks = checks  # pad.checks: which measures are needed

    @classmethod
    def from_config(cls, cfg: KioskConfig, plan: runtime.ProviderPlan, threads: int = 0) -> PadEngine:
        checks = tuple(c.name for c in check_classes(cfg.pad, bool(cfg.models.pad)))
        models = []
        for i, path, spec in pad_model_files(cfg):
            where = f"models.pad[{i}]" + (" (default: the shipped MiniFASNet files)" if spec is None else "")
            try:
                model, _digest = _load(path)
            except ModelError as exc:
                raise ModelError(f"{where}: {exc}") from None
            kind = classify_pad(model)
            if kind is None:
                raise ModelError(
                    f"{where}: {path} does not look like a liveness model (expected one "
                    "1x3x80x80 or 1x3x128x128 input and one output of 2 or 3 classes)"
                )
            scale = spec.scale if spec is not None and spec.scale is not None else scale_from_name(path)
            if scale is None:
                raise ModelError(
                    f"{where}: {path}: give its crop scale ({{path: ..., scale: 2.7}}): the file name does not say it"
                )
            try:
                session = runtime.create_session(batch_free_model(model), str(path), plan, threads=threads)
                batched = True
            except Exception:  # noqa: BLE001 - a graph whose batch cannot be freed runs one face at a time
                session = runtime.create_session(model.SerializeToString(), str(path), plan, threads=threads)
                batched = False
            colour = spec.colour if spec is not None else "bgr"
            models.append(
                PadModel(path, session, _real_inputs(model)[0].name, kind[0], kind[1], scale, colour, batched)
            )
            log.info(
                "liveness model %s: %dx%d input, %d classes, crop scale %.1f, %s",
                path.name,
                kind[0],
                kind[0],
                kind[1],
                scale,
                colour.upper(),
            )
        landmarks = None
        if {"depth", "motion", "planar"} & set(checks):
            root = cfg.resolve(Path(cfg.models.pack)) if cfg.models.pack != "default" else None
            landmarks = LandmarkModel.load(find_landmark_model(root), plan, threads)
        log.info("liveness checks: %s", ", ".join(checks))
        if not models:
            log.warning(
                "liveness without texture models (models.pad is empty): movement alone vouches, which "
                "stops prints and photos but not a replayed video"
            )
        return cls(models, landmarks, checks)

    def observe(self, image: np.ndarray, boxes: np.ndarray) -> list[PadObservation]:
        """What the checks need of each face. Raises if a model fails: the caller then has no evidence for these
        faces, and their accepts wait and fail closed."""
        n = len(boxes)
        points = self.landmarks.predict(image, boxes) if self.landmarks is not None else [None] * n
        texture = self.score(image, boxes)[0] if self.models else [None] * n
        chroma = [screen_signs(image, box) for box in boxes] if "screen" in self.checks else [0.0] * n
        border = [border_lines(image, box) for box in boxes] if "border" in self.checks else [None] * n
        h, w = image.shape[:2]
        return [
            PadObservation(p, None if t is None else float(t), c, float(box[2] - box[0]), b, inside_frame(box, w, h))
            for p, t, c, box, b in zip(points, texture, chroma, boxes, border, strict=True)
        ]

    def score(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(N,) mean probability of "real" over the models, and each model's own."""
        each = {m.name: m.score(image, boxes) for m in self.models}
        mean = np.mean(np.stack(list(each.values())), axis=0) if each else np.zeros(len(boxes), np.float32)
        return mean.astype(np.float32), each


def pad_model_files(cfg: KioskConfig) -> list[tuple[int, Path, PadModelConfig | None]]:
    """The texture model files `models.pad` names: (index of the entry, file, its settings; None: a shipped file)."""
    out: list[tuple[int, Path, PadModelConfig | None]] = []
    for i, entry in enumerate(cfg.models.pad):
        if not isinstance(entry, PadModelConfig) and str(entry) == DEFAULT_PAD_MODELS:
            out += [(i, path, None) for path in shipped_pad_models()]
            continue
        spec = entry if isinstance(entry, PadModelConfig) else PadModelConfig(path=entry)
        out.append((i, spec.path, spec))
    return out


def check_classes(cfg: PadConfig, textured: bool) -> list[type[LivenessCheck]]:
    """The checks that run (`pad.checks`, less the texture check where no model is configured); a config error
    where a name is unknown or no check could ever say live."""
    classes = []
    for i, name in enumerate(cfg.checks):
        try:
            classes.append(check_class(name))
        except ValueError as exc:
            raise ConfigError(f"pad.checks[{i}]: {exc}") from None
    active = [c for c in classes if c.active(textured)]
    if not any(c.vouches for c in active):
        raise ConfigError(
            "pad.checks: no check here can say live (" + (", ".join(cfg.checks) or "none") + "): "
            "name texture (with models.pad) and motion, or turn liveness off with pad.enabled: false"
        )
    return active
