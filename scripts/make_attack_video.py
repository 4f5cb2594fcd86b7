#!/usr/bin/env python3
"""Make presentation-attack videos from a photo: a hand-held print, a phone/tablet screen, or a clean photo filling
the frame.

    uv run scripts/make_attack_video.py --type print --out print.avi photo.jpg
    uv run scripts/make_attack_video.py --type screen --seed 3 --close-up --out screen.avi photo.jpg

What each type simulates: see kiosk/tools/attacks.py. These are attacks BY CONSTRUCTION: never label them
bona fide.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiosk.config import config_from_mapping
from kiosk.errors import UsageError
from kiosk.tools.attacks import render_attack
from kiosk.tools.scenes import write_video
from kiosk.vision.engine import FaceEngine
from kiosk.vision.images import read_image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photo", type=Path)
    ap.add_argument("--type", choices=["print", "screen", "photo"], required=True)
    ap.add_argument("--out", type=Path, required=True, help="output .avi (Motion-JPEG)")
    ap.add_argument("--seed", type=int, default=0, help="varies the motion and the artefacts")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--size", default="640x480", help="frame size WxH")
    ap.add_argument("--close-up", action="store_true", help="end with the face filling most of the frame")
    args = ap.parse_args(argv)
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
        image = read_image(args.photo)
    except ValueError:
        print(f"--size: expected WxH, found {args.size!r}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = FaceEngine.from_config(config_from_mapping({"pad": {"enabled": False}}))
    faces = engine.detector.detect(image)
    if len(faces) == 0:
        print(f"error: {args.photo}: no face found", file=sys.stderr)
        return 2
    frames = render_attack(
        args.type,
        image,
        faces.largest().boxes[0],
        seed=args.seed,
        seconds=args.seconds,
        fps=args.fps,
        size=(w, h),
        close_up=args.close_up,
    )
    write_video(args.out, frames, args.fps)
    print(
        f"{args.out}: {args.type} attack, {len(frames)} frames of {w}x{h} at {args.fps:g} fps (seed {args.seed}"
        + (", close-up" if args.close_up else "")
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
