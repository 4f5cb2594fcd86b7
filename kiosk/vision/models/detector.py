"""SCRFD face detector with 5 keypoints, batched and fitted to the frame.

Up to three passes over each image:
- the main pass scales the image so its long side is `det_size` and pads
  each side only up to a multiple of 32 (a 640x360 frame costs 640x384, not
  640x640); it finds faces from about 16 px up to about 330 px of its input.
  Given `min_face_px` (the gate's smallest face worth a track) it scales the
  image further down, so that such a face is FACE_INPUT_PX at the input: a
  kiosk's faces are large, and detecting them at full size is wasted work
  (a 368x656 frame with 48 px faces costs 192x352 and no close-up pass: a
  fifth of the pixels of 384x640 plus the 320x320 close-up);
- the refine pass looks again at each face the main pass saw at under
  REFINE_BELOW_PX (one near `min_face_px`, seen at 24 px), in a square
  region three face heights wide around it at full resolution (a 160 px
  canvas at most: the face is then about 40 px or more),
  all such regions of a batch in one run. At 24 px of input a face's box,
  keypoints and score are coarse: on real crowd video (the walk-up clip cut
  into 640x360 windows at full resolution, 48-70 px faces) the quality rules
  passed 406 faces detected at the gate's scale, 426 at full size and 437
  with this pass, for 3.6, 15.5 and 6.3 ms a frame on this CPU;
- the close-up pass shrinks the whole image to 40% of a small square canvas,
  so a face that fills the frame becomes a face SCRFD can see. It runs only
  where it pays: when the main input's short side is over LARGEST_FACE_PX, so
  a face in the frame can be too large for the main pass. Its detections
  count only where the main pass found nothing that overlaps them.

Both sizes were measured on real camera video (246 frames of the 21 clips of
the team's liveness set, faces 73-461 px): at FACE_INPUT_PX 24 every face the
full-size pass finds is found, keypoints move by 2.7% of the eye distance
(median) and the embedding of the aligned face keeps a cosine of 0.986
(median; 0.941 at the 1st percentile) with the full-size one. A face scaled to
fill 20-100% of a 640x480 frame is found by a main pass of 320 px or less
every time, and missed by a 640 px one from 60% on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import cv2
import numpy as np
import onnxruntime as ort

from kiosk.vision.faces import Faces, box_intersections

log = logging.getLogger(__name__)

STRIDES = (8, 16, 32)
MEAN, STD = 127.5, 128.0
CLOSE_UP_FILL = 0.4
FACE_INPUT_PX = 24  # a face of `min_face_px` is this wide at the main pass's input
LARGEST_FACE_PX = 320  # the main pass finds faces up to about this size at its input
REFINE_BELOW_PX = 40  # a face narrower than this at the main pass's input is looked at again...
REFINE_CONTEXT = 3.0  # ...in a square region this many face heights wide around it...
REFINE_CANVAS = 160  # ...at full resolution, or shrunk to this canvas (a face is then about 40 px or more)
REFINE_FROM = 0.8  # of min_face_px: faces smaller than this are dropped by the caller anyway


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression (InsightFace's +1 pixel area convention)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= threshold]
    return np.asarray(keep, dtype=np.int64)


def overlap_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) intersection over the smaller box's area."""
    inter, area_a, area_b = box_intersections(a, b)
    return inter / np.maximum(np.minimum(area_a, area_b), 1e-6)


