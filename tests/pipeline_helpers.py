"""Helpers for the pipeline tests: scenes, configs with free ports, real processes, event readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from kiosk.config import load_config
from kiosk.messaging.channels import EventChannel
from kiosk.messaging.messages import Event, Heartbeat
from kiosk.messaging.transport import Transport, init_keys, loopback_endpoints
from kiosk.tools.scenes import Walk, person_crop, render, write_video
from tests.sealing_helpers import sealed_gallery, write_test_key
from tests.waiting import wait_until


def people(engine, photos) -> dict[str, np.ndarray]:
    """Person crops: 'yao' (portrait), and gdp.jpg's players 'duncan' (left) and 'parker' (right)."""
    yao = cv2.imread(str(photos["yaoming.jpg"]))
    gdp = cv2.imread(str(photos["gdp.jpg"]))
    faces = engine.detector.detect(gdp)
    faces = faces[faces.widths >= 48]
    order = np.argsort(faces.boxes[:, 0])
    return {
        "yao": person_crop(yao, engine.detector.detect(yao).largest().boxes[0]),
        "duncan": person_crop(gdp, faces.boxes[order[0]]),
        "parker": person_crop(gdp, faces.boxes[order[-1]]),
    }


def head_turn_of(engine, crop: np.ndarray):
    """The bona fide stand-in of a person crop (its head turns in 3D as it walks up: Walk(..., turn=this))."""
    from kiosk.tools.standin import head_turn
    from kiosk.vision.landmarks import LandmarkModel, find_landmark_model

    return head_turn(crop, engine.detector, LandmarkModel.load(find_landmark_model(None)))


def make_video(
    path: Path, walks: list[Walk], seconds: float, fps: float = 30.0, size: tuple[int, int] = (640, 480)
) -> Path:
    return write_video(path, render(walks, int(seconds * fps), size), fps)


def write_config(
    folder: Path, cameras: list[dict] | None = None, *, gallery_only: bool = False, **sections: Any
) -> Path:
    """`folder`/kiosk.yaml, and what it names, for a test; each keyword a top-level section that replaces the
    default one. The one config writer of the suite.

    - A site (the default): the gallery, `cameras`, loopback transport, CurveZMQ with keys made in keys/ (and the
      tests' template key), an audit log, metrics on a free port, liveness off; with cameras, the sealed gallery
      too (as `kiosk-enroll init` makes it: a verifier never does).
    - `gallery_only`: `gallery.path` and the given sections only, nothing made on disk (what `kiosk-enroll`
      needs; a command that wants a site refuses it).
    """
    if gallery_only:
        if cameras:
            raise ValueError("write_config: a gallery-only config has no cameras")
        cfg: dict[str, Any] = {"gallery": {"path": "gallery.db"}, **sections}
        path = folder / "kiosk.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path
    cameras = cameras or []
    cfg = {
        "gallery": {"path": "gallery.db"},
        "cameras": cameras,
        "transport": loopback_endpoints(),
        "security": {"curve": True, "keys_dir": "keys"},
        "audit": {"path": "events.jsonl"},
        "metrics": {"port": 0},
        # Liveness off unless a test is about it: these videos move a photo, a print attack by construction
        # (tests/test_liveness.py runs the default, liveness on, with attacks and the bona fide stand-in).
        "pad": {"enabled": False},
    }
    cfg.update(sections)
    # The tests' template key (tests/sealing_helpers.py), in keys/ whatever the security section says.
    cfg["security"] = {"template_key_file": "keys/template.key", **cfg["security"]}
    path = folder / "kiosk.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    init_keys(folder / "keys")
    write_test_key(folder / "keys")
    if cameras:  # a site that runs a verifier: its gallery, as `kiosk-enroll init` makes it (a verifier never does)
        sealed_gallery(folder / "gallery.db").close()
    return path


def kiosk(config: Path, *args: str, quiet: bool = True, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `kiosk -c CONFIG ARGS...` as a real process (own process group for cleanup)."""
    cmd = [sys.executable, "-m", "kiosk.cli", *(["-q"] if quiet else []), "-c", str(config), *args]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def stop(proc: subprocess.Popen, timeout: float = 10) -> tuple[str, str]:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()


def read_stderr_until(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read a running `kiosk(...)` process's stderr as it comes until `text` appears in it, and return what was
    read (fails naming `text` if it does not come within `timeout`). `stop(proc)` then returns only the rest."""
    import select

    fd = proc.stderr.fileno()  # type: ignore[union-attr]
    read: list[bytes] = []

    def seen() -> bool:
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:  # the process closed it: nothing more will come
                joined = b"".join(read).decode(errors="replace")
                raise AssertionError(f"stderr ended without {text!r}:\n{joined[-2000:]}")
            read.append(chunk)
        return text in b"".join(read).decode(errors="replace")

    wait_until(seen, timeout, f"{text!r} on stderr")
    return b"".join(read).decode(errors="replace")


def scrape(port: int) -> dict[tuple[str, tuple], tuple[str, float]]:
    """One scrape of a /metrics endpoint, parsed with prometheus_client's own parser:
    (sample name, sorted labels) -> (family type, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): (family.type, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def audit(config: Path) -> list[dict]:
    path = config.parent / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Events:
    """A real CurveZMQ subscriber on the events socket."""

    def __init__(self, config: Path, topics: tuple[str, ...] = ("event.", "health.")) -> None:
        self.cfg = load_config(config)
        self.transport = Transport(self.cfg, role="test")
        self.sock = self.transport.event_subscriber(list(topics))
        self.bad: list[str] = []
        self.inbox = EventChannel(self.sock, self.bad.append)
        self.events: list[Event] = []
        self.health: list[dict] = []  # the verifier's own heartbeats and relayed capture health, as sent
        self.gate_health: dict[str, list[dict]] = {}  # gate -> its part of each heartbeat (health.gate.<gate>)

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            message = self.inbox.recv(50)
            if isinstance(message, Event):
                self.events.append(message)
            elif isinstance(message, Heartbeat) and message.gate_id is not None:
                self.gate_health.setdefault(message.gate_id, []).append(message.body)
            elif message is not None:
                self.health.append(message.body)

    def wait_for(self, predicate, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return True
            self.poll(0.1)
        return predicate(self)

    def close(self) -> None:
        self.sock.close()
        self.transport.close()


class LiveGate:
    """What `live_gate` yields: the event listener, and the verifier's stderr once it has stopped."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.verifier_err = ""


@contextmanager
def live_gate(config: Path, cameras: tuple[str, ...] = ("cam-a1",), quiet: bool = True) -> Iterator[LiveGate]:
    """A real verifier, a listener on its events and heartbeat, and (once the verifier is up) one capture per
    camera; all stopped on the way out, captures first."""
    verifier = kiosk(config, "verify", quiet=quiet)
    captures: list[subprocess.Popen] = []
    gate = LiveGate(Events(config, ("event.", "health.verifier", "health.gate.")))
    try:
        assert gate.events.wait_for(lambda ev: ev.health, 30)
        captures = [kiosk(config, "capture", "--camera", cam) for cam in cameras]
        yield gate
    finally:
        gate.events.close()
        for capture in captures:
            stop(capture)
        _, gate.verifier_err = stop(verifier)
