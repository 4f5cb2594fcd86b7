"""Liveness: the checks on synthetic evidence (depth geometry, border edges), the texture-model plumbing with small
models the tests build (crop, scale, colour order, averaging, threshold, fail closed), the fusion rules in the
decision policy, and the acceptance runs with real processes and the shipped texture models (print and screen
attacks made from a photo, refused; a passenger made from a photo, accepted: what that proves is said there)."""

from __future__ import annotations

import numpy as np
import pytest

from kiosk.config import config_from_mapping
from kiosk.errors import ModelError
from kiosk.pipeline.policy import DecisionPolicy
from kiosk.pipeline.tracking import Track
from kiosk.store.gallery import Match
from kiosk.vision.depth_check import PRIOR, DepthEvidence
from kiosk.vision.liveness import PadEngine, PadObservation, crop_box, scale_from_name
from kiosk.vision.liveness_checks import STEADY_DIP, TEXTURE_FRAMES, BorderView, LivenessCheck
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


def _template(rng: np.random.Generator) -> np.ndarray:
    """A frontal face's 106 landmarks in face units (2d106 layout: outline, eyes with their lids, brows, lips, nose),
    each point jittered a little so no two faces are alike."""
    pts = np.zeros((106, 2))
    a = np.linspace(np.radians(200), np.radians(-20), 33)
    pts[0:33] = np.stack([0.45 * np.cos(a), -0.55 * np.sin(a) + 0.05], axis=1)  # the outline, over the chin
    for eye, cx in ((slice(33, 43), -0.2), (slice(87, 97), 0.2)):
        e = np.zeros((10, 2))
        lower, upper = [0, 3, 4], [7, 8, 9]  # (40, 33), (41, 36), (42, 37) and their mirror: upper vs lower lid
        e[lower] = [[0, 0.03], [-0.05, 0.025], [0.05, 0.025]]
        e[upper] = [[0, -0.03], [-0.05, -0.025], [0.05, -0.025]]
        e[[2, 6]] = [[-0.09, 0], [0.09, 0]]  # corners
        e[[1, 5]] = [[0, 0], [0, 0.005]]
        pts[eye] = e + [cx, -0.1]
    for brow, cx in ((slice(43, 52), -0.2), (slice(97, 106), 0.2)):
        pts[brow] = np.stack([cx + np.linspace(-0.1, 0.1, 9), np.full(9, -0.22)], axis=1)
    m = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    pts[52:72] = np.stack([0.14 * np.cos(m), 0.3 + 0.05 * np.sin(m)], axis=1)
    pts[[62, 71]] = [[0, 0.29], [0, 0.26]]  # inner and outer upper lip
    pts[[60, 53]] = [[0, 0.31], [0, 0.35]]  # inner and outer lower lip
    pts[72:87] = np.stack([np.linspace(-0.04, 0.04, 15), np.linspace(-0.05, 0.18, 15)], axis=1)
    return pts + rng.normal(0, 0.004, pts.shape)


def _points(kind: str, n: int = 40, turn_deg: float = 15.0, noise: float = 0.0, seed: int = 0) -> list:
    """Synthetic landmarks of a face walking up (growing, drifting) while it turns: a 'head' (each point at
    its generic depth), a 'card' (a flat print: every point at depth 0, seen with perspective close up), 'still'
    (no turn at all) or 'blink' (still, but the eyes close for 4 frames from frame 10 and the mouth opens a
    little from frame 20: the face's own movement, which no print shows)."""
    rng = np.random.default_rng(seed)
    xy = _template(rng)
    depth = 0.9 * PRIOR if kind == "head" else np.zeros(106)
    out = []
    for i in range(n):
        t = i / 30.0
        yaw = 0.0 if kind in ("still", "blink") else np.radians(turn_deg) * np.sin(2 * np.pi * 0.6 * t)
        pitch = 0.0 if kind in ("still", "blink") else np.radians(0.4 * turn_deg) * np.sin(2 * np.pi * 0.45 * t + 1)
        face = xy.copy()
        if kind == "blink" and 10 <= i < 14:  # upper lids down onto the lower ones
            for upper, lower in ((40, 33), (41, 36), (42, 37), (94, 87), (95, 90), (96, 91)):
                face[upper] = face[lower] - [0, 0.004]
        if kind == "blink" and i >= 20:
            face[[60, 53]] += [0, 0.08]  # the lower lip drops
        x = face[:, 0] * np.cos(yaw) + depth * np.sin(yaw)
        z = -face[:, 0] * np.sin(yaw) + depth * np.cos(yaw)
        y = face[:, 1] * np.cos(pitch) - z * np.sin(pitch)
        z = face[:, 1] * np.sin(pitch) + z * np.cos(pitch)
        scale = 120 + 3 * i
        persp = 1.0 / (1.0 - z * 0.25) if kind == "card" else 1.0  # a close-up card: the near side looks bigger
        pts = np.stack([x * persp, y * persp], axis=1) * scale + [320 + i, 240 - 0.5 * i]
        out.append(pts + rng.normal(0, noise * scale, pts.shape))
    return out


def test_the_motion_check_sees_a_blink_and_the_lips_never_a_rigid_face_however_it_is_held():
    """Expression frames: a blink and a mouth opening are what no homography of the face's rigid points explains;
    a print tilted far in perspective, a head turning, a face keeping still, all with landmark noise, show none.
    Too small a face brings no evidence."""
    from kiosk.vision.expression_check import EVIDENCE_FRAMES, ExpressionEvidence

    def seen(points, width: float = 200.0) -> ExpressionEvidence:
        ev = ExpressionEvidence()
        for p in points:
            ev.add(p, width)
        return ev

    blink = seen(_points("blink", noise=0.002))
    assert blink.live and blink.cue == "eye" and blink.evidence_frames >= EVIDENCE_FRAMES
    assert blink.peak[0] > 0.1 and blink.peak[1] > 0.14  # the eyes shut; then the lip dropped
    eyes_only = seen(_points("blink", n=18, noise=0.002))
    assert eyes_only.live and eyes_only.cue == "eye"
    for kind, turn in (("card", 35.0), ("card", 15.0), ("still", 0.0), ("head", 15.0)):
        for seed in range(3):
            rigid = seen(_points(kind, turn_deg=turn, noise=0.002, seed=seed))
            assert not rigid.live and rigid.evidence_frames == 0, (kind, turn, seed, rigid.as_dict())
    assert not seen(_points("blink", noise=0.002), width=60.0).live and seen(_points("blink"), width=60.0).frames == 0


