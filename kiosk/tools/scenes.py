"""Synthetic gate scenes: videos of people walking up to a camera, made from photos.

Used by `kiosk demo`, the integration tests and benchmarks when no camera
footage is at hand. A person is a photo crop around their face; walking up
is the crop growing from a small to a large face over the frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kiosk.tools.standin import HeadTurn

CROP_FACES = 2.4  # crop width in face widths: head and shoulders, not the neighbours


@dataclass(frozen=True)
class Walk:
    """One person's appearance: frames [start, start + frames), face width growing w0 -> w1 px."""

    person: np.ndarray  # crop with the face centred, face width = crop width / CROP_FACES
    start: int
    frames: int
    w0: float
    w1: float
    cx: float = 0.5
    cy: float = 0.45
    turn: HeadTurn | None = None  # a bona fide stand-in: the head turns (see kiosk.tools.standin)
    turn_deg: float = 18.0  # yaw amplitude; pitch is 0.4 of it

    def person_at(self, i: int, fps: float = 30.0) -> np.ndarray:
        """The person crop for frame i: turned as a head turns for a stand-in, the flat photo otherwise."""
        if self.turn is None:
            return self.person
        t = (i - self.start) / fps
        yaw = np.deg2rad(self.turn_deg) * np.sin(2 * np.pi * 0.6 * t)
        pitch = np.deg2rad(0.4 * self.turn_deg) * np.sin(2 * np.pi * 0.45 * t + 1.0)
        return self.turn.render(yaw, pitch)

    def face_width(self, i: int) -> float:
        t = min(1.0, (i - self.start) / max(1, self.frames * 0.7))  # grows, then holds
        return self.w0 + (self.w1 - self.w0) * t


def person_crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """A square crop of `image` centred on the face box, CROP_FACES face widths wide."""
    x1, y1, x2, y2 = box[:4]
    w = x2 - x1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + 0.1 * w
    side = int(round(CROP_FACES * w))
    pad = side
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    x0, y0 = int(round(cx - side / 2)) + pad, int(round(cy - side / 2)) + pad
    return padded[y0:y0 + side, x0:x0 + side].copy()


def background(size: tuple[int, int], seed: int = 7) -> np.ndarray:
    """A plain terminal wall: vertical gradient and mild texture."""
    w, h = size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(150, 95, h, dtype=np.float32)[:, None, None]
    tint = np.array([1.0, 0.97, 0.92], np.float32)[None, None, :]
    noise = rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    return np.clip(ramp * tint + noise, 0, 255).astype(np.uint8)


def paste(frame: np.ndarray, person: np.ndarray, face_w: float, cx: float, cy: float) -> None:
    """Blend the person into the frame through a soft oval (no crop edges, no neighbours)."""
    h, w = frame.shape[:2]
    side = max(2, int(round(CROP_FACES * face_w)))
    interp = cv2.INTER_AREA if side < person.shape[1] else cv2.INTER_LINEAR
    img = cv2.resize(person, (side, side), interpolation=interp).astype(np.float32)
    yy, xx = np.mgrid[:side, :side].astype(np.float32) / side - 0.5
    dist = np.sqrt((xx / 0.42) ** 2 + (yy / 0.5) ** 2)
    alpha = np.clip((1.0 - dist) / 0.15, 0.0, 1.0)[:, :, None]
    x0, y0 = int(round(cx * w - side / 2)), int(round(cy * h - side / 2))
    xs, ys, xe, ye = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
    if xe <= xs or ye <= ys:
        return
    a = alpha[ys - y0:ye - y0, xs - x0:xe - x0]
    region = frame[ys:ye, xs:xe].astype(np.float32)
    frame[ys:ye, xs:xe] = (img[ys - y0:ye - y0, xs - x0:xe - x0] * a + region * (1 - a)).astype(np.uint8)


def render(walks: list[Walk], total: int, size: tuple[int, int] = (640, 480)) -> list[np.ndarray]:
    bg = background(size)
    frames = []
    for i in range(total):
        frame = bg.copy()
        for walk in walks:
            if walk.start <= i < walk.start + walk.frames:
                paste(frame, walk.person_at(i), walk.face_width(i), walk.cx, walk.cy)
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: float = 30.0) -> Path:
    """Motion-JPEG AVI: every OpenCV build can write and read it."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write video {path}")
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path
