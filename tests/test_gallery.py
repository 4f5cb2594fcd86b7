"""The gallery and its search matrix; the behaviour on both backends (SQLite file, real PostgreSQL server)."""

from __future__ import annotations

import logging
import sqlite3
import time

import numpy as np
import pytest

from kiosk.errors import UsageError
from tests.sealing_helpers import sealed_gallery

MODEL = "rec:abc"
OTHER = "rec:other"


def unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_wal_mode_and_schema(tmp_path):
    with sealed_gallery(tmp_path / "g.db") as g:
        assert g.revision() == 0
    db = sqlite3.connect(tmp_path / "g.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_enroll_list_remove_and_revision(gallery_site):
    rng = np.random.default_rng(0)
    with gallery_site.open() as g:
        assert g.enroll("p1", "Ann", unit(rng, 2), MODEL) == 2
        assert g.enroll("p1", "", unit(rng, 1), MODEL) == 3  # more templates, name kept
        g.enroll("p2", "Bob", unit(rng, 1), MODEL, expires=time.time() + 3600)
        subjects = {s.id: s for s in g.subjects()}
        assert subjects["p1"].name == "Ann" and subjects["p1"].templates == {MODEL: 3}
        assert subjects["p2"].expires is not None
        assert g.revision() == 3
        assert g.remove("p1") is True
        assert g.remove("p1") is False
        assert [s.id for s in g.subjects()] == ["p2"]
        assert g.revision() == 4
        (count,) = g.execute("SELECT COUNT(*) FROM templates WHERE subject_id='p1'").fetchone()
        assert count == 0  # cascade


def test_failed_enrollment_writes_nothing(gallery_site):
    with gallery_site.open() as g:
        g.enroll("p1", "Ann", unit(np.random.default_rng(0), 1), MODEL)
        before = g.revision()
        with pytest.raises(Exception) as info:
            # A NULL subject id fails inside the transaction, after nothing else was written.
            g.enroll(None, "x", unit(np.random.default_rng(1), 1), MODEL)  # type: ignore[arg-type]
        assert "null" in str(info.value).lower()  # the database's own NOT NULL refusal, on either backend
        assert g.revision() == before and [s.id for s in g.subjects()] == ["p1"]


def test_search_best_second_and_multi_template_grouping(gallery_site):
    rng = np.random.default_rng(1)
    a, b, c = unit(rng, 3), unit(rng, 1), unit(rng, 2)
    with gallery_site.open() as g:
        g.enroll("b", "B", b, MODEL)
        g.enroll("a", "A", a, MODEL)
        g.enroll("c", "C", c, MODEL)
        m = g.matrix(MODEL, 8)
    assert len(m) == 3 and m.template_count == 6
    queries = np.stack([a[2], b[0], c[1]])
    per = m.subject_scores(queries)
    brute = {sid: (queries @ t.T).max(axis=1) for sid, t in (("a", a), ("b", b), ("c", c))}
    for j, sid in enumerate(m.subject_ids):
        assert np.allclose(per[:, j], brute[sid], atol=1e-6)
    matches = m.search(queries)
    assert [x.subject_id for x in matches] == ["a", "b", "c"]
    assert all(x.score == pytest.approx(1.0, abs=1e-5) for x in matches)
    for x, row in zip(matches, per, strict=True):
        assert x.second_id != x.subject_id
        assert x.second_score == pytest.approx(np.sort(row)[-2], abs=1e-6)
    only = m.search(queries[:1], only="b")[0]
    assert only.subject_id == "b" and only.second_id is None


def test_other_model_templates_and_expired_subjects_are_not_compared(gallery_site, caplog):
    rng = np.random.default_rng(2)
    with gallery_site.open() as g:
        g.enroll("mine", "", unit(rng, 1), MODEL)
        g.enroll("foreign", "", unit(rng, 1), OTHER)
        g.enroll("gone", "", unit(rng, 1), MODEL, expires=time.time() - 1)
        with caplog.at_level(logging.WARNING):
            m = g.matrix(MODEL, 8)
    assert m.subject_ids == ["mine"]
    assert "1 templates were made by another model" in caplog.text


def test_a_second_connection_sees_changes_by_revision(gallery_site):
    rng = np.random.default_rng(3)
    reader = gallery_site.open()
    writer = gallery_site.open()
    m0 = reader.matrix(MODEL, 8)
    writer.enroll("p", "", unit(rng, 1), MODEL)
    assert reader.revision() > m0.revision
    assert reader.matrix(MODEL, 8).subject_ids == ["p"]
    reader.close()
    writer.close()


def test_not_a_database(tmp_path):
    bad = tmp_path / "g.db"
    bad.write_text("hello, not sqlite" * 100)
    with pytest.raises(UsageError, match="not a usable SQLite database"):
        sealed_gallery(bad)


@pytest.mark.parametrize("name", ["g.db", "a gallery?#%é.db"])  # (the characters a URI must escape)
def test_a_gallery_not_to_be_created_is_never_made_empty_at_its_path(tmp_path, name, monkeypatch):
    """create=False (the commands, and each reopen() for a thread) opens an existing file or fails clearly: a
    file gone at the connect, even after the existence check saw it, is not replaced by a new empty gallery."""
    path = tmp_path / name
    with pytest.raises(UsageError, match="does not exist.*never created empty"):
        sealed_gallery(path, create=False)
    assert not path.exists()
    connect = sqlite3.connect

    def deleted_first(*args, **kwargs):  # the file goes after the existence check, just before the connect
        path.unlink(missing_ok=True)
        return connect(*args, **kwargs)

    with sealed_gallery(path) as g:
        g.enroll("ANN", "Ann", unit(np.random.default_rng(1), 1), MODEL)
        with monkeypatch.context() as m:
            m.setattr(sqlite3, "connect", deleted_first)
            with pytest.raises(UsageError, match="does not exist.*never created empty"):
                g.reopen()
        assert not path.exists()
        with pytest.raises(UsageError, match="does not exist"):  # deleted while the gallery is open
            g.reopen()
        assert not path.exists()
    with sealed_gallery(path) as again:  # created, where it is asked for
        assert again.revision() == 0 and path.exists()


def test_large_gallery_prefilter_matches_exact_search():
    from kiosk.store.gallery import PREFILTER_MIN, GalleryMatrix

    rng = np.random.default_rng(5)
    n, d = PREFILTER_MIN + 500, 512
    emb = unit(rng, n, d)
    owners = np.repeat(np.arange(n // 2), 2)[:n]  # two templates per subject
    ids = [f"s{i}" for i in range(owners[-1] + 1)]
    m = GalleryMatrix("x", d, ids, ids, emb, owners, 0)
    assert not m.prefiltered  # built on first need, not for enrollment's full-scan checks
    assert m.prepare().prefiltered
    picks = rng.choice(n, 40, replace=False)
    noisy = emb[picks] + rng.normal(0, 1.0 / np.sqrt(d), (40, d)).astype(np.float32)
    queries = np.concatenate([noisy / np.linalg.norm(noisy, axis=1, keepdims=True), unit(rng, 10, d)])
    exact = m.subject_scores(queries)
    for match, row in zip(m.search(queries), exact, strict=True):
        # Scores reported are exact; an impostor-only query may get a lesser impostor, never a higher score.
        assert match.score == pytest.approx(row[ids.index(match.subject_id)], abs=1e-5)
        assert match.score <= row.max() + 1e-6
    for match, row, pick in zip(m.search(queries[:40]), exact, picks, strict=False):
        assert match.subject_id == ids[int(np.argmax(row))]
        assert match.subject_id == ids[owners[pick]] and match.score > 0.6
        # The runner-up is an impostor here; its reported score is exact, at most the true runner-up's.
        assert match.second_score == pytest.approx(row[ids.index(match.second_id)], abs=1e-5)
        assert match.second_score <= np.sort(row)[-2] + 1e-6


def test_prefilter_keeps_a_close_runner_up():
    """The margin rule needs the real second-best when it is close to the best: it is never missed."""
    from kiosk.store.gallery import PREFILTER_MIN, GalleryMatrix

    rng = np.random.default_rng(6)
    n, d = PREFILTER_MIN + 10, 512
    emb = unit(rng, n, d)
    twin = emb[7] * 0.8 + unit(rng, 1, d)[0] * 0.6  # a look-alike of subject 7 (cos ~0.8)
    emb[12345] = twin / np.linalg.norm(twin)
    ids = [f"s{i}" for i in range(n)]
    m = GalleryMatrix("x", d, ids, ids, emb, np.arange(n), 0)
    (match,) = m.search(emb[7:8])
    assert (match.subject_id, match.second_id) == ("s7", "s12345")
    assert match.second_score == pytest.approx(float(emb[7] @ emb[12345]), abs=1e-5)


def test_a_patched_large_gallery_keeps_its_prefilter_and_finds_the_newcomers():
    """An update of a prefiltered gallery projects only the new templates on the kept axes; the result
    equals the matrix built afresh, and a newcomer is found through the prefilter."""
    from kiosk.store.gallery import PREFILTER_MIN, GalleryMatrix

    rng = np.random.default_rng(8)
    n, d = PREFILTER_MIN + 100, 512
    emb = unit(rng, n, d)
    ids = np.array([f"s{i:06d}" for i in range(n)], object)
    m = GalleryMatrix.from_rows("x", d, ids, ids, emb, 1).prepare()
    new_ids = np.array(["s000003", "t000001", "t000002"], object)  # s000003 re-enrolled, two newcomers
    new = unit(rng, 3, d)
    drop = {"s000003", "s000010"}  # s000010 removed
    p = m.patched(drop, new_ids, new_ids, new, 2, None, scope=None, as_of=0.0)
    assert p.prefilter is not None and m.prefilter is not None
    basis, reduced = p.prefilter
    assert basis is m.prefilter[0]  # the source's basis, not a new one
    keep = ~np.isin(ids, list(drop))
    all_ids = np.concatenate([ids[keep], new_ids])
    order = np.argsort(all_ids, kind="stable")
    fresh = GalleryMatrix.from_rows("x", d, all_ids[order], all_ids[order], np.concatenate([emb[keep], new])[order], 2)
    assert p.subject_ids == fresh.subject_ids and np.array_equal(p.embeddings, fresh.embeddings)
    assert np.allclose(reduced, p.embeddings @ basis, atol=1e-4)
    found = p.search(new)
    assert [f.subject_id for f in found] == list(new_ids) and all(f.score > 0.99 for f in found)
    assert p.search(emb[10:11])[0].subject_id != "s000010" and p.revision == 2