def test_the_planar_check_tells_a_moving_head_from_a_card_moved_by_hand_and_says_nothing_of_a_still_face():
    """A head that turns as it walks up leaves what no homography of its rigid points explains (parallax); a card
    moved, tilted and brought close in perspective leaves only the landmarks' noise, however far it turns; a face
    that keeps still has not moved far enough to be judged. It never accuses."""
    from kiosk.vision.planar_check import MOVED_FRAMES, SOLID, PlanarEvidence

    def seen(points, width: float = 200.0) -> PlanarEvidence:
        ev = PlanarEvidence()
        for p in points:
            ev.add(p, width)
        return ev

    for seed in range(3):
        head = seen(_points("head", turn_deg=15.0, noise=0.002, seed=seed))
        assert head.live and head.residual >= SOLID and len(head.residuals) >= MOVED_FRAMES, head.as_dict()
        assert head.as_dict()["verdict"] == "live"
        for turn in (35.0, 15.0, 5.0):
            card = seen(_points("card", turn_deg=turn, noise=0.002, seed=seed))
            assert card.residual is not None and card.residual < SOLID and not card.live, (turn, card.as_dict())
            assert card.score is not None and card.score < 0.5
    rng = np.random.default_rng(4)
    face = _points("still", n=1)[0]
    still = seen([face + rng.normal(0, 0.4, face.shape) for _ in range(60)])  # stands still: never moved far
    assert still.residual is None and not still.live and still.score is None and still.reach < 0.1
    walked = seen(_points("blink", noise=0.002))  # walks up, blinks and speaks, no turn: moved, but as a plane would
    assert walked.residual is not None and not walked.live
    # landmarks that jump about (blur, a screen's moire) stand out from no plane: their own noise is the floor
    assert not seen(_points("card", turn_deg=15.0, noise=0.01)).live
    assert seen(_points("head", noise=0.002), width=60.0).frames == 0  # too small a face: nothing measured


def test_the_depth_check_tells_a_turning_head_from_a_card_turned_far_and_never_accuses_on_weak_evidence():
    def verdict(points, width: float = 200.0) -> tuple:
        ev = DepthEvidence()
        for p in points:
            ev.add(p, width)
        return ev.verdict, ev.live_frames, ev.strong_flat_frames

    assert verdict(_points("head", noise=0.002))[0] == "live"
    assert verdict(_points("card", turn_deg=35, noise=0.002))[0] == "attack"  # a card turned ~35 degrees, no parallax
    # A card turned 15 degrees is flat-ish, as real faces talking are: no accusation on evidence that weak.
    weak = verdict(_points("card", turn_deg=15, noise=0.002))
    assert weak[0] is None and weak[2] == 0
    assert verdict(_points("card", turn_deg=35, noise=0.002), width=60.0)[0] is None  # too small a face to accuse
    assert verdict(_points("still", noise=0.002)) == (None, 0, 0)  # never turned: no verdict here
    # Landmarks that jump about (a screen's moire, blur) show neither: no verdict rather than a wrong one.
    assert verdict(_points("head", noise=0.03))[0] is None
    assert verdict(_points("card", turn_deg=35, noise=0.03))[0] is None


def _border_view(face: tuple[float, float, float], lines: list[tuple[float, float]]) -> BorderView:
    """Lines given in image terms (angle, signed distance from the image origin, px) seen around `face`."""
    cx, cy, w = face
    out = []
    for theta, dist in lines:
        nx, ny = -np.sin(theta), np.cos(theta)
        out.append((theta, (dist - (cx * nx + cy * ny)) / w, 1.0))
    return BorderView(np.array(out, np.float64).reshape(-1, 3), face)


def test_the_border_check_accuses_edges_that_move_with_the_face_not_the_scene_s():
    """A card's edge 1.2 face widths right of the face moves with it; a door frame's edge stays put in the image;
    a face that does not move gives no evidence either way."""
    from kiosk.config import PadConfig
    from kiosk.vision.liveness_checks import BorderCheck, PadObservation, attached_edges

    def faces(n: int, moving: bool) -> list[tuple[float, float, float]]:
        return [(300 + (6 * i if moving else 0), 240, 100 + (2 * i if moving else 0)) for i in range(n)]

    card = [_border_view(f, [(np.pi / 2, -(f[0] + 1.2 * f[2]))]) for f in faces(12, True)]  # x = cx + 1.2 w
    door = [_border_view(f, [(np.pi / 2, -450.0)]) for f in faces(12, True)]  # x = 450 whatever the face does
    still_card = [_border_view(f, [(np.pi / 2, -(f[0] + 1.2 * f[2]))]) for f in faces(12, False)]
    assert attached_edges(card[9], card[0]) == 1 and attached_edges(door[9], door[0]) == 0
    assert attached_edges(still_card[9], still_card[0]) == 0  # no motion: cannot tell a card from the scene

    def judged(views) -> tuple:
        check = BorderCheck(PadConfig())
        for v in views:
            check.add(PadObservation(None, border=v))
        return check.verdict, check.attached_frames

    assert judged(card)[0] == "attack"
    assert judged(door) == (None, 0) and judged(still_card) == (None, 0)


