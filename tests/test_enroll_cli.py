"""`kiosk-enroll` end to end on real photos: enrollment, refusals, list/remove, compare, import, evaluate."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest

from enrollment.cli import main
from kiosk.cli import main as kiosk_main
from kiosk.store.gallery import SCHEMA_VERSION
from tests.conftest import SHARED_FACES, run_cli
from tests.pipeline_helpers import write_config


def enroll(config: Path, *args: str) -> int:
    return main(["-c", str(config), "-q", *args])


def gallery_state(config: Path) -> tuple[list, int] | None:
    """(subject rows, revision) of the gallery beside `config`, None if it was never created."""
    db = config.parent / "gallery.db"
    if not db.exists():
        return None
    con = sqlite3.connect(db)
    try:
        subjects = con.execute("SELECT id, name FROM subjects ORDER BY id").fetchall()
        templates = con.execute("SELECT COUNT(*) FROM templates").fetchone()[0]
        revision = int(con.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])
        return subjects + [templates], revision
    finally:
        con.close()


@pytest.fixture(scope="module")
def people(tmp_path_factory, photos, engine) -> dict[str, Path]:
    """Single-person photos: Yao Ming, and the three players of gdp.jpg cut out and enlarged."""
    out = tmp_path_factory.mktemp("people")
    img = cv2.imread(str(photos["gdp.jpg"]))
    faces = engine.detector.detect(img)
    faces = faces[faces.widths >= 48]
    paths = {"yao": photos["yaoming.jpg"]}
    for i, (x1, y1, x2, y2) in enumerate(faces.boxes[np.argsort(faces.boxes[:, 0])]):
        w, h = x2 - x1, y2 - y1
        crop = img[max(0, int(y1 - 0.6 * h)) : int(y2 + 0.6 * h), max(0, int(x1 - 0.6 * w)) : int(x2 + 0.6 * w)]
        crop = cv2.resize(crop, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC)
        paths[f"gdp{i}"] = out / f"gdp{i}.jpg"
        cv2.imwrite(str(paths[f"gdp{i}"]), crop)
    # Same person, another take: mirrored and darker.
    yao = cv2.imread(str(photos["yaoming.jpg"]))
    paths["yao_b"] = out / "yao_b.jpg"
    cv2.imwrite(str(paths["yao_b"]), cv2.convertScaleAbs(cv2.flip(yao, 1), alpha=0.8, beta=-10))
    return paths


def test_add_list_remove(config_file, people, capsys):
    assert enroll(config_file, "add", "--id", "P1", "--name", "Yao Ming", str(people["yao"]), str(people["yao_b"])) == 0
    assert enroll(config_file, "add", "--id", "P2", str(people["gdp0"])) == 0
    capsys.readouterr()
    assert enroll(config_file, "list", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(s["id"], s["name"], s["templates"]) for s in listing["subjects"]] == [("P1", "Yao Ming", 2), ("P2", "", 1)]
    assert enroll(config_file, "remove", "P2") == 0
    assert enroll(config_file, "remove", "P2") == 2  # unknown subject
    assert "no subject 'P2'" in capsys.readouterr().err
    assert [s[0] for s in gallery_state(config_file)[0][:-1]] == ["P1"]


def test_refusals_exit_2_and_write_nothing(config_file, people, photos, tmp_path, yaoming, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("boarding list, not a photo\n")
    blank = tmp_path / "wall.jpg"
    cv2.imwrite(str(blank), np.random.default_rng(0).integers(80, 120, (480, 640, 3), dtype=np.uint8))
    small = tmp_path / "small.jpg"
    cv2.imwrite(str(small), cv2.resize(yaoming, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
    blurred = tmp_path / "blurred.jpg"
    cv2.imwrite(str(blurred), cv2.GaussianBlur(yaoming, (0, 0), 5))
    cases = {
        text: "not a readable image",
        blank: "no face found",
        photos["players.jpg"]: "faces found",
        small: "px wide, a reference photo needs at least",
        blurred: "too blurred",
        tmp_path / "missing.jpg": "no such file",
        people["gdp1"]: "turned too far to the side",  # Ginobili looks away in gdp.jpg
    }
    for path, message in cases.items():
        capsys.readouterr()
        assert enroll(config_file, "add", "--id", "X", str(path)) == 2, path
        err = capsys.readouterr().err
        assert message in err and str(path) in err and "Traceback" not in err
        assert gallery_state(config_file) is None  # nothing written, not even an empty gallery
    # With a gallery in place, a refusal leaves it exactly as it was.
    assert enroll(config_file, "add", "--id", "Y", str(people["yao"])) == 0
    before = gallery_state(config_file)
    for path in cases:
        assert enroll(config_file, "add", "--id", "X", str(path)) == 2
        assert enroll(config_file, "add", "--id", "Y", str(people["yao_b"]), str(path)) == 2
    assert gallery_state(config_file) == before


def test_largest_takes_one_face_of_a_group_photo(config_file, photos):
    # players.jpg faces are ~45 px: too small for a reference, even when told which.
    assert enroll(config_file, "add", "--id", "G", "--largest", str(photos["players.jpg"])) == 2
    assert gallery_state(config_file) is None


def test_rgba_png_is_a_valid_photo(config_file, yaoming, tmp_path, capsys):
    h, w = yaoming.shape[:2]
    alpha = np.zeros((h, w), np.uint8)
    cv2.ellipse(alpha, (w // 2, h // 2), (w // 2 - 4, h // 2 - 4), 0, 0, 360, 255, -1)
    png = tmp_path / "id.png"
    cv2.imwrite(str(png), np.dstack([yaoming, alpha]))
    assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED).shape[2] == 4
    assert enroll(config_file, "add", "--id", "RGBA", str(png)) == 0
    assert gallery_state(config_file)[0][0] == ("RGBA", "")


def test_same_face_under_two_ids_is_refused_unless_forced(config_file, people, capsys):
    assert enroll(config_file, "add", "--id", "A1", str(people["yao"])) == 0
    capsys.readouterr()
    before = gallery_state(config_file)
    assert enroll(config_file, "add", "--id", "B2", str(people["yao_b"])) == 2
    err = capsys.readouterr().err
    assert "matches the already enrolled subject A1" in err and "--force" in err
    assert gallery_state(config_file) == before
    assert enroll(config_file, "add", "--id", "B2", "--force", str(people["yao_b"])) == 0
    # Another person's photo added to A1 does not match A1's templates.
    assert enroll(config_file, "add", "--id", "A1", str(people["gdp2"])) == 2
    assert "does not match the templates already enrolled for A1" in capsys.readouterr().err
    # Two photos of different people for one id.
    assert enroll(config_file, "add", "--id", "C3", str(people["gdp0"]), str(people["gdp2"])) == 2
    assert "do not look like the same person" in capsys.readouterr().err


def test_compare_json(config_file, people, capsys):
    assert enroll(config_file, "compare", str(people["yao"]), str(people["yao_b"]), "--json") == 0
    same = json.loads(capsys.readouterr().out)
    assert enroll(config_file, "compare", str(people["yao"]), str(people["gdp0"]), "--json") == 0
    other = json.loads(capsys.readouterr().out)
    assert same["match"] is True and other["match"] is False
    assert same["threshold"] == other["threshold"] == 0.40
    assert same["score"] > 0.6 > 0.3 > other["score"]


def test_import_refuses_bad_rows_only(config_file, people, photos, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    bad = tmp_path / "photos" / "bad.jpg"
    bad.write_bytes(b"\x00\x01 not an image")
    manifest = tmp_path / "flight.csv"
    manifest.write_text(
        "id,name,photo\n"
        f"PAX1,Yao Ming,{people['yao']}\n"
        "PAX2,Bad File,photos/bad.jpg\n"
        f"PAX3,Group,{photos['players.jpg']}\n"
        f"PAX4,Player One,{people['gdp0']}\n"
        f"PAX5,Yao Again,{people['yao_b']}\n"
        ",No Id,photos/bad.jpg\n"
    )
    assert enroll(config_file, "import", "--no-progress", str(manifest)) == 2
    out = capsys.readouterr().out
    assert "6 row(s), 2 enrolled, 0 already enrolled from the same photo, 4 refused" in out
    assert "line 3 id=PAX2: refused (unreadable)" in out
    assert "line 4 id=PAX3: refused (multiple_faces)" in out
    assert "line 6 id=PAX5: refused (duplicate)" in out
    assert "line 7 id=?: refused (bad_row)" in out
    state = gallery_state(config_file)
    assert [s[0] for s in state[0][:-1]] == ["PAX1", "PAX4"] and state[0][-1] == 2
    # The same import again: idempotent, no second identical template, nothing written.
    assert enroll(config_file, "import", "--no-progress", str(manifest)) == 2
    assert "6 row(s), 0 enrolled, 2 already enrolled from the same photo, 4 refused" in capsys.readouterr().out
    assert gallery_state(config_file) == state
    # `add` of an enrolled photo for the same subject likewise.
    assert enroll(config_file, "add", "--id", "PAX1", str(people["yao"])) == 0
    assert "already enrolled from this photo; nothing changed" in capsys.readouterr().out
    assert gallery_state(config_file) == state


def test_version_1_gallery_is_upgraded_in_place(tmp_path, people, capsys):
    """A gallery file written by the first release (schema 1) is refused until `kiosk-enroll seal` seals its
    templates in place (which needs the key), then keeps its rows and gains photo hashes."""
    db = tmp_path / "gallery.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE subjects (id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
                               expires REAL, metadata TEXT NOT NULL DEFAULT '{}');
        CREATE TABLE templates (id INTEGER PRIMARY KEY AUTOINCREMENT, subject_id TEXT NOT NULL REFERENCES
                                subjects(id) ON DELETE CASCADE, model_id TEXT NOT NULL, dim INTEGER NOT NULL,
                                embedding BLOB NOT NULL, quality TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1'), ('revision', '7');
        INSERT INTO subjects VALUES ('OLD', 'Old Timer', 1.0, NULL, '{}');
    """)
    con.execute(
        "INSERT INTO templates (subject_id, model_id, dim, embedding, created) VALUES (?, ?, ?, ?, ?)",
        ("OLD", "other-model:abc", 4, np.ones(4, np.float32).tobytes(), 1.0),
    )
    con.commit()
    con.close()
    config = write_config(tmp_path, gallery_only=True)

    def dump() -> list[str]:
        con = sqlite3.connect(db)
        try:
            return list(con.iterdump())
        finally:
            con.close()

    before = dump()
    # Its templates are in the clear: nothing opens it but `seal`, and `seal` only with a key.
    assert enroll(config, "add", "--id", "NEW", str(people["gdp0"])) == 2
    assert f"in the clear; seal them in place with `kiosk-enroll -c CONFIG seal {db}`" in capsys.readouterr().err
    assert enroll(config, "seal") == 2
    assert "no template key there" in capsys.readouterr().err
    assert dump() == before  # nothing written
    assert kiosk_main(["keys", "init", str(tmp_path / "var" / "keys")]) == 0
    assert enroll(config, "seal") == 0
    assert "1 template(s), all sealed" in capsys.readouterr().out
    con = sqlite3.connect(db)
    (blob,) = con.execute("SELECT embedding FROM templates WHERE subject_id = 'OLD'").fetchone()
    con.close()
    assert blob[:3] == b"KT1" and np.ones(4, np.float32).tobytes() not in db.read_bytes()
    assert enroll(config, "add", "--id", "NEW", str(people["gdp0"])) == 0
    assert enroll(config, "add", "--id", "NEW", str(people["gdp0"])) == 0  # same photo: nothing new
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    assert con.execute("SELECT subject_id, photo_sha256 IS NULL FROM templates ORDER BY id").fetchall() == [
        ("OLD", 1),
        ("NEW", 0),
    ]
    assert con.execute("SELECT COUNT(*) FROM flights").fetchone() == (0,)  # version 3's tables, empty
    assert int(con.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]) == 8
    con.close()
    capsys.readouterr()


