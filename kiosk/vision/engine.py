"""The face engine: detect -> align -> embed, on ONNX Runtime.

`FaceEngine.from_config(cfg)` loads the model pack, chooses providers and
builds one session per model. The verifier drives the detector and the
recognizer itself (detection batched per canvas shape, all faces of a step
embedded in one call); `describe(image, faces)` aligns and embeds the given
faces of one photo (enrollment, compare).

`FaceModels` is all the verifier core asks of its models: detect a batch
of frames, embed a batch of aligned crops, and (liveness on) observe the
faces of a frame. The ONNX engine here is one implementation; the core's
frame-by-frame tests run on a fast fake (tests/fake_models.py), and an
implementation that batches across the cameras of a host on a GPU would
plug in the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kiosk.config import KioskConfig
from kiosk.vision.faces import Faces
from kiosk.vision.liveness import PadEngine
from kiosk.vision.models import runtime
from kiosk.vision.models.detector import ScrfdDetector
from kiosk.vision.models.pack import ModelPack, load_pack
from kiosk.vision.models.recognizer import ArcFaceRecognizer, align_faces, batch_free_model, input_normalisation

log = logging.getLogger(__name__)


class Detector(Protocol):
    def detect_batch(self, images: list[np.ndarray], min_face_px: int = 0) -> list[Faces]:
        """The faces of each image (boxes, scores, five keypoints), one call for the frames of a step."""
        ...


class Recognizer(Protocol):
    dim: int

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, dim) unit embeddings of (N, 112, 112, 3) aligned crops."""
        ...


class LivenessModels(Protocol):
    def observe(self, image: np.ndarray, boxes: np.ndarray) -> list:
        """A PadObservation per face box of one frame; raises when a model fails (the caller fails closed)."""
        ...


class FaceModels(Protocol):
    """What the verifier core uses of its models (see the module docstring)."""

    # read-only (properties): a concrete engine's own, more specific types fit
    @property
    def detector(self) -> Detector: ...

    @property
    def recognizer(self) -> Recognizer: ...

    @property
    def pad(self) -> LivenessModels | None: ...

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...


@dataclass
class Analysis:
    """Faces of one image with their aligned crops (for quality measures)."""

    faces: Faces
    crops: np.ndarray


class FaceEngine:
    """Detector + recognizer, and the ids that tie templates to the recognizer."""

    def __init__(
        self,
        pack: ModelPack,
        detector: ScrfdDetector,
        recognizer: ArcFaceRecognizer,
        providers: list[str],
        provider_note: str,
        pad: PadEngine | None = None,
    ) -> None:
        self.pack = pack
        self.pad = pad  # liveness models (pad.enabled), None otherwise
        self.detector = detector
        self.recognizer = recognizer
        self.providers = providers
        self.provider_note = provider_note

    @property
    def model_id(self) -> str:
        """Id of the recognizer; stored with every template."""
        return self.pack.recognizer.model_id

    @property
    def dim(self) -> int:
        return self.recognizer.dim

    @classmethod
    def from_config(cls, cfg: KioskConfig) -> FaceEngine:
        t0 = time.perf_counter()
        pack = load_pack(cfg.models.pack, cfg.base_dir)
        plan = runtime.plan_providers(cfg.models.providers)
        cache = cfg.models.cache_dir if runtime.TENSORRT in plan.providers else None
        threads = cfg.models.intra_op_threads
        det_session = runtime.create_session(
            pack.detector.model.SerializeToString(), str(pack.detector.path), plan, threads=threads, cache_dir=cache
        )
        rec_session = runtime.create_session(
            batch_free_model(pack.recognizer.model), str(pack.recognizer.path), plan, threads=threads, cache_dir=cache
        )
        chosen = det_session.get_providers()
        note = runtime.describe(plan, chosen)
        detector = ScrfdDetector(
            det_session,
            det_size=cfg.models.det_size,
            threshold=cfg.models.det_threshold,
            nms_threshold=cfg.models.nms_threshold,
            close_up_pass=cfg.models.close_up_pass,
        )
        mean, std = input_normalisation(pack.recognizer.model)
        recognizer = ArcFaceRecognizer(rec_session, mean=mean, std=std)
        pad = PadEngine.from_config(cfg, plan, threads) if cfg.pad.enabled else None
        log.info(
            "face engine ready in %.2fs: detector %s, recognizer %s (id %s), %s",
            time.perf_counter() - t0,
            pack.detector.path.name,
            pack.recognizer.path.name,
            pack.recognizer.sha256[:12],
            note,
        )
        return cls(pack, detector, recognizer, chosen, note, pad)

    def describe(self, image: np.ndarray, faces: Faces) -> Analysis:
        """Align and embed the given faces of one image (detection already done)."""
        crops = align_faces(image, faces.kps)
        return Analysis(faces.with_embeddings(self.recognizer.embed(crops)), crops)
