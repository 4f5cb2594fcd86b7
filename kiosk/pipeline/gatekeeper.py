"""The gatekeeper: the one place an accept is let through to a gate, or turned into the reject that says why not.

An accept opens a door, so every decision the core makes (a `Verdict`) goes through here before a gate hears
of it, in this order (`admit`):

1. checked (`checked`), each rule failing closed, an accept becoming a reject:
   - stale: a live camera's frame older than `policy.max_frame_age_ms` when it was decided -> `stale_frame`;
   - the gallery: stale past `gallery.stale_grace_s` -> `gallery_unavailable` (every accept); its file gone
     from under the verifier -> `store_unavailable` (an accept at a boarding gate: its boarded mark would go
     into a deleted file);
   - at a gate boarding a flight, board (`_board`): the boarded mark and the accept are one store
     transaction -> `already_boarded` (with where and when), `wrong_flight` (taken off the manifest: the
     reject then names the flights the passenger is on), `not_enrolled`, or `store_unavailable` when the
     store cannot answer;
   - elsewhere, confirm (`_confirm`): the subject is still enrolled -> `not_enrolled`; cannot tell ->
     `gallery_unavailable`;
   an accept withheld for the system's own state (`WITHHELD`) is forgotten by the repeat-accept memory, so
   the passenger's next presentation is a fresh accept;
2. audited, then published (`_publish`): the audit line first, so an event a gate received is in the log. An
   accept the audit log cannot hold is withheld: its boarded mark comes off again (`_unboard`), the accept
   is forgotten, and the gate is told `audit_unavailable` (a reject is published either way: it opens
   nothing; the log gets it as soon as it is writable again);
3. a reject at a boarding gate is kept for the flight's report (`_record`); those the store cannot take now
   wait in order, bounded, and are written when it answers again (`retry_records`).

It speaks only to ports (below): the enrolment, the boarding store, the audit log, the publisher, a clock,
the failure counters and the policy's accept memory. The verifier wires the real ones and states facts
(`gallery_state`: the gallery is stale, and why; its file is gone); the rules stay here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from kiosk.boarding.model import BoardOutcome, DecisionRecord
from kiosk.messaging.messages import Event
from kiosk.messaging.reasons import WITHHELD, Reason
from kiosk.pipeline.camera import Verdict
from kiosk.pipeline.policy import Decision

log = logging.getLogger(__name__)

UNRECORDED_MAX = 100_000  # boarding-gate decisions waiting for the store in an outage (oldest dropped beyond)


# -- ports -------------------------------------------------------------------------------------------------
class Enrolment(Protocol):
    def enrolled(self, subject_id: str) -> bool:
        """Is the subject enrolled (and not expired) right now? Raises when it cannot tell."""


class BoardingMarks(Protocol):
    """The part of kiosk.boarding.model.BoardingStore the accept path needs; each call one transaction,
    raising when the store cannot answer."""

    def board(self, record: DecisionRecord, camera_id: str | None = None) -> BoardOutcome: ...
    def undo(self, flight_id: str, subject_id: str, why: str, *, withdraw_accept: bool = False) -> object: ...
    def record(self, record: DecisionRecord) -> None: ...
    def flights_of(self, subject_id: str) -> list[str]: ...


class AuditTrail(Protocol):
    def write(self, line: bytes) -> bool:
        """Written and on disk (True), or not writable now (False; never raises)."""

    def defer(self, line: bytes) -> None:
        """Written as soon as the log is writable again (a line already published)."""


class Publisher(Protocol):
    def event(self, verdict: Verdict, decision: Decision) -> Event:
        """The event this decision would go out as (not sent yet)."""

    def publish(self, verdict: Verdict, event: Event) -> None:
        """Send it to the gates."""


class Clock(Protocol):
    def time(self) -> float: ...
    def monotonic(self) -> float: ...


class FailureCounters(Protocol):
    def store_failed(self) -> None: ...
    def audit_failed(self) -> None: ...


class SystemClock:
    @staticmethod
    def time() -> float:
        return time.time()

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


class NoCounters:
    def store_failed(self) -> None:
        pass

    def audit_failed(self) -> None:
        pass


def _reject(d: Decision, reason: str) -> Decision:
    return dataclasses.replace(d, type="reject", reason=reason)


class Gatekeeper:
    """Each decision through the fail-closed rules to the audit log and the gates; see the module docstring."""

    def __init__(
        self,
        *,
        enrolment: Enrolment,
        store: BoardingMarks,
        audit: AuditTrail,
        publisher: Publisher,
        forget_accept: Callable[[str, str], None],
        max_frame_age_ms: float,
        stale_grace_s: float,
        clock: Clock | None = None,
        counters: FailureCounters | None = None,
    ) -> None:
        self.enrolment = enrolment
        self.store = store
        self.audit = audit
        self.publisher = publisher
        self.forget_accept = forget_accept  # the policy's repeat-accept memory: this accept was not given
        self.max_frame_age_ms = max_frame_age_ms
        self.stale_grace_s = stale_grace_s
        self.clock = clock or SystemClock()
        self.counters = counters or NoCounters()
        self.last_error = ""  # "gallery: ..." or "boarding store: ...", until that component answers again
        self.stale_since: float | None = None  # clock.monotonic() when the gallery went stale (None: current)
        self.file_gone = False  # the gallery's file is no longer at its path
        self._refused_all = False  # every accept refused at the last gallery_state (its log line said so)
        self.unrecorded: deque[DecisionRecord] = deque(maxlen=UNRECORDED_MAX)  # rejects the store missed
        self.record_failing = False

    # -- facts from the service --------------------------------------------------------------------------
    def gallery_state(self, stale: str, *, file_gone: bool, remedy: str = "") -> None:
        """Facts from the service: `stale` says why the search matrix may be behind the gallery ("" when it is
        current), `file_gone` whether the gallery's file is no longer at its path, `remedy` what an operator
        can do about it (for the log)."""
        if stale and self.stale_since is None:
            self.stale_since = self.clock.monotonic()
        elif not stale:
            self.stale_since = None
        self.file_gone = file_gone
        refusing = self._refusal(None) is not None
        if refusing and not self._refused_all:
            log.error(
                "gallery stale for %.0f s (gallery.stale_grace_s): every accept is refused until it is back (%s)",
                self.stale_grace_s,
                remedy,
            )
        self._refused_all = refusing

    def use(self, enrolment: Enrolment, store: BoardingMarks) -> None:
        """Another gallery (the file put back at its path): confirm and board there from now on."""
        self.enrolment, self.store = enrolment, store

    def stale_for(self) -> float | None:
        """Seconds the gallery has been stale (None: it is current)."""
        return None if self.stale_since is None else self.clock.monotonic() - self.stale_since

    def refusing(self, boarding: bool = True) -> str:
        """What the gallery's state refuses now: "every accept", "boarding accepts" or ""."""
        if self._refusal(None) is not None:
            return "every accept"
        return "boarding accepts" if boarding and self._refusal("flight") is not None else ""

    def _refusal(self, flight: str | None) -> Reason | None:
        """The reject every accept gets from the gallery's state: stale past its grace, every accept
        (`gallery_unavailable`); its file gone, an accept at a boarding gate (`store_unavailable`)."""
        stale = self.stale_for()
        if stale is not None and stale >= self.stale_grace_s:
            return Reason.GALLERY_UNAVAILABLE
        if flight is not None and self.file_gone:
            return Reason.STORE_UNAVAILABLE
        return None

    # -- the accept path ---------------------------------------------------------------------------------
    def admit(self, verdict: Verdict) -> Event:
        """Check the core's decision, then audit and publish it; returns the event the gate was sent."""
        d = self.checked(verdict)
        track = verdict.track
        track.outcome = (d.type, d.subject_id, d.reason, d.score)
        return self._publish(verdict, d)

    def checked(self, verdict: Verdict) -> Decision:
        """The decision after every fail-closed rule (see the module docstring), the accept it withholds for
        the system's own state forgotten."""
        raw, cam = verdict.decision, verdict.camera
        d = raw
        if d.type == "accept" and cam.realtime and (verdict.at - d.captured_at) * 1000 > self.max_frame_age_ms:
            log.warning(
                "camera %s: accept of %s from a frame captured %.0f ms ago withheld (stale_frame)",
                cam.camera_id,
                d.subject_id,
                (verdict.at - d.captured_at) * 1000,
            )
            d = _reject(d, Reason.STALE_FRAME)
        refusal = self._refusal(d.flight_id)
        if d.type == "accept" and refusal is not None:
            log.warning(
                "camera %s: accept of %s withheld (%s): the gallery is stale", cam.camera_id, d.subject_id, refusal
            )
            d = _reject(d, refusal)
        if d.flight_id is not None and d.subject_id is not None:
            d = self._board(verdict, d)
        elif d.type == "accept" and d.subject_id is not None:
            d = self._confirm(d)
        if raw.type == "accept" and d.reason in WITHHELD and raw.subject_id is not None:
            # Withheld, not given: the passenger's next presentation is a fresh accept, not a "repeat" of this.
            self.forget_accept(cam.gate_id, raw.subject_id)
        return d

    def _confirm(self, d: Decision) -> Decision:
        """An accept only for a subject enrolled right now: a removal or expiry counts even while the search
        matrix is stale."""
        if d.subject_id is None:
            raise ValueError(f"an accept names its subject: {d}")
        try:
            confirmed = self.enrolment.enrolled(d.subject_id)
        except Exception as exc:  # noqa: BLE001 - any failure to confirm must reject, never accept
            self.last_error = f"gallery: {exc}"
            log.error("cannot confirm %s in the gallery (%s): rejected", d.subject_id, exc)
            return _reject(d, Reason.GALLERY_UNAVAILABLE)
        self._recovered("gallery")
        if not confirmed:
            log.warning("track matched %s, who is no longer enrolled (or expired): rejected", d.subject_id)
            return _reject(d, Reason.NOT_ENROLLED)
        return d

    def _board(self, verdict: Verdict, d: Decision) -> Decision:
        """At a gate boarding a flight: an accept marks the passenger boarded, or becomes the reject that says
        why not; a wrong_flight reject learns the flights the passenger is on."""
        flight, subject = d.flight_id, d.subject_id
        if flight is None or subject is None:
            raise ValueError(f"boarding needs a flight and a subject: {d}")
        cam = verdict.camera
        try:
            if d.reason == Reason.WRONG_FLIGHT:
                return dataclasses.replace(d, on_flights=self.store.flights_of(subject))
            if d.type != "accept":
                return d
            outcome = self.store.board(
                DecisionRecord(d.event_id, flight, cam.gate_id, "accept", None, subject, None, d.score, verdict.at),
                camera_id=cam.camera_id,
            )
            self._recovered("boarding store")
        except Exception as exc:  # noqa: BLE001 - a boarded mark that cannot be taken must reject, never accept
            self.last_error = f"boarding store: {exc}"
            self.counters.store_failed()
            log.error("cannot record the boarding of %s on %s (%s): rejected", subject, flight, exc)
            return _reject(d, Reason.STORE_UNAVAILABLE) if d.type == "accept" else d
        if outcome.first:
            return d
        if outcome.reason == Reason.ALREADY_BOARDED and outcome.previous is not None:
            log.info("%s already boarded %s at gate %s: rejected", subject, flight, outcome.previous.gate_id)
            return dataclasses.replace(
                _reject(d, Reason.ALREADY_BOARDED),
                boarded_at=outcome.previous.boarded_at,
                boarded_gate_id=outcome.previous.gate_id,
            )
        if outcome.reason == "not_on_flight":  # taken off the manifest since the view was loaded
            log.warning("%s is no longer on flight %s: rejected wrong_flight", subject, flight)
            return self._board(verdict, _reject(d, Reason.WRONG_FLIGHT))
        log.warning("track matched %s, who is no longer enrolled (or expired): rejected", subject)
        return _reject(d, outcome.reason or Reason.NOT_ENROLLED)

    def _publish(self, verdict: Verdict, d: Decision) -> Event:
        """Audit first, then publish. An accept that cannot be audited is published as a reject
        (`audit_unavailable`): nothing opens a door that the audit log does not hold. A reject is published
        either way: it opens nothing and tells the gate to stay closed."""
        gate = verdict.camera.gate_id
        event = self.publisher.event(verdict, d)
        if not self.audit.write(event.to_json()):
            self.counters.audit_failed()
            if d.type == "accept":
                log.error("accept of %s at gate %s withheld: the audit log cannot be written", d.subject_id, gate)
                if d.subject_id:
                    self.forget_accept(gate, d.subject_id)  # not accepted after all
                    if d.flight_id:
                        self._unboard(d)
                d = _reject(d, Reason.AUDIT_UNAVAILABLE)
                event = self.publisher.event(verdict, d)
            self.audit.defer(event.to_json())  # what the gate is told goes into the log once it can be written
        if d.flight_id and d.type != "accept":  # an accept was recorded with its boarded mark
            self._record(gate, d)
        self.publisher.publish(verdict, event)
        return event

    def _unboard(self, d: Decision) -> None:
        """The boarded mark of an accept that never reached the gate comes off again; if it cannot, an
        operator must (`kiosk board undo`), and the gate is told the reject all the same."""
        try:
            self.store.undo(
                str(d.flight_id), str(d.subject_id), why="accept withheld: audit log unwritable", withdraw_accept=True
            )
        except Exception as exc:  # noqa: BLE001 - logged and counted; the reject still goes out
            self.counters.store_failed()
            log.error(
                "the boarded mark of %s on %s could not be taken off (%s): `kiosk board undo` it",
                d.subject_id,
                d.flight_id,
                exc,
            )

    # -- the flight report's records ----------------------------------------------------------------------
    def _record(self, gate: str, d: Decision) -> None:
        """Keep a reject at a boarding gate for the flight's report. The gate is told either way; one the
        store cannot take now (an outage: the store_unavailable rejects themselves) waits, in order and
        bounded, and is written when the store answers again, with the time it was decided."""
        self.unrecorded.append(
            DecisionRecord(
                d.event_id,
                str(d.flight_id),
                gate,
                d.type,
                None if d.reason is None else str(d.reason),
                d.subject_id,
                d.candidate_id,
                d.score,
                self.clock.time(),
            )
        )
        self.retry_records()

    def retry_records(self) -> None:
        """Write the decisions waiting for the store, oldest first; stop at the first failure (next try with
        the next decision or the service's next round). Never into a gallery file no longer at its path."""
        if self.file_gone:
            return
        while self.unrecorded:
            record = self.unrecorded[0]
            try:
                self.store.record(record)
            except Exception as exc:  # noqa: BLE001 - kept for the next try
                self.counters.store_failed()
                if not self.record_failing:
                    log.warning(
                        "decision %s not yet kept for the report of %s (kept for later, %d waiting): %s",
                        record.event_id,
                        record.flight_id,
                        len(self.unrecorded),
                        exc,
                    )
                self.record_failing = True
                self.last_error = f"boarding store: {exc}"
                return
            self.unrecorded.popleft()
            if self.record_failing and not self.unrecorded:
                log.info("boarding store answers again: the decisions it missed are kept for the report")
                self.record_failing = False
                self._recovered("boarding store")

    def _recovered(self, component: str) -> None:
        """`component` answered again: its error is no longer the last one to show."""
        if self.last_error.startswith(component + ":"):
            log.info("%s answers again (was: %s)", component, self.last_error)
            self.last_error = ""
