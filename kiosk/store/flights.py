"""`BoardingStore` on the gallery (SQLite or PostgreSQL): flights, manifests, gate assignments, boarded marks.

It shares the gallery's connection and transactions, so a subject's templates and their flights change
together; its SQL runs on both backends (kiosk.store.queries.GalleryQueries).
Changes that alter what a verifier matches against (flights, manifests, gate assignments, purges) bump the
gallery's revision, so running verifiers reload within a second; boarded marks do not (they are read in the
transaction that decides an accept, never cached).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime

from kiosk.boarding.gates import GateFlights
from kiosk.boarding.model import Boarding, BoardOutcome, DecisionRecord, Flight, Passenger, PurgeResult
from kiosk.config import KioskConfig
from kiosk.errors import UsageError
from kiosk.store.gallery import open_gallery
from kiosk.store.queries import Db, GalleryQueries, Transaction
from kiosk.store.schema import BUMP, prune_changes

log = logging.getLogger(__name__)


class SqliteBoardingStore:
    """Boarding state in the gallery (see the module docstring; the name is historical: PostgreSQL too)."""

    def __init__(self, gallery: GalleryQueries) -> None:
        self.gallery = gallery
        self._db = gallery  # (its `execute`: reads outside a transaction)

    def _write(self) -> Transaction:
        return self.gallery.writing()

    # -- flights and manifests ---------------------------------------------------------
    def add_flight(self, flight_id: str, departs: float) -> None:
        """Create the flight, or move its departure. A purged flight is never reopened; the same flight
        number departing on another day (the next day's LH123) is a new flight, and the purged one is kept
        for its report as `LH123/YYYY-MM-DD` (its departure date)."""
        with self._write() as db:
            row = db.execute("SELECT departs, purged_at FROM flights WHERE id = ?", (flight_id,)).fetchone()
            if row is not None and row[1] is not None:
                old_day = datetime.fromtimestamp(row[0]).date()
                if datetime.fromtimestamp(departs).date() == old_day:
                    raise UsageError(
                        f"flight {flight_id} of {old_day} was purged after departure; nothing can be added to it"
                    )
                _archive(db, flight_id, f"{flight_id}/{old_day.isoformat()}")
            db.execute(
                "INSERT INTO flights (id, departs, created) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET departs = excluded.departs",
                (flight_id, departs, time.time()),
            )
            db.execute(BUMP)

    def add_passengers(self, flight_id: str, subject_ids: list[str]) -> int:
        """Put enrolled subjects on the flight's manifest; returns how many were new on it."""
        with self._write() as db:
            _usable(db, flight_id)
            added = sum(
                db.execute(
                    "INSERT INTO manifest (flight_id, subject_id, added) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    (flight_id, s, time.time()),
                ).rowcount
                for s in dict.fromkeys(subject_ids)
            )
            if added:
                db.execute(BUMP)
        return added

    def remove_passenger(self, flight_id: str, subject_id: str) -> bool:
        with self._write() as db:
            _known(db, flight_id)
            cur = db.execute("DELETE FROM manifest WHERE flight_id = ? AND subject_id = ?", (flight_id, subject_id))
            if cur.rowcount:
                _log_action(db, "remove_passenger", flight_id, subject_id)
                db.execute(BUMP)
        return bool(cur.rowcount)

    def flights(self) -> list[Flight]:
        gates: dict[str, list[str]] = {}
        for gate, flight in self._db.execute("SELECT gate_id, flight_id FROM gates ORDER BY gate_id"):
            gates.setdefault(flight, []).append(gate)
        rows = self._db.execute(
            "SELECT f.id, f.departs, f.purged_at, "
            " (SELECT COUNT(*) FROM manifest m WHERE m.flight_id = f.id),"
            " (SELECT COUNT(*) FROM boardings b JOIN manifest m ON m.flight_id = b.flight_id"
            "  AND m.subject_id = b.subject_id WHERE b.flight_id = f.id) "
            "FROM flights f ORDER BY f.departs, f.id"
        ).fetchall()
        return [
            Flight(fid, departs, n, boarded, tuple(gates.get(fid, ())), purged)
            for fid, departs, purged, n, boarded in rows
        ]

    def flight(self, flight_id: str) -> Flight | None:
        return next((f for f in self.flights() if f.id == flight_id), None)

    def passengers(self, flight_id: str) -> list[Passenger]:
        rows = self._db.execute(
            "SELECT m.subject_id, COALESCE(s.name, ''), "
            " EXISTS (SELECT 1 FROM templates t WHERE t.subject_id = m.subject_id),"
            " b.gate_id, b.boarded_at, b.score, b.event_id, b.camera_id "
            "FROM manifest m LEFT JOIN subjects s ON s.id = m.subject_id "
            "LEFT JOIN boardings b ON b.flight_id = m.flight_id AND b.subject_id = m.subject_id "
            "WHERE m.flight_id = ? ORDER BY m.subject_id",
            (flight_id,),
        ).fetchall()
        return [
            Passenger(
                sid,
                name,
                bool(enrolled),
                Boarding(flight_id, sid, gate, at, score, event, cam) if gate is not None else None,
            )
            for sid, name, enrolled, gate, at, score, event, cam in rows
        ]

    def manifest(self, flight_id: str) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT subject_id FROM manifest WHERE flight_id = ?", (flight_id,))}

    def manifests(self, flight_ids: set[str]) -> dict[str, set[str]]:
        """Several flights' manifests in one snapshot."""
        with self.gallery.transaction(write=False) as db:
            return {
                f: {r[0] for r in db.execute("SELECT subject_id FROM manifest WHERE flight_id = ?", (f,))}
                for f in flight_ids
            }

    def flights_of(self, subject_id: str) -> list[str]:
        """The flights not yet purged a subject is on, earliest departure first."""
        return [
            r[0]
            for r in self._db.execute(
                "SELECT f.id FROM manifest m JOIN flights f ON f.id = m.flight_id "
                "WHERE m.subject_id = ? AND f.purged_at IS NULL ORDER BY f.departs",
                (subject_id,),
            )
        ]

    # -- gates -------------------------------------------------------------------------
    def open_gate(self, gate_id: str, flight_id: str) -> None:
        with self._write() as db:
            _usable(db, flight_id)
            db.execute(
                "INSERT INTO gates (gate_id, flight_id, opened) VALUES (?, ?, ?) ON CONFLICT(gate_id) "
                "DO UPDATE SET flight_id = excluded.flight_id, opened = excluded.opened",
                (gate_id, flight_id, time.time()),
            )
            _log_action(db, "open", flight_id, gate=gate_id)
            db.execute(BUMP)

    def close_gate(self, gate_id: str) -> str | None:
        """Close the gate; returns the flight it was boarding (None: it was not boarding)."""
        with self._write() as db:
            row = db.execute("SELECT flight_id FROM gates WHERE gate_id = ?", (gate_id,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM gates WHERE gate_id = ?", (gate_id,))
            _log_action(db, "close", row[0], gate=gate_id)
            db.execute(BUMP)
        return str(row[0])

    def assignments(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT gate_id, flight_id FROM gates").fetchall())

    # -- boarding ------------------------------------------------------------------------
    def board(self, record: DecisionRecord, camera_id: str | None = None) -> BoardOutcome:
        """Mark the passenger boarded, in the transaction that checks they are enrolled, on the flight and
        not boarded yet; the accept is recorded with it. Two doors at once: one wins the primary key."""
        flight, subject = record.flight_id, str(record.subject_id)
        with self._write() as db:
            refused = _refusal(db, flight, subject, record.at)
            if refused is not None:
                return refused
            db.execute(
                "INSERT INTO boardings (flight_id, subject_id, gate_id, camera_id, boarded_at, score, event_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (flight, subject, record.gate_id, camera_id, record.at, record.score, record.event_id),
            )
            _insert_record(db, record)
        return BoardOutcome(True)

    def undo(self, flight_id: str, subject_id: str, why: str, *, withdraw_accept: bool = False) -> Boarding | None:
        """Make a boarded passenger boardable again (they left the aircraft, or the accept never reached the
        gate: `withdraw_accept` also drops that accept from the flight's decisions); logged with `why`. Returns
        the mark removed, None if there was none."""
        with self._write() as db:
            _known(db, flight_id)
            prev = _boarded(db, flight_id, subject_id)
            if prev is None:
                return None
            db.execute("DELETE FROM boardings WHERE flight_id = ? AND subject_id = ?", (flight_id, subject_id))
            if withdraw_accept and prev.event_id is not None:
                db.execute("DELETE FROM flight_decisions WHERE event_id = ?", (prev.event_id,))
            _log_action(db, "undo", flight_id, subject_id, prev.gate_id, why=why, event_id=prev.event_id)
        log.info("boarding of %s on %s undone (%s)", subject_id, flight_id, why)
        return prev

    def record(self, record: DecisionRecord) -> None:
        """Keep a decision at a boarding gate for the flight's report."""
        with self._write() as db:
            _insert_record(db, record)

    def decisions(self, flight_id: str) -> list[DecisionRecord]:
        return [
            DecisionRecord(*row)
            for row in self._db.execute(
                "SELECT event_id, flight_id, gate_id, type, reason, subject_id, candidate_id, score, at "
                "FROM flight_decisions WHERE flight_id = ? ORDER BY at",
                (flight_id,),
            )
        ]

    # -- retention ---------------------------------------------------------------------
    def purge(self, flight_id: str) -> PurgeResult:
        """Delete the biometric templates (and names) of the flight's passengers who are on no other flight
        not yet purged; the manifest, boarded marks and decisions stay for the report (ids only). The flight
        is closed on every gate and cannot be reopened."""
        with self._write() as db:
            _known(db, flight_id)
            gone, kept = _purgeable(db, flight_id)
            deleted = 0
            for sid in gone:
                deleted += db.execute("DELETE FROM templates WHERE subject_id = ?", (sid,)).rowcount
                db.execute("DELETE FROM subjects WHERE id = ?", (sid,))
            db.execute("UPDATE flights SET purged_at = ? WHERE id = ?", (time.time(), flight_id))
            db.execute("DELETE FROM gates WHERE flight_id = ?", (flight_id,))
            _log_action(db, "purge", flight_id, subjects=len(gone), kept=len(kept), templates=deleted)
            db.execute(BUMP)
            prune_changes(db)
        log.info(
            "purged flight %s: templates of %d passenger(s) deleted (%d templates), %d kept for a later flight",
            flight_id,
            len(gone),
            deleted,
            len(kept),
        )
        return PurgeResult(flight_id, gone, kept, deleted)

    def due_for_purge(self, now: float, after_h: float) -> list[str]:
        return [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM flights WHERE purged_at IS NULL AND departs + ? <= ? ORDER BY departs",
                (after_h * 3600.0, now),
            )
        ]


# -- the SQL steps the store's transactions share (each runs inside the caller's transaction) ---------------------


def _log_action(
    db: Db,
    action: str,
    flight: str | None,
    subject: str | None = None,
    gate: str | None = None,
    **detail: object,
) -> None:
    """A line of boarding_log: who changed a flight, a gate or a boarded mark, and when."""
    db.execute(
        "INSERT INTO boarding_log (at, action, flight_id, subject_id, gate_id, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), action, flight, subject, gate, json.dumps(detail)),
    )


def _known(db: Db, flight_id: str) -> tuple[str, float, float | None]:
    """The flight's id, departure and purge time; UsageError for a flight that does not exist."""
    row = db.execute("SELECT id, departs, purged_at FROM flights WHERE id = ?", (flight_id,)).fetchone()
    if row is None:
        raise UsageError(f"no flight {flight_id} (see `kiosk-enroll flight list`)")
    return (row[0], row[1], row[2])  # id, departs, purged_at


def _usable(db: Db, flight_id: str) -> None:
    """UsageError unless the flight exists and is not purged (a purged flight is never reopened)."""
    if _known(db, flight_id)[2] is not None:
        raise UsageError(f"flight {flight_id} was purged after departure; nothing can be added to it")


def _archive(db: Db, flight_id: str, archived: str) -> None:
    """Rename a purged flight and everything that names it to `archived`, freeing its number."""
    if db.execute("SELECT 1 FROM flights WHERE id = ?", (archived,)).fetchone() is not None:
        raise UsageError(f"flight {flight_id}: {archived} exists already")
    db.execute(
        "INSERT INTO flights (id, departs, created, purged_at) SELECT ?, departs, created, purged_at "
        "FROM flights WHERE id = ?",
        (archived, flight_id),
    )
    for table in ("manifest", "boardings", "flight_decisions", "boarding_log"):
        db.execute(f"UPDATE {table} SET flight_id = ? WHERE flight_id = ?", (archived, flight_id))  # noqa: S608 - table names from the tuple above
    db.execute("DELETE FROM flights WHERE id = ?", (flight_id,))
    log.info("flight %s: the purged flight of that number is kept as %s", flight_id, archived)


def _boarded(db: Db, flight_id: str, subject_id: str) -> Boarding | None:
    """The passenger's boarded mark on the flight, if there is one."""
    prev = db.execute(
        "SELECT gate_id, boarded_at, score, event_id, camera_id FROM boardings WHERE flight_id = ? AND subject_id = ?",
        (flight_id, subject_id),
    ).fetchone()
    return None if prev is None else Boarding(flight_id, subject_id, prev[0], prev[1], prev[2], prev[3], prev[4])


def _refusal(db: Db, flight: str, subject: str, at: float) -> BoardOutcome | None:
    """Why the passenger may not board now (not enrolled or expired, not on the flight, already boarded), or
    None: checked in the transaction that then marks them boarded."""
    row = db.execute("SELECT expires FROM subjects WHERE id = ?", (subject,)).fetchone()
    if row is None or (row[0] is not None and row[0] <= at):
        return BoardOutcome(False, "not_enrolled")
    on_flight = db.execute(
        "SELECT 1 FROM manifest m JOIN flights f ON f.id = m.flight_id WHERE m.flight_id = ? "
        "AND m.subject_id = ? AND f.purged_at IS NULL",
        (flight, subject),
    ).fetchone()
    if on_flight is None:
        return BoardOutcome(False, "not_on_flight")
    prev = _boarded(db, flight, subject)
    if prev is not None:
        return BoardOutcome(False, "already_boarded", prev)
    return None


def _insert_record(db: Db, r: DecisionRecord) -> None:
    """A decision for the flight's report (once per event)."""
    db.execute(
        "INSERT INTO flight_decisions (event_id, flight_id, gate_id, type, reason, subject_id, "
        "candidate_id, score, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (r.event_id, r.flight_id, r.gate_id, r.type, r.reason, r.subject_id, r.candidate_id, r.score, r.at),
    )


def _purgeable(db: Db, flight_id: str) -> tuple[list[str], list[str]]:
    """The flight's passengers whose templates go (on no other flight not yet purged) and those kept for a later
    flight, each in id order."""
    ids = [
        r[0]
        for r in db.execute("SELECT subject_id FROM manifest WHERE flight_id = ? ORDER BY subject_id", (flight_id,))
    ]
    kept = [
        r[0]
        for r in db.execute(
            "SELECT DISTINCT m.subject_id FROM manifest m JOIN manifest o ON o.subject_id = m.subject_id "
            "JOIN flights f ON f.id = o.flight_id WHERE m.flight_id = ? AND o.flight_id != ? "
            "AND f.purged_at IS NULL ORDER BY m.subject_id",
            (flight_id, flight_id),
        )
    ]
    return [s for s in ids if s not in set(kept)], kept


def open_store(cfg: KioskConfig) -> tuple[GalleryQueries, SqliteBoardingStore]:
    """The configured gallery (never created here: a missing one is a usage error) and its boarding store,
    for the commands (they never open a template: no template key is read); close the gallery when done."""
    gallery = open_gallery(cfg, create=False, keys=False)
    return gallery, SqliteBoardingStore(gallery)


def load_gate_flights(
    gallery: GalleryQueries,
    model_id: str,
    dim: int,
    *,
    require_flight: bool,
    gates: set[str],
    load: str = "all",
    previous: GateFlights | None = None,
    now: float | None = None,
) -> GateFlights:
    """The verifier's view of the gallery, from one snapshot: the templates it searches, which of `gates`
    board which flight, and those flights' manifests. `load`: "all" holds everyone enrolled (a passenger of
    any flight at the wrong gate is told `wrong_flight`); "gate_flights" holds only the passengers of the
    flights `gates` board (unless a gate boards none and so searches everyone), and a passenger of another
    host's flight is rejected `no_match`. Given the `previous` view, only what changed is read. `now` (epoch
    seconds, the current time where not given): who has expired."""
    store = SqliteBoardingStore(gallery)
    with gallery.transaction(write=False):
        assignments = {g: f for g, f in store.assignments().items() if g in gates}
        manifests = {f: store.manifest(f) for f in set(assignments.values())}
        scope = None
        if load == "gate_flights" and (require_flight or set(assignments) >= gates):
            scope = frozenset(sid for ids in manifests.values() for sid in ids)
        full = gallery.refresh(model_id, dim, previous.full if previous is not None else None, scope=scope, now=now)
    return GateFlights.build(full.prepare(), assignments, manifests, require_flight, gates)
