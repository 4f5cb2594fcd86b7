"""Boarding state in the gallery, on both backends (a SQLite file and a real PostgreSQL server): one boarded
mark per passenger and flight (raced by real processes), purge after departure, the per-gate search views;
and the upgrade of older SQLite gallery files."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time

import numpy as np
import pytest

from kiosk.boarding.model import DecisionRecord, check_flight_id
from kiosk.errors import UsageError
from kiosk.store.flights import SqliteBoardingStore, load_gate_flights
from kiosk.store.gallery import SCHEMA_VERSION
from tests.pg_server import GallerySite
from tests.sealing_helpers import clear_gallery, sealed_gallery

MODEL = "m:1"


def _unit(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    e = rng.standard_normal((n, dim)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _site(site: GallerySite) -> dict[str, np.ndarray]:
    """ANN and BOB on LH123, BOB (connecting) and CAT on BA456, DAN on no flight."""
    rng = np.random.default_rng(0)
    emb = {sid: _unit(rng, 1)[0] for sid in ("ANN", "BOB", "CAT", "DAN")}
    with site.open() as g:
        for sid, e in emb.items():
            g.enroll(sid, sid.title(), e[None, :], MODEL)
        store = SqliteBoardingStore(g)
        store.add_flight("LH123", time.time() + 3600)
        store.add_flight("BA456", time.time() + 7200)
        assert store.add_passengers("LH123", ["ANN", "BOB"]) == 2
        assert store.add_passengers("BA456", ["BOB", "CAT"]) == 2
        assert store.add_passengers("LH123", ["ANN"]) == 0  # listed once
    return emb


def _accept(flight: str, subject: str, gate: str, event: str) -> DecisionRecord:
    return DecisionRecord(event, flight, gate, "accept", None, subject, None, 0.7, time.time())


def test_flight_ids_are_checked():
    assert check_flight_id(" lh123 ") == "LH123" and check_flight_id("U21234") == "U21234"
    for bad in ("", "LH", "123", "LH-123", "LH123456789", "x" * 40):
        with pytest.raises(ValueError):
            check_flight_id(bad)


def test_board_once_undo_and_the_gate_views(gallery_site):
    emb = _site(gallery_site)
    with gallery_site.open() as g:
        store = SqliteBoardingStore(g)
        store.open_gate("A1", "LH123")
        store.open_gate("A2", "LH123")  # two doors, one flight
        view = load_gate_flights(g, MODEL, 8, require_flight=True, gates={"A1", "B1"})
        assert view.assignments == {"A1": "LH123"}  # only this verifier's gates
        assert view.matrix_for("A1").subject_ids == ["ANN", "BOB"] and len(view.full) == 4
        assert view.idle("B1") and not view.idle("A1")
        m = view.matrix_for("A1").search(emb["CAT"][None, :])[0]
        assert m.subject_id in ("ANN", "BOB") and m.score < 0.9  # CAT is not searched at A1 ...
        assert view.full.search(emb["CAT"][None, :])[0].subject_id == "CAT"  # ... but is known to everyone
        assert not view.on_flight("A1", "CAT") and view.on_flight("A1", "BOB")

        first = store.board(_accept("LH123", "ANN", "A1", "e1"), camera_id="cam-a1")
        again = store.board(_accept("LH123", "ANN", "A2", "e2"))
        assert first.first and not again.first and again.reason == "already_boarded"
        assert again.previous is not None and again.previous.gate_id == "A1" and again.previous.event_id == "e1"
        assert store.board(_accept("LH123", "CAT", "A1", "e3")).reason == "not_on_flight"
        assert store.board(_accept("LH123", "ZED", "A1", "e4")).reason == "not_enrolled"
        assert store.flight("LH123").boarded == 1 and store.flight("LH123").status(time.time()) == "boarding"
        removed = store.undo("LH123", "ANN", why="left the aircraft")
        assert removed is not None and removed.gate_id == "A1"
        assert store.board(_accept("LH123", "ANN", "A2", "e5")).first
        log = g.execute("SELECT action, subject_id, detail FROM boarding_log WHERE action = 'undo'").fetchall()
        assert log and log[0][1] == "ANN" and "left the aircraft" in log[0][2]
        assert [d.event_id for d in store.decisions("LH123")] == ["e1", "e5"]
        # An accept that never reached the gate (the audit log refused it): mark and decision both withdrawn.
        store.undo("LH123", "ANN", why="accept withheld", withdraw_accept=True)
        assert [d.event_id for d in store.decisions("LH123")] == ["e1"] and store.flight("LH123").boarded == 0
        assert store.close_gate("A1") == "LH123" and store.close_gate("A1") is None
        assert store.assignments() == {"A2": "LH123"}
        with pytest.raises(UsageError, match="no flight"):
            store.open_gate("A1", "XX999")


def _templates(view) -> dict[str, list[bytes]]:
    m = view.full
    return {sid: [e.tobytes() for e in m.embeddings[m.owners == j]] for j, sid in enumerate(m.subject_ids)}


@pytest.mark.parametrize("load", ["all", "gate_flights"])
def test_a_verifier_view_follows_each_change_reading_only_what_changed(gallery_site, load):
    """After each kind of change the view updated from the previous one equals a view read afresh, and the
    update read the templates of the changed subjects only."""
    emb = _site(gallery_site)
    rng = np.random.default_rng(5)
    with gallery_site.open() as g:
        store = SqliteBoardingStore(g)
        store.open_gate("A1", "LH123")
        read: list[frozenset[str] | None] = []
        g.on_template_read = read.append
        clock = [time.time()]  # the views' time: moved on below to expire a subject without waiting

        def follow(view, expect_read):
            read.clear()
            new = load_gate_flights(
                g, MODEL, 8, require_flight=True, gates={"A1"}, load=load, previous=view, now=clock[0]
            )
            assert (read or [frozenset()]) == [expect_read]  # (nothing read: no query at all)
            fresh = load_gate_flights(g, MODEL, 8, require_flight=True, gates={"A1"}, load=load, now=clock[0])
            assert _templates(new) == _templates(fresh) and new.full.names == fresh.full.names
            assert new.revision == fresh.revision == g.revision()
            for gate in ("A1",):
                assert new.matrix_for(gate).subject_ids == fresh.matrix_for(gate).subject_ids
            return new

        view = load_gate_flights(g, MODEL, 8, require_flight=True, gates={"A1"}, load=load, now=clock[0])
        mine = load == "gate_flights"
        assert view.full.subject_ids == (["ANN", "BOB"] if mine else ["ANN", "BOB", "CAT", "DAN"])
        view = follow(view, frozenset())  # nothing changed: nothing read
        g.enroll("EVE", "Eve", _unit(rng, 2), MODEL)  # on no flight yet
        view = follow(view, frozenset() if mine else frozenset({"EVE"}))
        store.add_passengers("LH123", ["EVE"])  # the manifest brings her into this host's flight
        view = follow(view, frozenset({"EVE"}) if mine else frozenset())
        assert "EVE" in view.matrix_for("A1").subject_ids
        g.enroll("ANN", "", _unit(rng, 1), MODEL)  # a template more
        view = follow(view, frozenset({"ANN"}))
        assert g.remove("BOB")
        view = follow(view, frozenset({"BOB"}))  # (asked for by id: none left)
        assert "BOB" not in view.full.subject_ids
        # SQL run by hand is logged too (by the database's triggers), not only the project's own writes.
        g.execute("UPDATE templates SET embedding = ? WHERE subject_id = 'EVE'", (emb["ANN"].tobytes(),))
        g.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")
        view = follow(view, frozenset({"EVE"}))
        g.enroll("ANN", "", _unit(rng, 1), MODEL, expires=clock[0] + 60)
        view = follow(view, frozenset({"ANN"}))
        clock[0] += 61  # ANN expires: dropped, with no write at all
        view = follow(view, frozenset({"ANN"}))
        assert "ANN" not in view.full.subject_ids
        store.open_gate("A1", "BA456")  # the gate boards another flight: its passengers come in
        view = follow(view, frozenset({"CAT"}) if mine else frozenset())  # (BOB: on LH123 too, removed)
        assert view.matrix_for("A1").subject_ids == ["CAT"]
        g.execute("UPDATE meta SET value = ? WHERE key = 'baseline'", (str(g.revision() + 1),))
        g.enroll("DAN", "", _unit(rng, 1), MODEL)  # the change log no longer reaches back: everything is read
        follow(view, frozenset({"BOB", "CAT"}) if mine else None)


def test_a_host_holding_its_gates_flights_searches_everyone_for_a_gate_boarding_none(gallery_site):
    _site(gallery_site)
    with gallery_site.open() as g:
        SqliteBoardingStore(g).open_gate("A1", "LH123")
        some = load_gate_flights(g, MODEL, 8, require_flight=False, gates={"A1"}, load="gate_flights")
        assert some.full.subject_ids == ["ANN", "BOB"] and some.full.scope == {"ANN", "BOB"}
        # B1 boards no flight and, as flights are not required, searches everyone enrolled.
        every = load_gate_flights(
            g, MODEL, 8, require_flight=False, gates={"A1", "B1"}, load="gate_flights", previous=some
        )
        assert every.full.subject_ids == ["ANN", "BOB", "CAT", "DAN"] and every.full.scope is None
        assert every.matrix_for("B1").subject_ids == every.full.subject_ids


def _race(site: GallerySite, gate: str, rounds: int, barrier, out) -> None:
    with site.open(create=False) as g:
        store = SqliteBoardingStore(g)
        wins = []
        for r in range(rounds):
            barrier.wait()
            wins.append(store.board(_accept("LH123", f"P{r}", gate, f"{gate}-{r}")).first)
        out.put((gate, wins))


def test_two_processes_boarding_the_same_passengers_at_once_give_one_accept_each(gallery_site):
    """Two doors (two processes; on PostgreSQL, two hosts' connections) mark the same passenger boarded at the
    same moment, 150 times over: exactly one of them wins every time."""
    rounds = 150
    rng = np.random.default_rng(1)
    with gallery_site.open() as g:
        for r in range(rounds):
            g.enroll(f"P{r}", "", _unit(rng, 1), MODEL)
        store = SqliteBoardingStore(g)
        store.add_flight("LH123", time.time() + 3600)
        store.add_passengers("LH123", [f"P{r}" for r in range(rounds)])
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(gallery_site, gate, rounds, barrier, out)) for gate in ("A1", "A2")]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    wins = np.array([results["A1"], results["A2"]])
    assert (wins.sum(axis=0) == 1).all(), "a passenger boarded twice, or not at all"
    with gallery_site.open() as g:
        assert g.execute("SELECT COUNT(*) FROM boardings").fetchone()[0] == rounds


def test_purge_deletes_only_passengers_on_no_later_flight(gallery_site):
    _site(gallery_site)
    with gallery_site.open() as g:
        store = SqliteBoardingStore(g)
        store.open_gate("A1", "LH123")
        store.board(_accept("LH123", "ANN", "A1", "e1"))
        assert store.due_for_purge(time.time(), 12) == []
        assert store.due_for_purge(time.time() + 3600 + 12 * 3600, 12) == ["LH123"]
        revision = g.revision()
        result = store.purge("LH123")
        assert result.subjects_purged == ["ANN"] and result.kept == ["BOB"] and result.templates_deleted == 1
        assert g.revision() > revision  # running verifiers reload: ANN is matched no more
        assert g.matrix(MODEL, 8).subject_ids == ["BOB", "CAT", "DAN"]
        assert store.assignments() == {}  # no gate boards a purged flight
        assert store.flight("LH123").status(time.time()) == "purged"
        passengers = {p.subject_id: p for p in store.passengers("LH123")}
        assert not passengers["ANN"].enrolled and passengers["ANN"].boarding is not None  # report keeps ids
        with pytest.raises(UsageError, match="purged"):
            store.add_passengers("LH123", ["DAN"])
        departs = store.flight("LH123").departs
        with pytest.raises(UsageError, match="purged"):
            store.add_flight("LH123", departs + 60)  # the same day's flight
        with pytest.raises(UsageError, match="purged"):
            store.open_gate("A1", "LH123")
        # BA456 departs later: its purge takes BOB now (LH123 is purged already) and CAT.
        assert store.purge("BA456").subjects_purged == ["BOB", "CAT"]
        assert g.matrix(MODEL, 8).subject_ids == ["DAN"]  # on no flight: untouched
        # The next day's LH123 is a new flight; the purged one stays for its report under its date.
        store.add_flight("LH123", departs + 86400)
        archived = f"LH123/{time.strftime('%Y-%m-%d', time.localtime(departs))}"
        assert store.flight("LH123").passengers == 0 and store.flight("LH123").purged_at is None
        assert store.flight(archived).purged_at is not None
        assert [(p.subject_id, p.boarding is not None) for p in store.passengers(archived)] == [
            ("ANN", True),
            ("BOB", False),
        ]
        assert [d.event_id for d in store.decisions(archived)] == ["e1"] and store.decisions("LH123") == []
        assert check_flight_id(archived.lower()) == archived


def test_a_version_2_gallery_gains_the_flight_tables_and_keeps_its_rows(tmp_path):
    path = tmp_path / "g.db"
    emb = _unit(np.random.default_rng(2), 2)
    clear_gallery(path, {"OLD": emb}, MODEL, version=4)
    con = sqlite3.connect(path, isolation_level=None)
    for table in ("boarding_log", "flight_decisions", "boardings", "gates", "manifest", "flights"):
        con.execute(f"DROP TABLE {table}")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(UsageError, match="in the clear; seal them"):  # never upgraded by merely opening it
        sealed_gallery(path)
    with sealed_gallery(path, seal=True) as g:
        assert g.execute("SELECT value FROM meta WHERE key = ?", ("schema_version",)).fetchone()[0] == str(
            SCHEMA_VERSION
        )
        assert g.subjects()[0].templates == {MODEL: 2}
        assert np.allclose(g.matrix(MODEL, 8).embeddings, emb)  # sealed in place, and they open
        store = SqliteBoardingStore(g)
        store.add_flight("LH123", time.time() + 60)
        assert store.add_passengers("LH123", ["OLD"]) == 1
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM manifest").fetchone() == (1,)
