"""Metrics by the book, unit level: capture counters relayed by the verifier never go down."""

from __future__ import annotations

from kiosk.services.metrics import VerifierMetrics


def _value(metrics: VerifierMetrics, name: str, camera: str) -> float:
    for family in metrics.captures.collect():
        if family.name == name:
            return next(s.value for s in family.samples if s.labels["camera"] == camera)
    raise AssertionError(name)


def test_a_restarted_capture_does_not_make_its_counters_fall():
    m = VerifierMetrics({"cam-a1": "A1"})
    assert _value(m, "kiosk_capture_frames_sent", "cam-a1") == 0  # present from zero
    seen = []
    # The capture restarted after 10 (a new start time) and again after 4 (a lower count, no start time).
    for sent, run in ((5, 1.0), (10, 1.0), (3, 2.0), (4, 2.0), (0, None), (2, None)):
        m.captures.update("cam-a1", {"sent": sent, "drops": 1, "faults": 0, "fps": 29.5, "started_at": run})
        seen.append(_value(m, "kiosk_capture_frames_sent", "cam-a1"))
    assert seen == [5, 10, 13, 14, 14, 16] and seen == sorted(seen)
    assert _value(m, "kiosk_capture_frames_dropped", "cam-a1") == 3  # one per run
    assert _value(m, "kiosk_capture_fps", "cam-a1") == 29.5
    m.captures.update("cam-a1", {"sent": "many", "drops": -4, "fps": True})  # ignored, never an error
    assert _value(m, "kiosk_capture_frames_sent", "cam-a1") == 16