def test_a_track_that_showed_a_few_attached_edges_waits_for_the_border_check_before_it_can_be_live():
    """A card whose edge has moved with the face in fewer than BORDER_FRAMES frames is not yet an attack, but a
    texture score that says live must not accept it meanwhile: the border check holds the track until the edge is
    confirmed or has gone unseen for BORDER_CLEAR frames. A track that never showed such an edge never waits."""
    from kiosk.config import PadConfig
    from kiosk.vision.liveness import fuse
    from kiosk.vision.liveness_checks import (
        BORDER_CLEAR,
        BorderCheck,
        PadObservation,
        TextureCheck,
    )

    faces = [(300 + 6 * i, 240, 100 + 2 * i) for i in range(40)]
    card = [_border_view(f, [(np.pi / 2, -(f[0] + 1.2 * f[2]))]) for f in faces]
    bare = [_border_view(f, []) for f in faces]
    cfg = PadConfig()

    def run(views) -> list:
        texture, border = TextureCheck(cfg), BorderCheck(cfg)
        out = []
        for i, v in enumerate(views):
            obs = PadObservation(None, texture=0.99, width=120.0, border=v)
            texture.add(obs)
            border.add(obs)
            out.append((fuse([texture, border], i + 1, cfg.min_frames), border.attached_frames, border.has_evidence))
        return out

    # the card's edge is in view for 11 frames (10 of them attached: enough to accuse), then leaves the patch
    assert run(card[:11] + bare[11:])[10][0] == "attack"
    # in view for only 4 frames (a few attached ones, not enough): the texture's "live" waits, then counts
    brief = run(card[:4] + bare[4:])
    seen = min(i for i, (_, attached, _) in enumerate(brief) if attached == brief[-1][1])
    assert 0 < brief[-1][1] < 4
    assert all(v is None and not ev for v, _, ev in brief[seen : seen + BORDER_CLEAR])
    assert brief[seen + BORDER_CLEAR][0] == "live"
    # no edge ever: live as soon as the texture and pad.min_frames allow
    assert [v for v, _, _ in run(bare)].index("live") == cfg.min_frames - 1


def _policy(textured: bool = True, **pad) -> DecisionPolicy:
    cfg = config_from_mapping(
        {
            "pad": {"enabled": True, **pad},
            "policy": {"accept_frames": 3, "reject_after_frames": 100, "decision_timeout_s": 60},
        }
    )
    return DecisionPolicy(cfg.policy, cfg.pad, textured=textured)


def _feed(policy: DecisionPolicy, observations: list, score: float = 0.8, t0: float = 100.0, dt: float = 1 / 30):
    track = Track(1, "cam", np.zeros(4, np.float32), 0.0)
    match = Match("P1", "Pat", score, None, -1.0)
    for i, obs in enumerate(observations):
        d = policy.observe(track, "A1", match, t0 + i * dt, i, live=obs)
        if d is not None:
            return i, d
    return None, policy.check_timeout(track, t0 + len(observations) * dt)


def _obs(kind: str, texture: float | None = None, chroma: float = 0.0, n: int = 40, width: float = 200.0, **kw) -> list:
    return [PadObservation(p, texture, chroma, width) for p in _points(kind, n=n, noise=0.002, **kw)]


def test_fusion_rules_need_texture_and_movement_reject_accusations_and_fail_closed():
    from kiosk.vision.planar_check import SOLID as PLANAR_SOLID

    # A passenger who stands still (no turn at all), blinks at frame 10, with live texture: accepted at the
    # blink's third frame; both kinds of evidence decided it.
    i, d = _feed(_policy(), _obs("blink", texture=0.99))
    assert d.type == "accept" and i == 12  # the identity is there at frame 2; the blink shows at 10, 11 and 12
    assert d.seq == i and d.liveness_checks["decided_by"] == ["texture", "motion"]
    assert d.liveness_checks["texture"] == {"verdict": "live", "frames": 13, "score": 0.99, "steady": 0.99}
    assert d.liveness_checks["motion"]["cue"] == "eye"
    # The same face without its blink is a photo as far as anyone can tell: live texture is not enough, the
    # accept waits and fails closed.
    i, d = _feed(_policy(max_wait_s=0.5), _obs("still", texture=0.99))
    assert (d.type, d.reason) == ("reject", "liveness_unverified") and i == 2 + 15
    assert d.liveness_checks["texture"]["verdict"] == "live" and d.liveness_checks["motion"]["verdict"] is None
    # A head that turns as it walks up, without a blink: it moved as no plane does, so the planar check vouches for
    # its movement (the depth check's linearised parallax is reported, and vouches for nothing).
    i, d = _feed(_policy(), _obs("head", texture=0.99))
    assert d.type == "accept" and d.liveness_checks["decided_by"] == ["texture", "planar"]
    assert d.liveness_checks["planar"]["residual"] >= PLANAR_SOLID and d.liveness_checks["motion"]["verdict"] is None
    # A card walked up, tilted and turned in perspective with live texture: it moved, but as a plane does; no check
    # vouches for its movement, and the accept fails closed (turned far, the depth check accuses it).
    for turn in (5.0, 15.0):
        i, d = _feed(_policy(max_wait_s=0.5), _obs("card", texture=0.99, turn_deg=turn))
        assert (d.type, d.reason) == ("reject", "liveness_unverified"), (turn, d.liveness_checks)
        assert d.liveness_checks["planar"]["verdict"] is None and d.liveness_checks["planar"]["moved_frames"] >= 5
    # Texture far below the bar accuses at once, however the face moves; between attack_below and the threshold
    # (doubtful) the accept waits and fails closed, even with a blink.
    i, d = _feed(_policy(), _obs("blink", texture=0.02))
    assert (d.type, d.reason, i) == ("reject", "presentation_attack", TEXTURE_FRAMES - 1)
    assert d.liveness_checks["decided_by"] == ["texture"]
    i, d = _feed(_policy(max_wait_s=0.5), _obs("blink", texture=0.6))
    assert (d.type, d.reason) == ("reject", "liveness_unverified") and i == 2 + 15
    i, d = _feed(_policy(max_wait_s=0.5), _obs("head", texture=0.6))
    assert (d.type, d.reason) == ("reject", "liveness_unverified")
    # A mean over the threshold that comes and goes (a screen whose glare and moire the hand moves: one frame in
    # five seen as a screen) is not steady evidence: it waits and fails closed, blink or not; the same mean held
    # steadily is accepted.
    flicker = [
        PadObservation(o.landmarks, 0.55 if k % 5 == 4 else 1.0, 0.0, o.width) for k, o in enumerate(_obs("blink"))
    ]
    assert sum(o.texture for o in flicker[:25]) / 25 >= 0.9  # mean 0.91
    i, d = _feed(_policy(threshold=0.9, max_wait_s=0.5), flicker)
    assert (d.type, d.reason) == ("reject", "liveness_unverified"), d.liveness_checks["texture"]
    assert d.liveness_checks["texture"]["score"] >= 0.9 and d.liveness_checks["texture"]["steady"] < 0.9 - STEADY_DIP
    i, d = _feed(_policy(threshold=0.9), _obs("blink", texture=0.91))
    assert d.type == "accept" and d.liveness_checks["decided_by"] == ["texture", "motion"]
    # Texture on faces too small to judge (under 90 px) counts for nothing: the accept waits.
    i, d = _feed(_policy(max_wait_s=0.5), _obs("blink", texture=0.99, width=60.0))
    assert (d.type, d.reason) == ("reject", "liveness_unverified")
    # One accuser with strong evidence is enough, whatever the texture says.
    i, d = _feed(_policy(), _obs("blink", texture=0.99, chroma=20.0))  # a screen's colour fringes
    assert (d.type, d.reason, i) == ("reject", "presentation_attack", 2)
    assert d.liveness_checks["decided_by"] == ["screen"]
    i, d = _feed(_policy(), _obs("card", texture=0.6, turn_deg=35))  # unsure texture, a card turned far
    assert (d.type, d.reason) == ("reject", "presentation_attack") and d.liveness_checks["decided_by"] == ["depth"]
    # No evidence (a model that fails on every frame): the texture check is required, so the accept waits
    # pad.max_wait_s on the frame clock, then fails closed, however the face moves.
    i, d = _feed(_policy(max_wait_s=0.5), _obs("blink", texture=float("nan")))
    assert (d.type, d.reason) == ("reject", "liveness_unverified") and i == 2 + 15
    i, d = _feed(_policy(max_wait_s=0.5), [None] * 40)
    assert (d.type, d.reason) == ("reject", "liveness_unverified") and d.liveness_score is None
    # Without texture models movement alone vouches (a site's explicit choice: it stops prints, not replays).
    i, d = _feed(_policy(textured=False), _obs("blink"))
    assert d.type == "accept" and d.liveness_checks["decided_by"] == ["motion"] and "texture" not in d.liveness_checks
    i, d = _feed(_policy(textured=False, max_wait_s=0.5), _obs("still"))
    assert (d.type, d.reason) == ("reject", "liveness_unverified")
    # Liveness off: the same card is accepted (it is the liveness check that refuses it).
    cfg = config_from_mapping({"policy": {"accept_frames": 3}, "pad": {"enabled": False}})
    i, d = _feed(DecisionPolicy(cfg.policy, cfg.pad), _obs("card", turn_deg=35))
    assert d.type == "accept" and i == 2 and d.liveness_score is None and d.liveness_checks is None


