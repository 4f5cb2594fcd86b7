"""The verifier core, frame by frame and with no sockets: rationing, the identity re-check (no starvation), one
batched search per step, stale-frame drops, an end-of-source marker never lost, tracks ageing out when a camera
stalls, claims, no accept from a frame older than the bound (through the gatekeeper), idle skipping and the
captures' idle hints. The gatekeeper's own rules (confirm, board, audit) are in tests/test_gatekeeper.py.

The rules run on fast fake models (tests/fake_models.py: people are coloured patches); the idle gate's test runs
on the real models as well, since what it checks (sensor noise is no face, a person stepping in is found on the
frame they appear) depends on the detector."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from kiosk.config import config_from_mapping
from kiosk.messaging.messages import FrameHeader
from kiosk.pipeline.core import RECHECK_OVERDUE, Eof, Frame, VerifierCore
from kiosk.services.metrics import VerifierMetrics
from kiosk.store.gallery import GalleryMatrix
from kiosk.tools.scenes import person_crop
from tests.conftest import real_engine
from tests.fake_models import FakeEngine, person
from tests.fake_ports import gatekeeper

FPS = 30.0
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    """Six people (Yao first) as the fake models see them."""
    return [person(i) for i in range(6)]


@pytest.fixture(scope="module")
def yao_matrix(engine) -> GalleryMatrix:
    return engine.gallery({"YAO": 0})


@pytest.fixture(scope="module", params=["fake", "real"])
def kit(request, engine, crops, yao_matrix):
    """(models, people, gallery with Yao): the fakes, and the shipped models with Yao Ming's photo."""
    if request.param == "fake":
        return engine, crops, yao_matrix
    photos = request.getfixturevalue("photos")
    real = real_engine()
    yao = cv2.imread(str(photos["yaoming.jpg"]))
    face = real.describe(yao, real.detector.detect(yao).largest()).faces
    matrix = GalleryMatrix.from_templates(
        real.model_id, real.dim, [("YAO", "Yao Ming", face.embeddings[0])], revision=1
    )
    return real, [person_crop(yao, face.boxes[0])], matrix


def scene(crops: list[np.ndarray], people: list[int], width: int = 120) -> np.ndarray:
    """A 1280x720 frame with the given people side by side, each `width` px wide."""
    frame = np.full((720, 1280, 3), 90, np.uint8)
    for slot, who in enumerate(people):
        crop = crops[who]
        small = cv2.resize(crop, (width, round(crop.shape[0] * width / crop.shape[1])), interpolation=cv2.INTER_AREA)
        h = min(small.shape[0], 500)
        x = 30 + slot * 205
        frame[100 : 100 + h, x : x + width] = small[:h]
    return frame


def core_for(engine, matrix, *, realtime: bool = False, **policy) -> VerifierCore:
    cfg = config_from_mapping(
        {
            "cameras": [{"id": "cam", "gate": "A1", "source": 0, "realtime": realtime}],
            "policy": policy,
            "metrics": {"port": 0},
            "pad": {"enabled": False},
        }
    )
    return VerifierCore(
        cfg.policy, cfg.cameras, engine, matrix, pad=cfg.pad, textured=bool(cfg.models.pad), metrics=metrics_for(cfg)
    )


def metrics_for(cfg) -> VerifierMetrics:
    return VerifierMetrics({c.id: c.gate for c in cfg.cameras})


def frame(image: np.ndarray, seq: int, *, live: bool = False) -> Frame:
    at = T0 + seq / FPS
    header = FrameHeader("cam", "A1", seq, at, image.shape[1], image.shape[0], "bgr8", None if live else seq / FPS)
    return Frame(header, image, at)


def feed(core: VerifierCore, image: np.ndarray, seq: int, **kw) -> list:
    core.offer(frame(image, seq, **kw), T0 + seq / FPS)
    return core.step(T0 + seq / FPS)


def counted(counter, **labels: str) -> float:
    """A counter's value (its child for `labels`), read through prometheus_client's public collect()."""
    return next(
        sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels == labels
    )


