"""`kiosk-enroll evaluate-pad` with stills, sources, confidence bounds and leave-one-source-out (pad_eval.py).

Everything is made here: the person is a sample photo in grey with a red-blue difference set so that the test's
texture model (tests/pad_models.py: real when the crop is more red than blue) scores it what the test wants."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from enrollment.pad_eval import (
    FIT_GRID,
    LabelledFile,
    PadReport,
    StillClip,
    _Judge,
    read_labels,
    replay,
    samples,
    text,
    upper_bound,
)
from kiosk.config import config_from_mapping
from kiosk.pipeline.tracking import Track
from kiosk.vision.liveness_checks import LivenessCheck, PadObservation
from tests.pad_models import red_is_real_model

# The liveness settings these tests count on, whatever the defaults are.
PAD = {"threshold": 0.3, "attack_below": 0.1, "min_frames": 8, "max_wait_s": 2.0}


# -- the confidence bound ---------------------------------------------------------------------------------------

# (errors, n) -> the one-sided 95% Clopper-Pearson upper bound, from scipy.stats.beta.ppf(0.95, k + 1, n - k)
CLOPPER_PEARSON_95 = {
    (0, 10): 0.2588655508930522,
    (0, 3): 0.6315968501359612,
    (1, 5): 0.6574083180011386,
    (0, 2): 0.776393202250021,
    (1, 2): 0.9746794344808963,
    (5, 20): 0.4555824040017489,
    (0, 100): 0.029513049607039925,
    (3, 1000): 0.007735244718479458,
    (0, 1): 0.95,
}


def test_the_upper_bound_is_the_exact_one_sided_clopper_pearson_bound():
    for (k, n), expected in CLOPPER_PEARSON_95.items():
        assert upper_bound(k, n) == pytest.approx(expected, abs=1e-9), (k, n)
    assert upper_bound(0, 10) == pytest.approx(1 - 0.05 ** (1 / 10))  # no error: 1 - alpha^(1/n), near 3/n
    assert upper_bound(3, 3) == 1.0 and upper_bound(0, 0) is None
    try:
        from scipy.stats import beta
    except ImportError:  # scipy comes with the dev tools; the table above is the check without it
        return
    for k, n in ((0, 7), (2, 9), (10, 50), (40, 400)):
        assert upper_bound(k, n) == pytest.approx(beta.ppf(0.95, k + 1, n - k), abs=1e-9)


# -- the labels file --------------------------------------------------------------------------------------------


def test_labels_take_video_or_file_and_stills_of_one_subject_are_one_clip_in_file_name_order(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "file,label,subject\n"
        "lab/s1_c.png,bona_fide,s1\n"  # 2
        "lab/v.avi,print,\n"  # 3
        "lab/s1_a.PNG,bona_fide,s1\n"  # 4
        "lab/s1_b.jpg,print,s1\n"  # 5: another label, another clip
        "field/s1_a.png,bona_fide,s1\n"  # 6: another source, another clip
        "alone.webp,replay,\n"  # 7: no subject, no folder: a clip alone, the labels file's folder
        "./lab/deep/x.bmp,replay,\n"
    )  # 8
    rows = read_labels(tmp_path / "labels.csv")
    assert [(r.line, r.still, r.source) for r in rows] == [
        (2, True, "lab"),
        (3, False, "lab"),
        (4, True, "lab"),
        (5, True, "lab"),
        (6, True, "field"),
        (7, True, tmp_path.name),
        (8, True, "lab"),
    ]
    got = samples(rows)
    assert [type(s).__name__ for s in got] == [
        "StillClip",
        "LabelledFile",
        "StillClip",
        "StillClip",
        "StillClip",
        "StillClip",
    ]
    clip = got[0]
    assert (
        isinstance(clip, StillClip) and clip.line == 2 and [r.path.name for r in clip.rows] == ["s1_a.PNG", "s1_c.png"]
    )
    (tmp_path / "v.csv").write_text("video,label,source\nx.avi,Bona_Fide,cam-3\n")
    assert [(r.label, r.source, r.still) for r in read_labels(tmp_path / "v.csv")] == [("bona_fide", "cam-3", False)]
    (tmp_path / "bad.csv").write_text("clip,label\nx.avi,print\n")
    with pytest.raises(Exception, match="video,label or file,label"):
        read_labels(tmp_path / "bad.csv")


# -- the report's figures over presentations judged without the detector -------------------------------------


class Mover(LivenessCheck):
    """A site's check of how the face moves (as the built-in depth or motion checks, a vouching check whose evidence
    is of another kind than the texture's): live from its 10th frame."""

    name = "mover"
    vouches = True
    cue = "movement"

    @property
    def verdict(self):
        return "live" if self.frames >= 10 else None


