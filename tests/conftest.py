"""Shared fixtures: the real engine on the default pack, sample photos, configs, CLI runners."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from kiosk.config import KioskConfig, config_from_mapping
from kiosk.vision.engine import FaceEngine
from kiosk.vision.models.pack import sample_photo

# The PostgreSQL server and the MQTT broker fixtures, one of each per session for every module that asks
pytest_plugins = ["tests.pg_server", "tests.mqtt_broker"]

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def real_engine() -> FaceEngine:
    """The shipped models, liveness off, loaded once per test run (for modules that shadow `engine`)."""
    return FaceEngine.from_config(config_from_mapping({"pad": {"enabled": False}}))


@pytest.fixture(scope="session")
def engine() -> FaceEngine:
    return real_engine()


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    return {name: sample_photo(name) for name in ("yaoming.jpg", "players.jpg", "gdp.jpg")}


@pytest.fixture(scope="session")
def yaoming(photos: dict[str, Path]) -> np.ndarray:
    return cv2.imread(str(photos["yaoming.jpg"]))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A gallery-only config in tmp_path (see tests.pipeline_helpers.write_config)."""
    from tests.pipeline_helpers import write_config

    return write_config(tmp_path, gallery_only=True)


@pytest.fixture
def cfg(config_file: Path) -> KioskConfig:
    from kiosk.config import load_config

    return load_config(config_file)


def run_cli(
    tool: str,
    *args: str,
    timeout: float = 120,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run an installed console script as a real process ($KIOSK_CONFIG unset unless `env` sets it)."""
    exe = BIN / tool
    cmd = (
        [str(exe), *args]
        if exe.exists()
        else [sys.executable, "-m", "kiosk.cli" if tool == "kiosk" else "enrollment.cli", *args]
    )
    full_env = dict(os.environ)
    full_env.pop("KIOSK_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin, env=full_env, cwd=cwd)


def place_face(
    face: np.ndarray,
    frame_hw: tuple[int, int],
    width: int,
    center: tuple[float, float] = (0.5, 0.5),
    background: int = 90,
) -> np.ndarray:
    """`face` (a crop) scaled to `width` px and pasted into a plain frame."""
    h, w = frame_hw
    scale = width / face.shape[1]
    small = cv2.resize(
        face, (max(1, round(face.shape[1] * scale)), max(1, round(face.shape[0] * scale))), interpolation=cv2.INTER_AREA
    )
    frame = np.full((h, w, 3), background, np.uint8)
    sh, sw = small.shape[:2]
    y0 = int(center[1] * h - sh / 2)
    x0 = int(center[0] * w - sw / 2)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + sh), min(w, x0 + sw)
    frame[ys:ye, xs:xe] = small[ys - y0 : ye - y0, xs - x0 : xe - x0]
    return frame
