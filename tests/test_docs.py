"""The docs site: the configuration reference is generated from config/kiosk.yaml and names every key of the
config classes, and `mkdocs build --strict` passes (a broken link, a missing page or a lost marker fails it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from kiosk.config import CameraConfig, KioskConfig, SubscriberConfig

REPO = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_ref", REPO / "docs" / "gen_config_ref.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_config_ref", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_config_reference_names_every_key_with_the_files_default():
    gen = _generator()
    ref = gen.reference()
    missing = [k for k in _keys(KioskConfig) if f"`{k}`" not in ref]
    assert missing == []
    # list entries: every field of a camera and a subscriber appears in the entries the file writes
    for cls, section in ((CameraConfig, "cameras"), (SubscriberConfig, "subscribers")):
        block = ref.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert [f.name for f in dataclasses.fields(cls) if f"{f.name}:" not in block] == []
    assert "| `policy.accept_threshold` | `0.40` |" in ref
    # it follows the file: a changed default or comment shows at the next build
    changed = (REPO / "config" / "kiosk.yaml").read_text().replace("accept_threshold: 0.40", "accept_threshold: 0.5")
    assert "| `policy.accept_threshold` | `0.5` |" in gen.reference(changed)
    assert gen.MARKER in (REPO / "docs" / "configuration.md").read_text()


def test_docs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs or mkdocs-material is not installed (dev dependencies: uv sync --locked)")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "accept_threshold" in page and "config-reference" not in page
    assert (tmp_path / "site" / "console-live.png").is_file()
    assert not (tmp_path / "site" / "gen_config_ref.py").exists()
    shutil.rmtree(tmp_path / "site")


def test_a_broken_link_fails_the_strict_build(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs or mkdocs-material is not installed (dev dependencies: uv sync --locked)")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "docs" / "glossary.md").write_text("# Glossary\n\nSee [the page](no-such-page.md).\n")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert res.returncode != 0 and "no-such-page.md" in res.stdout + res.stderr
