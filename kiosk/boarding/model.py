"""What boarding by flight stores, and the interface of the store that keeps it.

`BoardingStore` is what the verifier, `kiosk board` and `kiosk-enroll flight` need; `kiosk.store.flights`
implements it on the SQLite gallery. Every method is one transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from kiosk.errors import UsageError

# An airline code and a number; a past, purged flight of the same number is kept as `LH123/2026-11-24`.
FLIGHT_ID = re.compile(r"^(?:[A-Z]{2,3}|[A-Z][0-9]|[0-9][A-Z])[0-9]{1,5}[A-Z]?(?:/\d{4}-\d{2}-\d{2})?$")


def check_flight_id(value: str) -> str:
    """A flight id as airlines write it (`LH123`, `U21234`, `BA9A`), upper-cased; ValueError otherwise."""
    flight = value.strip().upper()
    if not FLIGHT_ID.match(flight):
        raise ValueError(f"flight {value!r}: expected an airline code and a number, such as LH123")
    return flight


def flight_arg(value: str) -> str:
    """`check_flight_id` for a command-line argument: a usage error (exit 2) when malformed."""
    try:
        return check_flight_id(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def known_flight(store: BoardingStore, flight_id: str) -> Flight:
    """The flight, or a usage error that says how to make it."""
    flight = store.flight(flight_id)
    if flight is None:
        raise UsageError(
            f"no flight {flight_id} (see `kiosk-enroll flight list`; a new one comes with "
            f"`kiosk-enroll import MANIFEST.csv --flight {flight_id} --departs ISO_TIME`)"
        )
    return flight


@dataclass(frozen=True)
class Flight:
    id: str
    departs: float  # scheduled departure, unix seconds
    passengers: int
    boarded: int
    gates: tuple[str, ...]  # gates boarding it now
    purged_at: float | None = None

    def status(self, now: float) -> str:
        """scheduled | boarding (a gate is open on it) | departed (past its departure) | purged."""
        if self.purged_at is not None:
            return "purged"
        if self.gates:
            return "boarding"
        return "departed" if now >= self.departs else "scheduled"


@dataclass(frozen=True)
class Boarding:
    """A passenger's boarded mark: one per flight and subject (the store guarantees it)."""

    flight_id: str
    subject_id: str
    gate_id: str
    boarded_at: float
    score: float | None = None
    event_id: str | None = None
    camera_id: str | None = None


@dataclass(frozen=True)
class Passenger:
    subject_id: str
    name: str
    enrolled: bool  # has templates (false once purged or removed)
    boarding: Boarding | None


@dataclass(frozen=True)
class BoardOutcome:
    """What marking a passenger boarded found: `first` (this accept boards them), or why not."""

    first: bool
    reason: str | None = None  # already_boarded | not_enrolled | not_on_flight
    previous: Boarding | None = None


@dataclass(frozen=True)
class DecisionRecord:
    """A decision at a gate boarding a flight, kept for the boarding report (no biometrics)."""

    event_id: str
    flight_id: str
    gate_id: str
    type: str
    reason: str | None
    subject_id: str | None
    candidate_id: str | None  # for a reject: the best-scoring passenger, below the bar
    score: float | None
    at: float


@dataclass(frozen=True)
class PurgeResult:
    flight_id: str
    subjects_purged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # on another flight not yet purged
    templates_deleted: int = 0


class BoardingStore(Protocol):
    def add_flight(self, flight_id: str, departs: float) -> None: ...
    def add_passengers(self, flight_id: str, subject_ids: list[str]) -> int: ...
    def remove_passenger(self, flight_id: str, subject_id: str) -> bool: ...
    def flights(self) -> list[Flight]: ...
    def flight(self, flight_id: str) -> Flight | None: ...
    def passengers(self, flight_id: str) -> list[Passenger]: ...
    def manifest(self, flight_id: str) -> set[str]: ...
    def flights_of(self, subject_id: str) -> list[str]: ...
    def open_gate(self, gate_id: str, flight_id: str) -> None: ...
    def close_gate(self, gate_id: str) -> str | None: ...
    def assignments(self) -> dict[str, str]: ...
    def board(self, record: DecisionRecord, camera_id: str | None = None) -> BoardOutcome: ...
    def undo(self, flight_id: str, subject_id: str, why: str, *, withdraw_accept: bool = False) -> Boarding | None: ...
    def record(self, record: DecisionRecord) -> None: ...
    def decisions(self, flight_id: str) -> list[DecisionRecord]: ...
    def purge(self, flight_id: str) -> PurgeResult: ...
    def due_for_purge(self, now: float, after_h: float) -> list[str]: ...
