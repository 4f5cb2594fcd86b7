"""What both command-line tools share: logging set-up and the exit-code contract."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

from kiosk.errors import EXIT_RUNTIME, EXIT_USAGE, KioskError

log = logging.getLogger("kiosk")


def setup_logging(verbosity: int) -> None:
    """One line per event on stderr; -v for debug, -q for warnings only."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def add_common(parser: argparse.ArgumentParser, *, sub: bool = False) -> None:
    """-c/-v/-q. A sub-command's parser takes them too (`sub`), so `kiosk run -c CONFIG` and `kiosk -c CONFIG
    run` are the same: there they default to SUPPRESS and leave what was given before the sub-command."""
    keep = argparse.SUPPRESS
    parser.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        default=keep if sub else None,
        help="YAML config file (default: $KIOSK_CONFIG, else the built-in defaults)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=keep if sub else 0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=keep if sub else 0, help="only warnings and errors")


def add_commands(parser: argparse.ArgumentParser, dest: str) -> argparse._SubParsersAction:
    """Sub-commands whose parsers all accept the common options (see `add_common`)."""
    return parser.add_subparsers(dest=dest, required=True, parser_class=CommandParser)


def no_core_dumps() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:  # not on this platform: say so, go on
        logging.getLogger(__name__).warning("cannot turn core dumps off (%s): a crash may write memory to disk", exc)


def run_command(prog: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a sub-command: KioskError -> its exit code and one line, never a traceback.

    Files are private from the start (umask 077): galleries, audit logs, hook output and keys hold
    biometric data or secrets, so they are created 0600 in 0700 folders, and children inherit that. No
    core dumps either (RLIMIT_CORE 0, inherited too): a crashed verifier's memory holds every template and
    the frames of the moment, and a core file would put them on disk in the clear."""
    os.umask(0o077)
    no_core_dumps()
    setup_logging(args.verbose - args.quiet)
    try:
        return func(args)
    except KioskError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_RUNTIME
    except Exception:  # a bug, not an operator mistake: keep the traceback in the log
        logging.getLogger(prog).exception("unexpected failure")
        return EXIT_RUNTIME


def warn_if_readable_by_others(*paths: Path) -> None:
    """A warning for each existing file or folder that users other than its owner can read (made before
    umask 077, or copied in): biometric templates and keys should not be."""
    for path in paths:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & 0o077:
            log.warning(
                "%s is readable by other users (mode %o): it holds biometric data or secrets; chmod go-rwx %s",
                path,
                mode & 0o777,
                path,
            )


class Service(Protocol):
    def run(self) -> int: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


def serve(service: Service) -> int:
    """Run a long-lived process role until it ends or SIGINT/SIGTERM asks it to stop; always close it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: service.stop())
    try:
        return service.run()
    finally:
        service.close()


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its message on one line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class CommandParser(Parser):
    """A sub-command's parser: takes -c/-v/-q itself as well."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # argparse.ArgumentParser's
        super().__init__(*args, **kwargs)
        add_common(self, sub=True)
