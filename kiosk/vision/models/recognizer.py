"""ArcFace recognizer and the 5-point alignment that feeds it.

Alignment is a least-squares similarity transform (Umeyama, as scikit-image
estimates it for InsightFace's `norm_crop`) from the detector keypoints to
the ArcFace 112x112 template, computed for all faces at once, then one
`cv2.warpAffine` per face.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import onnxruntime as ort

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def similarity_transforms(src: np.ndarray, dst: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """(N, 2, 3) similarity transforms mapping each src (N, K, 2) onto dst (K, 2).

    Umeyama's closed form, vectorised over faces.
    """
    src = np.asarray(src, np.float64)
    n, k, _ = src.shape
    src_mean = src.mean(axis=1, keepdims=True)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    cov = np.einsum("kd,nke->nde", dst_c, src_c) / k  # (N, 2, 2): dst^T src
    u, s, vt = np.linalg.svd(cov)
    d = np.ones((n, 2))
    det = np.linalg.det(cov)
    d[det < 0, 1] = -1
    # Where the rank is full, a reflection is removed by flipping the smallest axis.
    rot = np.einsum("nij,nj,njk->nik", u, d, vt)
    var_src = (src_c**2).sum(axis=(1, 2)) / k
    scale = (s * d).sum(axis=1) / np.maximum(var_src, 1e-12)
    t = dst_mean[None, :] - scale[:, None] * np.einsum("nij,nj->ni", rot, src_mean[:, 0, :])
    m = np.empty((n, 2, 3))
    m[:, :, :2] = scale[:, None, None] * rot
    m[:, :, 2] = t
    return m


def align_faces(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """(N, size, size, 3) uint8 crops aligned to the ArcFace template."""
    if len(kps) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    mats = similarity_transforms(kps, ARCFACE_TEMPLATE * (size / 112.0))
    return np.stack([cv2.warpAffine(image, m, (size, size), borderValue=0.0) for m in mats])


def batch_free_model(model: onnx.ModelProto) -> bytes:
    """The recognizer graph with a symbolic batch dimension on its output.

    InsightFace's ArcFace exports declare the output as (1, 512) although the
    input batch is free; ONNX Runtime then warns on every batched call.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.value_info[:]  # stale inferred shapes carry the fixed batch of 1 too
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = "batch"
    return model.SerializeToString()


def input_normalisation(model: onnx.ModelProto) -> tuple[float, float]:
    """(mean, std) the recognizer expects: MXNet exports normalise inside the graph."""
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class ArcFaceRecognizer:
    """Embeds aligned 112x112 crops; `embed(crops) -> (N, D)` L2-normalised."""

    def __init__(
        self, session: ort.InferenceSession, *, mean: float = 127.5, std: float = 127.5, max_batch: int = 32
    ) -> None:
        self.session = session
        self.mean, self.std = mean, std
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.input_size = int(inp.shape[2])
        self.output_name = session.get_outputs()[0].name
        self.dim = int(session.get_outputs()[0].shape[1])
        self.max_batch = max_batch

    def embed(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(crops), self.max_batch):
            chunk = list(crops[start : start + self.max_batch])
            blob = cv2.dnn.blobFromImages(
                chunk,
                1.0 / self.std,
                (self.input_size, self.input_size),
                (self.mean, self.mean, self.mean),
                swapRB=True,
            )
            out.append(self.session.run([self.output_name], {self.input_name: blob})[0])
        emb = np.concatenate(out).astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb
