"""The engine on the real default models: parity with insightface, scale range, alignment, batching."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from kiosk.vision.models.recognizer import (
    ARCFACE_TEMPLATE,
    align_faces,
    similarity_transforms,
)
from tests.conftest import place_face


def describe(engine, image: np.ndarray):
    """Every face of `image`, detected, aligned and embedded (Faces with embeddings)."""
    return engine.describe(image, engine.detector.detect(image)).faces


def _pair_up(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Index into b of the nearest box centre for each box of a."""
    ca = (a[:, :2] + a[:, 2:4]) / 2
    cb = (b[:, :2] + b[:, 2:4]) / 2
    return np.argmin(((ca[:, None] - cb[None]) ** 2).sum(-1), axis=1)


@pytest.mark.parametrize("name", ["yaoming.jpg", "players.jpg", "gdp.jpg"])
def test_parity_with_insightface(engine, photos, name):
    model_zoo = pytest.importorskip("insightface.model_zoo")
    face_align = pytest.importorskip("insightface.utils.face_align")
    img = cv2.imread(str(photos[name]))
    det = model_zoo.get_model(str(engine.pack.detector.path), providers=["CPUExecutionProvider"])
    det.prepare(-1, input_size=(640, 640))
    rec = model_zoo.get_model(str(engine.pack.recognizer.path), providers=["CPUExecutionProvider"])
    rec.prepare(-1)
    ref_boxes, ref_kps = det.detect(img, input_size=(640, 640))
    ours = describe(engine, img)
    assert len(ours) == len(ref_boxes) > 0
    idx = _pair_up(ours.boxes, ref_boxes[:, :4])
    assert len(set(idx.tolist())) == len(ours)
    assert np.abs(ours.boxes - ref_boxes[idx, :4]).max() <= 1.0
    assert np.abs(ours.kps - ref_kps[idx]).max() <= 1.0
    ref_emb = np.stack([rec.get_feat(face_align.norm_crop(img, k))[0] for k in ref_kps[idx]])
    ref_emb /= np.linalg.norm(ref_emb, axis=1, keepdims=True)
    cos = (ours.embeddings * ref_emb).sum(axis=1)
    assert cos.min() >= 0.99