class BlinkCheck(LivenessCheck):
    """A site's own cue, named in pad.checks as tests.test_liveness:BlinkCheck: accuses every face."""

    name = "blink"

    @property
    def verdict(self):
        return "attack" if self.frames >= 2 else None


def test_a_site_s_own_check_is_one_class_and_one_config_entry(tmp_path):
    i, d = _feed(_policy(checks=["texture", "motion", "tests.test_liveness:BlinkCheck"]), _obs("blink", texture=0.99))
    assert (d.type, d.reason, i) == ("reject", "presentation_attack", 1) and d.liveness_checks["decided_by"] == [
        "blink"
    ]
    from tests.conftest import run_cli

    for checks, why in (
        (["texture", "nosuch"], "unknown liveness check 'nosuch'"),
        (["tests.test_liveness:Nope"], "cannot be loaded"),
        (["screen", "border"], "no check here can say live"),
    ):
        (tmp_path / "kiosk.yaml").write_text(f"pad: {{checks: {checks}}}\n")
        (tmp_path / "labels.csv").write_text("video,label\nx.avi,print\n")
        res = run_cli("kiosk-enroll", "-c", str(tmp_path / "kiosk.yaml"), "evaluate-pad", str(tmp_path / "labels.csv"))
        assert res.returncode == 2 and why in res.stderr and "pad.checks" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def _enroll_yao_and_run(config, photos, timeout: float = 120) -> str:
    """Enroll Yao, run the site to the end of its videos (real processes); the run's stderr."""
    from tests.conftest import run_cli
    from tests.pipeline_helpers import kiosk, stop

    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    proc = kiosk(config, "run", "--exit-on-eof", quiet=False)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    return err


def _run_gates(tmp_path, photos, names: list[str], folder_name: str, **extra) -> tuple[dict[str, list], str]:
    """One `kiosk run` of the gates `names` (their videos `tmp_path/NAME.avi`) in a folder of its own, with Yao
    enrolled: each gate's decisions (type, reason, liveness checks), and the run's stderr."""
    from tests.pipeline_helpers import audit, write_config

    folder = tmp_path / folder_name
    folder.mkdir()
    for name in names:
        (folder / f"{name}.avi").symlink_to(tmp_path / f"{name}.avi")
    cams = [{"id": f"cam-{n}", "gate": n.upper(), "source": f"{n}.avi", "realtime": False} for n in names]
    config = write_config(folder, cams, **extra)
    err = _enroll_yao_and_run(config, photos, timeout=240)
    out: dict[str, list] = {n.upper(): [] for n in names}
    for e in audit(config):
        if e["type"] in ("accept", "reject"):
            out[e["gate_id"]].append((e["type"], e["reason"], e.get("liveness_checks")))
    return out, err


