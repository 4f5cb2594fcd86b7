"""The accept path's fail-closed rules, one test each, against the gatekeeper (kiosk.pipeline.gatekeeper) with fake
ports (tests/fake_ports.py): no process, no socket, no database, a few milliseconds a test.

Each rule turns an accept into the reject that says why: a stale frame, the gallery stale past its grace, its file
gone (at a boarding gate), a subject no longer enrolled or one the gallery cannot confirm, a passenger already
boarded, not on the flight, a store that cannot take the boarded mark, an audit log that cannot hold the accept
(the boarded mark then comes off again, even if that itself fails); the rejects kept for a flight's report wait,
in order, while the store is down."""

from __future__ import annotations

import json
import logging

import numpy as np

from kiosk.messaging.reasons import Reason
from kiosk.pipeline.core import CameraState, Verdict
from kiosk.pipeline.policy import Decision
from kiosk.pipeline.tracking import Track, Tracker
from tests.fake_ports import Ports, gatekeeper

T0 = 1_800_000_000.0
LH = "LH123"


def verdict(
    subject: str | None = "ANN",
    *,
    type: str = "accept",
    reason: str | None = None,
    gate: str = "A1",
    flight: str | None = None,
    age_s: float = 0.05,
    realtime: bool = True,
) -> Verdict:
    """A decision of the core as it reaches the gatekeeper: made `age_s` after its frame was captured."""
    cam = CameraState(f"cam-{gate.lower()}", gate, realtime, Tracker(f"cam-{gate.lower()}"))
    track = Track(7, cam.camera_id, np.zeros(4, np.float32), T0)
    d = Decision(type, reason, subject, subject and subject.title(), 0.81, 3, T0, seq=42, flight_id=flight)
    return Verdict(cam, track, d, T0 + age_s)


def sent(ports: Ports) -> list[tuple[str, str | None]]:
    return [(e.type, e.reason) for e in ports.publisher.sent]


def boarding(**kw) -> Ports:
    return gatekeeper(manifests={LH: {"ANN", "BOB"}, "BA9": {"CARL"}}, **kw)


# -- what goes through ---------------------------------------------------------------------------------------
def test_an_accept_is_confirmed_audited_then_published():
    ports = gatekeeper(enrolled={"ANN"})
    v = verdict()
    event = ports.gate.admit(v)
    assert (event.type, event.subject_id, event.reason) == ("accept", "ANN", None)
    assert ports.enrolment.asked == ["ANN"] and ports.publisher.audited_first == [True]
    assert ports.audit.lines == [event.to_json()] and ports.forgotten == []
    assert v.track.outcome == ("accept", "ANN", None, 0.81)  # what a watching console shows


def test_an_accept_at_a_boarding_gate_is_the_boarded_mark():
    ports = boarding()
    event = ports.gate.admit(verdict(flight=LH))
    assert event.type == "accept" and ports.store.boarded[(LH, "ANN")].event_id == event.event_id
    assert ports.enrolment.asked == []  # the store's transaction checks the enrolment itself


# -- stale ---------------------------------------------------------------------------------------------------
def test_an_accept_from_a_stale_frame_is_withheld_and_forgotten():
    ports = gatekeeper(enrolled={"ANN"}, max_frame_age_ms=500)
    assert sent(ports) == []
    ports.gate.admit(verdict(age_s=0.8))
    assert sent(ports) == [("reject", "stale_frame")] and ports.forgotten == [("A1", "ANN")]
    ports.gate.admit(verdict(age_s=0.8, realtime=False))  # a replay's frames have no age to speak of
    assert sent(ports)[-1] == ("accept", None)


def test_a_stale_frame_at_a_boarding_gate_takes_no_boarded_mark():
    ports = boarding(max_frame_age_ms=500)
    ports.gate.admit(verdict(flight=LH, age_s=0.8))
    assert sent(ports) == [("reject", "stale_frame")] and ports.store.boarded == {}
    assert [(r.type, r.reason) for r in ports.store.records] == [("reject", "stale_frame")]  # for the report


# -- the gallery's state -------------------------------------------------------------------------------------
def test_a_gallery_stale_past_its_grace_refuses_every_accept_until_it_is_back():
    ports = gatekeeper(enrolled={"ANN"}, stale_grace_s=60)
    ports.gate.gallery_state("gallery reload: disk I/O error", file_gone=False)
    ports.clock.advance(59)
    ports.gate.admit(verdict())  # within the grace: decided from memory
    assert ports.gate.refusing() == ""
    ports.clock.advance(1)
    assert ports.gate.refusing() == "every accept"
    ports.gate.admit(verdict())
    ports.gate.admit(verdict(type="reject", reason="no_match", subject=None))  # a reject goes out as it is
    assert sent(ports) == [("accept", None), ("reject", "gallery_unavailable"), ("reject", "no_match")]
    assert ports.forgotten == [("A1", "ANN")]
    ports.gate.gallery_state("", file_gone=False)
    ports.gate.admit(verdict())
    assert sent(ports)[-1] == ("accept", None) and ports.gate.stale_for() is None


