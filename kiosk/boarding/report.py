"""The boarding report of one flight: every manifest passenger, boarded or not, and what the gates decided."""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from kiosk.boarding.model import DecisionRecord, Flight, Passenger


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def flight_json(f: Flight, now: float) -> dict[str, Any]:
    """A flight as `flight list --json`, `flight show --json` and `board status --json` give it."""
    return {
        "id": f.id,
        "departs": iso(f.departs),
        "status": f.status(now),
        "passengers": f.passengers,
        "boarded": f.boarded,
        "remaining": f.passengers - f.boarded,
        "gates": list(f.gates),
        "purged_at": iso(f.purged_at),
    }


@dataclass(frozen=True)
class PassengerLine:
    id: str
    name: str
    boarded: bool
    boarded_at: str | None
    gate_id: str | None
    score: float | None
    event_id: str | None
    attempts: int  # decisions about them up to their boarding (all of them if not boarded)


def build_report(
    flight: Flight, passengers: list[Passenger], decisions: list[DecisionRecord], now: float
) -> dict[str, Any]:
    """A decision is about a passenger when it names them (accept, already_boarded, wrong_flight) or, for a
    reject below the bar, when they were its best-scoring candidate: so `attempts` counts the walk-ups a
    passenger needed, as far as the gate could tell who stood there."""
    about: dict[str, list[DecisionRecord]] = {}
    for d in decisions:
        who = d.subject_id or d.candidate_id
        if who:
            about.setdefault(who, []).append(d)
    lines = []
    for p in passengers:
        b = p.boarding
        mine = [d for d in about.get(p.subject_id, []) if b is None or d.at <= b.boarded_at]
        lines.append(
            PassengerLine(
                p.subject_id,
                p.name,
                b is not None,
                iso(b.boarded_at) if b else None,
                b.gate_id if b else None,
                b.score if b else None,
                b.event_id if b else None,
                len(mine),
            )
        )
    rejects = Counter(d.reason or "" for d in decisions if d.type == "reject")
    boarded = sum(line.boarded for line in lines)
    return {
        "flight_id": flight.id,
        "departs": iso(flight.departs),
        "status": flight.status(now),
        "passengers": len(lines),
        "boarded": boarded,
        "not_boarded": len(lines) - boarded,
        "accepts": sum(d.type == "accept" for d in decisions),
        "rejects": dict(sorted(rejects.items())),
        "needed_more_than_one_attempt": sum(line.boarded and line.attempts > 1 for line in lines),
        "manifest": [asdict(line) for line in lines],
    }


def report_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    fields = list(PassengerLine.__dataclass_fields__)
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for row in report["manifest"]:
        writer.writerow(row)
    return out.getvalue()


def report_text(report: dict[str, Any]) -> str:
    rejects = ", ".join(f"{k} {v}" for k, v in report["rejects"].items()) or "none"
    lines = [
        f"flight {report['flight_id']} (departs {report['departs']}, {report['status']}): "
        f"{report['boarded']} of {report['passengers']} boarded, {report['not_boarded']} not boarded",
        f"decisions: {report['accepts']} accept(s); rejects: {rejects}; "
        f"{report['needed_more_than_one_attempt']} passenger(s) needed more than one attempt",
    ]
    for p in report["manifest"]:
        state = (
            f"boarded {p['boarded_at']} at {p['gate_id']} (score {p['score']:.3f}, event {p['event_id']})"
            if p["boarded"]
            else "NOT BOARDED"
        )
        lines.append(f"  {p['id']}\t{p['name']}\t{state}\t{p['attempts']} attempt(s)")
    return "\n".join(lines)