class ScrfdDetector:
    """Wraps one SCRFD session; `detect_batch(images) -> list[Faces]`."""

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        det_size: int = 640,
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
        close_up_pass: bool = True,
    ) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self.batched = len(session.get_outputs()[0].shape) == 3
        self.det_size = det_size
        self.threshold = threshold
        self.nms_threshold = nms_threshold
        self.close_up_pass = close_up_pass
        self.close_up_size = max(160, int(math.ceil(det_size / 2 / 32) * 32))
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}
        # Told each pass's geometry (new_w, new_h, scale, canvas_w, canvas_h, offset_x, offset_y), one per image,
        # before it runs: which passes a detection took and at what size, for tests and profiling.
        self.on_pass: Callable[[list[tuple[int, int, float, int, int, int, int]]], None] | None = None

    # -- geometry -----------------------------------------------------------------
    def main_geometry(self, h: int, w: int, min_face_px: int = 0) -> tuple[int, int, float, int, int]:
        """(new_w, new_h, scale, canvas_w, canvas_h) of the main pass.

        The resize matches InsightFace's (long side to det_size, int-truncated
        short side, scale from the heights) so boxes agree with it; the canvas
        is only padded up to a multiple of 32. With `min_face_px` the long side
        is at most what makes such a face FACE_INPUT_PX wide (at least 64).
        """
        long = self.det_size
        if min_face_px > 0:
            long = max(64, min(long, int(round(max(h, w) * FACE_INPUT_PX / min_face_px))))
        if h > w:
            new_h, new_w = long, int(long * w / h)
        else:
            new_w, new_h = long, int(long * h / w)
        new_w, new_h = max(new_w, 1), max(new_h, 1)
        scale = new_h / h
        return new_w, new_h, scale, int(math.ceil(new_w / 32) * 32), int(math.ceil(new_h / 32) * 32)

    def _centers_for(self, ch: int, cw: int, stride: int) -> np.ndarray:
        key = (ch, cw, stride)
        centers = self._centers.get(key)
        if centers is None:
            gh, gw = ch // stride, cw // stride
            grid = np.stack(list(np.mgrid[:gh, :gw][::-1]), axis=-1).astype(np.float32).reshape(-1, 2) * stride
            centers = np.repeat(grid, 2, axis=0)  # two anchors per location
            self._centers[key] = centers
        return centers

    # -- inference ----------------------------------------------------------------
    def _run(self, canvases: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Raw outputs per canvas (all canvases must share one shape)."""
        if self.batched:
            blob = cv2.dnn.blobFromImages(canvases, 1.0 / STD, (0, 0), (MEAN, MEAN, MEAN), swapRB=True)
            outs = self.session.run(self.output_names, {self.input_name: blob})
            return [[o[i] for o in outs] for i in range(len(canvases))]
        results = []
        for canvas in canvases:
            blob = cv2.dnn.blobFromImage(canvas, 1.0 / STD, (0, 0), (MEAN, MEAN, MEAN), swapRB=True)
            results.append(self.session.run(self.output_names, {self.input_name: blob}))
        return results

    def _decode(
        self, outs: list[np.ndarray], ch: int, cw: int, scale: float, offset: tuple[float, float]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores_l, boxes_l, kps_l = [], [], []
        for i, stride in enumerate(STRIDES):
            scores = outs[i].reshape(-1)
            pos = np.nonzero(scores >= self.threshold)[0]
            if pos.size == 0:
                continue
            centers = self._centers_for(ch, cw, stride)[pos]
            d = outs[i + 3].reshape(-1, 4)[pos] * stride
            k = outs[i + 6].reshape(-1, 10)[pos] * stride
            boxes = np.concatenate([centers - d[:, :2], centers + d[:, 2:]], axis=1)
            kps = centers[:, None, :] + k.reshape(-1, 5, 2)
            scores_l.append(scores[pos])
            boxes_l.append(boxes)
            kps_l.append(kps)
        if not scores_l:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
        scores = np.concatenate(scores_l)
        ox, oy = offset
        boxes = (np.concatenate(boxes_l) - np.array([ox, oy, ox, oy], np.float32)) / scale
        kps = (np.concatenate(kps_l) - np.array([ox, oy], np.float32)) / scale
        order = np.argsort(-scores, kind="stable")
        return boxes[order].astype(np.float32), scores[order].astype(np.float32), kps[order].astype(np.float32)

    def _nms_faces(self, boxes: np.ndarray, scores: np.ndarray, kps: np.ndarray) -> Faces:
        if len(scores) == 0:
            return Faces.empty()
        keep = nms(boxes, scores, self.nms_threshold)
        return Faces(boxes[keep], scores[keep], kps[keep])

    def _pass(
        self, images: list[np.ndarray], geometry: list[tuple[int, int, float, int, int, int, int]]
    ) -> list[Faces]:
        """Resize each image into its canvas, run in batches of one canvas shape, decode."""
        if self.on_pass is not None:
            self.on_pass(geometry)
        canvases = []
        for img, (nw, nh, _scale, cw, ch, ox, oy) in zip(images, geometry, strict=True):
            canvas = np.zeros((ch, cw, 3), np.uint8)
            canvas[oy : oy + nh, ox : ox + nw] = cv2.resize(img, (nw, nh))
            canvases.append(canvas)
        results: dict[int, Faces] = {}
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(canvases):
            by_shape.setdefault(c.shape[:2], []).append(i)
        for (ch, cw), idx in by_shape.items():
            outs = self._run([canvases[i] for i in idx])
            for i, out in zip(idx, outs, strict=True):
                _, _, scale, _, _, ox, oy = geometry[i]
                results[i] = self._nms_faces(*self._decode(out, ch, cw, scale, (ox, oy)))
        return [results[i] for i in range(len(images))]

    def detect_batch(self, images: list[np.ndarray], min_face_px: int = 0) -> list[Faces]:
        """Faces of each BGR image, sorted by detector score. With `min_face_px` (the verifier's
        `policy.min_face_px`) faces narrower than it may be missed, and the detection is that much cheaper;
        0 (enrollment photos) looks at the full `det_size`."""
        if not images:
            return []
        main_geo = []
        for img in images:
            h, w = img.shape[:2]
            nw, nh, scale, cw, ch = self.main_geometry(h, w, min_face_px=min_face_px)
            main_geo.append((nw, nh, scale, cw, ch, 0, 0))
        found = self._pass(images, main_geo)
        if min_face_px > 0:
            found = self._refine(images, found, [g[2] for g in main_geo], min_face_px)
        if not self.close_up_pass:
            return found
        # A face too large for the main pass is possible only where its input's short side is over the size
        # the main pass sees (a face taller than the frame has no eyes and mouth to align in it).
        close_idx = [i for i, g in enumerate(main_geo) if min(g[0], g[1]) > LARGEST_FACE_PX]
        if not close_idx:
            return found
        size = self.close_up_size
        close_geo = []
        for img in (images[i] for i in close_idx):
            h, w = img.shape[:2]
            scale = CLOSE_UP_FILL * size / max(h, w)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            close_geo.append((nw, nh, scale, size, size, (size - nw) // 2, (size - nh) // 2))
        close = self._pass([images[i] for i in close_idx], close_geo)
        for i, c in zip(close_idx, close, strict=True):
            found[i] = self._merge(found[i], c)
        return found

    def _refine(
        self, images: list[np.ndarray], found: list[Faces], scales: list[float], min_face_px: int
    ) -> list[Faces]:
        """Faces the main pass saw at under REFINE_BELOW_PX (those near `min_face_px` when it ran at the gate's
        scale), found again in their own region at (nearly) full resolution: their box, keypoints and score
        from 24 px of input are coarse, and on real crowd video those faces passed the quality rules (score,
        sharpness, pose) a fifth less often than with full-size detection. All regions go in one batch."""
        crops, geo, where = [], [], []
        for i, (img, faces, scale) in enumerate(zip(images, found, scales, strict=True)):
            if scale >= 1.0 or not len(faces):
                continue
            h, w = img.shape[:2]
            widths = faces.widths
            for small in np.flatnonzero((widths * scale < REFINE_BELOW_PX) & (widths >= REFINE_FROM * min_face_px)):
                x1, y1, x2, y2 = (float(v) for v in faces.boxes[small])
                side = REFINE_CONTEXT * max(x2 - x1, y2 - y1)
                left = int(max(0, min(w - side, (x1 + x2 - side) / 2)))
                top = int(max(0, min(h - side, (y1 + y2 - side) / 2)))
                crop = img[top : top + int(side), left : left + int(side)]
                if crop.size == 0:
                    continue
                s = min(1.0, REFINE_CANVAS / max(crop.shape[:2]))
                nw, nh = max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))
                crops.append(crop)
                geo.append((nw, nh, s, REFINE_CANVAS, REFINE_CANVAS, 0, 0))
                where.append((i, int(small), left, top))
        if not crops:
            return found
        refined = self._pass(crops, geo)
        boxes = [f.boxes.copy() for f in found]
        scores = [f.scores.copy() for f in found]
        kps = [f.kps.copy() for f in found]
        for (i, j, left, top), again in zip(where, refined, strict=True):
            if not len(again):
                continue
            shifted = again.boxes + np.array([left, top, left, top], np.float32)
            inter, area_a, area_b = box_intersections(shifted, found[i].boxes[j : j + 1])
            iou = (inter / np.maximum(area_a + area_b - inter, 1e-6))[:, 0]
            k = int(np.argmax(iou))
            if iou[k] < 0.4:
                continue  # not the same face
            boxes[i][j], scores[i][j] = shifted[k], again.scores[k]
            kps[i][j] = again.kps[k] + np.array([left, top], np.float32)
        out = []
        for i in range(len(found)):
            faces = Faces(boxes[i], scores[i], kps[i])
            out.append(faces[np.argsort(-faces.scores, kind="stable")] if len(faces) else faces)
        return out

    def _merge(self, main: Faces, close: Faces) -> Faces:
        """Add the close-up faces that the main pass did not see whole.

        A close-up face that overlaps a main-pass face of similar size is the
        same face, seen better by the main pass (6x the resolution): dropped.
        Main-pass faces much smaller than an overlapping close-up face are
        fragments of a face too big for the main pass (a cheek, an eye):
        replaced by the close-up face.
        """
        if len(close) == 0:
            return main
        if len(main) == 0:
            return close
        overlap = overlap_matrix(close.boxes, main.boxes) >= 0.3
        drop_main = np.zeros(len(main), bool)
        add_close = np.zeros(len(close), bool)
        for i in range(len(close)):
            hits = overlap[i]
            if not hits.any():
                add_close[i] = True
            elif (main.widths[hits] < 0.6 * close.widths[i]).all():
                add_close[i] = True
                drop_main |= hits
        if not add_close.any():
            return main
        kept = main[~drop_main]
        merged = Faces(
            np.concatenate([kept.boxes, close.boxes[add_close]]),
            np.concatenate([kept.scores, close.scores[add_close]]),
            np.concatenate([kept.kps, close.kps[add_close]]),
        )
        return merged[np.argsort(-merged.scores, kind="stable")]

    def detect(self, image: np.ndarray, min_face_px: int = 0) -> Faces:
        return self.detect_batch([image], min_face_px)[0]