def test_a_gallery_file_gone_refuses_boarding_accepts_at_once_and_keeps_records_back():
    ports = boarding()
    ports.gate.gallery_state("gallery file gone", file_gone=True)
    assert ports.gate.refusing() == "boarding accepts" and ports.gate.refusing(boarding=False) == ""
    ports.gate.admit(verdict(flight=LH))
    ports.enrolment.enrolled_ids.add("ANN")
    ports.gate.admit(verdict())  # a 1:N gate decides from memory for the grace
    assert sent(ports) == [("reject", "store_unavailable"), ("accept", None)]
    assert ports.forgotten == [("A1", "ANN")] and ports.store.boarded == {}
    # the reject is kept for the report, but never written into a file no longer at its path
    assert ports.store.records == [] and len(ports.gate.unrecorded) == 1
    ports.gate.gallery_state("", file_gone=False)
    ports.gate.retry_records()
    assert [r.reason for r in ports.store.records] == ["store_unavailable"] and not ports.gate.unrecorded


# -- confirm -------------------------------------------------------------------------------------------------
def test_an_accept_of_someone_no_longer_enrolled_is_rejected_not_enrolled():
    ports = gatekeeper(enrolled=set())
    ports.gate.admit(verdict())
    assert sent(ports) == [("reject", "not_enrolled")]
    assert ports.forgotten == []  # the passenger's own state, not the system's: no fresh accept next time


def test_an_accept_the_gallery_cannot_confirm_is_rejected_gallery_unavailable():
    ports = gatekeeper(enrolled={"ANN"})
    ports.enrolment.down = True
    ports.gate.admit(verdict())
    assert sent(ports) == [("reject", "gallery_unavailable")] and ports.forgotten == [("A1", "ANN")]
    assert ports.gate.last_error == "gallery: database is locked"
    ports.enrolment.down = False
    ports.gate.admit(verdict())
    assert sent(ports)[-1] == ("accept", None) and ports.gate.last_error == ""


# -- board ---------------------------------------------------------------------------------------------------
def test_a_passenger_already_boarded_is_rejected_with_where_and_when():
    ports = boarding()
    first = ports.gate.admit(verdict(flight=LH, gate="A1"))
    ports.clock.advance(30)
    second = ports.gate.admit(verdict(flight=LH, gate="A2"))  # the other door of the same flight
    assert (first.type, second.type, second.reason) == ("accept", "reject", "already_boarded")
    assert (second.boarded_gate_id, second.boarded_at) == ("A1", T0 + 0.05)
    assert ports.forgotten == []  # a real second boarding: no fresh accept
    assert [(r.type, r.reason) for r in ports.store.records] == [("accept", None), ("reject", "already_boarded")]


def test_a_passenger_taken_off_the_manifest_is_rejected_wrong_flight_with_their_flights():
    ports = boarding()
    ports.store.manifests["BA9"].add("ANN")
    ports.store.manifests[LH].discard("ANN")  # since the gate's view was loaded
    event = ports.gate.admit(verdict(flight=LH))
    assert (event.type, event.reason, event.on_flights) == ("reject", "wrong_flight", ["BA9"])
    assert ports.store.boarded == {}


def test_a_wrong_flight_reject_of_the_policy_learns_the_passengers_flights():
    ports = boarding()
    event = ports.gate.admit(verdict("CARL", type="reject", reason="wrong_flight", flight=LH))
    assert (event.reason, event.on_flights) == ("wrong_flight", ["BA9"])


def test_an_accept_of_someone_the_store_finds_unenrolled_is_rejected_not_enrolled():
    ports = boarding()
    ports.store.enrolled_ids = {"BOB"}  # ANN's enrolment expired since the view was loaded
    ports.gate.admit(verdict(flight=LH))
    assert sent(ports) == [("reject", "not_enrolled")] and ports.store.boarded == {}


