"""The verifier's watch over its own key files, so a key that went wrong is known before a restart fails.

The verifier loads its keys once, at start: the template key (a file that
must be private, or `kiosk verify` refuses to start) and, with CurveZMQ on,
its server key pair (`<keys_dir>/server.key_secret`, the identity every
capture, tool and gate pins). A key file deleted, made readable by others,
or replaced by another key under a running verifier changes nothing until
the next restart, which then fails (or serves another identity) and takes
the gates down. `KeyFileWatch` looks at each file every `KEY_CHECK_EVERY_S`:
still a regular file, no group or other access, and still the key in use.
A change is reported at once: status `degraded` with the problem
(`key_files` in `kiosk status`), `kiosk_key_file_ok{key}` 0, and one log
line; one more line when it is fixed.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq.auth

from kiosk.errors import ConfigError
from kiosk.services.metrics import VerifierMetrics
from kiosk.store.sealing import TemplateCodec, read_key_file

log = logging.getLogger(__name__)

KEY_CHECK_EVERY_S = 60.0
# For tests only: a shorter period (seconds) in the environment of a verifier a test starts. Operators leave it
# unset; a value that is not a number from 0.05 to 3600 is ignored (with a warning).
KEY_CHECK_ENV = "KIOSK_TEST_KEY_CHECK_EVERY_S"


def key_check_every_s() -> float:
    """KEY_CHECK_EVERY_S, or the test override in $KIOSK_TEST_KEY_CHECK_EVERY_S."""
    text = os.environ.get(KEY_CHECK_ENV)
    if text is None:
        return KEY_CHECK_EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 3600.0:
        log.warning(
            "$%s=%r is not a number of seconds from 0.05 to 3600; key files are checked every %.0f s",
            KEY_CHECK_ENV,
            text[:40],
            KEY_CHECK_EVERY_S,
        )
        return KEY_CHECK_EVERY_S
    return value


@dataclass(frozen=True)
class WatchedKey:
    """One key file: `name` (the metric's `key` label), its path, and `identity(path)`: None when the file holds
    the key in use, else what is wrong (the file's mode and type are checked before it is called)."""

    name: str
    title: str  # for messages: "template key", "CurveZMQ server key"
    path: Path
    identity: Callable[[Path], str | None]


def _private_file_problem(path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return "is gone"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_mode & 0o077:
        return (
            f"is readable by other users (mode {stat.S_IMODE(st.st_mode):04o}; chmod 600 {path}), which the "
            "key loader refuses at start"
        )
    return None


def template_key(path: Path, codec: Callable[[], TemplateCodec | None]) -> WatchedKey:
    """The template key file, against the key the gallery is sealed under now (`codec()`'s current key: after
    a `rotate-key`, the file must hold the new key before any restart)."""

    def identity(p: Path) -> str | None:
        held = codec()
        try:
            key = read_key_file(p)
        except ConfigError as exc:
            return f"does not hold a template key ({str(exc).removeprefix(f'{p}: ')})"
        if held is None:
            return None
        current = held.keys.current()
        if key.key_id == current.key_id and key.secret == current.secret:
            return None
        if key.key_id != current.key_id and held.keys.get(key.key_id) is not None:
            return (
                f"holds key {key.key_id.hex()}, but the gallery is sealed under key {current.key_id.hex()} now "
                "(rotated): a restart with this file fails; put the new key file in its place"
            )
        return (
            f"holds key {key.key_id.hex()}, not the key {current.key_id.hex()} this verifier runs with: a "
            "restart with this file would not open the gallery"
        )

    return WatchedKey("template", "template key", path, identity)


def curve_server_key(path: Path, public: bytes) -> WatchedKey:
    """The CurveZMQ server key pair's secret file, against the public key the sockets were built with."""

    def identity(p: Path) -> str | None:
        try:
            pub, sec = zmq.auth.load_certificate(str(p))
        except (OSError, ValueError) as exc:
            return f"does not hold a CurveZMQ key pair ({exc})"
        if sec is None:
            return "holds no secret key"
        if pub != public:
            return (
                "holds another CurveZMQ key pair than the one this verifier serves with: after a restart every "
                "capture, tool and gate that pins server.key is refused"
            )
        return None

    return WatchedKey("curve_server", "CurveZMQ server key", path, identity)


class KeyFileWatch:
    """Checks each watched key file every `every_s` (the first time at once); keeps the problems found."""

    def __init__(self, keys: list[WatchedKey], metrics: VerifierMetrics, every_s: float | None = None) -> None:
        self.keys = keys
        self.metrics = metrics
        self.every_s = key_check_every_s() if every_s is None else every_s
        self.problems: dict[str, str] = {}  # key name -> what is wrong
        self._next = float("-inf")
        for key in keys:
            metrics.key_file_ok.labels(key=key.name).set(1)

    def check(self, mono: float) -> bool:
        """Look at the files if the period has passed; True when what is wrong changed (log lines written)."""
        if mono < self._next:
            return False
        self._next = mono + self.every_s
        changed = False
        for key in self.keys:
            problem = self._problem(key)
            if problem == self.problems.get(key.name):
                continue
            changed = True
            if problem:
                self.problems[key.name] = problem
                log.error("%s", problem)
            else:
                del self.problems[key.name]
                log.info("%s file %s is in order again", key.title, key.path)
            self.metrics.key_file_ok.labels(key=key.name).set(0 if problem else 1)
        return changed

    def _problem(self, key: WatchedKey) -> str | None:
        what = _private_file_problem(key.path)
        try:
            what = what or key.identity(key.path)
        except Exception as exc:  # noqa: BLE001 - a check that breaks must not stop the gates; it is a problem
            what = f"cannot be checked ({exc.__class__.__name__}: {exc})"
        return f"{key.title} file {key.path} {what}" if what else None

    def status(self) -> dict[str, Any]:
        """`key_files` of the verifier's status."""
        return {
            "ok": not self.problems,
            "every_s": self.every_s,
            "watched": [str(k.path) for k in self.keys],
            "problems": dict(self.problems),
        }