@pytest.mark.parametrize(
    "pad,expect",
    [
        ({"enabled": True, "model": 0.05}, ("reject", "presentation_attack")),
        # the two accepting runs in the slow step: the refusals (fail-closed) stay in the default run
        pytest.param({"enabled": True, "model": 0.99}, ("accept", None), marks=pytest.mark.slow),
        pytest.param({"enabled": False}, ("accept", None), marks=pytest.mark.slow),
        ({"enabled": True, "model": float("nan")}, ("reject", "liveness_unverified")),  # a model that fails: closed
    ],
)
def test_learned_models_decide_in_the_running_system(tmp_path, engine, photos, pad, expect):
    """Real processes on the bona fide stand-in (Yao walking up, his head turning, blinking), `models.pad`
    replacing the shipped models: a model that calls it an attack rejects it `presentation_attack` though the motion
    check says live; one that calls it live: accepted, the event carrying the checks; liveness off: accepted; a
    model that fails: `liveness_unverified` (the texture check is required)."""
    import json as _json

    from kiosk.tools.scenes import Walk
    from kiosk.tools.standin import natural_expressions
    from tests.pipeline_helpers import (
        audit,
        head_turn_of,
        make_video,
        people,
        write_config,
    )

    crops = people(engine, photos)
    make_video(
        tmp_path / "a1.avi",
        [
            Walk(
                crops["yao"],
                start=0,
                frames=75,
                w0=80,
                w1=180,
                turn=head_turn_of(engine, crops["yao"]),
                turn_deg=15,
                expression=natural_expressions(75, seed=1),
            )
        ],
        seconds=2.7,
    )
    extra: dict = {"pad": {"enabled": pad["enabled"]}}
    if pad["enabled"]:
        constant_pad_model(tmp_path / "2.7_80x80_Test.onnx", pad["model"])
        extra["models"] = {"pad": ["2.7_80x80_Test.onnx"]}
    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": False}], **extra)
    err = _enroll_yao_and_run(config, photos)
    decisions = [e for e in audit(config) if e["type"] in ("accept", "reject")]
    assert [(e["type"], e["reason"]) for e in decisions] == [expect], _json.dumps(decisions)
    checks = decisions[0]["liveness_checks"]
    if not pad["enabled"]:
        assert checks is None and decisions[0]["liveness_score"] is None and "liveness is OFF" in err
    elif pad["model"] != pad["model"]:  # NaN: no frame brought evidence
        assert "liveness model failed" in err and checks["depth"]["frames"] == 0
    else:
        assert checks["texture"]["score"] == pytest.approx(pad["model"], abs=1e-3)
        assert checks["decided_by"][0] == "texture" and set(checks) >= {"depth", "motion", "screen"}


def test_a_rigid_close_up_photo_is_never_accepted_a_passenger_standing_still_is_and_columns_accuse_nobody(
    tmp_path, engine, photos
):
    """Real processes, sockets and models. Three gates:

    - PH: Yao's photo held so close it fills the frame, its edges never in view, moved only as one rigid piece
      (kiosk.tools.attacks 'photo'). A clean photo: nothing in its surface gives it away.
    - ST: the bona fide stand-in standing still at the gate (no walk, no head turn), blinking and saying a word.
    - CO: the stand-in walking across the frame past dark columns, a door frame and a beam (strong straight
      edges passing behind and beside the face).

    Run 1, liveness exactly as shipped (no pad section, the shipped texture models): PH is never accepted, CO is
    accused of nothing. Run 2 gives every face live texture evidence (a test texture model that says 0.99 for
    any face: renderings of a photo cannot give real skin texture; the shipped models rightly doubt them): ST is
    accepted on texture and its own movement, PH is still refused (its texture live, but it never moved as a
    living face: fail closed), CO is accepted.

    What this proves: the fusion needs movement evidence beside the texture's, finds it in a blink with no head
    turn, and the default checks leave a face passing columns alone. What it does not prove: anything about real
    people or attacks (README "Liveness" has those, measured on real camera video and real attacks)."""
    import json as _json

    import cv2

    from kiosk.tools.attacks import render_attack
    from kiosk.tools.scenes import Walk, render, standing, write_video
    from kiosk.tools.standin import natural_expressions
    from tests.pipeline_helpers import head_turn_of, people

    yao_photo = cv2.imread(str(photos["yaoming.jpg"]))
    box = engine.detector.detect(yao_photo).largest().boxes[0]
    write_video(tmp_path / "ph.avi", render_attack("photo", yao_photo, box, seed=3, seconds=3.5), 30.0)
    yao = people(engine, photos)["yao"]
    turn = head_turn_of(engine, yao)
    write_video(tmp_path / "st.avi", render([standing(yao, turn, 0, 90, 170.0, seed=2)], 90), 30.0)
    crossing = Walk(
        yao,
        start=0,
        frames=100,
        w0=110,
        w1=170,
        cx=0.2,
        cx1=0.8,
        turn=turn,
        turn_deg=12,
        expression=natural_expressions(100, seed=5),
    )
    write_video(tmp_path / "co.avi", render([crossing], 100, background="columns"), 30.0)

    def run(names: list[str], folder_name: str, **extra) -> dict[str, list]:
        return _run_gates(tmp_path, photos, names, folder_name, **extra)[0]

    shipped = run(["ph", "co"], "shipped", pad={})  # pad: {} is the shipped default, liveness on
    report = _json.dumps(shipped)
    assert shipped["PH"] and all(t == "reject" for t, _, _ in shipped["PH"]), report
    assert shipped["CO"] and all(r != "presentation_attack" for _, r, _ in shipped["CO"]), report
    assert all(c["motion"]["verdict"] is None for _, _, c in shipped["PH"]), report  # it never moved as a face

    constant_pad_model(tmp_path / "2.7_80x80_Live.onnx", 0.99)
    live = run(["ph", "st", "co"], "live", pad={}, models={"pad": [str(tmp_path / "2.7_80x80_Live.onnx")]})
    report = _json.dumps(live)
    assert [(t, r) for t, r, _ in live["PH"]] == [("reject", "liveness_unverified")], report
    assert live["PH"][0][2]["texture"]["verdict"] == "live" and live["PH"][0][2]["motion"]["verdict"] is None
    assert [(t, r) for t, r, _ in live["ST"]] == [("accept", None)], report
    assert live["ST"][0][2]["decided_by"] == ["texture", "motion"] and live["ST"][0][2]["depth"]["live_frames"] == 0
    assert [(t, r) for t, r, _ in live["CO"]] == [("accept", None)], report