def test_rationing_is_fair_and_a_decided_track_is_rechecked_despite_a_crowd(engine, crops, yao_matrix):
    # Undecided faces never decide here (nobody else is enrolled, no reject for a long time): a crowd that
    # keeps four or more faces undecided, which used to starve the decided track's identity check forever.
    core = core_for(engine, yao_matrix, max_embeddings_per_frame=4, reject_after_frames=1000, decision_timeout_s=3600)
    alone = scene(crops, [0])
    verdicts = [v for seq in range(4) for v in feed(core, alone, seq)]
    assert [(v.decision.type, v.decision.subject_id) for v in verdicts] == [("accept", "YAO")]
    (yao,) = core.cameras["cam"].tracker.tracks
    crowd = scene(crops, [0, 1, 2, 3, 4, 5])
    embedded_at = {}
    for seq in range(4, 4 + 3 * RECHECK_OVERDUE):
        before = {tr.track_id: tr.last_embedded for tr in core.cameras["cam"].tracker.tracks}
        assert feed(core, crowd, seq) == []
        tracks = core.cameras["cam"].tracker.tracks
        assert len(tracks) == 6
        now_embedded = [tr for tr in tracks if tr.last_embedded == core.steps - 1]
        assert len(now_embedded) <= 4  # the cap holds every step
        for tr in now_embedded:
            if before.get(tr.track_id, -1) != tr.last_embedded:
                embedded_at.setdefault(tr.track_id, []).append(seq)
    others = [tr for tr in core.cameras["cam"].tracker.tracks if tr is not yao]
    counts = {tr.track_id: len(embedded_at.get(tr.track_id, [])) for tr in others}
    assert min(counts.values()) >= 3 * RECHECK_OVERDUE * 4 // 6 - 2, counts  # fair share
    checks = embedded_at.get(yao.track_id, [])
    assert checks, "the decided track was never re-checked"
    gaps = np.diff([3] + checks)  # its last embedding before the crowd came was on frame 3 at the latest
    assert gaps.max() <= RECHECK_OVERDUE + 1
    assert counted(core.metrics.embeddings_deferred) > 0


def test_all_faces_of_a_step_are_matched_in_one_search(engine, crops, yao_matrix):
    core = core_for(engine, yao_matrix, max_embeddings_per_frame=0)
    calls = []
    search = core.matrix.search
    core.matrix.search = lambda q, **kw: calls.append((len(q), kw)) or search(q, **kw)  # type: ignore[method-assign]
    feed(core, scene(crops, [0, 1, 2, 3]), 0)
    assert calls == [(4, {})]


def test_stale_frames_dropped_but_never_an_end_of_source_marker(engine, crops, yao_matrix):
    core = core_for(engine, yao_matrix, realtime=True)
    cam = core.cameras["cam"]
    empty = np.full((360, 640, 3), 90, np.uint8)
    for seq in range(3):
        core.offer(frame(empty, seq, live=True), T0)
    assert cam.frames_waiting() == 1 and cam.stale == 2 and cam.pending[0].header.seq == 2
    core.offer(Eof("cam"), T0)
    core.offer(frame(empty, 3, live=True), T0)  # a newer frame clears stale frames, not the marker
    assert [type(p).__name__ for p in cam.pending] == ["Eof", "Frame"] and cam.stale == 3
    core.step(T0)
    assert cam.eof and cam.processed == 1 and not cam.pending


def test_tracks_age_out_when_a_live_camera_stalls(engine, crops):
    empty_gallery = GalleryMatrix.from_templates(engine.model_id, engine.dim, [])
    core = core_for(
        engine, empty_gallery, realtime=True, reject_after_frames=50, decision_timeout_s=60, track_max_age_s=1.0
    )
    image = scene(crops, [1])
    for seq in range(5):
        assert feed(core, image, seq, live=True) == []
    assert len(core.cameras["cam"].tracker.tracks) == 1
    last = T0 + 4 / FPS
    assert core.tick(last + 0.5) == []  # not gone yet
    (verdict,) = core.tick(last + 1.5)  # no frame for 1.5 s: the person left, the transaction ends
    assert (verdict.decision.type, verdict.decision.reason) == ("reject", "timeout")
    assert core.cameras["cam"].tracker.tracks == []


