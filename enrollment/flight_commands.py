"""`kiosk-enroll flight ...` and the `--flight`/`--departs` options of `add` and `import`."""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime

from kiosk.boarding.model import flight_arg, known_flight
from kiosk.boarding.report import flight_json, iso
from kiosk.config import KioskConfig, load_config
from kiosk.errors import EXIT_OK, UsageError
from kiosk.store.flights import SqliteBoardingStore, open_store


def parse_departs(value: str, cfg: KioskConfig) -> float:
    """`--departs`: an ISO date-time (local time unless it names a zone). A departure so long ago that its
    passengers would be purged at once is refused."""
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UsageError(f"--departs: expected an ISO date-time such as 2026-11-25T18:05, found {value!r}") from None
    if len(value.strip()) <= 10:
        raise UsageError(f"--departs {value}: give the time too (e.g. {value.strip()}T18:05)")
    if dt.tzinfo is None:
        dt = dt.astimezone()
    ts = dt.timestamp()
    if ts + cfg.retention.purge_after_departure_h * 3600 <= time.time():
        raise UsageError(
            f"--departs {value}: more than retention.purge_after_departure_h "
            f"({cfg.retention.purge_after_departure_h:g} h) ago; its passengers would be purged at once"
        )
    return ts


def prepare_flight(store: SqliteBoardingStore, flight: str, departs: str | None, cfg: KioskConfig) -> None:
    """Check (and create or reschedule) the flight an add or import lists its passengers on, before any
    enrollment: a bad flight writes nothing."""
    known = store.flight(flight)
    if departs is None:
        if known is None:
            raise UsageError(f"no flight {flight} yet: give its scheduled departure with --departs ISO_TIME")
        if known.purged_at is not None:
            raise UsageError(
                f"flight {flight} was purged after departure; nothing can be added to it (the same "
                "flight number on another day: give its --departs)"
            )
        return
    store.add_flight(flight, parse_departs(departs, cfg))  # the next day's flight of a purged number is new


def cmd_flight_list(args: argparse.Namespace) -> int:
    gallery, store = open_store(load_config(args.config))
    with gallery:
        flights = store.flights()
    now = time.time()
    if args.json:
        print(json.dumps({"flights": [flight_json(f, now) for f in flights]}))
        return EXIT_OK
    if not flights:
        print("no flights")
    for f in flights:
        print(
            f"{f.id}\tdeparts {iso(f.departs)}\t{f.status(now)}\t{f.passengers} passenger(s), "
            f"{f.boarded} boarded" + (f"\tgates {','.join(f.gates)}" if f.gates else "")
        )
    return EXIT_OK


def cmd_flight_show(args: argparse.Namespace) -> int:
    flight_id = flight_arg(args.flight)
    gallery, store = open_store(load_config(args.config))
    with gallery:
        flight = known_flight(store, flight_id)
        passengers = store.passengers(flight_id)
    if args.json:
        print(
            json.dumps(
                {
                    **flight_json(flight, time.time()),
                    "manifest": [
                        {
                            "id": p.subject_id,
                            "name": p.name,
                            "enrolled": p.enrolled,
                            "boarded": p.boarding is not None,
                            "boarded_at": iso(p.boarding.boarded_at) if p.boarding else None,
                            "gate_id": p.boarding.gate_id if p.boarding else None,
                        }
                        for p in passengers
                    ],
                }
            )
        )
        return EXIT_OK
    print(
        f"{flight.id}: departs {iso(flight.departs)}, {flight.status(time.time())}, {flight.passengers} "
        f"passenger(s), {flight.boarded} boarded"
    )
    for p in passengers:
        state = f"boarded {iso(p.boarding.boarded_at)} at {p.boarding.gate_id}" if p.boarding else "not boarded"
        print(f"  {p.subject_id}\t{p.name}\t{state}" + ("" if p.enrolled else "\t(no template)"))
    return EXIT_OK


def cmd_flight_remove_passenger(args: argparse.Namespace) -> int:
    flight_id = flight_arg(args.flight)
    gallery, store = open_store(load_config(args.config))
    with gallery:
        if not store.remove_passenger(flight_id, args.id):
            raise UsageError(f"{args.id!r} is not on flight {flight_id}")
    print(
        f"removed {args.id} from flight {flight_id} (still enrolled; `kiosk-enroll remove {args.id}` deletes "
        "their templates)"
    )
    return EXIT_OK


def cmd_flight_purge(args: argparse.Namespace) -> int:
    flight_id = flight_arg(args.flight)
    gallery, store = open_store(load_config(args.config))
    with gallery:
        flight = known_flight(store, flight_id)
        if flight.purged_at is not None:
            print(f"flight {flight_id} was already purged")
            return EXIT_OK
        result = store.purge(flight_id)
    print(
        f"purged flight {flight_id}: templates of {len(result.subjects_purged)} passenger(s) deleted "
        f"({result.templates_deleted} templates); {len(result.kept)} kept for a later flight"
    )
    return EXIT_OK


def add_flight_commands(sub: argparse._SubParsersAction, add_commands) -> None:
    p = sub.add_parser("flight", help="flights and their manifests: list, show, remove-passenger, purge")
    fsub = add_commands(p, "flight_command")
    q = fsub.add_parser("list", help="every flight with its departure, status and boarding counts")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_flight_list)
    q = fsub.add_parser("show", help="one flight's manifest with who has boarded")
    q.add_argument("flight", metavar="FLIGHT")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_flight_show)
    q = fsub.add_parser("remove-passenger", help="take a passenger off a flight's manifest")
    q.add_argument("flight", metavar="FLIGHT")
    q.add_argument("id", metavar="ID")
    q.set_defaults(func=cmd_flight_remove_passenger)
    q = fsub.add_parser(
        "purge", help="delete the templates of the flight's passengers now (not those on a later flight)"
    )
    q.add_argument("flight", metavar="FLIGHT")
    q.set_defaults(func=cmd_flight_purge)
