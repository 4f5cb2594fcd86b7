"""Learned liveness plumbing with small models the tests build (crop, scale, colour order, averaging,
threshold, fail closed), and the liveness rules of the decision policy."""

from __future__ import annotations

import numpy as np
import pytest

from kiosk.config import config_from_mapping
from kiosk.errors import ModelError
from kiosk.pipeline.policy import DecisionPolicy
from kiosk.pipeline.tracking import Track
from kiosk.store.gallery import Match
from kiosk.vision.liveness import PadEngine, crop_box, scale_from_name
from kiosk.vision.models import runtime
from tests.pad_models import constant_pad_model, red_is_real_model


def pad_engine(tmp_path, models: list) -> PadEngine:
    cfg = config_from_mapping({"models": {"pad": models}, "pad": {"enabled": True}}, base_dir=tmp_path)
    return PadEngine.from_config(cfg, runtime.plan_providers("cpu"))


def scene() -> tuple[np.ndarray, np.ndarray]:
    """A red face box (100x100 at 270,190) on a blue frame: a tight crop is red, a 4x crop mostly blue."""
    img = np.zeros((480, 640, 3), np.uint8)
    img[:] = (255, 0, 0)  # BGR blue
    img[190:290, 270:370] = (0, 0, 255)  # BGR red
    return img, np.array([[270, 190, 370, 290]], np.float32)


def test_crop_box_enlarges_about_the_centre_and_stays_inside_the_frame():
    assert crop_box(np.array([270, 190, 370, 290]), 2.0, 640, 480) == (220, 140, 420, 340)
    x1, y1, x2, y2 = crop_box(np.array([0, 0, 100, 100]), 2.7, 640, 480)  # at the corner: shifted in
    assert (x1, y1) == (0, 0) and x2 - x1 == 270 and y2 - y1 == 270
    x1, y1, x2, y2 = crop_box(np.array([200, 100, 500, 400]), 4.0, 640, 480)  # too big: scale limited
    assert 0 <= x1 and 0 <= y1 and x2 <= 639 and y2 <= 479 and y2 - y1 == 479 - 0
    assert scale_from_name(__import__("pathlib").Path("2.7_80x80_MiniFASNetV2.onnx")) == 2.7
    assert scale_from_name(__import__("pathlib").Path("MiniFASNetV1SE.onnx")) == 4.0


def test_scale_and_colour_order_reach_the_model(tmp_path):
    img, box = scene()
    red = red_is_real_model(tmp_path / "red.onnx")
    tight = pad_engine(tmp_path, [{"path": "red.onnx", "scale": 1.0}])
    wide = pad_engine(tmp_path, [{"path": "red.onnx", "scale": 4.0}])
    swapped = pad_engine(tmp_path, [{"path": "red.onnx", "scale": 1.0, "colour": "rgb"}])
    assert red.exists()
    assert tight.score(img, box)[0][0] > 0.99  # the crop is the red face: real
    assert wide.score(img, box)[0][0] < 0.1  # 4x the box: mostly blue background
    assert swapped.score(img, box)[0][0] < 0.01  # the same crop handed over as RGB


def test_several_models_are_averaged_and_each_is_reported(tmp_path):
    constant_pad_model(tmp_path / "2.7_80x80_Live.onnx", 0.9)
    constant_pad_model(tmp_path / "4.0_80x80_Fake.onnx", 0.1)
    constant_pad_model(tmp_path / "2.7_128x128_TwoClass.onnx", 0.8, classes=2, size=128)
    img, box = scene()
    mean, each = pad_engine(tmp_path, ["2.7_80x80_Live.onnx", "4.0_80x80_Fake.onnx"]).score(img, np.repeat(box, 2, 0))
    assert mean == pytest.approx([0.5, 0.5], abs=1e-5)
    assert each["2.7_80x80_Live.onnx"] == pytest.approx([0.9, 0.9], abs=1e-5)
    two = pad_engine(tmp_path, ["2.7_128x128_TwoClass.onnx"])
    assert two.models[0].size == 128 and two.score(img, box)[0][0] == pytest.approx(0.8, abs=1e-5)


