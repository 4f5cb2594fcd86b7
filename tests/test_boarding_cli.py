"""`kiosk-enroll ... --flight`, `kiosk-enroll flight ...` and `kiosk board ...` on a real gallery file with
real photos: enrolled once and listed on each flight, bad input refused with one line and nothing written."""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from kiosk.boarding.model import DecisionRecord
from kiosk.store.flights import SqliteBoardingStore
from kiosk.store.gallery import Gallery
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def site(tmp_path_factory, photos, engine) -> Path:
    """A config with gates A1, A2 and B1, and manifests for LH123 (YAO, PARKER) and BA456 (YAO from another
    photo, DUNCAN): YAO connects."""
    folder = tmp_path_factory.mktemp("site")
    gdp = cv2.imread(str(photos["gdp.jpg"]))
    faces = engine.detector.detect(gdp)
    faces = faces[faces.widths >= 48]
    order = np.argsort(faces.boxes[:, 0])
    for name, i in (("duncan", order[0]), ("parker", order[-1])):
        x1, y1, x2, y2 = faces.boxes[i]
        w, h = x2 - x1, y2 - y1
        crop = gdp[max(0, int(y1 - 0.6 * h)) : int(y2 + 0.6 * h), max(0, int(x1 - 0.6 * w)) : int(x2 + 0.6 * w)]
        cv2.imwrite(str(folder / f"{name}.jpg"), cv2.resize(crop, None, fx=2.0, fy=2.0))
    yao = cv2.imread(str(photos["yaoming.jpg"]))
    cv2.imwrite(str(folder / "yao.jpg"), yao)
    cv2.imwrite(str(folder / "yao_b.jpg"), cv2.convertScaleAbs(cv2.flip(yao, 1), alpha=0.8, beta=-10))
    (folder / "lh123.csv").write_text("id,name,photo\nYAO,Yao Ming,yao.jpg\nPARKER,Tony Parker,parker.jpg\n")
    (folder / "ba456.csv").write_text("id,name,photo\nYAO,Yao Ming,yao_b.jpg\nDUNCAN,Tim Duncan,duncan.jpg\n")
    (folder / "kiosk.yaml").write_text(
        "gallery: {path: gallery.db}\nsecurity: {curve: false}\nmetrics: {port: 0}\n"
        "boarding: {require_flight: true}\n"
        "cameras:\n  - {id: cam-a1, gate: A1, source: 0}\n  - {id: cam-a2, gate: A2, source: 1}\n"
        "  - {id: cam-b1, gate: B1, source: 2}\n"
    )
    return folder / "kiosk.yaml"


def cli(tool: str, config: Path, *args: str):
    return run_cli(tool, "-q", "-c", str(config), *args)


def dump(db: Path) -> list:
    """Every row of every table: "nothing written" means this did not change."""
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return [(t, con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()) for t in tables]  # noqa: S608 - our own tables
    finally:
        con.close()