@pytest.mark.slow
def test_default_config_refuses_print_and_screen_attacks_and_accepts_a_still_passenger(tmp_path, engine, photos):
    """The acceptance run, real processes and sockets, the default `pad` section (checks texture, depth, motion,
    planar and screen; live needs the texture at pad.threshold AND movement: a blink, or a head's movement that no
    plane's explains). Five gates: two prints of Yao's photo held up and moved (one ending in a close-up that fills
    most of the frame), a phone screen showing it (close-up), and two passengers: L1 the stand-in whose head turns
    as it walks up, blinking, L2 the stand-in walking up without turning its head at all, but blinking and saying a
    word.

    Run 1, liveness exactly as shipped (no `models.pad`: the MiniFASNet texture models inside the package): no
    attack is accepted (the far print accused by its texture, the screen by its fringes, the close-up print, its
    texture in doubt, failing closed), none ever moved as a living face, and nothing accuses the passengers, whose
    movement checks vouch. The passengers are renderings of Yao's photo, which the shipped models rightly doubt
    (about 0.77 when this was written, under pad.threshold 0.95): they are not accepted either (they fail closed,
    `liveness_unverified`), which this run does not assert.

    Run 2 gives every face live texture evidence (a test texture model that says 0.99 for any face): both
    passengers are accepted on texture and their movement (L1's head turn, which no plane's motion explains, as it
    walks up: the planar check; L2's blink: the motion check); the prints, whose texture is now live too, are
    still refused `liveness_unverified` (they never move as a living face: rigid, and as a plane does). Run 3, the
    same prints with `pad: {enabled: false}`: accepted, so it is the liveness check that refused them.

    What the passengers prove: the fusion finds movement evidence with no head turn, and the default checks leave
    a face alone that shows no fringes and no far-turned plane. They say nothing about how often a real person is
    refused (README "Liveness" has that, measured on real camera video)."""
    import json as _json

    import cv2

    from kiosk.tools.attacks import render_attack
    from kiosk.tools.scenes import Walk, write_video
    from kiosk.tools.standin import natural_expressions
    from tests.pipeline_helpers import (
        head_turn_of,
        make_video,
        people,
    )

    yao_photo = cv2.imread(str(photos["yaoming.jpg"]))
    box = engine.detector.detect(yao_photo).largest().boxes[0]
    attacks = {"p1": ("print", 1, False), "p2": ("print", 6, True), "s1": ("screen", 2, True)}
    for name, (kind, seed, close) in attacks.items():
        write_video(
            tmp_path / f"{name}.avi", render_attack(kind, yao_photo, box, seed=seed, close_up=close, seconds=2.5), 30.0
        )
    yao = people(engine, photos)["yao"]
    turn = head_turn_of(engine, yao)
    make_video(
        tmp_path / "l1.avi",
        [
            Walk(
                yao,
                start=0,
                frames=75,
                w0=80,
                w1=180,
                turn=turn,
                turn_deg=15,
                expression=natural_expressions(75, seed=3),
            )
        ],
        seconds=2.7,
    )
    make_video(
        tmp_path / "l2.avi",
        [
            Walk(
                yao,
                start=0,
                frames=75,
                w0=100,
                w1=180,
                turn=turn,
                turn_deg=0,
                expression=natural_expressions(75, seed=1),
            )
        ],
        seconds=2.7,
    )

    def run(names: list[str], folder_name: str, **extra) -> tuple[dict[str, list[tuple]], str]:
        out, err = _run_gates(tmp_path, photos, names, folder_name, **extra)
        assert ("liveness is OFF" in err) == (extra["pad"].get("enabled") is False)
        return out, err

    def refused(result: dict[str, list[tuple]], gates: tuple[str, ...]) -> None:
        report = _json.dumps(result)
        for gate in gates:
            assert result[gate] and all(t == "reject" for t, _, _ in result[gate]), report  # never accepted
            assert {r for _, r, _ in result[gate]} <= {"presentation_attack", "liveness_unverified"}, report

    on, err = run(["p1", "p2", "s1", "l1", "l2"], "shipped", pad={})  # pad: {} is the shipped default, liveness on
    assert "liveness model MiniFASNetV2.onnx" in err and "liveness model MiniFASNetV1SE.onnx" in err
    assert "liveness checks: texture, depth, motion, planar, screen" in err
    report = _json.dumps(on)
    refused(on, ("P1", "P2", "S1"))
    assert ("reject", "presentation_attack", ["texture"]) in [(t, r, c["decided_by"]) for t, r, c in on["P1"]], report
    # the screen accused by its fringes (and, since small faces are detected again at full resolution, by its texture
    # too: the close-up's early, smaller frames are boxed as at full size)
    assert any(r == "presentation_attack" and "screen" in c["decided_by"] for _, r, c in on["S1"]), report
    for gate in ("P1", "P2", "S1"):  # no attack ever moved as a living face
        assert all(c["depth"]["verdict"] != "live" and c["motion"]["verdict"] is None for _, _, c in on[gate]), report
    for gate in ("L1", "L2"):  # nothing accuses a passenger (whether the texture vouches: see the docstring)
        assert on[gate] and all(r != "presentation_attack" for _, r, _ in on[gate]), report
        checks = on[gate][-1][2]
        assert not any(
            checks[name]["verdict"] == "attack" for name in ("texture", "depth", "motion", "planar", "screen")
        ), report
    assert on["L1"][-1][2]["depth"]["verdict"] == "live" and on["L2"][-1][2]["motion"]["verdict"] == "live", report

    constant_pad_model(tmp_path / "2.7_80x80_Live.onnx", 0.99)
    live, _ = run(["p1", "p2", "l1", "l2"], "live", pad={}, models={"pad": [str(tmp_path / "2.7_80x80_Live.onnx")]})
    report = _json.dumps(live)
    refused(live, ("P1", "P2"))
    for gate in ("P1", "P2"):  # the texture fooled, the prints still never moved as a living face: fail closed
        assert [(t, r) for t, r, _ in live[gate]] == [("reject", "liveness_unverified")], report
        assert live[gate][0][2]["texture"]["verdict"] == "live" and live[gate][0][2]["decided_by"] == [], report
    assert [(t, r) for t, r, _ in live["L1"]] == [("accept", None)], report
    assert live["L1"][0][2]["decided_by"] == ["texture", "planar"], report  # its head turned before it blinked
    assert [(t, r) for t, r, _ in live["L2"]] == [("accept", None)], report
    assert live["L2"][0][2]["decided_by"] == ["texture", "motion"], report
    assert live["L2"][0][2]["depth"]["live_frames"] == 0, report  # no head turn: its blink vouched
    off, _ = run(["p1", "p2"], "off", pad={"enabled": False})
    assert [(t, r) for t, r, _ in off["P1"]] == [("accept", None)], _json.dumps(off)
    assert [(t, r) for t, r, _ in off["P2"]] == [("accept", None)], _json.dumps(off)