class LateAccuser(LivenessCheck):
    """A site's check that accuses from its 9th frame, never vouches."""

    name = "late"

    @property
    def verdict(self):
        return "attack" if self.frames >= 9 else None


def _judged(cfg, texture: float, frames: int = 14):
    """One presentation of `frames` quality frames whose texture models all say `texture`, as the gate judges it
    (and recorded past its decision, for the replays)."""
    judge = _Judge(cfg, True)
    track = Track(1, "eval", np.zeros(4, np.float32), 0.0)
    for i in range(frames):
        judge.observe(track, PadObservation(None, texture, width=120.0), i / 30, i)
    judge.ended(track, frames / 30)
    return judge.tracks[1]


@pytest.mark.parametrize(
    "others",
    [
        ["tests.test_evaluate_pad:LateAccuser"],
        ["tests.test_evaluate_pad:Mover", "tests.test_evaluate_pad:LateAccuser"],
        ["tests.test_evaluate_pad:Mover"],
    ],
)
def test_a_replay_at_another_threshold_is_the_judgement_at_that_threshold_whatever_the_other_checks(others):
    """The other checks are replayed as recorded, whatever their names and kinds of evidence, and past the
    original decision: a replay at threshold t decides as the gate set to t would have."""
    checks = ["texture", *others]
    cfg = config_from_mapping({"pad": {**PAD, "checks": checks}})
    for texture in (0.9, 0.5, 0.2, 0.05):
        p = _judged(cfg, texture)
        assert {"texture", *(c.rsplit(":", 1)[1].lower().replace("lateaccuser", "late") for c in others)} <= set(
            p.checks
        )
        for t in (0.1, 0.3, 0.6, 0.95):
            at_t = config_from_mapping({"pad": {**PAD, "checks": checks, "threshold": t, "attack_below": min(0.1, t)}})
            assert replay(cfg, p, t) == _judged(at_t, texture).outcome, (texture, t)
    if others == ["tests.test_evaluate_pad:LateAccuser"]:  # the texture alone vouches: live at frame 8 or never
        p = _judged(cfg, 0.9)
        assert (p.outcome, p.frames) == ("accepted", 8)
        assert replay(cfg, p, 0.5) == "accepted" and replay(cfg, p, 0.95) == "attack"  # the accusation, recorded


# Scores by source and label: LOSO fits on the attack side (margin 0.1) and measures the source left out.
SCORES = {
    ("lab", "bona_fide"): [0.9, 0.8, 0.62],
    ("lab", "print"): [0.42],
    ("lab", "screen"): [0.07],
    ("field", "bona_fide"): [0.72, 0.52],
    ("field", "print"): [0.22],
}


def _report(cfg, scores) -> PadReport:
    report = PadReport(cfg, ["m.onnx"], ["texture"])
    line = 1
    for (source, label), values in scores.items():
        for s in values:
            line += 1
            report.add(LabelledFile(line, Path(f"{source}/{line}.avi"), label, source), [_judged(cfg, s)])
    return report


