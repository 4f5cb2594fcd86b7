"""The enrolled gallery, and an in-memory matrix for 1:N search.

`GalleryQueries` is the gallery in SQL that both backends run: `Gallery`, a SQLite file in WAL mode (the
embedded default), and `kiosk.store.postgres.PgGallery`, one PostgreSQL database shared by many hosts;
`open_gallery(cfg)` picks the configured one.

Only templates are stored, never photos. Every template carries the id of
the recognizer that made it; `matrix(model_id)` loads only those of that
model, so a template from another model is never compared (it is counted
and logged instead). A `revision` counter, bumped in the same transaction
as every change, lets a running verifier notice changes cheaply and reload.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiosk.config import KioskConfig
from kiosk.errors import RuntimeFailure, UsageError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
# Version 2: templates.photo_sha256 (the photo a template came from), unique per subject and model, so
# re-running the same import or add enrolls nothing new.
# Version 3: flights, their manifests, gate assignments, boarded marks (one per flight and subject: the
# primary key is the guarantee that nobody boards twice), decisions at boarding gates and the log of
# boarding actions (undo, purge). See kiosk.store.flights.
# Version 4: subject_changes, the subjects each revision changed (logged by triggers), so a verifier reloads
# only those; meta 'baseline' is the revision from which that log is complete (older: reload everything).
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subjects (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    expires REAL,
    metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS templates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_id TEXT NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL,
    dim INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    quality TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    photo_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS templates_subject ON templates(subject_id);
CREATE INDEX IF NOT EXISTS subjects_expires ON subjects(expires);
CREATE TABLE IF NOT EXISTS flights (
    id TEXT PRIMARY KEY,
    departs REAL NOT NULL,
    created REAL NOT NULL,
    purged_at REAL
);
CREATE TABLE IF NOT EXISTS manifest (
    flight_id TEXT NOT NULL REFERENCES flights(id) ON DELETE CASCADE,
    subject_id TEXT NOT NULL,
    added REAL NOT NULL,
    PRIMARY KEY (flight_id, subject_id)
);
CREATE INDEX IF NOT EXISTS manifest_subject ON manifest(subject_id);
CREATE TABLE IF NOT EXISTS gates (
    gate_id TEXT PRIMARY KEY,
    flight_id TEXT NOT NULL REFERENCES flights(id),
    opened REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS boardings (
    flight_id TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    gate_id TEXT NOT NULL,
    camera_id TEXT,
    boarded_at REAL NOT NULL,
    score REAL,
    event_id TEXT,
    PRIMARY KEY (flight_id, subject_id)
);
CREATE TABLE IF NOT EXISTS flight_decisions (
    event_id TEXT PRIMARY KEY,
    flight_id TEXT NOT NULL,
    gate_id TEXT,
    type TEXT NOT NULL,
    reason TEXT,
    subject_id TEXT,
    candidate_id TEXT,
    score REAL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS flight_decisions_flight ON flight_decisions(flight_id);
CREATE TABLE IF NOT EXISTS subject_changes (
    revision INTEGER NOT NULL,
    subject_id TEXT NOT NULL,
    PRIMARY KEY (revision, subject_id)
);
CREATE TABLE IF NOT EXISTS boarding_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    flight_id TEXT,
    subject_id TEXT,
    gate_id TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
"""
# Run once the schema is at the current version (the column does not exist in version 1).
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS templates_photo ON templates(subject_id, model_id, photo_sha256);
"""
MIGRATIONS = {  # from version -> statements that bring it to version + 1
    1: ["ALTER TABLE templates ADD COLUMN photo_sha256 TEXT"],
    2: [],  # version 3's tables are all new: SCHEMA creates them
    # subject_changes is new (SCHEMA; its baseline: BASELINE). The index on templates(model_id) goes: nearly every
    # template has the one model, and SQLite's planner preferred it over the subject index to read a few
    # subjects' templates (a scan of all of them).
    3: ["DROP INDEX IF EXISTS templates_model"],
}
# The change log starts at the revision a gallery has when it gets the table (0 for a new one).
BASELINE = "INSERT INTO meta (key, value) SELECT 'baseline', value FROM meta WHERE key = 'revision' " \
           "ON CONFLICT (key) DO NOTHING"
BUMP = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'"
CHANGES_KEPT = 50_000  # revisions of change log kept; a verifier further behind reloads everything
# Every change to a subject or its templates, whoever writes it (the project, or SQL run by hand), logs the
# subject under the revision its transaction is about to commit: the one after the current (writers take
# turns under the write lock, so no verifier's snapshot holds that revision without the change).
# (NOT EXISTS, not OR IGNORE: a trigger's conflict clause yields to its statement's, e.g. an upsert's.)
_LOG_ROW = ("INSERT INTO subject_changes (revision, subject_id) SELECT CAST(m.value AS INTEGER) + 1, {row} "
            "FROM meta m WHERE m.key = 'revision' AND NOT EXISTS (SELECT 1 FROM subject_changes c "
            "WHERE c.revision = CAST(m.value AS INTEGER) + 1 AND c.subject_id = {row})")
TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS {table}_{what.lower()}_logged AFTER {what} ON {table} BEGIN "
    + "; ".join(_LOG_ROW.format(row=f"{version}.{column}") for version in versions) + "; END"
    for table, column in (("subjects", "id"), ("templates", "subject_id"))
    for what, versions in (("INSERT", ("NEW",)), ("DELETE", ("OLD",)), ("UPDATE", ("OLD", "NEW")))
]


def prune_changes(db: Any) -> None:
    """Forget the change log's revisions beyond the last CHANGES_KEPT (a verifier that far behind reloads
    everything)."""
    (revision,) = db.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'revision'").fetchone()
    if revision > CHANGES_KEPT:
        db.execute("DELETE FROM subject_changes WHERE revision <= ?", (revision - CHANGES_KEPT,))
        db.execute("UPDATE meta SET value = ? WHERE key = 'baseline' AND CAST(value AS INTEGER) < ?",
                   (str(revision - CHANGES_KEPT), revision - CHANGES_KEPT))


def rebase(db: Any) -> None:
    """The gallery's content was replaced wholesale (restore, copy): the change log leads nowhere now; every
    verifier behind the current revision reloads everything."""
    db.execute("DELETE FROM subject_changes")
    db.execute("UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'revision') WHERE key = 'baseline'")


@dataclass(frozen=True)
class Subject:
    """One enrolled person, with template counts per model id."""

    id: str
    name: str
    created: float
    expires: float | None
    metadata: dict[str, Any]
    templates: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Match:
    """Best and second-best subject for one query (subject_id None: nothing to match against)."""

    subject_id: str | None
    name: str
    score: float
    second_id: str | None
    second_score: float

    @property
    def margin(self) -> float:
        return self.score - self.second_score


PREFILTER_MIN = 20_000  # templates from which search prefilters in a reduced space
PREFILTER_DIM = 128
PREFILTER_K = 256


class GalleryMatrix:
    """Templates of one model as a (N, D) matrix, grouped by subject, for 1:N search.

    Up to PREFILTER_MIN templates every query is scored exactly against all.
    Beyond that a full scan is memory-bound (100k x 512 floats is 205 MB per
    query), so the templates are also kept projected on their top
    PREFILTER_DIM principal axes: the reduced scores pick PREFILTER_K
    candidate templates, which are then scored exactly. A subject that could
    matter for a decision (score near or above the threshold) scores far
    above the impostor crowd in the reduced space too, so it is always among
    the candidates; the scores reported are the exact ones.
    """

    def __init__(self, model_id: str, dim: int, subject_ids: list[str], names: list[str],
                 embeddings: np.ndarray, owners: np.ndarray, revision: int, next_expiry: float | None = None, *,
                 scope: frozenset[str] | None = None, as_of: float = 0.0) -> None:
        self.model_id = model_id
        self.next_expiry = next_expiry  # when the earliest subject in here expires: rebuild then
        self.scope = scope  # the subjects it was loaded for (None: everyone enrolled)
        self.as_of = as_of  # the time expiry was judged at
        self.dim = dim
        self.subject_ids = subject_ids
        self.names = names
        self.embeddings = np.ascontiguousarray(embeddings, np.float32)
        self.owners = owners  # (N,) subject index of each template, non-decreasing
        self.revision = revision
        self._starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]]) if len(owners) else owners
        self._basis: np.ndarray | None = None
        self._reduced: np.ndarray | None = None
        self._sorted_ids: np.ndarray | None = None  # subject_ids as an object array, when in code point order

    @classmethod
    def from_templates(cls, model_id: str, dim: int, templates: list[tuple[str, str, np.ndarray]],
                       revision: int = -1) -> GalleryMatrix:
        """A matrix from (subject id, name, embedding) tuples, e.g. the rows an import has added so far."""
        rows = sorted(templates, key=lambda t: t[0])
        ids: list[str] = []
        names: list[str] = []
        owners = np.empty(len(rows), np.int64)
        for i, (sid, name, _) in enumerate(rows):
            if not ids or ids[-1] != sid:
                ids.append(sid)
                names.append(name)
            owners[i] = len(ids) - 1
        emb = np.stack([t[2] for t in rows]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
        return cls(model_id, dim, ids, names, emb, owners, revision)

    def subset(self, subject_ids: set[str]) -> GalleryMatrix:
        """The templates of these subjects only (a flight's passengers), as a matrix of its own."""
        keep = np.array([sid in subject_ids for sid in self.subject_ids], bool)
        rows = keep[self.owners] if len(self.owners) else np.zeros(0, bool)
        index = np.cumsum(keep) - 1
        ids = [sid for sid, k in zip(self.subject_ids, keep) if k]
        names = [n for n, k in zip(self.names, keep) if k]
        return GalleryMatrix(self.model_id, self.dim, ids, names, self.embeddings[rows], index[self.owners[rows]],
                             self.revision, self.next_expiry)

    @classmethod
    def from_rows(cls, model_id: str, dim: int, sids: np.ndarray, names: np.ndarray, embeddings: np.ndarray,
                  revision: int, next_expiry: float | None = None, *, scope: frozenset[str] | None = None,
                  as_of: float = 0.0) -> GalleryMatrix:
        """A matrix from per-template subject ids and names (object arrays, sorted by subject id)."""
        first = np.r_[True, sids[1:] != sids[:-1]] if len(sids) else np.zeros(0, bool)
        out = cls(model_id, dim, [str(x) for x in sids[first]], [str(x) for x in names[first]], embeddings,
                  np.cumsum(first) - 1, revision, next_expiry, scope=scope, as_of=as_of)
        out._sorted_ids = sids[first]
        return out

    def patched(self, drop: set[str], sids: np.ndarray, names: np.ndarray, embeddings: np.ndarray, revision: int,
                next_expiry: float | None, *, scope: frozenset[str] | None, as_of: float) -> GalleryMatrix:
        """This matrix without the subjects in `drop`, plus the templates given (per-template subject ids and
        names, sorted by subject id; none of a subject kept): what a full load would give, for about the cost
        of copying the arrays. The search prefilter's axes are kept; only the new rows are projected on them."""
        ids = self._sorted_ids
        if ids is None:  # not built sorted (from_rows): put it in order first
            order = np.argsort(np.array(self.subject_ids, object)[self.owners], kind="stable")
            return GalleryMatrix.from_rows(self.model_id, self.dim, np.array(self.subject_ids, object)[self.owners][
                order], np.array(self.names, object)[self.owners][order], self.embeddings[order], self.revision,
                self.next_expiry, scope=self.scope, as_of=self.as_of).patched(
                drop, sids, names, embeddings, revision, next_expiry, scope=scope, as_of=as_of)
        keep = np.ones(len(ids), bool)
        if drop and len(ids):
            gone = np.array(sorted(drop), object)
            at = np.minimum(np.searchsorted(ids, gone), len(ids) - 1)
            keep[at[ids[at] == gone]] = False
        rows = keep[self.owners] if len(self.owners) else np.zeros(0, bool)
        everyone = bool(rows.all())  # (the usual change, a newcomer: the big arrays are copied once, not twice)
        own = self.owners if everyone else self.owners[rows]
        kept_sids = ids[own]
        at = np.searchsorted(kept_sids, sids) if len(sids) else np.zeros(0, np.int64)  # where the new rows go
        new = np.asarray(embeddings, np.float32).reshape(-1, self.dim)
        out = GalleryMatrix.from_rows(self.model_id, self.dim, np.insert(kept_sids, at, sids),
                                      np.insert(np.array(self.names, object)[own], at, names),
                                      np.insert(self.embeddings if everyone else self.embeddings[rows], at, new, axis=0),
                                      revision, next_expiry, scope=scope, as_of=as_of)
        if self._basis is not None and self._reduced is not None and len(out.embeddings) >= PREFILTER_MIN // 2:
            out._basis = self._basis
            out._reduced = np.insert(self._reduced if everyone else self._reduced[rows], at, new @ self._basis,
                                     axis=0)
        return out

    def prepare(self) -> GalleryMatrix:
        """Build the search prefilter of a large gallery now (about 1 s at 100k templates) rather than on
        the first search; a no-op for small galleries. Enrollment checks never need it."""
        if self._reduced is None and len(self.embeddings) >= PREFILTER_MIN:
            rng = np.random.default_rng(0)
            sample = self.embeddings[rng.choice(len(self.embeddings), min(20_000, len(self.embeddings)),
                                                replace=False)]
            _, _, vt = np.linalg.svd(sample, full_matrices=False)
            self._basis = np.ascontiguousarray(vt[:PREFILTER_DIM].T)  # (D, k)
            self._reduced = np.ascontiguousarray(self.embeddings @ self._basis)
        return self

    @property
    def prefiltered(self) -> bool:
        return self._reduced is not None

    def __len__(self) -> int:
        return len(self.subject_ids)

    @property
    def template_count(self) -> int:
        return int(self.embeddings.shape[0])

    def subject_scores(self, queries: np.ndarray) -> np.ndarray:
        """(Q, S) best template score of each subject for each query (exact, full scan)."""
        q = np.asarray(queries, np.float32).reshape(-1, self.dim)
        if not len(self.subject_ids):
            return np.zeros((len(q), 0), np.float32)
        scores = q @ self.embeddings.T
        if len(self._starts) == scores.shape[1]:  # one template per subject
            return scores
        return np.maximum.reduceat(scores, self._starts, axis=1)

    def _candidates(self, q: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (subject indices, exact best scores) of the prefiltered candidates."""
        approx = (q @ self._basis) @ self._reduced.T  # type: ignore[operator]
        k = min(PREFILTER_K, approx.shape[1] - 1)
        out = []
        for row, query in zip(approx, q):
            cand = np.argpartition(-row, k)[:k]
            exact = self.embeddings[cand] @ query
            owners = self.owners[cand]
            order = np.lexsort((-exact, owners))  # per subject, best template first
            first = np.r_[True, owners[order][1:] != owners[order][:-1]]
            out.append((owners[order][first], exact[order][first]))
        return out

    def search(self, queries: np.ndarray, *, only: str | None = None) -> list[Match]:
        """Best and second-best subject per query; `only` restricts to one subject (1:1)."""
        q = np.asarray(queries, np.float32).reshape(-1, self.dim)
        if only is not None:
            if only not in self.subject_ids:
                return [Match(None, "", -1.0, None, -1.0) for _ in q]
            j = self.subject_ids.index(only)
            rows = self.embeddings[self.owners == j]
            best = (q @ rows.T).max(axis=1)
            return [Match(only, self.names[j], float(b), None, -1.0) for b in best]
        if self.prepare().prefiltered:
            return [self._match(subjects, scores) for subjects, scores in self._candidates(q)]
        per_subject = self.subject_scores(q)
        index = np.arange(per_subject.shape[1])
        return [self._match(index, row) for row in per_subject]

    def _match(self, subjects: np.ndarray, scores: np.ndarray) -> Match:
        if scores.size == 0:
            return Match(None, "", -1.0, None, -1.0)
        if scores.size == 1:
            j = int(subjects[0])
            return Match(self.subject_ids[j], self.names[j], float(scores[0]), None, -1.0)
        top2 = np.argpartition(-scores, 1)[:2]
        b, s2 = (top2 if scores[top2[0]] >= scores[top2[1]] else top2[::-1])
        jb, js = int(subjects[b]), int(subjects[s2])
        return Match(self.subject_ids[jb], self.names[jb], float(scores[b]), self.subject_ids[js], float(scores[s2]))


class GalleryQueries:
    """What every gallery backend answers, in SQL both SQLite and PostgreSQL run (`?` placeholders; the
    PostgreSQL connection adapter rewrites them). A backend provides `_db` (execute, executemany,
    in_transaction), `_transaction(write)` and `name` (for messages)."""

    _db: Any

    def file_problem(self) -> str:
        """What is wrong with the store under this connection ('' when nothing is seen): a file backend
        checks that its file is still the one it opened and still reads as a database."""
        return ""
    name: str

    def _transaction(self, write: bool = True) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        self._db.close()

    def reopen(self) -> GalleryQueries:
        """Another connection to the same gallery (for a thread of its own)."""
        raise NotImplementedError

    def __enter__(self) -> GalleryQueries:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def writing(self) -> Any:
        """One write transaction (the write lock) around several calls, e.g. an enrollment's duplicate
        check (`matrix`) and its insert (`enroll`): no other process can enroll in between, so two
        enrollments of one face at once cannot both pass the check."""
        return self._transaction(write=True)

    def revision(self) -> int:
        """Bumped by every change; cheap to poll."""
        return int(self._meta("revision") or 0)

    def enrolled(self, subject_id: str, now: float | None = None) -> bool:
        """Whether `subject_id` is enrolled and unexpired right now (one indexed read): the verifier asks
        before every accept, so a removal or expiry counts even while its search matrix is stale."""
        now = time.time() if now is None else now
        row = self._db.execute("SELECT expires FROM subjects WHERE id = ?", (subject_id,)).fetchone()
        return row is not None and (row[0] is None or row[0] > now)

    # -- writes ------------------------------------------------------------------
    def enroll(self, subject_id: str, name: str, embeddings: np.ndarray, model_id: str, *,
               expires: float | None = None, metadata: dict[str, Any] | None = None,
               qualities: list[dict[str, float]] | None = None,
               photo_hashes: list[str | None] | None = None) -> int:
        """Add a subject (or more templates to one) in one transaction; returns its template count.

        A template whose photo (`photo_hashes`) the subject already has for this model is not added again.
        """
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or len(emb) == 0:
            raise ValueError("embeddings must be a non-empty (N, D) array")
        now = time.time()
        qualities = qualities or [{} for _ in range(len(emb))]
        hashes = photo_hashes or [None] * len(emb)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO subjects (id, name, created, expires, metadata) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET name = CASE WHEN excluded.name != '' THEN excluded.name "
                "ELSE subjects.name END, expires = COALESCE(excluded.expires, subjects.expires)",
                (subject_id, name or "", now, expires, json.dumps(metadata or {})),
            )
            db.executemany(
                "INSERT INTO templates (subject_id, model_id, dim, embedding, quality, created, photo_sha256)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (subject_id, model_id, photo_sha256) DO NOTHING",
                [(subject_id, model_id, emb.shape[1], e.tobytes(), json.dumps(q), now, h)
                 for e, q, h in zip(emb, qualities, hashes)],
            )
            db.execute(BUMP)
            (count,) = db.execute("SELECT COUNT(*) FROM templates WHERE subject_id = ? AND model_id = ?",
                                  (subject_id, model_id)).fetchone()
        log.info("enrolled %s (%d new templates, %d for this model)", subject_id, len(emb), count)
        return int(count)

    def remove(self, subject_id: str) -> bool:
        """Delete a subject and its templates; False if there was none."""
        with self._transaction() as db:
            cur = db.execute("DELETE FROM subjects WHERE id = ?", (subject_id,))
            if cur.rowcount:
                db.execute(BUMP)
        if cur.rowcount:
            log.info("removed %s", subject_id)
        return bool(cur.rowcount)

    # -- reads -------------------------------------------------------------------
    def subjects(self) -> list[Subject]:
        counts: dict[str, dict[str, int]] = {}
        for sid, model_id, n in self._db.execute(
                "SELECT subject_id, model_id, COUNT(*) FROM templates GROUP BY subject_id, model_id"):
            counts.setdefault(sid, {})[model_id] = n
        return [Subject(sid, name, created, expires, json.loads(meta or "{}"), counts.get(sid, {}))
                for sid, name, created, expires, meta in
                self._db.execute("SELECT id, name, created, expires, metadata FROM subjects ORDER BY id")]

    def has_templates(self, subject_id: str, model_id: str) -> bool:
        """Whether the subject is enrolled with at least one template of this model."""
        return self._db.execute("SELECT 1 FROM templates WHERE subject_id = ? AND model_id = ? LIMIT 1",
                                (subject_id, model_id)).fetchone() is not None

    def has_photo(self, subject_id: str, model_id: str, photo_sha256: str) -> bool:
        """Whether the subject already has a template of this model from this very photo."""
        return self._db.execute("SELECT 1 FROM templates WHERE subject_id = ? AND model_id = ? AND photo_sha256 = ?",
                                (subject_id, model_id, photo_sha256)).fetchone() is not None

    def matrix(self, model_id: str, dim: int, *, now: float | None = None) -> GalleryMatrix:
        """The templates of `model_id` of unexpired subjects, as a search matrix."""
        return self.refresh(model_id, dim, now=now)

    def changed_since(self, revision: int) -> set[str] | None:
        """The subjects changed after `revision` (enrolled, given templates, removed, purged); None where the
        change log does not reach back that far (the caller reloads everything)."""
        baseline = int(self._meta("baseline") or 0)
        if revision < baseline:
            return None
        return {str(r[0]) for r in self._db.execute(
            "SELECT DISTINCT subject_id FROM subject_changes WHERE revision > ?", (revision,))}

    def refresh(self, model_id: str, dim: int, previous: GalleryMatrix | None = None, *,
                scope: frozenset[str] | None = None, now: float | None = None) -> GalleryMatrix:
        """The search matrix of `model_id`'s templates of unexpired subjects (only those in `scope` where one is
        given), from one snapshot. Given the `previous` matrix, only what changed since it is read: the subjects
        the change log names, those that expired since, and those the new scope adds; the rest is kept. That is
        what lets a verifier host follow a shared 100k-subject gallery without reading it all at each change."""
        now = time.time() if now is None else now
        with self._transaction(write=False) as db:  # one snapshot: revision and rows agree, writers not blocked
            revision = int(db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])
            (next_expiry,) = db.execute("SELECT MIN(expires) FROM subjects WHERE expires > ?", (now,)).fetchone()
            changed = None
            if previous is not None and previous.model_id == model_id and previous.dim == dim and \
                    not (previous.scope is not None and scope is None):
                changed = self.changed_since(previous.revision)
            if changed is None or previous is None:
                rows = self._template_rows(db, model_id, now, scope)
                (foreign,) = db.execute("SELECT COUNT(*) FROM templates WHERE model_id != ?", (model_id,)).fetchone()
                if foreign:
                    log.warning("gallery %s: %d templates were made by another model and are not used; re-enroll "
                                "those subjects with this model (%s)", self.name, foreign, model_id.split(":")[0])
                sids, names, emb = self._arrays(rows, dim)
                return GalleryMatrix.from_rows(model_id, dim, sids, names, emb, revision, next_expiry, scope=scope,
                                               as_of=now)
            changed |= {str(r[0]) for r in db.execute(
                "SELECT id FROM subjects WHERE expires > ? AND expires <= ?", (previous.as_of, now))}
            held = set(previous.subject_ids)
            if scope is not None:
                changed |= scope - (previous.scope if previous.scope is not None else held)
                drop = changed | (held - scope)
                wanted = changed & scope
            else:
                drop = wanted = changed
            rows = self._template_rows(db, model_id, now, frozenset(wanted)) if wanted else []
        sids, names, emb = self._arrays(rows, dim)
        return previous.patched(drop, sids, names, emb, revision, next_expiry, scope=scope, as_of=now)

    def _template_rows(self, db: Any, model_id: str, now: float, subjects: frozenset[str] | None) -> list[Any]:
        """(subject id, name, dim, embedding) of unexpired subjects' templates of `model_id`, by subject id and
        template id; only `subjects` where given (read in chunks: one statement has a bounded parameter count)."""
        query = ("SELECT t.subject_id, s.name, t.dim, t.embedding FROM templates t JOIN subjects s ON s.id = "
                 "t.subject_id WHERE t.model_id = ? AND (s.expires IS NULL OR s.expires > ?)")
        if subjects is None:
            return db.execute(query + " ORDER BY t.subject_id, t.id", (model_id, now)).fetchall()
        ids = sorted(subjects)
        rows: list[Any] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows += db.execute(query + f" AND t.subject_id IN ({', '.join('?' * len(chunk))}) "
                               "ORDER BY t.subject_id, t.id", (model_id, now, *chunk)).fetchall()
        return rows

    def _arrays(self, rows: list[Any], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bad = next((sid for sid, _n, d, blob in rows if d != dim or len(blob) != 4 * dim), None)
        if bad is not None:
            raise RuntimeFailure(f"gallery {self.name}: a template of {bad} does not have the model's {dim} dims")
        emb = np.frombuffer(b"".join(bytes(r[3]) for r in rows), np.float32).reshape(len(rows), dim)
        sids = np.array([str(r[0]) for r in rows], dtype=object)
        names = np.array([str(r[1]) for r in rows], dtype=object)
        # By subject id in code point order (a server's collation may order otherwise), each subject's
        # templates in the order they were read (by template id).
        order = np.argsort(sids, kind="stable") if len(sids) else np.zeros(0, np.int64)
        return sids[order], names[order], emb[order]


SQLITE_MAGIC = b"SQLite format 3\x00"  # a database file's first 16 bytes


class Gallery(GalleryQueries):
    """The SQLite gallery (the embedded default). One connection per process; writes are one transaction
    each."""

    def __init__(self, path: Path, *, create: bool = True, timeout: float = 10.0) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise UsageError(f"gallery {self.path} does not exist: create it with `kiosk-enroll -c CONFIG init` "
                             "(or enroll someone); it is never created empty behind your back")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if not self._current():  # a current gallery is opened without taking the write lock
                self._migrate()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):  # another process holds it: not a config error
                raise RuntimeFailure(f"gallery {self.path}: still locked by another process after "
                                     f"{timeout:g}s ({exc}); try again") from None
            raise UsageError(f"gallery {self.path}: not a usable SQLite database: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"gallery {self.path}: not a usable SQLite database: {exc}") from None
        except OSError as exc:
            raise UsageError(f"gallery {self.path}: cannot open: {exc}") from None
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._fd: int | None = None  # SQLite's descriptor of the file, once looked up

    def file_problem(self) -> str:
        """'' while the file at the path is the one this connection opened and opens as a SQLite database;
        else what happened to it. A deleted or replaced file is otherwise invisible: the open connection
        goes on reading (and writing) the old inode. The file is never opened here with open(): closing any
        descriptor of it would drop the POSIX locks this process's connection holds (SQLite's documented
        pitfall; two verifiers sharing the file could then both write). A second SQLite connection is safe:
        SQLite shares one inode's locks among the connections of a process."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"gallery file {self.path} is gone (deleted or moved away)"
        except OSError as exc:
            return f"gallery file {self.path} cannot be read: {exc.strerror or exc}"
        if (st.st_dev, st.st_ino) != self._identity:
            return f"gallery file {self.path} was replaced (it is not the file this verifier opened)"
        fd = self._own_fd()
        if fd is not None:  # the header on disk, read through SQLite's own descriptor (pread closes nothing)
            try:
                head = os.pread(fd, 100, 0)
            except OSError as exc:
                return f"gallery file {self.path} cannot be read: {exc.strerror or exc}"
            if head[:16] != SQLITE_MAGIC:
                return f"gallery file {self.path} is corrupt (it does not start as a SQLite database)"
        try:
            probe = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=1.0)
            try:
                probe.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            finally:
                probe.close()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):  # a writer at work: nothing wrong with the file
                return ""
            return f"gallery file {self.path} is corrupt: {exc}"
        except sqlite3.DatabaseError as exc:
            return f"gallery file {self.path} is corrupt: {exc}"
        return ""

    def _own_fd(self) -> int | None:
        """The descriptor SQLite holds on this gallery's file (Linux: found in /proc/self/fd by its inode;
        None elsewhere). Only read with pread, never closed."""
        if self._fd is not None:
            try:
                st = os.fstat(self._fd)
                if (st.st_dev, st.st_ino) == self._identity:
                    return self._fd
            except OSError:
                pass
            self._fd = None
        try:
            names = os.listdir("/proc/self/fd")
        except OSError:
            return None
        for name in names:
            try:
                st = os.fstat(int(name))
            except (OSError, ValueError):
                continue
            if (st.st_dev, st.st_ino) == self._identity and stat.S_ISREG(st.st_mode):
                self._fd = int(name)
                return self._fd
        return None

    def integrity_problem(self) -> str:
        """SQLite's quick check of every page ('' when it passes): corruption inside the file, which the
        header check cannot see. Costs a read of the whole file: run it in a background thread."""
        try:
            rows = self._db.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            return f"gallery file {self.path} is corrupt: {exc}"
        if rows != [("ok",)]:
            return f"gallery file {self.path} is corrupt: {'; '.join(str(r[0]) for r in rows[:3])}"
        return ""

    def _current(self) -> bool:
        try:
            return self._meta("schema_version") == str(SCHEMA_VERSION)
        except sqlite3.OperationalError:  # no meta table yet: a new file
            return False

    def _migrate(self) -> None:
        """Create a new gallery, or bring an older file to SCHEMA_VERSION, in one transaction."""
        with self._transaction() as db:  # the write lock: two processes opening an old file migrate it once
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('revision', '0')")
            db.execute(BASELINE)
            self._upgrade(db)
            db.execute(INDEXES)  # after the upgrade: its column is new in version 2
            for trigger in TRIGGERS:
                db.execute(trigger)

    def _upgrade(self, db: sqlite3.Connection) -> None:
        """Stamp a new file, or run the migrations from its version to SCHEMA_VERSION (inside `_migrate`)."""
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            fresh = db.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 0 and \
                "photo_sha256" in {r[1] for r in db.execute("PRAGMA table_info(templates)")}
            if not fresh:
                raise UsageError(f"gallery {self.path}: has templates but no schema version")
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise UsageError(f"gallery {self.path}: schema version {version} is newer than this program "
                             f"reads ({SCHEMA_VERSION}); upgrade gate-kiosk")
        start = version
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            version += 1
        if version != start:
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
            log.info("gallery %s: schema upgraded from version %d to %d", self.path, start, version)

    @property
    def name(self) -> str:  # type: ignore[override]
        """For messages: the file."""
        return str(self.path)

    def reopen(self) -> Gallery:
        """Another connection to the same file (for a thread of its own)."""
        return Gallery(self.path, create=False)

    # -- backup and restore ----------------------------------------------------------
    def backup(self, dest: Path) -> int:
        """A consistent copy of the whole gallery in `dest` (SQLite's online backup: writers may go on);
        returns the revision it holds."""
        if dest.exists():
            raise UsageError(f"{dest} exists; backup writes a new file only")
        try:
            target = sqlite3.connect(str(dest))
            try:
                self._db.backup(target)
            finally:
                target.close()
            dest.chmod(0o600)
        except (sqlite3.Error, OSError) as exc:
            dest.unlink(missing_ok=True)
            raise RuntimeFailure(f"backup of {self.path} to {dest} failed: {exc}") from None
        with Gallery(dest, create=False) as copy:
            return copy.revision()

    def restore(self, source: Path) -> int:
        """Replace the gallery's content with the backup `source`, in place, and move the revision past both,
        so running verifiers reload it within a second. Returns the new revision."""
        with Gallery(source, create=False) as backup:  # checked (and upgraded) like any gallery file
            before = self.revision()
            try:
                backup._db.backup(self._db)  # the whole database, under the write lock
            except sqlite3.Error as exc:
                raise RuntimeFailure(f"restore of {self.path} from {source} failed: {exc}") from None
        with self._transaction() as db:
            revision = max(before, self.revision()) + 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (str(revision),))
            rebase(db)  # the backup's change log does not lead from any running verifier's revision
        log.info("gallery %s restored from %s (revision %d)", self.path, source, revision)
        return revision

    @classmethod
    def restore_file(cls, path: Path, source: Path) -> tuple[int, Path | None]:
        """`restore` into the gallery at `path`; a gallery there that is not a usable database (corrupt) is
        first moved aside, with its WAL, to `NAME.corrupt-TIMESTAMP` (kept for inspection, never deleted).
        Returns the new revision and where the corrupt file went (None if it was usable)."""
        path = Path(path)
        moved: Path | None = None
        try:
            gallery = cls(path)
        except UsageError:
            if not path.exists():
                raise
            with cls(source, create=False):  # a bad backup is refused before anything is moved
                pass
            moved = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                part = Path(str(path) + suffix)
                if part.exists():
                    part.rename(Path(str(moved) + suffix))
            log.warning("gallery %s is not usable; moved it aside to %s before restoring", path, moved)
            gallery = cls(path)
        with gallery:
            return gallery.restore(source), moved

    def __enter__(self) -> Gallery:
        return self

    def _transaction(self, write: bool = True) -> _Transaction:
        return _Transaction(self._db, ("BEGIN IMMEDIATE",) if write else ("BEGIN DEFERRED",))


