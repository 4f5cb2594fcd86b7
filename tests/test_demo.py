"""`kiosk demo` as a newcomer runs it: a real process on the shipped samples."""

from __future__ import annotations

import cv2

from tests.conftest import run_cli


def test_demo_finds_the_enrolled_player_once(tmp_path):
    res = run_cli("kiosk", "demo", "--out", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("ACCEPT yao-ming") == 1
    assert "reject no_match" in res.stdout
    assert "demo done: 1 face(s) accepted" in res.stdout
    preview = cv2.imread(str(tmp_path / "demo" / "players-annotated.jpg"))
    assert preview is not None and preview.shape[:2] == (800, 1237)


def test_unknown_subcommand_and_bad_config_exit_2(tmp_path):
    res = run_cli("kiosk", "fly")
    assert res.returncode == 2 and "invalid choice" in res.stderr
    bad = tmp_path / "k.yaml"
    bad.write_text("models: {pack: /nonexistent/pack}\n")
    res = run_cli("kiosk", "-c", str(bad), "demo", "--out", str(tmp_path / "d"))
    assert res.returncode == 2 and "no such model directory" in res.stderr and "Traceback" not in res.stderr
