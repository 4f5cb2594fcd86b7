"""`kiosk`: the gate service's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiosk.cli_support import Parser, add_common, run_command
from kiosk.config import load_config
from kiosk.errors import EXIT_OK, EXIT_RUNTIME

PROG = "kiosk"


def cmd_demo(args: argparse.Namespace) -> int:
    from kiosk.demo import run_demo

    cfg = load_config(args.config)
    accepted = run_demo(cfg, Path(args.out))
    return EXIT_OK if accepted == 1 else EXIT_RUNTIME


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Face verification for camera-driven boarding gates.")
    add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("demo", help="enroll a sample portrait and find that person in sample photos")
    p.add_argument("--out", default="var/demo", help="folder for the demo gallery and annotated photos")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