class _Transaction:
    """BEGIN ... COMMIT, rolled back on any exception; inside a transaction already open on the connection, it
    joins that one. SQLite: BEGIN IMMEDIATE (write: takes the write lock now) or BEGIN DEFERRED (read: a
    snapshot that never blocks a writer, in WAL mode). PostgreSQL: see kiosk.store.postgres."""

    def __init__(self, db: Any, begin: tuple[str, ...]) -> None:
        self.db = db
        self.begin = begin
        self.outer = False

    def __enter__(self) -> Any:
        self.outer = not self.db.in_transaction
        if self.outer:
            for statement in self.begin:
                self.db.execute(statement)
        return self.db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self.outer:
            return
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:  # (a connection that died took its transaction with it)
            self.db.execute("ROLLBACK")


# Every table and the columns a copy carries over (row ids are the target's own).
COPIED = (
    ("subjects", "id, name, created, expires, metadata"),
    ("templates", "subject_id, model_id, dim, embedding, quality, created, photo_sha256"),
    ("flights", "id, departs, created, purged_at"),
    ("manifest", "flight_id, subject_id, added"),
    ("gates", "gate_id, flight_id, opened"),
    ("boardings", "flight_id, subject_id, gate_id, camera_id, boarded_at, score, event_id"),
    ("flight_decisions", "event_id, flight_id, gate_id, type, reason, subject_id, candidate_id, score, at"),
    ("boarding_log", "at, action, flight_id, subject_id, gate_id, detail"),
)


