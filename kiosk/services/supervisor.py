"""`kiosk run`: start and watch the verifier and one capture per camera.

A child that dies is restarted with exponential backoff (a capture that
finished its file is not). SIGINT/SIGTERM stop every child (SIGTERM, then
SIGKILL after a grace period); children also get SIGTERM from the kernel if
the supervisor itself dies, so no orphan keeps a camera or a port.
A child that exits 2 (usage or config error) at its first start stops the
run; one that ran before and then exits 2 (its gallery went corrupt under
it) is retried every few seconds instead, while the subscribers tell the
gates `verifier_down`, so fixing it (`kiosk-enroll restore`) brings it back.
`--exit-on-eof` ends the run when every file source has been read and the
verifier has processed and published everything from them.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.config import KioskConfig
from kiosk.messaging.channels import sources_done
from kiosk.messaging.transport import ask_verifier, init_keys
from kiosk.services.capture import open_source
from kiosk.services.webhook_signing import make_secret, secret_path

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
BROKEN_RETRY_S = 5.0  # a child that ran before and now exits 2 (e.g. its gallery went corrupt) is retried this often
STABLE_AFTER_S = 30.0
GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    restart_on_success: bool
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START_S
    next_start: float = 0.0
    finished: bool = False
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(
        self, cfg: KioskConfig, config_path: Path, *, exit_on_eof: bool = False, verbosity: list[str] | None = None
    ) -> None:
        self.cfg = cfg
        self.exit_on_eof = exit_on_eof
        self.failed = False
        self._stop = threading.Event()
        base = [sys.executable, "-m", "kiosk.cli", *(verbosity or []), "-c", str(config_path)]
        self.verifier = Child("verifier", base + ["verify"], restart_on_success=True)
        self.captures = [
            Child(
                f"capture {c.id}",
                base + ["capture", "--camera", c.id],
                restart_on_success=open_source(c, cfg).live or c.loop,
            )
            for c in cfg.cameras
        ]
        self.file_cameras = [c.id for c in cfg.cameras if not (open_source(c, cfg).live or c.loop)]
        self.subscribers = []
        for sub in cfg.subscribers:
            # hooks.python runs in one subscriber of its own (below), not once per subscriber.
            argv = (
                base
                + ["subscribe", "--no-config-hooks", "--name", sub.name]
                + (["--gate", sub.gate] if sub.gate else [])
            )
            argv += (["--exec", sub.exec] if sub.exec else []) + (["--webhook", sub.webhook] if sub.webhook else [])
            argv += ["--jsonl", str(sub.jsonl)] if sub.jsonl else []
            argv += ["--mqtt", sub.mqtt] if sub.mqtt else []
            argv += ["--metrics-port", str(sub.metrics_port)] if sub.metrics_port else []
            self.subscribers.append(Child(f"subscriber {sub.name}", argv, restart_on_success=True))
        # The console (0 or 1): started with the subscribers, stopped with the verifier.
        self.consoles = [Child("console", base + ["console"], restart_on_success=True)] if cfg.console.enabled else []
        if cfg.hooks.python:  # all gates, every event once
            self.subscribers.append(
                Child(
                    "subscriber hooks.python", base + ["subscribe", "--name", "hooks-python"], restart_on_success=True
                )
            )

    @property
    def children(self) -> list[Child]:
        return [self.verifier, *self.captures, *self.subscribers, *self.consoles]

    def stop(self) -> None:
        self._stop.set()

    def _start(self, child: Child) -> None:
        # S603: argv is this interpreter running kiosk with arguments the supervisor built from its config
        child.proc = subprocess.Popen(child.argv, preexec_fn=_die_with_parent)  # noqa: S603
        child.started = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def _check(self, child: Child, now: float) -> None:
        if child.finished:
            return
        if child.proc is None:
            if now >= child.next_start:
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            if now - child.started > STABLE_AFTER_S:
                child.backoff = BACKOFF_START_S
            return
        child.exit_codes.append(code)
        child.proc = None
        if code == 2 and len(child.exit_codes) == 1:  # a usage/config error at first start: restarting cannot fix it
            log.error("%s stopped with a configuration or usage error (exit 2); stopping the run", child.name)
            self.failed = True
            self._stop.set()
            return
        if code == 2:  # it ran before: something under it broke (a corrupt gallery); the other gates stay up
            child.restarts += 1
            child.next_start = now + BROKEN_RETRY_S
            log.error(
                "%s cannot start again (exit 2: see its error above); the gates hear verifier_down from the "
                "subscribers; retrying every %.0fs until it is fixed (e.g. kiosk-enroll restore)",
                child.name,
                BROKEN_RETRY_S,
            )
            return
        if code == 0 and not child.restart_on_success:
            child.finished = True
            log.info("%s finished", child.name)
            return
        child.restarts += 1
        child.next_start = now + child.backoff
        log.warning(
            "%s exited with %s; restart %d in %.1fs",
            child.name,
            f"signal {-code}" if code < 0 else f"code {code}",
            child.restarts,
            child.backoff,
        )
        child.backoff = min(child.backoff * 2, BACKOFF_MAX_S)

    def _all_sources_done(self) -> bool:
        captures = {c.name: c for c in self.captures}
        if not self.file_cameras or not all(captures[f"capture {cid}"].finished for cid in self.file_cameras):
            return False
        if self.verifier.proc is None:
            return False
        status = ask_verifier(self.cfg, {"cmd": "status"}, role="supervisor", timeout_ms=2000)
        return sources_done(status, self.file_cameras)

    def run(self) -> int:
        keys_dir = self.cfg.security.keys_dir
        if self.cfg.security.curve:
            made = init_keys(keys_dir, client_name=self.cfg.security.client_key)
            if self.consoles:  # the console's own key: it may listen, never send frames or claims
                made += init_keys(keys_dir, client_name=self.cfg.console.key, role="console")
            if made:
                log.info("made CurveZMQ keys and the webhook secret in %s", keys_dir)
        elif (
            self.cfg.hooks.sign_webhooks
            and not self.cfg.hooks.webhook_secret_file
            and any(sub.webhook for sub in self.cfg.subscribers)
        ):  # only the default place is ours to fill
            if make_secret(secret_path(self.cfg)):
                log.info("made the webhook secret %s", secret_path(self.cfg))
        for child in self.subscribers + self.consoles:  # first, so they hear the verifier's first heartbeat
            self._start(child)
        self._start(self.verifier)
        time.sleep(0.2)  # let the verifier bind before the captures connect (they retry anyway)
        for child in self.captures:
            self._start(child)
        last_eof_check = 0.0
        code = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for child in self.children:
                    self._check(child, now)
                if self.exit_on_eof and now - last_eof_check > 0.5:
                    last_eof_check = now
                    if self._all_sources_done():
                        log.info("every file source read and decided; stopping")
                        if self.subscribers:
                            time.sleep(1.0)  # let the subscribers receive the last events
                        break
                self._stop.wait(0.1)
        finally:
            self._shutdown()
        return 2 if self.failed else code

    def _shutdown(self) -> None:
        """Stop the captures and the verifier first, and the subscribers last, once they have told the gates:
        a clean stop sends a last heartbeat (`stopping`) that they pass on as `verifier_down` at once; after a
        failure they need the heartbeat window to notice."""
        self._stop_children([self.verifier, *self.captures, *self.consoles])
        if any(c.proc is not None for c in self.subscribers):
            hb = self.cfg.heartbeat
            time.sleep(hb.interval_s * hb.misses + 0.5 if self.failed else 1.0)
        self._stop_children(self.subscribers)
        log.info("all children stopped")

    @staticmethod
    def _stop_children(children: list[Child]) -> None:
        running = [(c, c.proc) for c in children if c.proc is not None and c.proc.poll() is None]
        for _child, proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for child, proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, GRACE_S)
                proc.kill()
                proc.wait()


def run_supervisor(cfg: KioskConfig, config_path: Path, *, exit_on_eof: bool, verbosity: list[str]) -> int:
    sup = Supervisor(cfg, config_path, exit_on_eof=exit_on_eof, verbosity=verbosity)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sup.stop())
    return sup.run()
