"""The PostgreSQL store's foundation against a real server (tests/pg_server.py): the password never in the
config, one-line errors naming the server, and the schema created once by several processes at the same time."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kiosk.errors import ConfigError, RuntimeFailure, UsageError
from kiosk.store import postgres
from tests.pg_server import PASSWORD
from tests.sealing_helpers import TEST_KEY, sealed_gallery

MIGRATE = """
import sys
from pathlib import Path
from kiosk.store import postgres
where = postgres.target(sys.argv[1], Path(sys.argv[2]))
print(postgres.migrate(postgres.connect(where), where))
"""


def test_the_password_comes_from_a_file_or_the_environment_never_the_config(pg_server, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="carries a password"):
        postgres.target(f"postgresql://kiosk:{PASSWORD}@127.0.0.1:{pg_server.port}/kiosk")
    with pytest.raises(ConfigError, match="scheme 'mysql'"):
        postgres.target("mysql://kiosk@127.0.0.1/kiosk")
    with pytest.raises(ConfigError, match="found no host"):
        postgres.target("postgresql:///kiosk")
    from kiosk.config import config_from_mapping

    with pytest.raises(ConfigError, match="gallery.url: the URL carries a password") as info:  # the same check
        config_from_mapping({"gallery": {"url": f"postgresql://kiosk:{PASSWORD}@127.0.0.1/kiosk"}})
    assert PASSWORD not in str(info.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        postgres.target(pg_server.url, tmp_path / "empty")
    conn = postgres.connect(postgres.target(pg_server.url, pg_server.password_file))
    assert conn.execute("SELECT current_user").fetchone()[0] == "kiosk"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv(postgres.PASSWORD_ENV, PASSWORD)
    assert postgres.connect(postgres.target(pg_server.url)).execute("SELECT 1").fetchone()[0] == 1
    # A wrong password, a closed port: one line naming the server, never the password.
    monkeypatch.setenv(postgres.PASSWORD_ENV, "not-the-password")
    with pytest.raises(RuntimeFailure) as info:
        postgres.connect(postgres.target(pg_server.url))
    assert f"database 127.0.0.1:{pg_server.port}/kiosk unreachable" in str(info.value)
    assert "password authentication failed" in str(info.value) and "not-the-password" not in str(info.value)
    from kiosk.messaging.transport import free_port

    with pytest.raises(RuntimeFailure, match="unreachable"):
        postgres.connect(
            postgres.target(f"postgresql://kiosk@127.0.0.1:{free_port()}/kiosk", pg_server.password_file), timeout_s=2
        )


def test_several_processes_starting_together_create_the_schema_once(pg_server):
    where = postgres.target(pg_server.url, pg_server.password_file)
    conn = postgres.connect(where)
    conn.execute("DROP SCHEMA public CASCADE")
    conn.execute("CREATE SCHEMA public")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, pg_server.url, str(pg_server.password_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    found = sorted(int(out) for out, _ in results)
    v = postgres.SCHEMA_VERSION
    assert found == [0, v, v, v]  # one created it; the others, serialised by the lock, found it done
    rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    assert rows == {"schema_version": str(v), "revision": "0", "baseline": "0"}
    tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {
        "subjects",
        "templates",
        "flights",
        "manifest",
        "gates",
        "boardings",
        "flight_decisions",
        "boarding_log",
    } <= tables
    # The boarded mark's guarantee is the database's: a second mark for one flight and passenger is refused.
    conn.execute("INSERT INTO flights VALUES ('LH123', 0, 0, NULL)")
    conn.execute("INSERT INTO boardings VALUES ('LH123', 'P1', 'A1', NULL, 1, NULL, 'e1')")
    import psycopg

    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO boardings VALUES ('LH123', 'P1', 'A2', NULL, 2, NULL, 'e2')")
    # A database from a newer program is refused, not downgraded.
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(UsageError, match="newer than this program"):
        postgres.migrate(conn, where)


def test_an_enrollment_on_one_host_is_matched_by_a_verifier_on_another(pg_server, tmp_path, engine, photos):
    """Two sites' configs naming one PostgreSQL gallery: `kiosk-enroll` on host A, the verifier on host B
    (real processes, CurveZMQ) accepts the passenger; B's config has no gallery file at all."""
    from kiosk.tools.scenes import Walk
    from tests.conftest import run_cli
    from tests.pipeline_helpers import (
        audit,
        kiosk,
        make_video,
        people,
        stop,
        write_config,
    )

    shared = {"url": pg_server.new_database(), "password_file": str(pg_server.password_file)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    host_a = write_config(tmp_path / "a", [], gallery=shared)
    make_video(
        tmp_path / "b" / "b1.avi", [Walk(people(engine, photos)["yao"], start=0, frames=40, w0=80, w1=170)], seconds=1.6
    )
    host_b = write_config(
        tmp_path / "b", [{"id": "cam-b1", "gate": "B1", "source": "b1.avi", "realtime": False}], gallery=shared
    )
    (tmp_path / "b" / "gallery.db").unlink()  # host B has no gallery of its own
    res = run_cli("kiosk-enroll", "-c", str(host_b), "list")
    assert res.returncode == 2 and "holds no gallery" in res.stderr and "kiosk-enroll" in res.stderr
    assert "ready (revision 0)" in run_cli("kiosk-enroll", "-q", "-c", str(host_a), "init").stdout
    res = run_cli("kiosk-enroll", "-q", "-c", str(host_a), "add", "--id", "YAO", str(photos["yaoming.jpg"]))
    assert res.returncode == 0, res.stderr
    proc = kiosk(host_b, "run", "--exit-on-eof", quiet=False)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, err[-3000:]
    decisions = [(e["type"], e["subject_id"]) for e in audit(host_b) if e["type"] in ("accept", "reject")]
    assert decisions == [("accept", "YAO")]
    assert PASSWORD not in err  # nothing logs the password


def test_a_server_restart_fails_calls_closed_then_the_store_reconnects_by_itself(pg_server):
    """The database stops under a running store: boarding and the enrollment check raise at once (the
    verifier turns that into `store_unavailable` / `gallery_unavailable` rejects), nothing half-written; once
    the server is back, the same store object works again without being reopened."""
    import time

    import numpy as np

    from kiosk.boarding.model import BoardOutcome, DecisionRecord
    from kiosk.store.flights import SqliteBoardingStore
    from tests.pg_server import GallerySite
    from tests.waiting import wait_until

    site = GallerySite("postgresql", {"url": pg_server.new_database(), "password_file": str(pg_server.password_file)})
    with site.open() as g:
        emb = np.eye(8, dtype=np.float32)[:2]
        g.enroll("ANN", "Ann", emb[:1], "m:1")
        g.enroll("BOB", "Bob", emb[1:], "m:1")
        store = SqliteBoardingStore(g)
        store.add_flight("LH123", time.time() + 3600)
        store.add_passengers("LH123", ["ANN", "BOB"])

        def accept(subject: str, event: str) -> DecisionRecord:
            return DecisionRecord(event, "LH123", "A1", "accept", None, subject, None, 0.8, time.time())

        assert store.board(accept("ANN", "e1")).first
        pg_server.stop("immediate")
        try:
            t0 = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017 - whatever psycopg raises for a dead server
                store.board(accept("BOB", "e2"))
            with pytest.raises(Exception):  # noqa: B017 - as above
                g.enrolled("BOB")
            assert time.monotonic() - t0 < 5  # fails at once: a gate is not kept waiting
        finally:
            pg_server.start()

        def boarded() -> BoardOutcome | None:
            try:
                return store.board(accept("BOB", "e3"))
            except Exception:  # noqa: BLE001 - reconnecting, at most once a second
                return None

        outcome = wait_until(boarded, 10, "the store reconnecting (a boarding going through)", every=0.3)
        assert outcome.first and g.enrolled("ANN")
        assert [p.boarding.event_id for p in store.passengers("LH123")] == ["e1", "e3"]  # e2 never half-written


def test_migrate_copies_a_sqlite_gallery_into_postgresql_once(pg_server, tmp_path):
    """`kiosk-enroll migrate --from FILE --to URL`: subjects, templates, flights, manifests and boarded marks
    arrive whole; the same search matrix comes out; a second copy into the now full database is refused; an
    unreachable database is one line and exit 1."""
    import time

    import numpy as np

    from kiosk.boarding.model import DecisionRecord
    from kiosk.messaging.transport import free_port
    from kiosk.store.flights import SqliteBoardingStore
    from tests.conftest import run_cli
    from tests.pg_server import GallerySite

    rng = np.random.default_rng(5)
    with sealed_gallery(tmp_path / "g.db") as g:
        for sid in ("ANN", "BOB", "CAT"):
            g.enroll(
                sid,
                sid.title(),
                rng.standard_normal((2, 8)).astype(np.float32),
                "m:1",
                photo_hashes=[f"{sid}-1", f"{sid}-2"],
            )
        store = SqliteBoardingStore(g)
        store.add_flight("LH123", time.time() + 3600)
        store.add_passengers("LH123", ["ANN", "BOB"])
        store.open_gate("A1", "LH123")
        store.board(DecisionRecord("e1", "LH123", "A1", "accept", None, "ANN", None, 0.8, time.time()))
        before = g.matrix("m:1", 8)
    url = pg_server.new_database()
    args = [
        "kiosk-enroll",
        "migrate",
        "--from",
        str(tmp_path / "g.db"),
        "--to",
        url,
        "--password-file",
        str(pg_server.password_file),
    ]
    key = {"KIOSK_TEMPLATE_KEY": TEST_KEY.line()}  # the key the file's templates are sealed with
    res = run_cli(*args, env=key)
    assert res.returncode == 0, res.stderr
    assert "3 subjects, 6 templates, 1 flights, 1 boarded marks" in res.stdout
    with GallerySite("postgresql", {"url": url, "password_file": str(pg_server.password_file)}).open() as pg:
        after = pg.matrix("m:1", 8)
        assert after.subject_ids == before.subject_ids and np.array_equal(after.embeddings, before.embeddings)
        store = SqliteBoardingStore(pg)
        assert store.assignments() == {"A1": "LH123"}
        assert [(p.subject_id, p.boarding.event_id if p.boarding else None) for p in store.passengers("LH123")] == [
            ("ANN", "e1"),
            ("BOB", None),
        ]
        assert pg.has_photo("CAT", "m:1", "CAT-2")
        blobs = pg.execute("SELECT id, embedding FROM templates ORDER BY id").fetchall()
    with sealed_gallery(tmp_path / "g.db") as g:  # the sealed blobs carried unchanged, under their own ids
        assert [(i, bytes(b)) for i, b in blobs] == [
            (i, bytes(b)) for i, b in g.execute("SELECT id, embedding FROM templates ORDER BY id").fetchall()
        ]
    res = run_cli(*args, env=key)
    assert res.returncode == 2 and "not empty" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(
        "kiosk-enroll",
        "migrate",
        "--from",
        str(tmp_path / "g.db"),
        "--to",
        f"postgresql://kiosk@127.0.0.1:{free_port()}/kiosk",
        "--password-file",
        str(pg_server.password_file),
        env=key,
    )
    assert res.returncode == 1 and "unreachable" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a 5 s database outage under a running gate
def test_the_database_down_for_5_s_under_a_running_gate_never_opens_it_and_the_gate_recovers(
    pg_server, tmp_path, engine, photos
):
    """A real verifier boarding LH123 from PostgreSQL, Yao walking up again and again (a looping live camera).
    The server stops for 5 s as the capture starts: Yao's accepts then are rejected `store_unavailable` (no
    boarded mark, no open door) and the heartbeat says the gallery is unreachable; when it is back, the
    verifier reconnects by itself and boards him once; every event the gate saw is in the audit log, and the
    accept is the boarded mark's event."""
    import time

    from kiosk.store.flights import SqliteBoardingStore
    from kiosk.tools.scenes import Walk
    from tests.conftest import run_cli
    from tests.pg_server import GallerySite
    from tests.pipeline_helpers import (
        audit,
        live_gate,
        make_video,
        people,
        write_config,
    )

    section = {"url": pg_server.new_database(), "password_file": str(pg_server.password_file)}
    make_video(
        tmp_path / "a1.avi", [Walk(people(engine, photos)["yao"], start=45, frames=60, w0=90, w1=170)], seconds=3.5
    )
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": True, "loop": True}],
        gallery=section,
        boarding={"require_flight": True},
    )
    assert (
        run_cli(
            "kiosk-enroll",
            "-q",
            "-c",
            str(config),
            "add",
            "--id",
            "YAO",
            str(photos["yaoming.jpg"]),
            "--flight",
            "LH123",
            "--departs",
            time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() + 7200)),
        ).returncode
        == 0
    )
    assert (
        run_cli("kiosk", "-q", "-c", str(config), "board", "open", "--gate", "A1", "--flight", "LH123").returncode == 0
    )
    with live_gate(config, quiet=False) as gate:
        pg_server.stop("immediate")
        try:
            gate.events.poll(5.0)
        finally:
            pg_server.start()
        down = [h for h in gate.events.health if h.get("gallery", {}).get("stale")]
        assert down and "unreachable" in down[-1]["gallery"]["error"] and down[-1]["status"] == "degraded"
        assert gate.events.wait_for(lambda ev: any(e.type == "accept" for e in ev.events), 30), [
            (e.type, e.reason) for e in gate.events.events
        ]
        # the health topic says it is back (waited for: on a busy machine the heartbeat after the accept may lag)
        assert gate.events.wait_for(lambda ev: bool(ev.health) and not ev.health[-1]["gallery"]["stale"], 15), (
            gate.events.health[-1:]
        )
        # the rejects the store missed are written once it answers, and its error clears from the status
        assert gate.events.wait_for(
            lambda ev: (
                ev.health[-1]["boarding_store"] == {"ok": True, "decisions_waiting": 0}
                and "boarding store" not in ev.health[-1]["last_error"]
                and ev.health[-1]["status"] == "ok"
            ),
            15,
        ), gate.events.health[-1:]
    seen = [(e.type, e.reason) for e in gate.events.events if e.type in ("accept", "reject")]
    first_accept = seen.index(("accept", None))
    assert ("reject", "store_unavailable") in seen[:first_accept], seen
    assert seen.count(("accept", None)) == 1 and set(seen[first_accept + 1 :]) <= {("reject", "already_boarded")}
    logged = {e["event_id"] for e in audit(config)}
    assert {e.event_id for e in gate.events.events if e.type in ("accept", "reject")} <= logged  # nothing lost
    accept = next(e for e in gate.events.events if e.type == "accept")
    with GallerySite("postgresql", section).open() as g:
        (yao,) = SqliteBoardingStore(g).passengers("LH123")
        assert yao.boarding is not None and yao.boarding.event_id == accept.event_id
        kept = {r.event_id for r in SqliteBoardingStore(g).decisions("LH123")}
    missed = {e.event_id for e in gate.events.events if e.reason == "store_unavailable"}
    assert missed and missed <= kept, missed - kept  # `kiosk board report` counts every attempt
    assert "reconnected" in gate.verifier_err and "Traceback" not in gate.verifier_err