def copy_gallery(source: GalleryQueries, target: GalleryQueries) -> dict[str, int]:
    """Copy every row of `source` into the empty gallery `target` (e.g. a SQLite file into PostgreSQL), from
    one snapshot of the source, in one transaction of the target: all of it or nothing. Returns the rows
    copied per table."""
    counts: dict[str, int] = {}
    with target._transaction() as dst, source._transaction(write=False) as src:
        (held,) = dst.execute("SELECT (SELECT COUNT(*) FROM subjects) + (SELECT COUNT(*) FROM flights)").fetchone()
        if held:
            raise UsageError(f"{target.name} is not empty ({held} subjects and flights); copy into an empty gallery")
        for table, columns in COPIED:
            order = "id" if table in ("templates", "boarding_log") else "1"
            rows = src.execute(f"SELECT {columns} FROM {table} ORDER BY {order}").fetchall()
            marks = ", ".join("?" * (columns.count(",") + 1))
            if rows:
                dst.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", [tuple(r) for r in rows])
            counts[table] = len(rows)
        dst.execute(BUMP)
        rebase(dst)
    log.info("copied gallery %s into %s: %s", source.name, target.name, counts)
    return counts


def open_gallery(cfg: KioskConfig, *, create: bool = False) -> GalleryQueries:
    """The configured gallery: `gallery.url` (PostgreSQL) if set, else the SQLite file `gallery.path`.
    `create`: make it (or its schema) if missing; otherwise a missing gallery is a usage error."""
    if cfg.gallery.url:
        from kiosk.store.postgres import PgGallery, target

        password = cfg.resolve(cfg.gallery.password_file) if cfg.gallery.password_file else None
        return PgGallery(target(cfg.gallery.url, password), create=create)
    return Gallery(cfg.resolve(cfg.gallery.path), create=create)
