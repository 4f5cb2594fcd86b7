"""Synthetic gate scenes: videos of people walking up to a camera, made from photos.

Used by `kiosk demo`, the integration tests and benchmarks when no camera
footage is at hand. A person is a photo crop around their face; walking up
is the crop growing from a small to a large face over the frames (and, with
`cx1`, crossing the frame). A bona fide stand-in (kiosk/tools/standin.py)
turns its head, blinks and speaks; `standing` is one that stands still and
only blinks and speaks. A person without a stand-in is a photo moved as one
rigid piece: for liveness, a print attack.

Backgrounds (`render(..., background=)`): "wall", a plain terminal wall;
"columns", dark columns, a door frame and a beam on a light wall, long
straight high-contrast edges for the person to walk past (the border check,
which refuses a face whose surrounding straight edges move with it, must
not accuse a face moving past still ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kiosk.tools.standin import Expressions, HeadTurn, natural_expressions

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
    turn_deg: float = 18.0  # yaw amplitude; pitch is 0.4 of it; 0: the head holds still
    expression: Expressions | None = None  # the stand-in's blinks and mouth over the walk (needs `turn`)
    cx1: float | None = None  # crossing the frame: the face centre goes cx -> cx1 over the walk

    def __post_init__(self) -> None:
        if self.expression is not None and self.turn is None:
            raise ValueError("Walk: an expression needs the stand-in's mesh (turn=head_turn(...))")

    def person_at(self, i: int, fps: float = 30.0) -> np.ndarray:
        """The person crop for frame i: turned as a head turns and with its expression for a stand-in, the flat
        photo otherwise."""
        if self.turn is None:
            return self.person
        t = (i - self.start) / fps
        yaw = np.deg2rad(self.turn_deg) * np.sin(2 * np.pi * 0.6 * t)
        pitch = np.deg2rad(0.4 * self.turn_deg) * np.sin(2 * np.pi * 0.45 * t + 1.0)
        blink, mouth = self.expression.at(i - self.start) if self.expression is not None else (0.0, 0.0)
        return self.turn.render(yaw, pitch, blink=blink, mouth=mouth)

    def face_width(self, i: int) -> float:
        t = min(1.0, (i - self.start) / max(1, self.frames * 0.7))  # grows, then holds
        return self.w0 + (self.w1 - self.w0) * t

    def face_x(self, i: int) -> float:
        """The face centre's x (frame widths) at frame i: cx, or cx -> cx1 at an even pace over the walk."""
        if self.cx1 is None:
            return self.cx
        t = min(1.0, max(0.0, (i - self.start) / max(1, self.frames - 1)))
        return self.cx + (self.cx1 - self.cx) * t


def standing(
    person: np.ndarray,
    turn: HeadTurn,
    start: int,
    frames: int,
    width: float,
    cx: float = 0.5,
    cy: float = 0.45,
    seed: int = 0,
    fps: float = 30.0,
    words: bool = True,
) -> Walk:
    """A bona fide stand-in standing still at the gate: constant size and place, no head turn, but blinking and
    now and then saying a word (standin.natural_expressions), as a waiting passenger does. The only motion is
    non-rigid; without it this would be a photo held still."""
    return Walk(
        person,
        start,
        frames,
        width,
        width,
        cx,
        cy,
        turn=turn,
        turn_deg=0.0,
        expression=natural_expressions(frames, fps, seed, words),
    )


def person_crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """A square crop of `image` centred on the face box, CROP_FACES face widths wide."""
    x1, y1, x2, y2 = box[:4]
    w = x2 - x1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + 0.1 * w
    side = int(round(CROP_FACES * w))
    pad = side
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    x0, y0 = int(round(cx - side / 2)) + pad, int(round(cy - side / 2)) + pad
    return padded[y0 : y0 + side, x0 : x0 + side].copy()


def background(size: tuple[int, int], seed: int = 7) -> np.ndarray:
    """A plain terminal wall: vertical gradient and mild texture."""
    w, h = size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(150, 95, h, dtype=np.float32)[:, None, None]
    tint = np.array([1.0, 0.97, 0.92], np.float32)[None, None, :]
    noise = rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    return np.clip(ramp * tint + noise, 0, 255).astype(np.uint8)


def columns(size: tuple[int, int], seed: int = 7) -> np.ndarray:
    """A hall with long straight high-contrast edges: dark columns on a light wall, a door frame (two jambs and
    a lintel), a beam across the top and a skirting line; what a print's card edge looks like to the border
    check, but standing still in the scene."""
    w, h = size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(215, 185, h, dtype=np.float32)[:, None, None]
    tint = np.array([0.93, 0.97, 1.0], np.float32)[None, None, :]
    img = ramp * tint + rng.normal(0, 2.5, (h, w, 1)).astype(np.float32)
    dark = np.array([52, 48, 45], np.float32)
    col_w = max(4, round(0.045 * w))
    spots = np.array([0.06, 0.2, 0.34, 0.66, 0.8, 0.94]) + rng.uniform(-0.015, 0.015, 6)
    for x in spots * w:  # columns, floor to beam
        x0 = int(round(x - col_w / 2))
        img[:, max(0, x0) : max(0, x0 + col_w)] = dark
    door_x0, door_x1 = int(0.42 * w), int(0.58 * w)  # between the middle columns: jambs and a lintel
    jamb, lintel_y = max(3, round(0.015 * w)), int(0.2 * h)
    img[lintel_y + jamb :, door_x0 + jamb : door_x1 - jamb] *= 0.75  # the corridor behind the door, darker
    img[lintel_y:, door_x0 : door_x0 + jamb] = dark
    img[lintel_y:, door_x1 - jamb : door_x1] = dark
    img[lintel_y : lintel_y + jamb, door_x0:door_x1] = dark
    beam = max(4, round(0.05 * h))
    img[int(0.06 * h) : int(0.06 * h) + beam] = dark
    img[int(0.9 * h) : int(0.9 * h) + 3] = dark  # skirting
    return np.clip(img + rng.normal(0, 1.5, img.shape).astype(np.float32), 0, 255).astype(np.uint8)


BACKGROUNDS = {"wall": background, "columns": columns}


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
    a = alpha[ys - y0 : ye - y0, xs - x0 : xe - x0]
    region = frame[ys:ye, xs:xe].astype(np.float32)
    frame[ys:ye, xs:xe] = (img[ys - y0 : ye - y0, xs - x0 : xe - x0] * a + region * (1 - a)).astype(np.uint8)


def render(
    walks: list[Walk], total: int, size: tuple[int, int] = (640, 480), background: str = "wall"
) -> list[np.ndarray]:
    """`total` frames of `size` with the walks on a background of BACKGROUNDS."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r}: one of {', '.join(BACKGROUNDS)}")
    bg = BACKGROUNDS[background](size)
    frames = []
    for i in range(total):
        frame = bg.copy()
        for walk in walks:
            if walk.start <= i < walk.start + walk.frames:
                paste(frame, walk.person_at(i), walk.face_width(i), walk.face_x(i), walk.cy)
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: float = 30.0) -> Path:
    """Motion-JPEG AVI: every OpenCV build can write and read it."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write video {path}")
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path