def test_alignment_recovers_a_known_similarity_transform():
    rng = np.random.default_rng(1)
    angle, scale, t = 0.3, 2.5, np.array([40.0, -12.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # src = inverse-map the template, so the transform src->template is known exactly.
    src = (np.linalg.inv(rot) @ (ARCFACE_TEMPLATE - t).T).T
    mats = similarity_transforms(np.stack([src, src + rng.normal(0, 1e-9, src.shape)]))
    assert np.allclose(mats[0][:, :2], rot, atol=1e-6)
    assert np.allclose(mats[0][:, 2], t, atol=1e-6)
    mapped = (mats[0][:, :2] @ src.T).T + mats[0][:, 2]
    assert np.abs(mapped - ARCFACE_TEMPLATE).max() < 1e-6


def test_aligned_crop_puts_eyes_on_template(engine, yaoming):
    faces = engine.detector.detect(yaoming)
    crops = align_faces(yaoming, faces.kps)
    assert crops.shape == (1, 112, 112, 3)
    again = engine.detector.detect(cv2.copyMakeBorder(crops[0], 64, 64, 64, 64, cv2.BORDER_CONSTANT))
    assert len(again) == 1
    eyes = again.kps[0, :2] - 64
    assert np.abs(eyes - ARCFACE_TEMPLATE[:2]).max() < 4.0


@pytest.mark.parametrize("fill", [0.6, 0.85, 1.0])
def test_close_up_face_filling_the_frame_is_found_and_recognised(engine, yaoming, fill):
    ref = describe(engine, yaoming)
    x1, y1, x2, y2 = ref.boxes[0]
    side = (x2 - x1) / fill
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    padded = cv2.copyMakeBorder(yaoming, 300, 300, 300, 300, cv2.BORDER_REPLICATE)
    x0, y0 = int(cx - side / 2) + 300, int(cy - side / 2) + 300
    frame = cv2.resize(padded[y0 : y0 + int(side), x0 : x0 + int(side)], (640, 640))
    faces = describe(engine, frame)
    assert len(faces) == 1
    assert faces.widths[0] / 640 == pytest.approx(fill, abs=0.12)
    assert float(faces.embeddings[0] @ ref.embeddings[0]) > 0.7
    # Without the close-up pass SCRFD finds nothing this large.
    main_only = engine.detector.close_up_pass
    engine.detector.close_up_pass = False
    try:
        if fill >= 0.85:
            assert len(engine.detector.detect(frame)) == 0
    finally:
        engine.detector.close_up_pass = main_only


def test_small_face_30px_is_found(engine, yaoming):
    ref = describe(engine, yaoming)
    face_w = ref.widths[0]
    frame = place_face(yaoming, (480, 640), width=round(yaoming.shape[1] * 30 / face_w))
    faces = engine.detector.detect(frame)
    assert len(faces) == 1
    assert 22 <= faces.widths[0] <= 40


def test_batch_detection_matches_single(engine, photos):
    imgs = [cv2.imread(str(photos[n])) for n in ("yaoming.jpg", "gdp.jpg", "players.jpg")]
    imgs.append(cv2.flip(imgs[1], 1))  # same shape as gdp: shares its batch
    batch = engine.detector.detect_batch(imgs)
    for img, faces in zip(imgs, batch, strict=True):
        single = engine.detector.detect(img)
        assert len(single) == len(faces)
        assert np.abs(single.boxes - faces.boxes).max() < 1e-3


def test_embeddings_are_unit_length_and_identify_the_same_person(engine, photos, yaoming):
    ref = describe(engine, yaoming)
    assert np.allclose(np.linalg.norm(ref.embeddings, axis=1), 1.0, atol=1e-5)
    players = describe(engine, cv2.imread(str(photos["players.jpg"])))
    gdp = describe(engine, cv2.imread(str(photos["gdp.jpg"])))
    assert len(players) >= 15
    scores = players.embeddings @ ref.embeddings[0]
    from kiosk.config import PolicyConfig

    threshold = PolicyConfig().accept_threshold
    assert int((scores >= threshold).sum()) == 1  # Yao Ming is one of the players
    assert float((gdp.embeddings @ ref.embeddings[0]).max()) < threshold


def test_batched_recognizer_output_is_not_fixed_to_one(engine):
    shape = engine.recognizer.session.get_outputs()[0].shape
    assert isinstance(shape[0], str)  # symbolic: the graph file says 1
    crops = np.random.default_rng(0).integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    emb = engine.recognizer.embed(crops)
    single = np.concatenate([engine.recognizer.embed(crops[i : i + 1]) for i in range(5)])
    assert emb.shape == (5, 512)
    assert np.abs(emb - single).max() < 1e-4


@pytest.mark.parametrize("width", [48, 90, 250, 560])
def test_gate_scale_detection_finds_faces_from_min_face_px_to_the_full_frame(engine, yaoming, width):
    """At the verifier's scale (policy.min_face_px 48: a 640x480 frame is detected at 320x240, no close-up
    pass) a face from 48 px to nearly the frame's width is found where the full-size detector finds it, with
    keypoints close enough that its embedding barely moves."""
    ref = describe(engine, yaoming)
    face = yaoming
    if width > 300:  # a close-up: the face itself cropped to fill the frame
        x1, y1, x2, y2 = ref.boxes[0].astype(int)
        face = yaoming[max(0, y1 - 20) : y2 + 20, max(0, x1 - 20) : x2 + 20]
        frame = place_face(face, (480, 640), width=round(width * face.shape[1] / (x2 - x1)))
    else:
        frame = place_face(face, (480, 640), width=round(yaoming.shape[1] * width / ref.widths[0]))
    assert engine.detector.main_geometry(480, 640, min_face_px=48)[:2] == (320, 240)
    full = engine.detector.detect(frame)
    gate = engine.detector.detect(frame, min_face_px=48)
    assert len(full) == len(gate) == 1
    assert gate.widths[0] == pytest.approx(full.widths[0], rel=0.1)
    assert gate.widths[0] == pytest.approx(width, rel=0.2)
    close_up = engine.detector.close_up_pass
    engine.detector.close_up_pass = False
    try:  # the main pass alone found it: the close-up pass is not needed at this scale
        alone = engine.detector.detect(frame, min_face_px=48)
    finally:
        engine.detector.close_up_pass = close_up
    assert np.abs(alone.boxes - gate.boxes).max() < 1e-3
    a = engine.describe(frame, full).faces.embeddings[0]
    b = engine.describe(frame, gate).faces.embeddings[0]
    assert float(a @ b) > 0.9


@pytest.mark.parametrize("width", [48, 56, 66])
def test_a_face_near_min_face_px_is_looked_at_again_at_full_resolution(engine, yaoming, width, monkeypatch):
    """At the gate's scale a 48-70 px face is 24-35 px at the main pass's input; the refine pass finds it again in
    its own region at full resolution, so its box, keypoints and score are those of a 48+ px face."""
    from kiosk.vision.models import detector as det_module

    ref = describe(engine, yaoming)
    frame = place_face(yaoming, (480, 640), width=round(yaoming.shape[1] * width / ref.widths[0]))
    full = engine.detector.detect(frame)
    refined = engine.detector.detect(frame, min_face_px=48)
    regions: list = []
    monkeypatch.setattr(engine.detector, "on_pass", regions.append)
    again = engine.detector.detect(frame, min_face_px=48)
    assert len(full) == len(refined) == 1
    assert np.abs(again.boxes - refined.boxes).max() < 1e-3
    # main pass at 320x240 (canvas 320x256, the face 24-33 px there), then one refine region: a 160 px canvas
    # where the face is seen at full resolution or a third of the canvas high
    assert [g[0][3:5] for g in regions] == [(320, 256), (det_module.REFINE_CANVAS, det_module.REFINE_CANVAS)]
    seen = regions[1][0][2] * float(refined.heights[0])
    assert regions[1][0][2] == 1.0 or seen >= 0.95 * det_module.REFINE_CANVAS / det_module.REFINE_CONTEXT
    monkeypatch.setattr(det_module, "REFINE_BELOW_PX", 0)  # without it: the coarse main-pass face
    coarse = engine.detector.detect(frame, min_face_px=48)
    eyes = float(np.linalg.norm(full.kps[0, 1] - full.kps[0, 0]))
    assert float(np.abs(refined.kps[0] - full.kps[0]).max()) / eyes < 0.08
    assert not np.allclose(coarse.boxes, refined.boxes)
    a = engine.describe(frame, full).faces.embeddings[0]
    b = engine.describe(frame, refined).faces.embeddings[0]
    assert float(a @ b) > 0.95


def test_the_refine_pass_leaves_large_faces_and_full_size_detection_alone(engine, yaoming, monkeypatch):
    """A face large at the main pass's input, or any face of an enrollment photo (min_face_px 0), is not looked at
    again: the refine pass costs only where it helps."""
    ref = describe(engine, yaoming)
    frame = place_face(yaoming, (480, 640), width=round(yaoming.shape[1] * 150 / ref.widths[0]))
    runs: list[int] = []
    monkeypatch.setattr(engine.detector, "on_pass", lambda geo: runs.append(len(geo)))
    assert len(engine.detector.detect(frame, min_face_px=48)) == 1
    assert len(engine.detector.detect(frame)) == 1
    assert runs == [1, 1, 1]  # main pass at the gate's scale; main and close-up passes at full size
