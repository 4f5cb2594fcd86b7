"""Reading photos: any format OpenCV decodes, EXIF orientation applied, alpha flattened."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kiosk.errors import ImageError


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """A BGR uint8 image from encoded bytes, or ImageError naming `name`.

    A 32-bit image (RGBA) is composited over white, as an ID photo with a
    transparent background would be printed; 16-bit images are scaled to 8.
    EXIF orientation and the minimum size apply to every kind.
    """
    buf = np.frombuffer(data, np.uint8)
    if buf.size == 0:
        raise ImageError(f"{name}: empty file, not an image")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # applies EXIF orientation; drops alpha
    if img is None:
        raise ImageError(f"{name}: not a readable image (unknown format or corrupt file)")
    if min(img.shape[:2]) < 16:
        raise ImageError(f"{name}: image is too small ({img.shape[1]}x{img.shape[0]} px)")
    raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 3 or raw.shape[2] != 4:
        return img
    if raw.dtype != np.uint8:
        raw = (raw / 257).astype(np.uint8)
    raw = _oriented_like(raw, img)
    alpha = raw[:, :, 3:4].astype(np.float32) / 255.0
    rgb = raw[:, :, :3].astype(np.float32)
    return (rgb * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)


def _oriented_like(raw: np.ndarray, oriented: np.ndarray) -> np.ndarray:
    """`raw` (BGRA as stored) turned the way OpenCV turned its colour decode for the EXIF orientation: the
    one of the eight flips and quarter turns whose colour channels equal `oriented`."""
    for turns in range(4):
        for flip in (False, True):
            cand = np.rot90(raw, turns)
            cand = cand[:, ::-1] if flip else cand
            if cand.shape[:2] == oriented.shape[:2] and np.array_equal(cand[:, :, :3], oriented):
                return np.ascontiguousarray(cand)
    return raw  # colour conversion made them differ slightly: keep the stored orientation


def read_photo_bytes(path: str | Path) -> bytes:
    """A photo file's bytes; ImageError with the path if it cannot be read."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{p}: is a directory, not an image") from None
    except OSError as exc:
        raise ImageError(f"{p}: cannot read: {exc.strerror or exc}") from None


def read_image(path: str | Path) -> np.ndarray:
    """Load a photo from disk as BGR uint8; ImageError with the path if it cannot be read."""
    return decode_image(read_photo_bytes(path), str(path))