def test_a_boarded_mark_the_store_cannot_take_is_rejected_store_unavailable():
    ports = boarding()
    ports.store.down = True
    ports.gate.admit(verdict(flight=LH))
    assert sent(ports) == [("reject", "store_unavailable")] and ports.forgotten == [("A1", "ANN")]
    assert ports.counters.store == 2  # the boarded mark, then the reject's record for the report
    assert ports.gate.last_error == "boarding store: boarding store unreachable" and ports.gate.record_failing
    ports.store.down = False
    ports.gate.retry_records()
    assert [r.reason for r in ports.store.records] == ["store_unavailable"]
    assert not ports.gate.record_failing and ports.gate.last_error == ""


# -- audit ---------------------------------------------------------------------------------------------------
def test_an_accept_the_audit_log_cannot_hold_is_undone_forgotten_and_rejected_audit_unavailable():
    ports = boarding()
    ports.audit.writable = False
    event = ports.gate.admit(verdict(flight=LH))
    assert (event.type, event.reason) == ("reject", "audit_unavailable") and sent(ports) == [
        ("reject", "audit_unavailable")
    ]
    assert ports.store.boarded == {} and ports.store.undone == [(LH, "ANN", "accept withheld: audit log unwritable")]
    assert ports.forgotten == [("A1", "ANN")] and ports.counters.audit == 1
    # the accept's record went with its mark; the reject the gate was told is kept, and audited once it can be
    assert [(r.type, r.reason) for r in ports.store.records] == [("reject", "audit_unavailable")]
    assert [json.loads(line)["reason"] for line in ports.audit.deferred] == ["audit_unavailable"]
    ports.audit.writable = True
    ports.gate.admit(verdict(flight=LH))  # the passenger's next presentation is a fresh accept
    assert sent(ports)[-1] == ("accept", None)


def test_an_undo_that_fails_is_logged_and_counted_and_the_reject_still_goes_out(caplog):
    ports = boarding()
    ports.audit.writable = False
    ports.store.undo_down = True
    with caplog.at_level(logging.ERROR, logger="kiosk.pipeline.gatekeeper"):
        ports.gate.admit(verdict(flight=LH))
    assert sent(ports) == [("reject", "audit_unavailable")] and ports.forgotten == [("A1", "ANN")]
    assert ports.counters.store == 1 and (LH, "ANN") in ports.store.boarded  # left for an operator
    assert any(
        "could not be taken off" in r.getMessage() and "kiosk board undo" in r.getMessage() for r in caplog.records
    )


def test_a_reject_the_audit_log_cannot_hold_is_published_and_audited_later():
    ports = gatekeeper()
    ports.audit.writable = False
    ports.gate.admit(verdict(None, type="reject", reason="no_match"))
    assert sent(ports) == [("reject", "no_match")] and len(ports.audit.deferred) == 1
    assert ports.forgotten == [] and ports.counters.audit == 1


# -- the flight report's records -----------------------------------------------------------------------------
def test_records_the_store_missed_wait_in_order_and_are_written_when_it_answers():
    ports = boarding()
    ports.store.down = True
    for subject, reason in (("BOB", "no_match"), ("CARL", "wrong_flight"), (None, "timeout")):
        ports.gate.admit(verdict(subject, type="reject", reason=reason, flight=LH))
        ports.clock.advance(1)
    assert sent(ports) == [("reject", "no_match"), ("reject", "wrong_flight"), ("reject", "timeout")]
    assert len(ports.gate.unrecorded) == 3 and ports.gate.record_failing and ports.store.records == []
    ports.gate.retry_records()  # still down: nothing lost, nothing reordered
    assert len(ports.gate.unrecorded) == 3
    ports.store.down = False
    ports.gate.retry_records()
    assert [(r.reason, r.at) for r in ports.store.records] == [
        ("no_match", T0),
        ("wrong_flight", T0 + 1),
        ("timeout", T0 + 2),
    ]  # with the time each was decided
    assert not ports.gate.unrecorded and not ports.gate.record_failing


def test_a_reject_at_a_gate_boarding_no_flight_is_not_recorded():
    ports = gatekeeper()
    ports.gate.admit(verdict(None, type="reject", reason="no_match"))
    assert ports.store.records == [] and not ports.gate.unrecorded


def test_reasons_go_out_as_their_bare_values():
    ports = boarding()
    ports.store.down = True
    event = ports.gate.admit(verdict(flight=LH))
    assert event.reason is Reason.STORE_UNAVAILABLE
    assert json.loads(event.to_json())["reason"] == "store_unavailable"
    assert b'"reason":"store_unavailable"' in event.to_json()
    assert ports.gate.unrecorded[0].reason == "store_unavailable" and type(ports.gate.unrecorded[0].reason) is str