def test_a_broken_or_foreign_model_file_is_a_clear_error(tmp_path):
    (tmp_path / "2.7_junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        pad_engine(tmp_path, ["2.7_junk.onnx"])
    with pytest.raises(ModelError, match="model file not found"):
        pad_engine(tmp_path, ["2.7_missing.onnx"])
    with pytest.raises(ModelError, match="not a regular file"):  # a device is refused, not read for ever
        pad_engine(tmp_path, [{"path": "/dev/zero", "scale": 2.7}])
    constant_pad_model(tmp_path / "odd.onnx", 0.9)
    with pytest.raises(ModelError, match="give its crop scale"):
        pad_engine(tmp_path, ["odd.onnx"])
    from kiosk.vision.models.pack import default_pack_dir
    with pytest.raises(ModelError, match="does not look like a liveness model"):
        pad_engine(tmp_path, [str(default_pack_dir() / "w600k_mbf.onnx")])


def _policy(**pad) -> DecisionPolicy:
    cfg = config_from_mapping({"models": {"pad": ["x.onnx"]}, "pad": {"enabled": True, **pad},
                               "policy": {"accept_frames": 3, "reject_after_frames": 8}})
    return DecisionPolicy(cfg.policy, cfg.pad)


def _feed(policy: DecisionPolicy, lives: list, score: float = 0.8, t0: float = 100.0, dt: float = 0.1):
    track = Track(1, "cam", np.zeros(4, np.float32), 0.0)
    match = Match("P1", "Pat", score, None, -1.0)
    for i, live in enumerate(lives):
        d = policy.observe(track, "A1", match, t0 + i * dt, i, live=live)
        if d is not None:
            return i, d
    return None, policy.check_timeout(track, t0 + len(lives) * dt)


def test_liveness_rules_accept_reject_wait_and_fail_closed():
    i, d = _feed(_policy(), [0.9, 0.8, 0.95])
    assert d.type == "accept" and i == 2 and d.liveness_score == pytest.approx(0.8833, abs=1e-3)
    i, d = _feed(_policy(), [0.2, 0.1, 0.3])  # a print: rejected as soon as the evidence is in
    assert (d.type, d.reason, i) == ("reject", "presentation_attack", 2) and d.liveness_frames == 3
    # The model fails on every frame (NaN): the accept waits pad.max_wait_s on the frame clock, then fails closed.
    i, d = _feed(_policy(max_wait_s=0.5), [float("nan")] * 12)
    assert (d.type, d.reason) == ("reject", "liveness_unverified") and d.liveness_score is None
    # A late score comes in time: accepted after waiting.
    i, d = _feed(_policy(max_wait_s=0.5), [float("nan"), float("nan"), 0.9, 0.9, 0.9])
    assert d.type == "accept" and i == 4
    # Liveness off: the same print is accepted (it is the liveness check that refuses it).
    cfg = config_from_mapping({"policy": {"accept_frames": 3}})
    i, d = _feed(DecisionPolicy(cfg.policy, cfg.pad), [0.2, 0.1, 0.3])
    assert d.type == "accept" and d.liveness_score is None


@pytest.mark.parametrize("pad,expect", [
    ({"enabled": True, "model": 0.05}, ("reject", "presentation_attack")),
    ({"enabled": True, "model": 0.95}, ("accept", None)),
    ({"enabled": False}, ("accept", None)),
    ({"enabled": True, "model": float("nan")}, ("reject", "liveness_unverified")),  # a model that fails: closed
])
def test_liveness_decides_in_the_running_system(tmp_path, engine, photos, pad, expect):
    """Real processes on a video of Yao walking up (made by moving a photo: a print attack). With a model that
    calls it an attack: rejected `presentation_attack`, never accepted; with one that calls it live: accepted,
    the event carrying the score; liveness off: accepted (so it is the liveness check that refused it)."""
    import json as _json

    from kiosk.tools.scenes import Walk
    from tests.conftest import run_cli
    from tests.pipeline_helpers import audit, kiosk, make_video, people, stop, write_config

    crops = people(engine, photos)
    make_video(tmp_path / "a1.avi", [Walk(crops["yao"], start=0, frames=60, w0=80, w1=180)], seconds=2.5)
    extra: dict = {"pad": {"enabled": pad["enabled"]}}
    if pad["enabled"]:
        constant_pad_model(tmp_path / "2.7_80x80_Test.onnx", pad["model"])
        extra["models"] = {"pad": ["2.7_80x80_Test.onnx"]}
    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": False}],
                          **extra)
    assert run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO",
                   str(photos["yaoming.jpg"])).returncode == 0
    proc = kiosk(config, "run", "--exit-on-eof", quiet=False)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    decisions = [e for e in audit(config) if e["type"] in ("accept", "reject")]
    assert [(e["type"], e["reason"]) for e in decisions] == [expect], _json.dumps(decisions)
    score = decisions[0]["liveness_score"]
    if pad["enabled"] and pad["model"] != pad["model"]:  # NaN: no frame got a score
        assert score is None and "liveness model failed" in err
    elif pad["enabled"]:
        assert score == pytest.approx(pad["model"], abs=1e-3) and decisions[0]["liveness_frames"] >= 3
        assert "liveness is OFF" not in err
    else:
        assert score is None and "liveness is OFF" in err