def test_evaluate_json(config_file, people, tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    rows = ["image_a,image_b,same", f"{people['yao']},{people['yao_b']},yes"]
    names = ["gdp0", "gdp1", "gdp2", "yao"]
    rows += [f"{people[a]},{people[b]},0" for i, a in enumerate(names) for b in names[i + 1 :]]
    rows.append(f"{people['gdp0']},{tmp_path / 'missing.jpg'},1")
    pairs.write_text("\n".join(rows) + "\n")
    assert enroll(config_file, "evaluate", "--no-progress", "--json", str(pairs)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 7 and report["genuine_pairs"] == 1 and report["impostor_pairs"] == 6
    assert report["threshold"] == 0.40 and report["fmr"] == 0.0 and report["fnmr"] == 0.0
    assert report["eer"] == 0.0 and report["genuine_min"] > report["impostor_max"]
    assert report["threshold_at_fmr"] == {"0.01": None, "0.001": None}  # 6 impostor pairs cannot tell
    assert len(report["skipped"]) == 1 and "missing.jpg" in report["skipped"][0]["reason"]


# Real processes: the console scripts as an operator runs them.


def test_cli_process_bad_config_and_text_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: {accept_threshold: high}\n")
    res = run_cli("kiosk-enroll", "-c", str(bad), "list")
    assert res.returncode == 2
    assert f"{bad}: policy.accept_threshold: expected a number, found str 'high'" in res.stderr
    assert "Traceback" not in res.stderr
    cfg = write_config(tmp_path, gallery_only=True)
    text = tmp_path / "scan.jpg"
    text.write_text("hello")
    res = run_cli("kiosk-enroll", "-c", str(cfg), "add", "--id", "T", str(text))
    assert res.returncode == 2 and "not a readable image" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "gallery.db").exists()
    res = run_cli("kiosk-enroll", "-c", str(cfg), "frobnicate")
    assert res.returncode == 2 and "invalid choice" in res.stderr


needs_shared = pytest.mark.skipif(not SHARED_FACES.is_dir(), reason="shared face photos not present")


@needs_shared
def test_shared_photos_32bit_png_enrolls_two_people_refused(tmp_path):
    cfg = write_config(tmp_path, gallery_only=True)
    res = run_cli("kiosk-enroll", "-c", str(cfg), "add", "--id", "TWO", str(SHARED_FACES / "misc" / "two_people.jpg"))
    assert res.returncode == 2 and "2 faces found" in res.stderr
    assert not (tmp_path / "gallery.db").exists()
    res = run_cli("kiosk-enroll", "-c", str(cfg), "add", "--id", "OBAMA", str(SHARED_FACES / "misc" / "32bit.png"))
    assert res.returncode == 0, res.stderr
    res = run_cli("kiosk-enroll", "-c", str(cfg), "list", "--json")
    assert json.loads(res.stdout)["subjects"][0]["id"] == "OBAMA"
    before = gallery_state(cfg)
    res = run_cli("kiosk-enroll", "-c", str(cfg), "add", "--id", "TWO", str(SHARED_FACES / "misc" / "two_people.jpg"))
    assert res.returncode == 2 and gallery_state(cfg) == before
