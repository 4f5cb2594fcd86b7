"""The 106-point face landmarks (InsightFace's 2d106det, in the default pack): the motion and depth liveness checks
read a face's shape from them, frame by frame.

The model takes a 192x192 RGB crop (0-255, its own normalisation inside) of the detector's box enlarged
1.5 times about its centre, and gives 106 (x, y) in [-1, 1] of that crop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

from kiosk.errors import ModelError
from kiosk.vision.models import runtime
from kiosk.vision.models.pack import _dims, _load, _real_inputs

log = logging.getLogger(__name__)

DEFAULT_FILE = "2d106det.onnx"
POINTS = 106
SIZE = 192
CROP_SCALE = 1.5

# Where the 106 points lie on a face (checked on the sample portrait yaoming.jpg): the face outline 0-32 (0 the
# chin), the eye on the image's left 33-42 and its brow 43-51, the mouth 52-71, the nose 72-86, the eye on the right
# 87-96 and its brow 97-105. Each eye's upper lid (40, 41, 42 and 94, 95, 96) lies over its lower lid (33, 36, 37
# and 87, 90, 91), point for point; the eye corners are 35, 39, 89, 93.
CONTOUR = tuple(range(0, 33))
CHIN = 0
LEFT_EYE, RIGHT_EYE = tuple(range(33, 43)), tuple(range(87, 97))
LEFT_BROW, RIGHT_BROW = tuple(range(43, 52)), tuple(range(97, 106))
MOUTH = tuple(range(52, 72))
NOSE = tuple(range(72, 87))
UPPER_LIDS = (40, 41, 42, 94, 95, 96)
LOWER_LIDS = (33, 36, 37, 87, 90, 91)  # under UPPER_LIDS, in the same order
EYE_CORNERS = (35, 39, 89, 93)


def is_landmark_model(model: onnx.ModelProto) -> bool:
    """A 2d106-like graph: one 1x3x192x192 input, one output of 212 values."""
    inputs = _real_inputs(model)
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    shape, out = _dims(inputs[0]), _dims(outputs[0])
    return len(shape) == 4 and shape[1:] == [3, SIZE, SIZE] and len(out) == 2 and out[1] == 2 * POINTS


def find_landmark_model(pack_dir: Path | None) -> Path:
    """The 106-point landmark model of a model pack (None: the default pack): `2d106det.onnx`, or the one file
    whose graph looks like it."""
    from kiosk.vision.models.pack import default_pack_dir

    root = default_pack_dir() if pack_dir is None else pack_dir
    if (root / DEFAULT_FILE).is_file():
        return root / DEFAULT_FILE
    for path in sorted(root.glob("*.onnx")):
        try:
            if is_landmark_model(_load(path)[0]):
                return path
        except ModelError:
            continue
    raise ModelError(
        f"models.pack: {root}: the motion and depth liveness checks (pad.checks: motion, depth) need "
        f"InsightFace's 106-point landmark model ({DEFAULT_FILE}); none found in the pack"
    )


class LandmarkModel:
    """106 landmarks of the faces in one image."""

    def __init__(self, session: ort.InferenceSession, input_name: str, path: Path) -> None:
        self.session = session
        self.input_name = input_name
        self.path = path

    @classmethod
    def load(cls, path: Path, plan: runtime.ProviderPlan | None = None, threads: int = 0) -> LandmarkModel:
        model, _digest = _load(path)
        if not is_landmark_model(model):
            raise ModelError(f"{path}: expected the 106-point landmark model (one 1x3x192x192 input, 212 outputs)")
        plan = plan or runtime.plan_providers("cpu")
        session = runtime.create_session(model.SerializeToString(), str(path), plan, threads=threads)
        return cls(session, _real_inputs(model)[0].name, path)

    def predict(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, 106, 2) landmarks in image pixels for the faces in `boxes` (N, 4)."""
        out = np.zeros((len(boxes), POINTS, 2), np.float32)
        for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64)[:, :4]):
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            k = SIZE / max(1.0, max(x2 - x1, y2 - y1) * CROP_SCALE)
            m = np.array([[k, 0, SIZE / 2 - cx * k], [0, k, SIZE / 2 - cy * k]], np.float64)
            crop = cv2.warpAffine(image, m, (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE)
            blob = crop[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)
            pts = np.asarray(
                self.session.run(None, {self.input_name: blob})[0],
                np.float64,
            ).reshape(POINTS, 2)
            if not np.isfinite(pts).all():
                raise RuntimeError(f"{self.path.name}: non-finite landmarks")
            out[i] = (pts + 1) * (SIZE / 2) / k + np.array([cx - SIZE / 2 / k, cy - SIZE / 2 / k])
        return out
