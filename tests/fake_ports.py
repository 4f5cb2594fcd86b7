"""Fakes of the gatekeeper's ports (kiosk.pipeline.gatekeeper): an enrolment, a boarding store, an audit log, a
publisher, a clock and failure counters, each a few lines of plain state a test can set and read. A port told to
fail raises (or, the audit log, answers False) as the real one does when its database or disk is gone."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiosk.boarding.model import Boarding, BoardOutcome, DecisionRecord
from kiosk.messaging.messages import Event
from kiosk.pipeline.core import Verdict
from kiosk.pipeline.gatekeeper import Gatekeeper
from kiosk.pipeline.policy import Decision


class Down(Exception):
    """What a fake port raises when told it is down."""


@dataclass
class FakeEnrolment:
    enrolled_ids: set[str] = field(default_factory=set)
    down: bool = False
    asked: list[str] = field(default_factory=list)

    def enrolled(self, subject_id: str) -> bool:
        self.asked.append(subject_id)
        if self.down:
            raise Down("database is locked")
        return subject_id in self.enrolled_ids


@dataclass
class FakeStore:
    """Flights -> passengers; the boarded marks and the report's records, as the real store keeps them."""

    manifests: dict[str, set[str]] = field(default_factory=dict)
    enrolled_ids: set[str] | None = None  # None: everyone on a manifest is enrolled
    boarded: dict[tuple[str, str], Boarding] = field(default_factory=dict)
    records: list[DecisionRecord] = field(default_factory=list)
    undone: list[tuple[str, str, str]] = field(default_factory=list)
    down: bool = False  # every call raises
    undo_down: bool = False  # only undo raises (the store went down between board and undo)

    def _check(self) -> None:
        if self.down:
            raise Down("boarding store unreachable")

    def board(self, record: DecisionRecord, camera_id: str | None = None) -> BoardOutcome:
        self._check()
        subject = str(record.subject_id)
        if self.enrolled_ids is not None and subject not in self.enrolled_ids:
            return BoardOutcome(False, "not_enrolled")
        if subject not in self.manifests.get(record.flight_id, set()):
            return BoardOutcome(False, "not_on_flight")
        previous = self.boarded.get((record.flight_id, subject))
        if previous is not None:
            return BoardOutcome(False, "already_boarded", previous)
        self.boarded[(record.flight_id, subject)] = Boarding(
            record.flight_id, subject, record.gate_id, record.at, record.score, record.event_id, camera_id
        )
        self.records.append(record)
        return BoardOutcome(True)

    def undo(self, flight_id: str, subject_id: str, why: str, *, withdraw_accept: bool = False) -> Boarding | None:
        self._check()
        if self.undo_down:
            raise Down("boarding store unreachable")
        self.undone.append((flight_id, subject_id, why))
        mark = self.boarded.pop((flight_id, subject_id), None)
        if withdraw_accept and mark is not None:
            self.records = [r for r in self.records if r.event_id != mark.event_id]
        return mark

    def record(self, record: DecisionRecord) -> None:
        self._check()
        self.records.append(record)

    def flights_of(self, subject_id: str) -> list[str]:
        self._check()
        return sorted(f for f, people in self.manifests.items() if subject_id in people)


@dataclass
class FakeAudit:
    writable: bool = True
    lines: list[bytes] = field(default_factory=list)
    deferred: list[bytes] = field(default_factory=list)

    def write(self, line: bytes) -> bool:
        if self.writable:
            self.lines.append(line)
        return self.writable

    def defer(self, line: bytes) -> None:
        self.deferred.append(line)


@dataclass
class FakePublisher:
    sent: list[Event] = field(default_factory=list)
    audit: FakeAudit | None = None  # to check that each event was audited before it went out
    audited_first: list[bool] = field(default_factory=list)

    def event(self, verdict: Verdict, d: Decision) -> Event:
        return Event(
            type=d.type,
            gate_id=verdict.camera.gate_id,
            camera_id=verdict.camera.camera_id,
            track_id=verdict.track_id,
            subject_id=d.subject_id,
            display_name=d.display_name,
            score=d.score,
            reason=d.reason,
            frames=d.frames,
            captured_at=d.captured_at,
            seq=d.seq,
            event_id=d.event_id,
            flight_id=d.flight_id,
            boarded_at=d.boarded_at,
            boarded_gate_id=d.boarded_gate_id,
            on_flights=d.on_flights,
        )

    def publish(self, verdict: Verdict, event: Event) -> None:
        if self.audit is not None:
            self.audited_first.append(event.to_json() in self.audit.lines + self.audit.deferred)
        self.sent.append(event)


@dataclass
class FakeClock:
    now: float = 1_800_000_000.0
    mono: float = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


@dataclass
class FakeCounters:
    store: int = 0
    audit: int = 0

    def store_failed(self) -> None:
        self.store += 1

    def audit_failed(self) -> None:
        self.audit += 1


@dataclass
class Ports:
    """One gatekeeper and its fakes."""

    enrolment: FakeEnrolment
    store: FakeStore
    audit: FakeAudit
    publisher: FakePublisher
    clock: FakeClock
    counters: FakeCounters
    forgotten: list[tuple[str, str]]
    gate: Gatekeeper


def gatekeeper(
    *,
    enrolled: set[str] | None = None,
    manifests: dict[str, set[str]] | None = None,
    max_frame_age_ms: float = 500.0,
    stale_grace_s: float = 300.0,
) -> Ports:
    enrolment = FakeEnrolment(set(enrolled or ()))
    store = FakeStore(dict(manifests or {}))
    audit = FakeAudit()
    publisher = FakePublisher(audit=audit)
    clock = FakeClock()
    counters = FakeCounters()
    forgotten: list[tuple[str, str]] = []
    gate = Gatekeeper(
        enrolment=enrolment,
        store=store,
        audit=audit,
        publisher=publisher,
        forget_accept=lambda gate_id, subject_id: forgotten.append((gate_id, subject_id)),
        max_frame_age_ms=max_frame_age_ms,
        stale_grace_s=stale_grace_s,
        clock=clock,
        counters=counters,
    )
    return Ports(enrolment, store, audit, publisher, clock, counters, forgotten, gate)