def test_claims(engine, crops, yao_matrix):
    core = core_for(engine, yao_matrix)
    assert core.control({"cmd": "claim", "gate_id": "A1", "subject_id": "NOBODY"}, T0)["ok"] is False
    assert core.control({"cmd": "claim", "gate_id": "Z9", "subject_id": "YAO"}, T0)["ok"] is False
    assert core.control({"cmd": "claim", "gate_id": "A1", "subject_id": "YAO", "ttl_s": 30}, T0)["ok"] is True
    image = scene(crops, [0])
    verdicts = [v for seq in range(4) for v in feed(core, image, seq)]
    assert [(v.decision.type, v.decision.subject_id) for v in verdicts] == [("accept", "YAO")]
    assert core.policy.claims == {}  # one transaction per claim


def test_live_frames_from_before_a_stall_are_dropped_and_never_accepted(engine, crops, yao_matrix):
    core = core_for(engine, yao_matrix, realtime=True, max_frame_age_ms=500)
    image = scene(crops, [0])
    # Captured 2 s before the verifier got to it (it was paused): dropped, not processed late.
    core.offer(frame(image, 0, live=True), T0 + 2.0)
    assert core.step(T0 + 2.0) == []
    cam = core.cameras["cam"]
    assert cam.too_old == 1 and cam.processed == 0 and counted(core.metrics.frames_too_old, camera="cam") == 1
    # Even if old frames reach the decision (a stall inside processing), no accept comes from them: the
    # gatekeeper every decision goes through withholds it, and the accept is forgotten (the next one is fresh).
    ports = gatekeeper(enrolled={"YAO"}, max_frame_age_ms=500)
    verdicts = [v for seq in range(1, 5) for v in core.process([frame(image, seq, live=True)], T0 + seq / FPS + 0.8)]
    events = [ports.gate.admit(v) for v in verdicts]
    assert [(e.type, e.reason, e.subject_id) for e in events] == [("reject", "stale_frame", "YAO")]
    assert ports.forgotten == [("A1", "YAO")]
    # Fresh frames of the same person: accepted.
    fresh = core_for(engine, yao_matrix, realtime=True, max_frame_age_ms=500)
    verdicts = [v for seq in range(4) for v in feed(fresh, image, seq, live=True)]
    events = [ports.gate.admit(v) for v in verdicts]
    assert [(e.type, e.subject_id) for e in events] == [("accept", "YAO")]


def test_an_idle_gate_skips_the_detector_on_an_unchanged_scene_and_detects_a_face_that_appears(kit):
    """An empty scene with sensor noise: detected once, then skipped (counted) until the safety-net second
    has passed on the frame clock; a person stepping in is detected on the very frame they appear (33 ms at
    30 fps), and nothing is skipped while their track is open."""
    engine, crops, yao_matrix = kit
    core = core_for(engine, yao_matrix, realtime=True)
    cam = core.cameras["cam"]
    rng = np.random.default_rng(1)
    empty = scene(crops, [])

    fields = [rng.normal(0, 3, empty.shape).astype(np.int16) for _ in range(5)]  # sensor noise, a field a frame
    shown = iter(range(10**6))

    def noisy(image: np.ndarray) -> np.ndarray:
        return np.clip(image + fields[next(shown) % len(fields)], 0, 255).astype(np.uint8)

    skipped = lambda: counted(core.metrics.frames_idle, camera="cam")  # noqa: E731

    def hints() -> list[tuple[bool, int]]:  # what the capture is told, taken off the core as the service does
        return [(h.idle, h.seq) for h in core.take_hints()]

    for seq in range(20):  # 0.67 s of frame clock: the first detected, the rest skipped
        feed(core, noisy(empty), seq, live=True)
    assert cam.idle_skipped == 19 == skipped() and cam.processed == 20 and core.faces_total == 0
    assert hints() == [(True, 0)]  # the capture may hold back frames like frame 0
    for seq in range(20, 40):  # past 1 s since the last detection: one safety-net detection, then skipped again
        feed(core, noisy(empty), seq, live=True)
    assert cam.idle_skipped == 38 and core.faces_total == 0
    assert hints() == [(True, 30)]  # renewed by the safety-net detection, with its frame
    walked_in = scene(crops, [0], width=160)
    feed(core, noisy(walked_in), 40, live=True)  # the first frame with a person
    assert core.faces_total == 1 and cam.idle_skipped == 38 and len(cam.tracker.tracks) == 1
    assert hints() == [(False, 40)]  # every frame counts now
    woken = core.metrics.wake_latency.collect()[0].samples
    assert [seq for seq, _ in cam.wakes] == [40] and next(s.value for s in woken if s.name.endswith("_count")) == 1
    for seq in range(41, 45):
        feed(core, noisy(walked_in), seq, live=True)
    assert cam.idle_skipped == 38 and core.faces_total == 5  # every frame detected while a track is open
    assert hints() == [] and len(cam.wakes) == 1  # said once; a face on an open track wakes nothing


