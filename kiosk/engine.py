"""The face engine: detect -> align -> embed, on ONNX Runtime.

`FaceEngine.from_config(cfg)` loads the model pack, chooses providers and
builds one session per model; `analyze(images)` returns `Faces` with
embeddings for every image, batching detection per canvas shape and
embedding all faces of all images in one call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from kiosk.config import KioskConfig
from kiosk.faces import Faces
from kiosk.models import runtime
from kiosk.models.detector import ScrfdDetector
from kiosk.models.pack import ModelPack, load_pack
from kiosk.models.recognizer import ArcFaceRecognizer, align_faces, batch_free_model, input_normalisation

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    """Faces of one image with their aligned crops (for quality measures)."""

    faces: Faces
    crops: np.ndarray


class FaceEngine:
    """Detector + recognizer, and the ids that tie templates to the recognizer."""

    def __init__(self, pack: ModelPack, detector: ScrfdDetector, recognizer: ArcFaceRecognizer,
                 providers: list[str], provider_note: str) -> None:
        self.pack = pack
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
        cache = cfg.resolve(cfg.models.cache_dir) if runtime.TENSORRT in plan.providers else None
        threads = cfg.models.intra_op_threads
        det_session = runtime.create_session(pack.detector.model.SerializeToString(), str(pack.detector.path),
                                             plan, threads=threads, cache_dir=cache)
        rec_session = runtime.create_session(batch_free_model(pack.recognizer.model), str(pack.recognizer.path),
                                             plan, threads=threads, cache_dir=cache)
        chosen = det_session.get_providers()
        note = runtime.describe(plan, chosen)
        detector = ScrfdDetector(det_session, det_size=cfg.models.det_size, threshold=cfg.models.det_threshold,
                                 nms_threshold=cfg.models.nms_threshold, close_up_pass=cfg.models.close_up_pass)
        mean, std = input_normalisation(pack.recognizer.model)
        recognizer = ArcFaceRecognizer(rec_session, mean=mean, std=std)
        log.info("face engine ready in %.2fs: detector %s, recognizer %s (id %s), %s",
                 time.perf_counter() - t0, pack.detector.path.name, pack.recognizer.path.name,
                 pack.recognizer.sha256[:12], note)
        return cls(pack, detector, recognizer, chosen, note)

    def analyze(self, images: list[np.ndarray], *, min_width: float = 0.0) -> list[Analysis]:
        """Detect, align and embed every face (wider than `min_width`) in each image."""
        found = self.detector.detect_batch(images)
        if min_width > 0:
            found = [f[f.widths >= min_width] for f in found]
        crops = [align_faces(img, f.kps) for img, f in zip(images, found)]
        counts = [len(f) for f in found]
        all_crops = np.concatenate(crops) if sum(counts) else np.zeros((0, 112, 112, 3), np.uint8)
        emb = self.recognizer.embed(all_crops)
        out, start = [], 0
        for f, c, n in zip(found, crops, counts):
            out.append(Analysis(f.with_embeddings(emb[start:start + n]), c))
            start += n
        return out

    def describe(self, image: np.ndarray, faces: Faces) -> Analysis:
        """Align and embed the given faces of one image (detection already done)."""
        crops = align_faces(image, faces.kps)
        return Analysis(faces.with_embeddings(self.recognizer.embed(crops)), crops)

    def analyze_one(self, image: np.ndarray, *, min_width: float = 0.0) -> Analysis:
        return self.analyze([image], min_width=min_width)[0]