def test_the_attack_video_script_makes_prints_and_screens_a_detector_finds(tmp_path, engine, photos):
    import subprocess
    import sys

    import cv2

    from tests.conftest import REPO_ROOT

    widths = {}
    for kind, extra in (("print", []), ("screen", ["--close-up"])):
        out = tmp_path / f"{kind}.avi"
        res = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_attack_video.py"), "--type", kind,
                              "--seconds", "1.5", "--seed", "7", *extra, "--out", str(out),
                              str(photos["yaoming.jpg"])], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and f"{kind} attack, 45 frames" in res.stdout, res.stderr
        cap = cv2.VideoCapture(str(out))
        found = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            faces = engine.detector.detect(frame)
            found.append(float(faces.largest().widths[0]) if len(faces) else 0.0)
        assert len(found) == 45 and sum(w > 0 for w in found) >= 36, found
        widths[kind] = found
    assert widths["screen"][-1] > 0.3 * 640 > widths["print"][-1]  # the close-up ends with a face filling the view
    res = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_attack_video.py"), "--type", "print",
                          "--out", str(tmp_path / "x.avi"), str(tmp_path / "missing.jpg")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_evaluate_pad_counts_apcer_per_type_and_bpcer(tmp_path, engine, photos):
    """Videos whose colour the test model reads as live (red) or attack (blue): the counts are known."""
    import json as _json

    import cv2

    from kiosk.tools.scenes import Walk
    from tests.conftest import run_cli
    from tests.pipeline_helpers import make_video, people

    crops = people(engine, photos)
    yao = crops["yao"]
    red, blue = yao.copy(), yao.copy()
    red[..., 2], blue[..., 0] = 255, 255  # BGR: a red or a blue cast over the whole crop
    rows = ["video,label"]
    for name, crop, label in (("bf1", red, "bona_fide"), ("bf2", red, "bona_fide"), ("bf3", blue, "bona_fide"),
                              ("p1", blue, "print"), ("p2", red, "print"), ("s1", blue, "screen")):
        make_video(tmp_path / f"{name}.avi", [Walk(crop, start=0, frames=20, w0=120, w1=160)], seconds=0.7)
        rows.append(f"{name}.avi,{label}")
    make_video(tmp_path / "empty.avi", [], seconds=0.3)
    rows.append("empty.avi,print")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    red_is_real_model(tmp_path / "1.0_80x80_Red.onnx")
    (tmp_path / "kiosk.yaml").write_text("models: {pad: [1.0_80x80_Red.onnx]}\n")
    res = run_cli("kiosk-enroll", "-q", "-c", str(tmp_path / "kiosk.yaml"), "evaluate-pad",
                  str(tmp_path / "labels.csv"), "--json", "--no-progress")
    assert res.returncode == 0, res.stderr
    report = _json.loads(res.stdout)
    assert report["bona_fide"] == {"videos": 3, "rejected": 1, "bpcer": pytest.approx(1 / 3)}
    assert report["attacks"]["print"] == {"videos": 2, "accepted": 1, "apcer": 0.5}
    assert report["attacks"]["screen"] == {"videos": 1, "accepted": 0, "apcer": 0.0}
    assert report["at_bpcer"] == {"0.01": None, "0.05": None}  # 3 bona fide videos cannot measure those
    assert [item["line"] for item in report["no_face"]] == [8]
    (tmp_path / "bad.csv").write_text("video,label\nnope.avi,print\n")
    res = run_cli("kiosk-enroll", "-q", "-c", str(tmp_path / "kiosk.yaml"), "evaluate-pad", str(tmp_path / "bad.csv"))
    assert res.returncode == 2 and "line 2" in res.stderr and "no such video" in res.stderr


def test_child_configs_carry_the_liveness_models_with_absolute_paths(tmp_path):
    """bench and demo write the operator's models: into their children's config (YAML)."""
    import yaml

    from kiosk.config import load_config, models_section

    (tmp_path / "site").mkdir()
    site = tmp_path / "site" / "kiosk.yaml"
    site.write_text("models: {pad: [m/2.7_a.onnx, {path: m/b.onnx, scale: 4.0, colour: rgb}]}\n")
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"models": models_section(load_config(site))}))
    pads = load_config(child).models.pad
    assert str(pads[0]) == str(tmp_path / "site" / "m" / "2.7_a.onnx")
    assert (str(pads[1].path), pads[1].scale, pads[1].colour) == (str(tmp_path / "site" / "m" / "b.onnx"), 4.0, "rgb")
