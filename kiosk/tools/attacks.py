"""Presentation-attack videos made from a photo: a hand-held print, or a phone/tablet screen
(`scripts/make_attack_video.py`, `kiosk demo`, the liveness tests).

Each video shows the photo's largest face presented to a gate camera the way an attacker would: the
medium held in a hand that approaches, tilts and trembles, at kiosk distances (close_up: ending with the
face filling most of the frame). What each type simulates:

- print: a photo printed on paper: paper white instead of black levels and a narrower gamut, a halftone
  dot grain, a slight bend of the sheet, a moving specular glare, the white paper edge visible or not.
- screen: the photo on a phone or tablet: an RGB sub-pixel grid (moire once resampled by the camera), the
  screen's gamma and blue tint, a faint reflection of the room, the black bezel.
- photo: a clean, high-quality photo held so close that it fills the frame (its edges never in view), moved only
  as one rigid piece (hand tremor, a slow tilt and approach). No print grain and no screen: what the texture
  models see is the photo's own skin, so only the face's movement can tell it from a person (it never blinks).

Both are re-captured: perspective warp onto a room background, camera blur and noise, Motion-JPEG. These
are attacks BY CONSTRUCTION (never label them bona fide); the seed varies the motion and the artefacts. They
exercise texture models (print grain, pixel grids) and geometric checks (a flat card moves as a plane).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def _face_card(image: np.ndarray, box: np.ndarray, margin: float) -> np.ndarray:
    """The part of the photo that is on the card: the face with `margin` face widths around it."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = w * (0.5 + margin), h * (0.5 + margin * 1.1)
    top, bottom = int(max(0, cy - half_h)), int(min(image.shape[0], cy + half_h))
    left, right = int(max(0, cx - half_w)), int(min(image.shape[1], cx + half_w))
    return image[top:bottom, left:right].copy()


def _print_look(card: np.ndarray, rng: np.random.Generator, edge: bool) -> np.ndarray:
    """Paper: no true black, less saturation, halftone grain; a white border when the edge shows."""
    img = card.astype(np.float32)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * rng.uniform(0.65, 0.85)  # narrower gamut
    img = 28 + img * (215 / 255)  # paper white, ink never reaches black
    h, w = img.shape[:2]
    period = rng.uniform(2.2, 3.2)  # halftone dots, in card pixels
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.deg2rad(rng.uniform(10, 50))
    u = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) * 2 * np.pi / period
    dots = (np.cos(u) * np.cos(v))[..., None]
    img = img * (1 - 0.10 * dots) + rng.normal(0, 4, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if edge:
        pad = max(4, int(0.06 * max(h, w)))
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(236, 238, 240))
    return img


