"""From a reference photo to a template, or a refusal that says why.

A reference template decides who a gate opens for, so a photo is refused
(never silently accepted) when it has no face, more than one face (unless
the operator says to take the largest), a face too small, too blurred,
turned too far or detected with low confidence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiosk.config import EnrollmentConfig
from kiosk.errors import UsageError
from kiosk.vision.engine import FaceEngine
from kiosk.vision.images import decode_image, read_image, read_photo_bytes
from kiosk.vision.quality import measure

# Faces narrower than this are background noise, not a second person to worry about.
MIN_COUNTED_FACE_PX = 20


class Refused(UsageError):
    """A photo (or a whole enrollment) refused; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Template:
    """One reference template and the measures it passed."""

    source: str
    embedding: np.ndarray
    quality: dict[str, float]
    photo_sha256: str  # of the photo file: the same photo is never enrolled twice for a subject


def photo_digest(data: bytes) -> str:
    """The identity of a reference photo file (SHA-256 of its bytes)."""
    return hashlib.sha256(data).hexdigest()


def read_reference(path: str | Path) -> bytes:
    """A reference photo's bytes, or `Refused` ("unreadable")."""
    try:
        return read_photo_bytes(path)
    except UsageError as exc:
        raise Refused("unreadable", str(exc)) from None


def reference_template(
    engine: FaceEngine, path: str | Path, rules: EnrollmentConfig, *, largest: bool = False, data: bytes | None = None
) -> Template:
    """The template of the one face in the photo at `path` (its bytes `data` if already read), or `Refused`."""
    if data is None:
        data = read_reference(path)
    try:
        image = decode_image(data, str(path))
    except UsageError as exc:
        raise Refused("unreadable", str(exc)) from None
    faces = engine.detector.detect(image)
    faces = faces[faces.widths >= MIN_COUNTED_FACE_PX]
    if len(faces) == 0:
        raise Refused("no_face", f"{path}: no face found")
    if len(faces) > 1 and not largest:
        raise Refused(
            "multiple_faces",
            f"{path}: {len(faces)} faces found; enroll a photo of one person "
            "(or pass --largest to take the largest face)",
        )
    analysis = engine.describe(image, faces.largest())
    faces, crops = analysis.faces, analysis.crops
    if faces.embeddings is None:  # describe() embeds every face it is given
        raise RuntimeError(f"{path}: the face was not embedded")
    q = measure(faces, crops)
    width, sharp, yaw, score = float(q.width[0]), float(q.sharpness[0]), float(q.yaw[0]), float(q.score[0])
    if width < rules.min_face_px:
        raise Refused(
            "face_too_small",
            f"{path}: face is {width:.0f} px wide, a reference photo needs "
            f"at least {rules.min_face_px} px (enrollment.min_face_px)",
        )
    if sharp < rules.min_sharpness:
        raise Refused(
            "too_blurred",
            f"{path}: face is too blurred (sharpness {sharp:.0f}, "
            f"at least {rules.min_sharpness:g} needed: enrollment.min_sharpness)",
        )
    if abs(yaw) > rules.max_yaw:
        raise Refused(
            "pose",
            f"{path}: face is turned too far to the side (yaw {yaw:+.2f}, "
            f"at most {rules.max_yaw:g}: enrollment.max_yaw); use a frontal photo",
        )
    if score < rules.min_det_score:
        raise Refused(
            "low_confidence",
            f"{path}: face detected with low confidence ({score:.2f}, "
            f"at least {rules.min_det_score:g}: enrollment.min_det_score)",
        )
    quality = {
        "width": round(width, 1),
        "inter_eye": round(float(q.inter_eye[0]), 1),
        "sharpness": round(sharp, 1),
        "yaw": round(yaw, 3),
        "roll": round(float(q.roll[0]), 1),
        "det_score": round(score, 3),
    }
    return Template(
        source=str(path),
        embedding=faces.embeddings[0],
        quality=quality,
        photo_sha256=photo_digest(data),
    )


def largest_face_embedding(engine: FaceEngine, path: str | Path) -> np.ndarray:
    """Embedding of the largest face in a photo, for compare/evaluate (no quality rules)."""
    image = read_image(path)
    faces = engine.detector.detect(image)
    if len(faces) == 0:
        raise Refused("no_face", f"{path}: no face found")
    embeddings = engine.describe(image, faces.largest()).faces.embeddings
    if embeddings is None:  # describe() embeds every face it is given
        raise RuntimeError(f"{path}: the face was not embedded")
    return embeddings[0]