def test_a_broken_missing_or_foreign_texture_model_stops_the_verifier_at_start(tmp_path):
    """Fail closed at start, exit 2, one clear line: never a verifier that runs without its texture evidence."""
    import subprocess
    import sys

    from kiosk.vision.models.pack import default_pack_dir
    from tests.conftest import REPO_ROOT

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    cases = {
        "junk.onnx": "not a valid ONNX model",
        "missing.onnx": "model file not found",
        str(default_pack_dir() / "w600k_mbf.onnx"): "does not look like a liveness model",
    }
    for path, why in cases.items():
        (tmp_path / "kiosk.yaml").write_text(
            f"models: {{pad: [default, '{path}']}}\n"
            "cameras: [{id: cam-a1, gate: A1, source: a1.avi}]\n"
            "security: {curve: false}\nmetrics: {port: 0}\n"
        )
        res = subprocess.run(
            [sys.executable, "-m", "kiosk.cli", "-c", str(tmp_path / "kiosk.yaml"), "verify"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
        assert res.returncode == 2 and why in res.stderr and "models.pad[1]" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_the_attack_video_script_makes_prints_and_screens_a_detector_finds(tmp_path, engine, photos):
    import subprocess
    import sys

    import cv2

    from tests.conftest import REPO_ROOT

    widths = {}
    for kind, extra in (("print", []), ("screen", ["--close-up"])):
        out = tmp_path / f"{kind}.avi"
        res = subprocess.run(
            [
                sys.executable,
                str(REPO_ROOT / "scripts" / "make_attack_video.py"),
                "--type",
                kind,
                "--seconds",
                "1.5",
                "--seed",
                "7",
                *extra,
                "--out",
                str(out),
                str(photos["yaoming.jpg"]),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
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
    res = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "make_attack_video.py"),
            "--type",
            "print",
            "--out",
            str(tmp_path / "x.avi"),
            str(tmp_path / "missing.jpg"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr


@pytest.mark.slow
def test_evaluate_pad_judges_every_track_and_counts_apcer_per_type_and_bpcer(tmp_path, engine, photos):
    """Videos whose outcome is known, judged by the gate's own rules: the default `pad` section (checks texture,
    depth, motion and screen; live needs texture at pad.threshold AND movement), with a test model that reads red as
    live replacing the shipped texture models. Yao with a red cast, turning and blinking or walking up without a
    head turn but blinking (live: texture and motion), with a blue cast (the model: attack), a clip of two red-cast
    people side by side, both blinking (two presentations), a blue photo labelled print and a red stand-in labelled
    print (the model is fooled and so is the motion check: accepted), a blue screen, and a video with nobody in it
    (listed, not counted)."""
    import json as _json

    from kiosk.tools.scenes import Walk
    from kiosk.tools.standin import natural_expressions
    from tests.conftest import run_cli
    from tests.pipeline_helpers import head_turn_of, make_video, people

    crops = people(engine, photos)
    yao = crops["yao"]
    red, blue = yao.copy(), yao.copy()
    # BGR: a red cast (the blue taken out: the eyes keep their contrast, so a blink shows) or a blue one
    red[..., 0], blue[..., 0] = 0, 255
    turns = {"red": head_turn_of(engine, red), "blue": head_turn_of(engine, blue)}

    def walk(crop, cast: str, moves: str | None, seed: int = 0, **kw) -> Walk:
        """moves: 'turn' (the head turns 15 degrees, blinking), 'blink' (no head turn; blinks and words), None (a
        rigid photo)."""
        if moves == "blink":
            return Walk(
                crop,
                start=0,
                frames=60,
                turn=turns[cast],
                turn_deg=0.0,
                expression=natural_expressions(60, seed=seed),
                **kw,
            )
        if moves == "turn":  # the head turns and blinks
            return Walk(
                crop,
                start=0,
                frames=60,
                turn=turns[cast],
                turn_deg=15,
                expression=natural_expressions(60, seed=seed),
                **kw,
            )
        return Walk(crop, start=0, frames=60, turn_deg=15, **kw)

    rows = ["video,label"]
    for name, crop, cast, moves, label in (
        ("bf1", red, "red", "turn", "bona_fide"),
        ("bf2", red, "red", "blink", "bona_fide"),
        ("bf3", blue, "blue", "turn", "bona_fide"),
        ("p1", blue, "blue", None, "print"),
        ("p2", red, "red", "turn", "print"),
        ("s1", blue, "blue", None, "screen"),
    ):
        make_video(tmp_path / f"{name}.avi", [walk(crop, cast, moves, seed=1, w0=100, w1=160)], seconds=2.0)
        rows.append(f"{name}.avi,{label}")
    make_video(
        tmp_path / "two.avi",
        [
            walk(red, "red", "blink", seed=4, w0=100, w1=110, cx=0.27),
            walk(red, "red", "blink", seed=6, w0=100, w1=110, cx=0.73),
        ],
        seconds=2.0,
    )
    rows.append("two.avi,bona_fide")
    make_video(tmp_path / "empty.avi", [], seconds=0.3)
    rows.append("empty.avi,print")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    red_is_real_model(tmp_path / "1.0_80x80_Red.onnx")
    (tmp_path / "kiosk.yaml").write_text("models: {pad: [1.0_80x80_Red.onnx]}\n")
    res = run_cli(
        "kiosk-enroll",
        "-q",
        "-c",
        str(tmp_path / "kiosk.yaml"),
        "evaluate-pad",
        str(tmp_path / "labels.csv"),
        "--json",
        "--no-progress",
        "--sweep",
    )
    assert res.returncode == 0, res.stderr
    report = _json.loads(res.stdout)
    assert report["models"] == ["1.0_80x80_Red.onnx"] and report["checks"] == [
        "texture",
        "depth",
        "motion",
        "planar",
        "screen",
    ]
    assert report["bona_fide"] == {
        "presentations": 5,
        "videos": 4,
        "still_clips": 0,
        "rejected": 1,
        "bpcer": pytest.approx(0.2),
        "bpcer_upper95": pytest.approx(0.6574, abs=1e-4),
        "unverified": 0,
        "unverified_rate": 0.0,
        "judged_attack": 1,
    }
    assert report["attacks"]["print"] == {
        "presentations": 2,
        "accepted": 1,
        "apcer": 0.5,
        "judged_attack": 1,
        "unverified": 0,
        "apcer_upper95": pytest.approx(0.9747, abs=1e-4),
    }
    assert report["attacks"]["screen"] == {
        "presentations": 1,
        "accepted": 0,
        "apcer": 0.0,
        "judged_attack": 1,
        "unverified": 0,
        "apcer_upper95": pytest.approx(0.95),
    }
    by_video = {v["video"].rsplit("/", 1)[-1]: v["presentations"] for v in report["videos"]}
    # live needs both kinds of evidence: the texture, and a blink or a head's movement that no plane's explains
    moved = [("accepted", ["texture", "motion"]), ("accepted", ["texture", "planar"])]
    moved.append(("accepted", ["texture", "motion", "planar"]))
    assert [(p["outcome"], p["decided_by"]) for p in by_video["two.avi"]] in ([m, n] for m in moved for n in moved)
    assert [(p["outcome"], p["decided_by"]) for p in by_video["bf1.avi"]] in ([m] for m in moved)
    assert [(p["outcome"], p["decided_by"]) for p in by_video["bf2.avi"]] == [("accepted", ["texture", "motion"])]
    assert by_video["p1.avi"][0]["outcome"] == "attack" and by_video["p1.avi"][0]["decided_by"] == ["texture"]
    # bf2 (no head turn) waited for its blink: accepted at its third expression frame (quality frame 11, past
    # pad.min_frames), 8 frames after the identity (frame 3)
    bf2 = by_video["bf2.avi"][0]
    assert bf2["checks"]["motion"]["cue"] == "eye" and bf2["checks"]["depth"]["live_frames"] == 0, bf2
    assert bf2["frames"] == 11 and bf2["wait_s"] == pytest.approx(8 / 30, abs=1e-3), bf2
    assert report["liveness_wait_s"]["n"] == 4
    # the sweep replays every presentation: the red model's scores are near 0 or 1, so every threshold between
    # gives today's outcomes; 5 bona fide presentations cannot measure BPCER 1% or 5%
    mid = {row["threshold"]: row for row in report["sweep"]}[0.5]
    assert mid["bpcer"] == pytest.approx(0.2) and mid["apcer"] == {"print": 0.5, "screen": 0.0}
    assert report["at_bpcer"] == {"0.01": None, "0.05": None}
    assert [item["line"] for item in report["no_face"]] == [9]
    table = run_cli(
        "kiosk-enroll",
        "-q",
        "-c",
        str(tmp_path / "kiosk.yaml"),
        "evaluate-pad",
        str(tmp_path / "labels.csv"),
        "--no-progress",
    )
    assert "BPCER 20.0% (1 of 5 bona fide presentations in 4 videos refused" in table.stdout
    assert "APCER print: 50.0% (1 of 2 accepted" in table.stdout and "two.avi" in table.stdout
    (tmp_path / "bad.csv").write_text("video,label\nnope.avi,print\n")
    res = run_cli("kiosk-enroll", "-q", "-c", str(tmp_path / "kiosk.yaml"), "evaluate-pad", str(tmp_path / "bad.csv"))
    assert res.returncode == 2 and "line 2" in res.stderr and "no such video" in res.stderr


def test_child_configs_carry_the_liveness_models_with_absolute_paths(tmp_path):
    """bench and demo write the operator's models: into their children's config (YAML)."""
    import yaml

    from kiosk.config import load_config, models_section

    (tmp_path / "site").mkdir()
    site = tmp_path / "site" / "kiosk.yaml"
    site.write_text("models: {pad: [default, m/2.7_a.onnx, {path: m/b.onnx, scale: 4.0, colour: rgb}]}\n")
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"models": models_section(load_config(site))}))
    pads = load_config(child).models.pad
    assert str(pads[0]) == "default"  # the shipped models stay the shipped models, wherever the child config is
    assert str(pads[1]) == str(tmp_path / "site" / "m" / "2.7_a.onnx")
    assert (str(pads[2].path), pads[2].scale, pads[2].colour) == (str(tmp_path / "site" / "m" / "b.onnx"), 4.0, "rgb")


def test_liveness_on_with_a_pack_that_lacks_the_landmark_model_is_a_clear_error(tmp_path):
    """The built-in check needs the pack's 106-point landmark model: a pack without it is refused at start
    (exit 2 from the CLI), naming what is missing, not a traceback at the first face."""
    import shutil

    from kiosk.vision.models.pack import default_pack_dir
    from tests.conftest import run_cli

    pack = tmp_path / "pack"
    pack.mkdir()
    for name in ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx"):
        shutil.copy(default_pack_dir() / name, pack / name)
    (tmp_path / "kiosk.yaml").write_text("models: {pack: pack}\n")
    (tmp_path / "labels.csv").write_text("video,label\nx.avi,print\n")
    res = run_cli("kiosk-enroll", "-c", str(tmp_path / "kiosk.yaml"), "evaluate-pad", str(tmp_path / "labels.csv"))
    assert res.returncode == 2 and "106-point landmark model" in res.stderr and "Traceback" not in res.stderr
    from kiosk.vision.engine import FaceEngine

    off = config_from_mapping({"models": {"pack": str(pack)}, "pad": {"enabled": False}})
    assert FaceEngine.from_config(off).pad is None  # liveness off: the pack serves without it