def _screen_look(card: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A display: each content pixel shown as R, G and B stripes, the screen's gamma and tint, a bezel."""
    scale = 3
    size = (card.shape[1] * scale, card.shape[0] * scale)
    big: np.ndarray = cv2.resize(card, size, interpolation=cv2.INTER_NEAREST).astype(np.float32)
    mask = np.zeros((1, scale, 3), np.float32) + 0.25
    for c, ch in enumerate((2, 1, 0)):  # R, G, B stripes (BGR channels)
        mask[0, c, ch] = 1.0
    big *= np.tile(mask, (big.shape[0], big.shape[1] // scale, 1))
    big[::scale] *= 0.6  # the dark rows between pixel rows
    gamma = rng.uniform(0.8, 1.25)
    big = 255 * (np.clip(big, 0, 255) / 255) ** gamma
    big[..., 0] *= rng.uniform(1.02, 1.12)  # cold white point
    big = np.clip(big * rng.uniform(1.0, 1.3), 0, 255).astype(np.uint8)
    pad = max(6, int(0.05 * max(big.shape[:2])))
    return cv2.copyMakeBorder(big, pad, pad * 3, pad, pad * 3 // 2, cv2.BORDER_CONSTANT, value=(12, 12, 14))


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(70, 170, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = (xx / w - 0.5) * rng.uniform(-60, 60) + (yy / h - 0.5) * rng.uniform(-60, 60)
    img = base[None, None, :] + grad[..., None] + rng.normal(0, 3, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class HandSway:
    """How a hand holds a card or a photo up to the camera: the amplitude of a slow tilt (yaw, pitch, roll,
    radians), of the tremor added to each, and of the drift of the held thing's centre (frame widths and heights
    about `centre_y`)."""

    tremor: float
    yaw: float
    pitch: float
    roll: float
    drift_x: float
    centre_y: float
    drift_y: float

    def pose(
        self, i: int, t: float, fps: float, phase: np.ndarray, w: int, h: int
    ) -> tuple[float, float, float, float, float]:
        """(yaw, pitch, roll, centre x, centre y) at frame `i`, `t` of the way through the clip."""
        tremor = [self.tremor * np.sin(2 * np.pi * (3 + k) * i / fps + phase[k]) for k in range(3)]
        yaw = self.yaw * np.sin(2 * np.pi * 0.4 * t + phase[3]) + tremor[0]
        pitch = self.pitch * np.sin(2 * np.pi * 0.3 * t + phase[4]) + tremor[1]
        roll = self.roll * np.sin(2 * np.pi * 0.5 * t + phase[5]) + tremor[2]
        cx = w / 2 + self.drift_x * w * np.sin(2 * np.pi * 0.2 * t + phase[0])
        cy = h * self.centre_y + self.drift_y * h * np.sin(2 * np.pi * 0.25 * t + phase[1])
        return yaw, pitch, roll, cx, cy


CARD_SWAY = HandSway(tremor=0.012, yaw=0.25, pitch=0.15, roll=0.08, drift_x=0.06, centre_y=0.47, drift_y=0.04)
PHOTO_SWAY = HandSway(tremor=0.01, yaw=0.12, pitch=0.08, roll=0.05, drift_x=0.03, centre_y=0.5, drift_y=0.03)


def _corners(
    card_w: float, card_h: float, yaw: float, pitch: float, roll: float, dist: float, cx: float, cy: float, focal: float
) -> np.ndarray:
    """Image positions of the card's corners: a rigid card rotated in 3D at `dist`, seen by a pinhole camera."""
    pts = np.array(
        [
            [-card_w / 2, -card_h / 2, 0],
            [card_w / 2, -card_h / 2, 0],
            [card_w / 2, card_h / 2, 0],
            [-card_w / 2, card_h / 2, 0],
        ],
        np.float64,
    )
    cyw, syw, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rot = (
        np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
        @ np.array([[cyw, 0, syw], [0, 1, 0], [-syw, 0, cyw]])
        @ np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    )
    p = pts @ rot.T + np.array([0, 0, dist])
    return np.stack([cx + focal * p[:, 0] / p[:, 2], cy + focal * p[:, 1] / p[:, 2]], axis=1).astype(np.float32)


def render_attack(
    kind: str,
    photo: np.ndarray,
    box: np.ndarray,
    *,
    seed: int = 0,
    seconds: float = 3.0,
    fps: float = 30.0,
    size: tuple[int, int] = (640, 480),
    close_up: bool = False,
) -> list[np.ndarray]:
    """The frames of one attack of `kind` ('print', 'screen' or 'photo') made from the face `box` of `photo`."""
    if kind == "photo":
        return _photo_close_up(photo, box, np.random.default_rng(seed), int(seconds * fps), fps, size)
    rng = np.random.default_rng(seed)
    w, h = size
    edge = kind == "print" and bool(rng.random() < 0.6)
    card = (
        _print_look(_face_card(photo, box, rng.uniform(0.35, 0.7)), rng, edge)
        if kind == "print"
        else _screen_look(_face_card(photo, box, rng.uniform(0.5, 0.9)), rng)
    )
    ch, cw = card.shape[:2]
    focal = w * rng.uniform(0.9, 1.2)
    card_h_m = rng.uniform(0.14, 0.22) if kind == "print" else rng.uniform(0.12, 0.20)  # metres
    card_w_m = card_h_m * cw / ch
    face_frac = (box[3] - box[1]) * (3 if kind == "screen" else 1) / max(1, ch)  # of the card's height
    # Distances so the face goes from small to the target size (pixels): h_face = focal * face_m / dist.
    face_m = card_h_m * min(0.95, face_frac)
    end_px = rng.uniform(0.7, 0.9) * h if close_up else rng.uniform(140, 220)
    start_dist = focal * face_m / rng.uniform(45, 70)
    end_dist = focal * face_m / end_px
    bg = _background(w, h, rng)
    n = int(seconds * fps)
    frames = []
    phase = rng.uniform(0, 2 * np.pi, 6)
    bend = rng.uniform(0.0, 0.06) if kind == "print" else 0.0
    glare_path = rng.uniform(0.2, 0.8, 2)
    src = np.array([[0, 0], [cw - 1, 0], [cw - 1, ch - 1], [0, ch - 1]], np.float32)
    if bend:  # a slightly bent sheet: the middle column bulges towards the camera (a horizontal remap)
        xs = np.linspace(-1, 1, cw, dtype=np.float32)
        map_x = np.tile(((xs * (1 - bend * (1 - xs**2))) + 1) * (cw - 1) / 2, (ch, 1)).astype(np.float32)
        map_y = np.tile(np.arange(ch, dtype=np.float32)[:, None], (1, cw))
        card = cv2.remap(card, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    for i in range(n):
        t = i / max(1, n - 1)
        ease = t * t * (3 - 2 * t)
        dist = start_dist + (end_dist - start_dist) * ease
        yaw, pitch, roll, cx, cy = CARD_SWAY.pose(i, t, fps, phase, w, h)
        dst = _corners(card_w_m, card_h_m, yaw, pitch, roll, dist, cx, cy, focal)
        m = cv2.getPerspectiveTransform(src, dst)
        layer = cv2.warpPerspective(card, m, (w, h), flags=cv2.INTER_LINEAR)
        alpha = cv2.warpPerspective(np.full((ch, cw), 255, np.uint8), m, (w, h)) > 0
        frame = bg.copy()
        frame[alpha] = layer[alpha]
        frame = frame.astype(np.float32)
        if kind == "print":  # specular glare wandering over the sheet
            gx = w * (glare_path[0] + 0.2 * np.sin(2 * np.pi * 0.3 * t))
            gy = h * (glare_path[1] + 0.2 * np.cos(2 * np.pi * 0.2 * t))
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            glare = 70 * np.exp(-(((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * (0.12 * w) ** 2)))
            frame[alpha] += glare[alpha][:, None]
        else:  # a faint reflection of the room on the glass
            frame[alpha] = frame[alpha] * 0.88 + bg.astype(np.float32)[::-1, ::-1][alpha] * 0.12
        frame = cv2.GaussianBlur(frame, (0, 0), rng.uniform(0.4, 0.9))
        frame += rng.normal(0, 2.5, frame.shape)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def _photo_close_up(
    photo: np.ndarray, box: np.ndarray, rng: np.random.Generator, n: int, fps: float, size: tuple[int, int]
) -> list[np.ndarray]:
    """A photo filling the frame, moved rigidly: each frame a homography of the photo (a plane rotated in 3D a few
    degrees, trembling, slowly approaching), the frame filled by the photo's mirrored surroundings where the photo
    ends, so no edge is ever in view; camera blur and noise."""
    w, h = size
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    fcx, fcy, fh = (x1 + x2) / 2, (y1 + y2) / 2, y2 - y1
    focal = w * rng.uniform(0.9, 1.2)
    start, end = rng.uniform(0.5, 0.6) * h, rng.uniform(0.7, 0.85) * h  # the face's height on screen
    phase = rng.uniform(0, 2 * np.pi, 6)
    src = np.array([[fcx - fh, fcy - fh], [fcx + fh, fcy - fh], [fcx + fh, fcy + fh], [fcx - fh, fcy + fh]], np.float32)
    frames = []
    for i in range(n):
        t = i / max(1, n - 1)
        face_px = start + (end - start) * t * t * (3 - 2 * t)
        yaw, pitch, roll, cx, cy = PHOTO_SWAY.pose(i, t, fps, phase, w, h)
        # the square of two face heights around the face, in units of a face height, at the distance where one
        # unit looks face_px high
        dst = _corners(2.0, 2.0, yaw, pitch, roll, focal / face_px, cx, cy, focal)
        m = cv2.getPerspectiveTransform(src, dst)
        warped = cv2.warpPerspective(photo, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        frame: np.ndarray = cv2.GaussianBlur(warped.astype(np.float32), (0, 0), rng.uniform(0.4, 0.8))
        frame += rng.normal(0, 2.0, frame.shape)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames
