"""Reading photos and sizing images: bounded before anything is decoded.

A photo is read only from a regular file of at most `MAX_PHOTO_BYTES` (a
device, a FIFO or a folder named as a photo is refused at once), and its
pixel size is read from its header (`image_size`, also used for JPEG
frames) and refused above `MAX_PHOTO_PIXELS`: a small file can declare a
huge image, and decoding allocates what it declares. JPEG, PNG, BMP and
WebP are read; EXIF orientation is applied and alpha is flattened.
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from kiosk.errors import ImageError
from kiosk.files import read_regular_file

MAX_PHOTO_BYTES = 50 * 1024 * 1024
MAX_PHOTO_PIXELS = 25_000_000  # a 6000x4000 camera photo; an ID photo is far smaller
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        if marker == 0xDA or length < 2:  # image data before any frame header
            return None
        i += 2 + length
    return None


def image_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) from an image's header, without decoding it: JPEG (its start-of-frame header, after
    at most the first 256 KB of metadata), PNG, BMP, WebP; None for anything else or a broken header."""
    head = bytes(data[: 256 * 1024])
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:2] == b"BM" and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        kind = head[12:16]
        if kind == b"VP8 ":
            w, h = struct.unpack("<HH", head[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if kind == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """A BGR uint8 image from encoded bytes, or ImageError naming `name`.

    A 32-bit image (RGBA) is composited over white, as an ID photo with a
    transparent background would be printed; 16-bit images are scaled to 8.
    EXIF orientation and the minimum size apply to every kind.
    """
    buf = np.frombuffer(data, np.uint8)
    if buf.size == 0:
        raise ImageError(f"{name}: empty file, not an image")
    size = image_size(data)
    if size is None:
        raise ImageError(f"{name}: not a readable image (a JPEG, PNG, BMP or WebP file is expected)")
    if size[0] * size[1] > MAX_PHOTO_PIXELS:
        raise ImageError(
            f"{name}: image is {size[0]}x{size[1]} px, more than {MAX_PHOTO_PIXELS // 1_000_000} "
            "megapixels (its header says so; it is not decoded)"
        )
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # applies EXIF orientation; drops alpha
    if img is None:
        raise ImageError(f"{name}: not a readable image (unknown format or corrupt file)")
    if min(img.shape[:2]) < 16:
        raise ImageError(f"{name}: image is too small ({img.shape[1]}x{img.shape[0]} px)")
    if data[:2] == b"\xff\xd8":  # a JPEG has no alpha: no second decode
        return img
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
    """A photo file's bytes; ImageError with the path if it is not a regular file of at most MAX_PHOTO_BYTES."""
    return read_regular_file(path, MAX_PHOTO_BYTES, "photo", ImageError)


def read_image(path: str | Path) -> np.ndarray:
    """Load a photo from disk as BGR uint8; ImageError with the path if it cannot be read."""
    return decode_image(read_photo_bytes(path), str(path))