@pytest.mark.slow
def test_two_verifier_hosts_boarding_one_flight_never_accept_one_passenger_twice(pg_server, tmp_path, engine, photos):
    """Two verifier processes (two hosts' configs, gates A1 and A2, one PostgreSQL gallery) board LH123 from
    the same video at the same time: three passengers walk up at both doors at once. Each passenger gets
    exactly one accept across the two hosts, and the other door says already_boarded."""
    import time

    import cv2

    from kiosk.tools.scenes import Walk
    from tests.conftest import run_cli
    from tests.pipeline_helpers import (
        audit,
        kiosk,
        make_video,
        people,
        stop,
        write_config,
    )

    crops = people(engine, photos)
    for name in ("parker", "duncan"):  # their "passport photos": the crops, enlarged
        cv2.imwrite(
            str(tmp_path / f"{name}.jpg"), cv2.resize(crops[name], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
        )
    walks = [
        Walk(crops[name], start=10 + 50 * i, frames=40, w0=90, w1=170)
        for i, name in enumerate(("yao", "parker", "duncan"))
    ]
    shared = {"url": pg_server.new_database(), "password_file": str(pg_server.password_file)}
    configs = []
    for gate in ("A1", "A2"):
        folder = tmp_path / gate.lower()
        folder.mkdir()
        make_video(folder / "door.avi", walks, seconds=5.5)
        configs.append(
            write_config(
                folder,
                [{"id": f"cam-{gate.lower()}", "gate": gate, "source": "door.avi", "realtime": False}],
                gallery=shared,
                boarding={"require_flight": True},
            )
        )
    departs = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() + 7200))
    for sid, photo in (
        ("YAO", photos["yaoming.jpg"]),
        ("PARKER", tmp_path / "parker.jpg"),
        ("DUNCAN", tmp_path / "duncan.jpg"),
    ):
        res = run_cli(
            "kiosk-enroll",
            "-q",
            "-c",
            str(configs[0]),
            "add",
            "--id",
            sid,
            str(photo),
            "--flight",
            "LH123",
            "--departs",
            departs,
        )
        assert res.returncode == 0, res.stderr
    for config, gate in zip(configs, ("A1", "A2"), strict=True):
        assert (
            run_cli("kiosk", "-q", "-c", str(config), "board", "open", "--gate", gate, "--flight", "LH123").returncode
            == 0
        )
    procs = [kiosk(config, "run", "--exit-on-eof", quiet=False) for config in configs]
    try:
        errs = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            stop(p)
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for e in errs]
    decided: dict[str, list[tuple]] = {}
    for config in configs:
        for e in audit(config):
            if e["type"] in ("accept", "reject"):
                decided.setdefault(e["subject_id"], []).append((e["type"], e["reason"], e["gate_id"]))
    for sid in ("YAO", "PARKER", "DUNCAN"):
        kinds = sorted((t, r) for t, r, _ in decided.get(sid, []))
        assert kinds == [("accept", None), ("reject", "already_boarded")], (sid, decided)
