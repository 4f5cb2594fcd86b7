"""`kiosk demo`: the engine and gallery on what the installed packages ship.

Enrolls Yao Ming from the sample portrait into a fresh gallery, then
searches every face of the two sample group photos against it (one of the
players in `players.jpg` is Yao Ming; nobody in `gdp.jpg` is), prints each
decision and writes annotated copies of the photos.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np

from enrollment.photos import reference_template
from kiosk.config import KioskConfig
from kiosk.engine import FaceEngine
from kiosk.gallery import Gallery
from kiosk.images import read_image
from kiosk.models.pack import sample_photo

log = logging.getLogger(__name__)

DEMO_SUBJECT = ("yao-ming", "Yao Ming", "yaoming.jpg")
SCENES = ("players.jpg", "gdp.jpg")
# The group photos are stills, not a gate camera: search every face big enough
# to recognise rather than apply the gate's policy.min_face_px.
DEMO_MIN_FACE_PX = 32


def annotate(image: np.ndarray, boxes: np.ndarray, labels: list[str], accepted: list[bool]) -> np.ndarray:
    out = image.copy()
    for box, label, ok in zip(boxes.astype(int), labels, accepted):
        colour = (0, 200, 0) if ok else (0, 0, 230)
        cv2.rectangle(out, (box[0], box[1]), (box[2], box[3]), colour, 2)
        cv2.putText(out, label, (box[0], max(12, box[1] - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1,
                    cv2.LINE_AA)
    return out


def run_demo(cfg: KioskConfig, out_dir: Path) -> int:
    """Returns the number of accepted faces (1 when all is well)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = FaceEngine.from_config(cfg)
    print(f"engine: {engine.pack.detector.path.name} + {engine.pack.recognizer.path.name}, {engine.provider_note}")
    gallery_path = out_dir / "demo-gallery.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(gallery_path) + suffix).unlink(missing_ok=True)
    subject_id, name, photo = DEMO_SUBJECT
    t0 = time.perf_counter()
    template = reference_template(engine, sample_photo(photo), cfg.enrollment)
    with Gallery(gallery_path) as gallery:
        gallery.enroll(subject_id, name, template.embedding[None, :], engine.model_id, qualities=[template.quality])
        matrix = gallery.matrix(engine.model_id, engine.dim)
    print(f"enrolled {subject_id} ({name}) from {photo} in {(time.perf_counter() - t0) * 1000:.0f} ms "
          f"into {gallery_path}")
    threshold = cfg.policy.accept_threshold
    accepted_total = 0
    for scene in SCENES:
        image = read_image(sample_photo(scene))
        t0 = time.perf_counter()
        analysis = engine.analyze_one(image)
        faces = analysis.faces
        matches = matrix.search(faces.embeddings) if len(faces) else []
        ms = (time.perf_counter() - t0) * 1000
        big = faces.widths >= DEMO_MIN_FACE_PX
        print(f"{scene}: {len(faces)} faces in {ms:.0f} ms ({int(big.sum())} at least "
              f"{DEMO_MIN_FACE_PX} px wide are searched)")
        labels, accepted = [], []
        for i, m in enumerate(matches):
            ok = bool(big[i]) and m.score >= threshold
            accepted_total += ok
            labels.append(f"{m.subject_id} {m.score:.2f}" if ok else f"{m.score:.2f}")
            accepted.append(ok)
            if big[i]:
                x1, y1, x2, y2 = faces.boxes[i].astype(int)
                verdict = f"ACCEPT {m.subject_id} ({m.name})" if ok else "reject no_match"
                print(f"  face at ({x1},{y1})-({x2},{y2}): {verdict}, score {m.score:.3f} "
                      f"(threshold {threshold:.2f})")
        preview = out_dir / f"{Path(scene).stem}-annotated.jpg"
        cv2.imwrite(str(preview), annotate(image, faces.boxes, labels, accepted))
        print(f"  annotated: {preview}")
    print(f"demo done: {accepted_total} face(s) accepted as {subject_id}")
    return accepted_total
