"""The decision policy and the tracker as plain objects, fed frame by frame."""

from __future__ import annotations

import numpy as np
import pytest

from kiosk.config import PolicyConfig
from kiosk.pipeline.policy import DecisionPolicy
from kiosk.pipeline.tracking import Track, Tracker
from kiosk.store.gallery import Match
from kiosk.vision.faces import Faces
from kiosk.vision.quality import Quality


def track(tid: int = 1) -> Track:
    return Track(tid, "cam", np.array([0, 0, 100, 100], np.float32), 0.0)


def m(subject: str | None, score: float, second: float = 0.0) -> Match:
    return Match(subject, subject or "", score, "other", second)


CFG = PolicyConfig(accept_threshold=0.4, min_margin=0.06, accept_frames=3, reject_after_frames=8)


def test_accept_needs_agreeing_quality_frames_and_happens_once():
    p, tr = DecisionPolicy(CFG), track()
    assert p.observe(tr, "A1", m("X", 0.7), 1.0, 1) is None
    assert p.observe(tr, "A1", m("Y", 0.7), 1.1, 2) is None  # a vote for someone else does not count for X
    assert p.observe(tr, "A1", m("X", 0.5), 1.2, 3) is None
    d = p.observe(tr, "A1", m("X", 0.6), 1.3, 4)
    assert d is not None and (d.type, d.subject_id, d.frames, d.seq) == ("accept", "X", 3, 4)
    assert d.score == pytest.approx(0.7)
    assert p.observe(tr, "A1", m("X", 0.9), 1.4, 5) is None and not p.needs_frames(tr)


def test_low_score_or_small_margin_ends_in_no_match():
    p, tr = DecisionPolicy(CFG), track()
    frames = [m("X", 0.39), m("X", 0.8, second=0.78), m(None, -1.0)] * 3
    decisions = [p.observe(tr, "A1", f, float(i)) for i, f in enumerate(frames)]
    assert all(d is None for d in decisions[:7])
    assert (decisions[7].type, decisions[7].reason, decisions[7].frames) == ("reject", "no_match", 8)


def test_claim_binds_to_the_next_transaction_only():
    p = DecisionPolicy(CFG)
    p.add_claim("A1", "X", ttl_s=60, now=0.0)
    first, second = track(1), track(2)
    assert p.claim_for(first, "A1", 1.0).subject_id == "X"
    assert p.claim_for(second, "A1", 1.0) is None  # used up by the first track
    out = [p.observe(first, "A1", m("Y", 0.9), float(i)) for i in range(8)]
    assert (out[-1].type, out[-1].reason, out[-1].subject_id) == ("reject", "claim_mismatch", "X")
    p.add_claim("A1", "Y", ttl_s=60, now=10.0)
    third = track(3)
    assert p.claim_for(third, "A1", 11.0).subject_id == "Y"
    out = [p.observe(third, "A1", m("Y", 0.5, second=0.49), 11.0 + i) for i in range(3)]
    assert out[-1].type == "accept"  # 1:1: no margin needed
    p.add_claim("A1", "Z", ttl_s=5, now=20.0)
    assert p.claim_for(track(4), "A1", 30.0) is None  # expired


def test_repeat_accept_suppressed_and_timeouts():
    p = DecisionPolicy(PolicyConfig(repeat_accept_s=10, decision_timeout_s=5))
    a, b = track(1), track(2)
    assert [p.observe(a, "A1", m("X", 0.8), t) for t in (0.0, 0.1, 0.2)][-1].type == "accept"
    assert [p.observe(b, "A1", m("X", 0.8), t) for t in (3.0, 3.1, 3.2)][-1] is None  # same person re-found
    c = track(3)
    p.observe(c, "A1", m("X", 0.1), 50.0)
    assert p.check_timeout(c, 52.0) is None
    d = p.check_timeout(c, 55.5)
    assert (d.type, d.reason) == ("reject", "timeout")
    e = track(4)
    assert p.track_ended(e) is None  # never had a quality frame: nothing to decide
    p.observe(e, "A1", m("X", 0.1), 60.0)
    assert p.track_ended(e) is None  # one glimpse is not a transaction
    f = track(5)
    for t in (70.0, 70.1, 70.2):
        p.observe(f, "A1", m("X", 0.1), t)
    assert p.track_ended(f).reason == "timeout"


def test_quality_gate():
    p = DecisionPolicy(PolicyConfig(min_face_px=48, min_det_score=0.6, min_sharpness=15, max_yaw=0.6))
    q = Quality(
        width=np.array([60, 40, 60, 60, 60.0]),
        inter_eye=np.zeros(5),
        score=np.array([0.8, 0.8, 0.5, 0.8, 0.8]),
        sharpness=np.array([100, 100, 100, 5, 100.0]),
        yaw=np.array([0, 0, 0, 0, 0.9]),
        roll=np.zeros(5),
    )
    assert p.quality_ok(q).tolist() == [True, False, False, False, False]


def faces(*boxes) -> Faces:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Faces(b, np.ones(len(b), np.float32), np.zeros((len(b), 5, 2), np.float32))


def test_tracker_follows_a_face_walking_up_and_ends_it():
    tr = Tracker("cam", max_age_s=1.0)
    ids = []
    for i in range(20):  # the face grows from 40 to 230 px, drifting
        w = 40 + 10 * i
        cx = 320 + 2 * i
        (t,), _ = tr.update(faces([cx - w / 2, 200 - w / 2, cx + w / 2, 200 + w / 2]), i / 30)
        ids.append(t.track_id)
    assert len(set(ids)) == 1
    (other, first), _ = tr.update(faces([10, 10, 50, 50], [250, 92, 482, 322]), 0.7)
    assert first.track_id == ids[0] and other.track_id != ids[0]
    _, ended = tr.update(faces(), 2.0)
    assert {t.track_id for t in ended} == {ids[0], other.track_id} and tr.tracks == []


def test_tracker_split_starts_a_new_transaction():
    tr = Tracker("cam")
    (a,), _ = tr.update(faces([0, 0, 100, 100]), 0.0)
    b = tr.split(a, 0.1)
    assert a.ended and b.track_id != a.track_id and tr.tracks == [b]
    (c,), _ = tr.update(faces([2, 2, 102, 102]), 0.2)
    assert c is b
