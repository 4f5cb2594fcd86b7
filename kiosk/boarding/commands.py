"""`kiosk board open|close|status|report|undo`: gate assignments and boarding state, stored in the gallery
database, so they work whether or not a verifier runs (a running one picks changes up within a second)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kiosk.boarding.model import flight_arg, known_flight
from kiosk.boarding.report import build_report, flight_json, iso, report_csv, report_text
from kiosk.config import KioskConfig, load_config
from kiosk.errors import EXIT_OK, UsageError
from kiosk.store.flights import SqliteBoardingStore, open_store
from kiosk.store.queries import GalleryQueries


def _gate(cfg: KioskConfig, gate: str) -> str:
    gates = sorted({c.gate for c in cfg.cameras})
    if gate not in gates:
        raise UsageError(f"unknown gate {gate!r}: the config's cameras serve " + (", ".join(gates) or "no gate"))
    return gate


def _open(args: argparse.Namespace) -> tuple[KioskConfig, GalleryQueries, SqliteBoardingStore]:
    cfg = load_config(args.config)
    return (cfg, *open_store(cfg))


def cmd_open(args: argparse.Namespace) -> int:
    flight_id = flight_arg(args.flight)
    cfg, gallery, store = _open(args)
    gate = _gate(cfg, args.gate)
    with gallery:
        flight = known_flight(store, flight_id)
        if flight.purged_at is not None:
            raise UsageError(f"flight {flight_id} was purged after departure; it cannot board")
        store.open_gate(gate, flight_id)
    print(f"gate {gate} boards flight {flight_id}: {flight.passengers} passenger(s), {flight.boarded} boarded")
    return EXIT_OK


def cmd_close(args: argparse.Namespace) -> int:
    cfg, gallery, store = _open(args)
    gate = _gate(cfg, args.gate)
    with gallery:
        was = store.close_gate(gate)
    print(f"gate {gate} closed (was boarding {was})" if was else f"gate {gate} was not boarding")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    cfg, gallery, store = _open(args)
    gate_filter = _gate(cfg, args.gate) if args.gate else None
    flight_filter = flight_arg(args.flight) if args.flight else None
    now = time.time()
    with gallery:
        if flight_filter is not None:
            known_flight(store, flight_filter)  # an unknown flight: say how to make it
        assigned = store.assignments()
        flights = {f.id: f for f in store.flights()}
    gates = sorted({c.gate for c in cfg.cameras} | set(assigned))
    gate_rows = [
        {
            "gate_id": g,
            "flight_id": assigned.get(g),
            "boarding": g in assigned,
            "processing": g in assigned or not cfg.boarding.require_flight,
        }
        for g in gates
        if (gate_filter is None or g == gate_filter) and (flight_filter is None or assigned.get(g) == flight_filter)
    ]
    wanted = (
        {flight_filter}
        if flight_filter
        else {r["flight_id"] for r in gate_rows if r["flight_id"]}
        if gate_filter
        else set(flights)
    )
    flight_rows = [flight_json(f, now) for f in flights.values() if f.id in wanted]
    if args.json:
        print(json.dumps({"require_flight": cfg.boarding.require_flight, "gates": gate_rows, "flights": flight_rows}))
        return EXIT_OK
    for r in gate_rows:
        state = (
            f"boarding {r['flight_id']}"
            if r["boarding"]
            else "not boarding (processes nobody)"
            if cfg.boarding.require_flight
            else "not boarding (1:N, any enrolled)"
        )
        print(f"gate {r['gate_id']}: {state}")
    for f in flight_rows:
        print(
            f"flight {f['id']} (departs {f['departs']}, {f['status']}): {f['passengers']} passenger(s), "
            f"{f['boarded']} boarded, {f['remaining']} remaining"
            + (f"; gates {', '.join(f['gates'])}" if f["gates"] else "")
        )
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    flight_id = flight_arg(args.flight)
    _cfg, gallery, store = _open(args)
    with gallery:
        flight = known_flight(store, flight_id)
        report = build_report(flight, store.passengers(flight_id), store.decisions(flight_id), time.time())
    if args.csv:
        Path(args.csv).write_text(report_csv(report))
        print(f"wrote {len(report['manifest'])} passenger row(s) of flight {flight_id} to {args.csv}")
    elif args.json:
        print(json.dumps(report))
    else:
        print(report_text(report))
    return EXIT_OK


def cmd_undo(args: argparse.Namespace) -> int:
    flight_id = flight_arg(args.flight)
    _cfg, gallery, store = _open(args)
    with gallery:
        known_flight(store, flight_id)
        removed = store.undo(flight_id, args.subject, why=args.reason)
    if removed is None:
        raise UsageError(f"{args.subject!r} has not boarded flight {flight_id}")
    print(
        f"{args.subject} is boardable again on {flight_id} (had boarded {iso(removed.boarded_at)} at "
        f"{removed.gate_id}); logged"
    )
    return EXIT_OK


def add_board_commands(sub: argparse._SubParsersAction, add_commands) -> None:
    p = sub.add_parser("board", help="boarding by flight: open/close a gate on a flight, status, report, undo")
    bsub = add_commands(p, "board_command")
    q = bsub.add_parser("open", help="the gate boards this flight (its passengers only)")
    q.add_argument("--gate", required=True)
    q.add_argument("--flight", required=True)
    q.set_defaults(func=cmd_open)
    q = bsub.add_parser("close", help="the gate stops boarding")
    q.add_argument("--gate", required=True)
    q.set_defaults(func=cmd_close)
    q = bsub.add_parser("status", help="which gate boards which flight; boarded and remaining per flight")
    q.add_argument("--gate")
    q.add_argument("--flight")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_status)
    q = bsub.add_parser("report", help="every passenger of a flight, boarded or not, and the gates' decisions")
    q.add_argument("--flight", required=True)
    out = q.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--csv", metavar="FILE")
    q.set_defaults(func=cmd_report)
    q = bsub.add_parser("undo", help="a boarded passenger left the aircraft: boardable again (logged)")
    q.add_argument("--flight", required=True)
    q.add_argument("--subject", required=True, metavar="ID")
    q.add_argument("--reason", default="left the aircraft", help="recorded in the boarding log")
    q.set_defaults(func=cmd_undo)