def _expect_loso(loso: dict) -> None:
    """What SCORES give (and the stills and videos of the end-to-end test)."""
    rows = {r["held_out"]: r for r in loso["rows"]}
    assert [r["held_out"] for r in loso["rows"]] == ["lab", "field", "all"] and loso["margin"] == 0.1
    # lab held out: field's one print (0.22) is stopped from 0.25 on: fitted 0.35; lab's print (0.42) passes
    lab = rows["lab"]
    assert (lab["lowest_stopping"], lab["fitted_threshold"], lab["training_attacks"]) == (0.25, 0.35, 1)
    assert lab["bona_fide"] == {
        "presentations": 3,
        "rejected": 0,
        "bpcer": 0.0,
        "bpcer_upper95": pytest.approx(0.6316, abs=1e-4),
        "unverified": 0,
    }
    assert lab["attacks"] == {
        "print": {"presentations": 1, "accepted": 1, "apcer": 1.0, "apcer_upper95": 1.0},
        "screen": {"presentations": 1, "accepted": 0, "apcer": 0.0, "apcer_upper95": pytest.approx(0.95)},
    }
    # field held out: lab's print (0.42) is stopped from 0.45 on: fitted 0.55, and field's 0.52 bona fide waits
    field = rows["field"]
    assert (field["lowest_stopping"], field["fitted_threshold"], field["training_attacks"]) == (0.45, 0.55, 2)
    assert field["bona_fide"] == {
        "presentations": 2,
        "rejected": 1,
        "bpcer": 0.5,
        "bpcer_upper95": pytest.approx(0.9747, abs=1e-4),
        "unverified": 1,
    }
    assert field["attacks"] == {
        "print": {"presentations": 1, "accepted": 0, "apcer": 0.0, "apcer_upper95": pytest.approx(0.95)}
    }
    every = rows["all"]
    assert every["same_data"] is True and not lab["same_data"]
    assert (every["lowest_stopping"], every["fitted_threshold"], every["training_attacks"]) == (0.45, 0.55, 3)
    assert every["bona_fide"]["rejected"] == 1 and every["bona_fide"]["presentations"] == 5
    assert every["bona_fide"]["bpcer_upper95"] == pytest.approx(0.6574, abs=1e-4)
    assert {k: (v["accepted"], v["presentations"]) for k, v in every["attacks"].items()} == {
        "print": (0, 2),
        "screen": (0, 1),
    }


def _expect_sources_and_apcer0(report: dict) -> None:
    lab, field = report["sources"]["lab"], report["sources"]["field"]
    assert list(report["sources"]) == ["lab", "field"]
    assert lab["bona_fide"] == {
        "presentations": 3,
        "rejected": 0,
        "bpcer": 0.0,
        "bpcer_upper95": pytest.approx(0.6316, abs=1e-4),
        "unverified": 0,
    }
    assert lab["attacks"]["print"] == {"presentations": 1, "accepted": 1, "apcer": 1.0, "apcer_upper95": 1.0}
    assert field["bona_fide"]["rejected"] == 0 and field["bona_fide"]["presentations"] == 2
    assert field["attacks"] == {
        "print": {"presentations": 1, "accepted": 0, "apcer": 0.0, "apcer_upper95": pytest.approx(0.95)}
    }  # liveness_unverified
    zero = report["at_apcer0"]
    assert zero["configured"]["threshold"] == 0.3 and zero["configured"]["apcer_max"] == 0.5
    assert (zero["pooled"]["threshold"], zero["pooled"]["rejected"], zero["pooled"]["presentations"]) == (0.45, 0, 5)
    assert zero["per_source"]["lab"]["threshold"] == 0.45 and zero["per_source"]["field"]["threshold"] == 0.25
    assert zero["per_source"]["field"]["bpcer"] == 0.0


def test_per_source_figures_bpcer_at_apcer_0_and_leave_one_source_out():
    cfg = config_from_mapping({"pad": {**PAD, "checks": ["texture"]}})
    report = _report(cfg, SCORES)
    data = report.as_dict()
    _expect_sources_and_apcer0(data)
    _expect_loso(data["loso"])
    scores = data["check_scores"]["texture"]
    assert scores["bona_fide"] == {
        "n": 5,
        "scored": 5,
        "min": 0.52,
        "median": 0.72,
        "max": 0.9,
        "verdicts": {"live": 5},
    }
    assert scores["screen"]["verdicts"] == {"attack": 1}
    lines = text(data)
    assert any(line.startswith("  all*") and "0.55" in line for line in lines)
    assert any("fitted and measured on the same data" in line for line in lines)
    # no threshold stops an attack that scores 1: fitted at the top of the grid, and said so
    data = _report(cfg, {("a", "bona_fide"): [0.9], ("a", "print"): [0.999], ("b", "bona_fide"): [0.9]}).as_dict()
    row = data["loso"]["rows"][1]
    assert row["held_out"] == "b" and row["lowest_stopping"] is None and row["fitted_threshold"] == FIT_GRID[-1]
    assert data["at_apcer0"]["pooled"]["threshold"] is None
    one = _report(cfg, {("a", "bona_fide"): [0.9]}).as_dict()
    assert one["loso"] is None and not any("leave-one-source-out" in line for line in text(one))


# -- end to end: videos and stills from two sources ----------------------------------------------------------