def test_no_idle_hint_for_a_watched_gate_or_a_replay_and_a_new_watcher_wakes_the_capture(engine, crops, yao_matrix):
    """A console watching a gate sees it live, so its capture is never told to hold frames back, and one that
    was is told to stop when the watching starts; a replay (realtime false) always sends every frame."""
    empty = scene(crops, [])
    live = core_for(engine, yao_matrix, realtime=True)
    feed(live, empty, 0, live=True)
    assert [(h.camera_id, h.idle) for h in live.take_hints()] == [("cam", True)]
    live.watch({"A1"})  # a console starts watching gate A1: its capture is told to send every frame
    assert [(h.camera_id, h.idle) for h in live.take_hints()] == [("cam", False)]
    live.watch({"A1"})  # still watched: nothing new to say
    for seq in range(1, 40):
        feed(live, empty, seq, live=True)
    assert live.take_hints() == []
    replay = core_for(engine, yao_matrix, realtime=False)
    for seq in range(40):
        feed(replay, empty, seq)
    assert replay.take_hints() == [] and replay.cameras["cam"].idle_skipped > 30


def test_idle_skipping_is_off_with_idle_change_0(engine, crops, yao_matrix):
    core = core_for(engine, yao_matrix, realtime=True, idle_change=0)
    for seq in range(10):
        feed(core, scene(crops, []), seq, live=True)
    assert core.cameras["cam"].idle_skipped == 0 and core.cameras["cam"].processed == 10


@pytest.mark.parametrize("per_step", [1, 0])
def test_two_gates_deciding_at_once_take_turns_and_neither_starves(engine, crops, yao_matrix, per_step):
    """policy.deciding_cameras_per_step 1 (the default): while people are being decided at two gates, a step
    takes one of them, the one processed longest ago, and the other keeps its newest frame for the next
    step; 0 takes both every step."""
    cfg = config_from_mapping(
        {
            "cameras": [
                {"id": c, "gate": g, "source": i, "realtime": True}
                for i, (c, g) in enumerate((("cam", "A1"), ("cam2", "A2")))
            ],
            "policy": {"reject_after_frames": 1000, "decision_timeout_s": 3600, "deciding_cameras_per_step": per_step},
            "metrics": {"port": 0},
            "pad": {"enabled": False},
        }
    )
    core = VerifierCore(
        cfg.policy,
        cfg.cameras,
        engine,
        yao_matrix,
        pad=cfg.pad,
        textured=bool(cfg.models.pad),
        metrics=metrics_for(cfg),
    )
    stranger = scene(crops, [1])  # not enrolled: undecided for as long as the test runs
    taken = []
    for seq in range(9):
        at = T0 + seq / FPS
        for cid, gate in (("cam", "A1"), ("cam2", "A2")):
            header = FrameHeader(cid, gate, seq, at, stranger.shape[1], stranger.shape[0], "bgr8", None)
            core.offer(Frame(header, stranger, at), at)
        before = {cid: cam.processed for cid, cam in core.cameras.items()}
        assert core.step(at) == []
        taken.append(sorted(cid for cid, cam in core.cameras.items() if cam.processed > before[cid]))
    if per_step:
        # The first step: nobody is being decided yet, both go; then one at a time, in turn.
        assert taken == [["cam", "cam2"]] + [["cam"], ["cam2"]] * 4
        # Each frame that sat a step out was replaced by its camera's next one (cam's last still waits).
        assert core.cameras["cam2"].stale == 4 and core.cameras["cam"].stale == 3
        assert core.cameras["cam"].frames_waiting() == 1 and core.cameras["cam2"].frames_waiting() == 0
    else:
        assert taken == [["cam", "cam2"]] * 9
