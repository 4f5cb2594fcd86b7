#!/usr/bin/env python3
"""Make a gate-camera video from photos: each photo's largest face walks up to the camera in turn.

    uv run scripts/make_gate_video.py --out gate.avi photo1.jpg photo2.jpg ...
    uv run scripts/make_gate_video.py --turn 15 --out live.avi photo.jpg

For trying the pipeline, benchmarks and acceptance runs when no camera
footage is at hand. Each person appears for --seconds (face growing from
--min-face to --max-face pixels), with --gap seconds of empty frames
between people. Prints the frame range of each person.

Each person is a photo blended into the frame (no card edge, no print or
screen texture): the shipped texture models score it live, as they score any
clean photo pasted into video, so the gate accepts it with liveness on. That
is a digital injection, not a presentation to a camera: liveness does not
claim to stop it (README "Liveness"). --turn renders the head turning in 3D
from its landmarks (kiosk/tools/standin.py). Neither is a real person: never
measure BPCER on these videos.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiosk.config import config_from_mapping
from kiosk.errors import UsageError
from kiosk.tools.scenes import Walk, person_crop, render, write_video
from kiosk.tools.standin import head_turn
from kiosk.vision.engine import FaceEngine
from kiosk.vision.images import read_image
from kiosk.vision.landmarks import LandmarkModel, find_landmark_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photos", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="output .avi (Motion-JPEG)")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=3.0, help="time each person is in view")
    ap.add_argument("--gap", type=float, default=1.0, help="empty time between people")
    ap.add_argument("--min-face", type=float, default=40.0)
    ap.add_argument("--max-face", type=float, default=180.0)
    ap.add_argument("--size", default="640x480", help="frame size WxH")
    ap.add_argument(
        "--turn",
        type=float,
        default=0.0,
        metavar="DEG",
        help="turn each head up to DEG degrees as it walks up (a bona fide stand-in for liveness, "
        "e.g. 15); 0: the photo only moves, which is a print attack",
    )
    ap.add_argument(
        "--crowd", type=int, default=1, help="people in view at once (side by side); >1 makes a multi-face video"
    )
    args = ap.parse_args(argv)
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"--size: expected WxH, found {args.size!r}", file=sys.stderr)
        return 2
    if not 0 <= args.turn <= 40:
        print(f"--turn: expected 0 to 40 degrees, found {args.turn:g}", file=sys.stderr)
        return 2
    engine = FaceEngine.from_config(config_from_mapping({"pad": {"enabled": False}}))
    marks = LandmarkModel.load(find_landmark_model(None)) if args.turn else None
    walks, t = [], args.gap
    crops = []
    for photo in args.photos:
        try:
            image = read_image(photo)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        faces = engine.detector.detect(image)
        if len(faces) == 0:
            print(f"error: {photo}: no face found", file=sys.stderr)
            return 2
        crop = person_crop(image, faces.largest().boxes[0])
        try:
            turn = head_turn(crop, engine.detector, marks) if marks is not None else None
        except ValueError:
            print(f"error: {photo}: no face found in the person crop", file=sys.stderr)
            return 2
        crops.append((photo, crop, turn))
    for k in range(0, len(crops), args.crowd):
        group = crops[k : k + args.crowd]
        start, frames = int(t * args.fps), int(args.seconds * args.fps)
        for j, (photo, crop, turn) in enumerate(group):
            cx = (j + 0.5) / len(group)
            walks.append(
                Walk(crop, start + 3 * j, frames, args.min_face, args.max_face, cx=cx, turn=turn, turn_deg=args.turn)
            )
            print(f"{photo}: frames {start + 3 * j}-{start + 3 * j + frames - 1}")
        t += args.seconds + args.gap
    total = int(t * args.fps)
    write_video(args.out, render(walks, total, (w, h)), args.fps)
    print(f"wrote {args.out}: {total} frames, {total / args.fps:.1f} s at {args.fps:g} fps, {w}x{h}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