def _tinted(crop: np.ndarray, p_real: float) -> np.ndarray:
    """The crop in grey with red = blue + d, d such that the red model's P(real) is `p_real` over any part of it
    (its logits: 10/255 * (mean red - mean blue) for "real", 0 for the other two). Every channel is the same grey
    plus a constant: no colour fringes for the screen check."""
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
    blue = 62 + 0.45 * grey
    d = 25.5 * math.log(2 * p_real / (1 - p_real))
    return np.clip(np.stack([blue, blue, blue + d], axis=2).round(), 0, 255).astype(np.uint8)


def _stills(folder: Path, name: str, crop: np.ndarray, p_real: float) -> list[str]:
    """Three close-ups (288 px, the face about 120 px) of the tinted crop, each a little apart."""
    big = cv2.resize(_tinted(crop, p_real), (320, 320), interpolation=cv2.INTER_AREA)
    out = []
    for letter, (dx, dy) in zip("cab", ((16, 10), (0, 0), (8, 4)), strict=True):
        path = folder / f"{name}_{letter}.png"
        cv2.imwrite(str(path), big[dy : dy + 288, dx : dx + 288])
        out.append(f"{folder.name}/{path.name}")
    return out


@pytest.fixture(scope="module")
def pad_run(tmp_path_factory, engine, photos) -> tuple[Path, dict]:
    """A labelled set (two sources; videos and subjects' stills; bona fide, print and screen) scored once by
    `kiosk-enroll evaluate-pad --json` with the texture the only check that vouches: its folder and report."""
    from kiosk.tools.scenes import Walk
    from tests.conftest import run_cli
    from tests.pipeline_helpers import make_video, people

    tmp_path = tmp_path_factory.mktemp("evaluate-pad")
    yao = people(engine, photos)["yao"]
    rows = ["file,label,subject"]
    for source, kind, name, label, p_real in (
        ("lab", "video", "bf", "bona_fide", 0.9),
        ("lab", "stills", "s1", "bona_fide", 0.8),
        ("lab", "stills", "s2", "bona_fide", 0.62),
        ("lab", "stills", "p1", "print", 0.42),
        ("lab", "video", "screen", "screen", 0.07),
        ("field", "video", "bf", "bona_fide", 0.72),
        ("field", "stills", "s3", "bona_fide", 0.52),
        ("field", "stills", "p2", "print", 0.22),
    ):
        folder = tmp_path / source
        folder.mkdir(exist_ok=True)
        if kind == "video":
            make_video(
                folder / f"{name}.avi", [Walk(_tinted(yao, p_real), start=0, frames=45, w0=110, w1=150)], seconds=1.5
            )
            rows.append(f"{source}/{name}.avi,{label},")
        else:
            rows += [f"{path},{label},{name}" for path in _stills(folder, name, yao, p_real)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    red_is_real_model(tmp_path / "1.0_80x80_Red.onnx")
    # the texture the only check that vouches (a flat photo moves as one piece: no movement check would vouch)
    (tmp_path / "kiosk.yaml").write_text(
        "models: {pad: [1.0_80x80_Red.onnx]}\ngallery: {path: g.db}\n"
        "pad: {checks: [texture, screen, border], threshold: 0.3, "
        "attack_below: 0.1, min_frames: 8, max_wait_s: 2.0}\n"
    )
    res = run_cli(
        "kiosk-enroll",
        "-q",
        "-c",
        str(tmp_path / "kiosk.yaml"),
        "evaluate-pad",
        str(tmp_path / "labels.csv"),
        "--json",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    return tmp_path, json.loads(res.stdout)


def _entries(report: dict) -> dict[tuple[str, str], dict]:
    return {(v["source"], v.get("subject") or Path(v["video"]).stem): v for v in report["videos"]}


def test_evaluate_pad_scores_a_subjects_stills_as_one_clip_in_file_name_order(pad_run):
    _, report = pad_run
    entries = _entries(report)
    assert not report["no_face"] and len(entries) == 8
    # the three stills of a subject: one clip, in file-name order, one presentation (one track)
    s1 = entries[("lab", "s1")]
    assert [Path(s).name for s in s1["stills"]] == ["s1_a.png", "s1_b.png", "s1_c.png"] and s1["hold"] == 6
    assert s1["lines"] == [4, 5, 3] and s1["line"] == 3  # written c, a, b on lines 3-5
    for key, v in entries.items():
        assert len(v["presentations"]) == 1, key
    textures = {key: v["presentations"][0]["texture"] for key, v in entries.items()}
    assert textures[("lab", "s1")] == pytest.approx(0.8, abs=0.01) and textures[("field", "p2")] == pytest.approx(
        0.22, abs=0.01
    )
    assert textures[("lab", "bf")] == pytest.approx(0.9, abs=0.03)  # video: compression moves it a little
    assert report["stills"] == {
        "images": 15,
        "clips": 5,
        "hold_frames": 6,
        "fps": 30.0,
        "scored_as": report["stills"]["scored_as"],
    }


def test_evaluate_pad_counts_bpcer_and_apcer_with_their_bounds_per_source_and_leaving_one_out(pad_run):
    _, report = pad_run
    assert report["bona_fide"]["presentations"] == 5 and report["bona_fide"]["videos"] == 2
    assert report["bona_fide"]["still_clips"] == 3 and report["bona_fide"]["bpcer"] == 0.0
    assert report["bona_fide"]["bpcer_upper95"] == pytest.approx(0.4507, abs=1e-4)  # 0 of 5
    assert report["attacks"]["print"]["apcer"] == 0.5 and report["attacks"]["print"]["apcer_upper95"] == pytest.approx(
        0.9747, abs=1e-4
    )
    _expect_sources_and_apcer0(report)
    _expect_loso(report["loso"])


def test_evaluate_pad_reports_each_checks_scores_by_label(pad_run):
    _, report = pad_run
    tex = report["check_scores"]["texture"]
    assert tex["bona_fide"]["n"] == 5 and tex["bona_fide"]["min"] == pytest.approx(0.52, abs=0.01)
    assert tex["print"]["verdicts"] == {"live": 1, "none": 1}
    assert list(report["check_scores"]) == ["texture", "screen", "border"]
    assert report["check_scores"]["screen"]["bona_fide"] == {
        "n": 5,
        "scored": 0,
        "min": None,
        "median": None,
        "max": None,
        "verdicts": {"none": 5},
    }


def test_evaluate_pad_text_says_how_stills_were_scored_and_what_the_bound_is(pad_run):
    lines = "\n".join(text(pad_run[1]))
    header, first = text(pad_run[1])[:2]
    assert header.split()[-4:] == ["texture", "steady", "wait", "s"]
    steady = pad_run[1]["videos"][0]["presentations"][0]["checks"]["texture"]["steady"]
    assert first.split()[-2] == f"{steady:.3f}"  # the row shows the texture's 10th percentile
    assert "15 images scored as 5 still clips" in lines and "each still held 6 frames at 30 fps" in lines
    assert "  lab: BPCER 0.0% (0 of 3; 95% upper 63.2%), 0 liveness_unverified" in lines
    assert "95% upper: the one-sided 95% upper bound, exact (Clopper-Pearson)" in lines


def test_evaluate_pad_refuses_a_missing_or_unreadable_still_naming_its_line(pad_run):
    from tests.conftest import run_cli

    tmp_path = pad_run[0]
    (tmp_path / "gone.csv").write_text("file,label,subject\nlab/s1_a.png,bona_fide,x\nlab/nope.png,print,x\n")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    (tmp_path / "junk.csv").write_text("file,label\nlab/s1_a.png,bona_fide\njunk.png,print\n")
    for labels, line, why in (("gone.csv", 3, "no such image file"), ("junk.csv", 3, "cannot be read as an image")):
        res = run_cli(
            "kiosk-enroll",
            "-q",
            "-c",
            str(tmp_path / "kiosk.yaml"),
            "evaluate-pad",
            str(tmp_path / labels),
            "--no-progress",
        )
        assert res.returncode == 2 and f"line {line}:" in res.stderr and why in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_evaluate_pad_refuses_options_out_of_range_before_reading_anything(pad_run):
    from tests.conftest import run_cli

    tmp_path = pad_run[0]
    for option, why in (
        (["--still-hold", "0"], "--still-hold: expected 1 to 300 frames, found 0"),
        (["--margin", "1.5"], "--margin: expected 0 to 0.99, found 1.5"),
    ):
        res = run_cli(
            "kiosk-enroll",
            "-q",
            "-c",
            str(tmp_path / "kiosk.yaml"),
            "evaluate-pad",
            str(tmp_path / "labels.csv"),
            "--no-progress",
            *option,
        )
        assert res.returncode == 2 and why in res.stderr and "Traceback" not in res.stderr, res.stderr