@pytest.mark.slow  # a day of CLI commands, each a process; run by .ci/run's second step
def test_an_operators_day_on_the_command_line(site):
    folder = site.parent
    departs = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() + 3 * 3600))
    res = cli(
        "kiosk-enroll",
        site,
        "import",
        "--no-progress",
        str(folder / "lh123.csv"),
        "--flight",
        "lh123",
        "--departs",
        departs,
    )
    assert res.returncode == 0 and "2 enrolled" in res.stdout and "2 added to flight LH123" in res.stdout, res.stderr
    res = cli(
        "kiosk-enroll",
        site,
        "import",
        "--no-progress",
        str(folder / "ba456.csv"),
        "--flight",
        "BA456",
        "--departs",
        time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() + 6 * 3600)),
    )
    # YAO is enrolled already: listed on BA456, no second template, not refused as a duplicate of himself.
    assert res.returncode == 0 and "1 enrolled" in res.stdout and "1 enrolled before" in res.stdout, res.stdout
    listed = json.loads(cli("kiosk-enroll", site, "list", "--json").stdout)
    assert {s["id"]: s["templates"] for s in listed["subjects"]} == {"YAO": 1, "PARKER": 1, "DUNCAN": 1}
    flights = json.loads(cli("kiosk-enroll", site, "flight", "list", "--json").stdout)["flights"]
    assert [(f["id"], f["passengers"], f["status"]) for f in flights] == [
        ("LH123", 2, "scheduled"),
        ("BA456", 2, "scheduled"),
    ]
    show = json.loads(cli("kiosk-enroll", site, "flight", "show", "BA456", "--json").stdout)
    assert [p["id"] for p in show["manifest"]] == ["DUNCAN", "YAO"]

    assert cli("kiosk", site, "board", "open", "--gate", "A1", "--flight", "LH123").returncode == 0
    assert cli("kiosk", site, "board", "open", "--gate", "A2", "--flight", "LH123").returncode == 0
    status = json.loads(cli("kiosk", site, "board", "status", "--json").stdout)
    gates = {g["gate_id"]: g for g in status["gates"]}
    assert gates["A1"]["flight_id"] == "LH123" and gates["A2"]["flight_id"] == "LH123"
    assert gates["B1"]["boarding"] is False and gates["B1"]["processing"] is False  # require_flight
    status = json.loads(cli("kiosk", site, "board", "status", "--flight", "LH123", "--json").stdout)
    assert [(f["id"], f["passengers"], f["boarded"], f["remaining"]) for f in status["flights"]] == [("LH123", 2, 0, 2)]

    # Decisions as the verifier records them: PARKER rejected twice (best candidate below the bar), then boards;
    # YAO boards at once, and is turned away at the other door.
    with Gallery(folder / "gallery.db") as g:  # (the boarding store opens no template: no key)
        store = SqliteBoardingStore(g)
        t = time.time()
        store.record(DecisionRecord("r1", "LH123", "A1", "reject", "no_match", None, "PARKER", 0.31, t))
        store.record(DecisionRecord("r2", "LH123", "A1", "reject", "timeout", None, "PARKER", 0.35, t + 1))
        assert store.board(DecisionRecord("a1", "LH123", "A1", "accept", None, "PARKER", None, 0.62, t + 2)).first
        assert store.board(DecisionRecord("a2", "LH123", "A2", "accept", None, "YAO", None, 0.71, t + 3)).first
        store.record(DecisionRecord("r3", "LH123", "A1", "reject", "already_boarded", "YAO", None, 0.7, t + 4))
    report = json.loads(cli("kiosk", site, "board", "report", "--flight", "LH123", "--json").stdout)
    assert (report["boarded"], report["not_boarded"], report["accepts"]) == (2, 0, 2)
    assert report["rejects"] == {"already_boarded": 1, "no_match": 1, "timeout": 1}
    assert report["needed_more_than_one_attempt"] == 1
    lines = {p["id"]: p for p in report["manifest"]}
    assert lines["PARKER"]["attempts"] == 3 and lines["YAO"]["gate_id"] == "A2" and lines["YAO"]["event_id"] == "a2"
    res = cli("kiosk", site, "board", "report", "--flight", "LH123", "--csv", str(folder / "lh123-report.csv"))
    assert res.returncode == 0
    rows = list(csv.DictReader((folder / "lh123-report.csv").open()))
    assert [(r["id"], r["boarded"]) for r in rows] == [("PARKER", "True"), ("YAO", "True")]

    res = cli("kiosk", site, "board", "undo", "--flight", "LH123", "--subject", "YAO")
    assert res.returncode == 0 and "boardable again" in res.stdout
    assert (
        json.loads(cli("kiosk", site, "board", "status", "--flight", "LH123", "--json").stdout)["flights"][0]["boarded"]
        == 1
    )
    assert cli("kiosk", site, "board", "close", "--gate", "A2").returncode == 0
    res = cli("kiosk-enroll", site, "flight", "remove-passenger", "BA456", "DUNCAN")
    assert res.returncode == 0 and "still enrolled" in res.stdout

    res = cli("kiosk-enroll", site, "flight", "purge", "LH123")
    assert res.returncode == 0 and "1 passenger(s) deleted" in res.stdout and "1 kept" in res.stdout, res.stdout
    listed = json.loads(cli("kiosk-enroll", site, "list", "--json").stdout)
    assert sorted(s["id"] for s in listed["subjects"]) == ["DUNCAN", "YAO"]  # YAO flies on with BA456


@pytest.mark.parametrize(
    "tool,args,message",
    [
        ("kiosk-enroll", ["import", "--no-progress", "lh123.csv", "--flight", "ZZ999"], "give its scheduled departure"),
        (
            "kiosk-enroll",
            ["import", "--no-progress", "lh123.csv", "--flight", "ZZ999", "--departs", "tomorrow"],
            "expected an ISO date-time",
        ),
        (
            "kiosk-enroll",
            ["import", "--no-progress", "lh123.csv", "--flight", "ZZ999", "--departs", "2026-11-30"],
            "give the time too",
        ),
        ("kiosk-enroll", ["import", "--no-progress", "lh123.csv", "--flight", "LH-12"], "expected an airline code"),
        ("kiosk-enroll", ["import", "--no-progress", "lh123.csv", "--flight", "OLD1"], "was purged"),
        ("kiosk-enroll", ["add", "--id", "NEW", "yao.jpg", "--flight", "OLD1"], "was purged"),
        (
            "kiosk-enroll",
            ["add", "--id", "NEW", "yao.jpg", "--departs", "2026-11-30T10:00"],
            "--departs needs --flight",
        ),
        ("kiosk-enroll", ["flight", "show", "ZZ999"], "no flight ZZ999"),
        ("kiosk-enroll", ["flight", "remove-passenger", "OK1", "NOBODY"], "is not on flight OK1"),
        ("kiosk", ["board", "open", "--gate", "Z9", "--flight", "OK1"], "unknown gate 'Z9'"),
        ("kiosk", ["board", "open", "--gate", "A1", "--flight", "ZZ999"], "no flight ZZ999"),
        ("kiosk", ["board", "open", "--gate", "A1", "--flight", "OLD1"], "was purged"),
        ("kiosk", ["board", "report", "--flight", "ZZ999"], "no flight ZZ999"),
        ("kiosk", ["board", "status", "--gate", "Q1"], "unknown gate"),
        ("kiosk", ["board", "undo", "--flight", "OK1", "--subject", "YAO"], "has not boarded"),
    ],
)
def test_bad_flight_input_is_one_line_exit_2_and_writes_nothing(tmp_path, site, tool, args, message):
    folder = site.parent
    config = tmp_path / "kiosk.yaml"
    config.write_text(site.read_text())
    for name in ("lh123.csv", "yao.jpg", "parker.jpg"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with Gallery(tmp_path / "gallery.db") as g:  # (the boarding store opens no template: no key)
        store = SqliteBoardingStore(g)
        store.add_flight("OLD1", time.time() - 3600)
        store.add_flight("OK1", time.time() + 3600)
        store.purge("OLD1")
    before = dump(tmp_path / "gallery.db")
    res = run_cli(tool, "-q", "-c", str(config), *args, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert dump(tmp_path / "gallery.db") == before
