"""`kiosk bench` as a command: it runs and reports what it promises (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from kiosk.tools.bench import compare_accepts
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.pipeline_helpers import make_video, people, write_config


@pytest.mark.slow  # the obvious loop beside the pipeline: a minute on 2 cores; run by .ci/run's second step
def test_bench_json_with_compare(tmp_path, engine, photos):
    crops = people(engine, photos)
    make_video(
        tmp_path / "v.avi",
        [
            Walk(crops["yao"], start=0, frames=45, w0=70, w1=150, cx=0.3),
            Walk(crops["parker"], start=0, frames=45, w0=70, w1=150, cx=0.7),
        ],
        seconds=1.5,
        size=(640, 360),
    )
    config = write_config(tmp_path, [])
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    res = run_cli(
        "kiosk",
        "-q",
        "-c",
        str(config),
        "bench",
        "--video",
        str(tmp_path / "v.avi"),
        "--compare",
        "insightface",
        "--json",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["frames"] == 45 and r["seconds"] > 0 and r["fps"] > 0 and r["providers"]
    assert r["faces_per_frame"] > 1.5 and r["dropped"] == {"capture": 0, "verifier_stale": 0}
    for stage in ("decode", "transport", "detect", "track", "align", "quality", "select", "embed", "match", "decide"):
        assert {"p50", "p99"} <= set(r["stages_ms"][stage]), stage
    assert r["accepted"] == ["YAO"]
    c = r["compare"]
    assert c["insightface"]["frames"] == 45 and c["insightface"]["accepted"] == ["YAO"]
    assert c["same_accepted_subjects"] is True and c["ratio"] > 0
    assert c["accepted_by_both"] == ["YAO"] and c["accepted_only_by_pipeline"] == c["accepted_only_by_reference"] == []


def test_compare_reports_differences_both_ways():
    assert compare_accepts(["A", "B"], []) == {
        "same_accepted_subjects": False,
        "accepted_by_both": [],
        "accepted_only_by_pipeline": ["A", "B"],
        "accepted_only_by_reference": [],
    }
    assert compare_accepts(["A", "B"], ["A"])["accepted_only_by_pipeline"] == ["B"]
    assert compare_accepts(["A"], ["A", "C"])["accepted_only_by_reference"] == ["C"]
    assert compare_accepts([], [])["same_accepted_subjects"] is False  # nobody accepted: nothing compared
    assert compare_accepts(["A"], ["A"])["same_accepted_subjects"] is True


def test_bench_search_scale_and_usage_errors(tmp_path):
    res = run_cli("kiosk", "bench", "--search-scale", "500,2000", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["search_scale"]
    assert [r["templates"] for r in rows] == [500, 2000] and all(r["top1_correct"] == 1.0 for r in rows)
    config = write_config(tmp_path, [])
    res = run_cli("kiosk", "-c", str(config), "bench", "--video", str(tmp_path / "none.avi"))
    assert res.returncode == 2 and "no such file" in res.stderr
    (tmp_path / "bad.avi").write_text("not a video")
    res = run_cli("kiosk", "-c", str(config), "bench", "--video", str(tmp_path / "bad.avi"))
    assert res.returncode == 2 and "not a video" in res.stderr
    res = run_cli("kiosk", "bench")
    assert res.returncode == 2


def test_bench_cameras_usage_errors(tmp_path):
    config = write_config(tmp_path, [])
    video = tmp_path / "v.avi"
    make_video(video, [], seconds=0.2, size=(160, 120))
    for args, says in (
        (["--cameras", "0"], "expected 1 to 64 cameras"),
        (["--cameras", "2", "--busy", "3"], "expected 1 to 64 cameras"),
        (["--busy", "1"], "--busy needs --cameras"),
        (["--cameras", "2", "--compare", "insightface"], "--compare runs on one camera"),
    ):
        res = run_cli("kiosk", "-c", str(config), "bench", "--video", str(video), *args)
        assert res.returncode == 2 and says in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr


@pytest.mark.slow  # three real-time captures and a verifier for the clip's length
def test_bench_cameras_reports_each_camera(tmp_path, engine, photos):
    """--cameras 3 --busy 1: the busy camera accepts the enrolled person, the two idle ones (an empty scene made
    by the bench) decide nothing and their captures, told the scene is empty, hold most frames back; every
    process's CPU share is reported."""
    crops = people(engine, photos)
    make_video(
        tmp_path / "v.avi",
        [Walk(crops["yao"], start=10, frames=80, w0=90, w1=160, cx=0.5)],
        seconds=4.0,
        size=(640, 360),
    )
    config = write_config(tmp_path, [])
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    res = run_cli(
        "kiosk",
        "-q",
        "-c",
        str(config),
        "bench",
        "--video",
        str(tmp_path / "v.avi"),
        "--cameras",
        "3",
        "--busy",
        "1",
        "--json",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    cams = {c["camera"]: c for c in r["per_camera"]}
    assert [c["busy"] for c in r["per_camera"]] == [True, False, False]
    assert cams["cam1"]["accepted"] == ["YAO"]
    for cid in ("cam2", "cam3"):
        c = cams[cid]
        assert c["decisions"] == 0 and c["frames_in"] >= 3  # the safety net: one a second at least
        assert c["held"] > 2 * c["sent"]  # the empty scene is unchanged: most frames are not even sent
    assert cams["cam1"]["sent"] >= 70  # the 80 frames with a person in them go (at most a few lost to a full queue)
    # Yao stepped into the empty gate: found no earlier than a face could be (the bench's own every-frame
    # detection of the file), and the delay is reported (a frame or two lost to a busy machine can add to it).
    wake = cams["cam1"]["wake"]
    assert r["first_face_frame"] is not None and wake is not None and wake["frames_late"] >= 0 and wake["ms"] > 0
    assert {"verifier", "capture cam1", "capture cam2", "capture cam3"} <= set(r["cpu"])
    assert all(0 < v["core_share"] < 2.5 for v in r["cpu"].values())
