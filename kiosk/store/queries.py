"""The gallery in SQL both backends run (`GalleryQueries`), its transactions, and the copy of one gallery into
another.

Only templates are stored, never photos, and only sealed (kiosk.store.sealing). Every template carries the
id of the recognizer that made it; `matrix(model_id)` loads only those of that model, so a template from
another model is never compared (it is counted and logged instead). A `revision` counter, bumped in the same
transaction as every change, lets a running verifier notice changes cheaply and reload.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiosk.boarding.matrix import GalleryMatrix
from kiosk.errors import ConfigError, RuntimeFailure, UsageError
from kiosk.store.schema import BUMP, TABLE, rebase
from kiosk.store.sealing import CHECK_PREFIX, CURRENT_KEY, NEXT_PREFIX, TemplateCodec, TemplateKey, TemplateUnreadable

log = logging.getLogger(__name__)


class Cursor(Protocol):
    """What the gallery code reads from a statement's result (sqlite3's and psycopg's cursors both fit). Rows
    are tuples of the columns asked for, whose types the statement knows, not this class."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """A gallery connection as the gallery code uses it: a `sqlite3.Connection`, or `PgDb` for PostgreSQL."""

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Cursor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Subject:
    """One enrolled person, with template counts per model id."""

    id: str
    name: str
    created: float
    expires: float | None
    metadata: dict[str, Any]
    templates: dict[str, int] = field(default_factory=dict)


class GalleryQueries:
    """What every gallery backend answers, in SQL both SQLite and PostgreSQL run (`?` placeholders; the
    PostgreSQL connection adapter rewrites them). A backend provides `_db` (execute, executemany,
    in_transaction), `transaction(write)` and `name` (for messages). The boarding store
    (kiosk.store.flights) runs its own SQL on the same connection through `execute` and `transaction`, so a
    subject's templates and their flights change together."""

    _db: Db
    # Told, before each read of templates, whose are read: a set of subject ids, or None for every subject's.
    # What a refresh costs is what it reads (a verifier following a 100k-subject gallery must not read it all
    # at each change): this is where a test or a profiler sees it.
    on_template_read: Callable[[frozenset[str] | None], None] | None = None

    def file_problem(self) -> str:
        """What is wrong with the store under this connection ('' when nothing is seen): a file backend
        checks that its file is still the one it opened and still reads as a database."""
        return ""

    @property
    def name(self) -> str:
        """For messages: where the gallery is."""
        raise NotImplementedError

    def transaction(self, write: bool = True) -> Transaction:
        """A context manager: BEGIN ... COMMIT (rolled back on an exception) giving the connection; `write`
        takes the write lock at once (writers take turns), else a snapshot that never blocks a writer. Inside
        one already open on this connection it joins that one."""
        raise NotImplementedError

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """One statement (`?` placeholders) outside any explicit transaction: a cursor to fetch from."""
        return self._db.execute(sql, params)

    def _after_copy(self, db: Db) -> None:
        """A backend's own housekeeping after `copy_gallery` wrote rows with their ids (PostgreSQL: move the
        id sequences past them)."""

    def close(self) -> None:
        self._db.close()

    def backup(self, dest: Path) -> int:
        """A consistent copy of the gallery at `dest`; returns the revision copied."""
        raise NotImplementedError

    def restore(self, source: Path) -> int:
        """The gallery replaced by the copy at `source`; returns its revision."""
        raise NotImplementedError

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

    def writing(self) -> Transaction:
        """One write transaction (the write lock) around several calls, e.g. an enrollment's duplicate
        check (`matrix`) and its insert (`enroll`): no other process can enroll in between, so two
        enrollments of one face at once cannot both pass the check."""
        return self.transaction(write=True)

    def revision(self) -> int:
        """Bumped by every change; cheap to poll."""
        return int(self._meta("revision") or 0)

    def enrolled(self, subject_id: str, now: float | None = None) -> bool:
        """Whether `subject_id` is enrolled and unexpired right now (one indexed read): the verifier asks
        before every accept, so a removal or expiry counts even while its search matrix is stale."""
        now = time.time() if now is None else now
        row = self._db.execute("SELECT expires FROM subjects WHERE id = ?", (subject_id,)).fetchone()
        return row is not None and (row[0] is None or row[0] > now)

    # -- keys ------------------------------------------------------------------
    codec: TemplateCodec | None = None
    rotation_dropped = 0  # templates the last `rotate_key` deleted because they did not open

    def use_codec(self, codec: TemplateCodec) -> None:
        """Seal and open this gallery's templates with `codec`, after checking that it holds every key the
        gallery's templates are sealed under (and is that key: each key's check value opens). A ConfigError
        naming where the key came from, else: a process with the wrong key stops at start instead of serving
        an empty gallery. (A row without a key id was written around the project, e.g. by hand-run SQL: it is
        left out as unreadable when loaded, like any template that does not open.)"""
        with self.transaction(write=False) as db:
            self._follow_keys(db, codec)
            for key_id, count in self.key_ids(db).items():
                if not key_id:
                    continue
                problem = codec.check(key_id, self._meta(CHECK_PREFIX + key_id))
                if problem:
                    hint = ""
                    if self._meta(CURRENT_KEY) == key_id:
                        hint = f" (the gallery's key was rotated to {key_id}: give this host that key file)"
                    raise ConfigError(f"gallery {self.name}: {count} template(s) {problem}: the wrong key?{hint}")
        self.codec = codec

    def _follow_keys(self, db: Db, codec: TemplateCodec) -> str | None:
        """Follow a key rotation (`rotate_key`) from inside a snapshot: take its new key into `codec`'s ring
        where this process holds the old key that wraps it, and seal with the gallery's current key once
        held. Returns the gallery's current key id where this process does not hold it (None: it does, or
        no rotation ever ran)."""
        for name, value in db.execute("SELECT key, value FROM meta WHERE key LIKE ?", (NEXT_PREFIX + "%",)):
            key_id = str(name)[len(NEXT_PREFIX) :]
            if codec.keys.get(bytes.fromhex(key_id)) is None:
                key = codec.unwrap(key_id, str(value))
                if key is not None:
                    codec.keys.add(key)
                    log.info(
                        "gallery %s: its template key is being rotated; holding the new key %s too", self.name, key_id
                    )
        row = db.execute("SELECT value FROM meta WHERE key = ?", (CURRENT_KEY,)).fetchone()
        if row is None or row[0] == codec.current_id():
            return None
        if codec.keys.get(bytes.fromhex(row[0])) is None:
            return str(row[0])
        codec.keys.use(bytes.fromhex(row[0]))
        return None

    def _sealing(self, db: Db) -> TemplateCodec:
        """The codec, for a write transaction that seals templates (with the gallery's current key, followed
        through a rotation); records its key's check value once."""
        if self.codec is None:
            raise UsageError(f"gallery {self.name}: opened without a template key; templates cannot be written")
        behind = self._follow_keys(db, self.codec)
        if behind is not None:
            raise UsageError(
                f"gallery {self.name}: its template key was rotated to {behind}, which "
                f"{self.codec.where} does not hold; nothing was written (give this host the new key)"
            )
        db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", self.codec.check_value())
        return self.codec

    def rotate_key(self, new: TemplateKey, *, batch: int = 500, settle_s: float = 5.0) -> int:
        """Re-seal every template under `new`, in batches of `batch` (one write transaction each, so
        enrollments and boarding marks go on between them), while verifiers keep deciding: first the new key
        is put in the gallery wrapped under the current one, so every process holding that key takes the
        new one too (`_follow_keys`, in the snapshot it reads templates from) and `settle_s` pass (a verifier
        notices a change within its one-second poll) before any template is sealed under it; each batch is
        logged in the change log like any change, so verifiers reload just those subjects. At the end the wrap
        and the old key's check value go: the old key opens nothing here any more, and the new key must be
        given to every host (its file) before a process restarts. Returns the
        templates re-sealed; a template that does not open (tampered, damaged) is deleted instead and counted
        in `rotation_dropped`. Run again after an interruption, it carries on."""
        codec = self.codec
        self.rotation_dropped = 0
        if codec is None:
            raise UsageError(f"gallery {self.name}: opened without a template key")
        with self.transaction() as db:
            if self._follow_keys(db, codec) is not None:
                raise UsageError(f"gallery {self.name}: its key was rotated to a key {codec.where} does not hold")
            old = codec.keys.current()
            if old.key_id != new.key_id:
                codec.keys.add(new)
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                    "excluded.value",
                    (NEXT_PREFIX + new.key_id.hex(), codec.wrap(new)),
                )
                codec.keys.use(new.key_id)
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", codec.check_value()
                )
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                    "excluded.value",
                    (CURRENT_KEY, new.key_id.hex()),
                )
                db.execute(BUMP)
        log.info(
            "gallery %s: rotating the template key to %s; %.0f s for running processes to take it",
            self.name,
            new.key_id.hex(),
            settle_s,
        )
        time.sleep(max(0.0, settle_s))
        done = 0
        while True:
            with self.transaction() as db:
                rows = db.execute(
                    "SELECT id, subject_id, model_id, embedding FROM templates WHERE key_id IS NULL "
                    "OR key_id != ? ORDER BY id LIMIT ?",
                    (new.key_id.hex(), batch),
                ).fetchall()
                for template_id, subject_id, model_id, blob in rows:
                    try:
                        clear = codec.open(subject_id, model_id, template_id, blob)
                    except TemplateUnreadable as exc:  # tampered or damaged: it matches nobody, and kept it would
                        # keep the old key of use to whoever holds a copy of it
                        log.error("gallery %s: %s; deleted (re-enroll %s)", self.name, exc, subject_id)
                        db.execute("DELETE FROM templates WHERE id = ?", (template_id,))
                        self.rotation_dropped += 1
                        continue
                    db.execute(
                        "UPDATE templates SET embedding = ?, key_id = ? WHERE id = ?",
                        (codec.seal(subject_id, model_id, template_id, clear), new.key_id.hex(), template_id),
                    )
                    done += 1
                if not rows:  # none left under the write lock: the rotation is complete
                    db.execute(
                        "DELETE FROM meta WHERE key LIKE ? OR (key LIKE ? AND key != ?)",
                        (NEXT_PREFIX + "%", CHECK_PREFIX + "%", CHECK_PREFIX + new.key_id.hex()),
                    )
                    db.execute(BUMP)
                    break
                db.execute(BUMP)
        log.info(
            "gallery %s: %d templates re-sealed under key %s; the old key opens none of them",
            self.name,
            done,
            new.key_id.hex(),
        )
        return done

    def template_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM templates").fetchone()[0])

    def key_ids(self, db: Db | None = None) -> dict[str, int]:
        """Templates per key id (hex) that sealed them ('' for none); `db`: inside that transaction."""
        return {
            str(k): int(n)
            for k, n in (db or self._db)
            .execute("SELECT COALESCE(key_id, ''), COUNT(*) FROM templates GROUP BY key_id ORDER BY 1")
            .fetchall()
        }

    # -- writes ------------------------------------------------------------------
    def enroll(
        self,
        subject_id: str,
        name: str,
        embeddings: np.ndarray,
        model_id: str,
        *,
        expires: float | None = None,
        metadata: dict[str, Any] | None = None,
        qualities: list[dict[str, float]] | None = None,
        photo_hashes: list[str | None] | None = None,
    ) -> int:
        """Add a subject (or more templates to one) in one transaction; returns its template count.

        A template whose photo (`photo_hashes`) the subject already has for this model is not added again.
        """
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or len(emb) == 0:
            raise ValueError("embeddings must be a non-empty (N, D) array")
        now = time.time()
        qualities = qualities or [{} for _ in range(len(emb))]
        hashes = photo_hashes or [None] * len(emb)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO subjects (id, name, created, expires, metadata) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET name = CASE WHEN excluded.name != '' THEN excluded.name "
                "ELSE subjects.name END, expires = COALESCE(excluded.expires, subjects.expires)",
                (subject_id, name or "", now, expires, json.dumps(metadata or {})),
            )
            codec = self._sealing(db)
            for e, q, h in zip(emb, qualities, hashes, strict=True):
                # The row first (its id is part of what the seal covers), then its sealed template, in the same
                # transaction: no reader ever sees the empty placeholder.
                row = db.execute(
                    "INSERT INTO templates (subject_id, model_id, dim, embedding, quality, created, photo_sha256, "
                    "key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (subject_id, model_id, photo_sha256) "
                    "DO NOTHING RETURNING id",
                    (subject_id, model_id, emb.shape[1], b"", json.dumps(q), now, h, codec.current_id()),
                ).fetchone()
                if row is not None:
                    db.execute(
                        "UPDATE templates SET embedding = ? WHERE id = ?",
                        (codec.seal(subject_id, model_id, row[0], e), row[0]),
                    )
            db.execute(BUMP)
            (count,) = db.execute(
                "SELECT COUNT(*) FROM templates WHERE subject_id = ? AND model_id = ?", (subject_id, model_id)
            ).fetchone()
        log.info("enrolled %s (%d new templates, %d for this model)", subject_id, len(emb), count)
        return int(count)

    def remove(self, subject_id: str) -> bool:
        """Delete a subject and its templates; False if there was none."""
        with self.transaction() as db:
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
            "SELECT subject_id, model_id, COUNT(*) FROM templates GROUP BY subject_id, model_id"
        ):
            counts.setdefault(sid, {})[model_id] = n
        return [
            Subject(sid, name, created, expires, json.loads(meta or "{}"), counts.get(sid, {}))
            for sid, name, created, expires, meta in self._db.execute(
                "SELECT id, name, created, expires, metadata FROM subjects ORDER BY id"
            )
        ]

    def has_templates(self, subject_id: str, model_id: str) -> bool:
        """Whether the subject is enrolled with at least one template of this model."""
        return (
            self._db.execute(
                "SELECT 1 FROM templates WHERE subject_id = ? AND model_id = ? LIMIT 1", (subject_id, model_id)
            ).fetchone()
            is not None
        )

    def has_photo(self, subject_id: str, model_id: str, photo_sha256: str) -> bool:
        """Whether the subject already has a template of this model from this very photo."""
        return (
            self._db.execute(
                "SELECT 1 FROM templates WHERE subject_id = ? AND model_id = ? AND photo_sha256 = ?",
                (subject_id, model_id, photo_sha256),
            ).fetchone()
            is not None
        )

    def matrix(self, model_id: str, dim: int, *, now: float | None = None) -> GalleryMatrix:
        """The templates of `model_id` of unexpired subjects, as a search matrix."""
        return self.refresh(model_id, dim, now=now)

    def changed_since(self, revision: int) -> set[str] | None:
        """The subjects changed after `revision` (enrolled, given templates, removed, purged); None where the
        change log does not reach back that far (the caller reloads everything)."""
        baseline = int(self._meta("baseline") or 0)
        if revision < baseline:
            return None
        return {
            str(r[0])
            for r in self._db.execute("SELECT DISTINCT subject_id FROM subject_changes WHERE revision > ?", (revision,))
        }

    def refresh(
        self,
        model_id: str,
        dim: int,
        previous: GalleryMatrix | None = None,
        *,
        scope: frozenset[str] | None = None,
        now: float | None = None,
    ) -> GalleryMatrix:
        """The search matrix of `model_id`'s templates of unexpired subjects (only those in `scope` where one is
        given), from one snapshot. Given the `previous` matrix, only what changed since it is read: the subjects
        the change log names, those that expired since, and those the new scope adds; the rest is kept. That is
        what lets a verifier host follow a shared 100k-subject gallery without reading it all at each change."""
        now = time.time() if now is None else now
        with self.transaction(write=False) as db:  # one snapshot: revision and rows agree, writers not blocked
            if self.codec is not None:  # a key rotation's new key, before any row sealed under it is read
                self._follow_keys(db, self.codec)
            revision = int(db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])
            (next_expiry,) = db.execute("SELECT MIN(expires) FROM subjects WHERE expires > ?", (now,)).fetchone()
            changed = None
            if (
                previous is not None
                and previous.model_id == model_id
                and previous.dim == dim
                and not (previous.scope is not None and scope is None)
            ):
                changed = self.changed_since(previous.revision)
            if changed is None or previous is None:
                rows = self._template_rows(db, model_id, now, scope)
                (foreign,) = db.execute("SELECT COUNT(*) FROM templates WHERE model_id != ?", (model_id,)).fetchone()
                if foreign:
                    log.warning(
                        "gallery %s: %d templates were made by another model and are not used; re-enroll "
                        "those subjects with this model (%s)",
                        self.name,
                        foreign,
                        model_id.split(":")[0],
                    )
                sids, names, emb, unreadable = self._arrays(rows, dim, model_id)
                return GalleryMatrix.from_rows(
                    model_id,
                    dim,
                    sids,
                    names,
                    emb,
                    revision,
                    next_expiry,
                    scope=scope,
                    as_of=now,
                    unreadable=unreadable,
                )
            changed |= {
                str(r[0])
                for r in db.execute("SELECT id FROM subjects WHERE expires > ? AND expires <= ?", (previous.as_of, now))
            }
            held = set(previous.subject_ids)
            if scope is not None:
                changed |= scope - (previous.scope if previous.scope is not None else held)
                drop = changed | (held - scope)
                wanted = changed & scope
            else:
                drop = wanted = changed
            rows = self._template_rows(db, model_id, now, frozenset(wanted)) if wanted else []
        sids, names, emb, unreadable = self._arrays(rows, dim, model_id)
        return previous.patched(
            drop, sids, names, emb, revision, next_expiry, scope=scope, as_of=now, unreadable=unreadable
        )

    def _template_rows(self, db: Db, model_id: str, now: float, subjects: frozenset[str] | None) -> list[Any]:
        """(subject id, name, dim, sealed template, template id) of unexpired subjects' templates of `model_id`,
        by subject id and template id; only `subjects` where given (read in chunks: one statement has a bounded
        parameter count)."""
        if self.on_template_read is not None:
            self.on_template_read(subjects)
        query = (
            "SELECT t.subject_id, s.name, t.dim, t.embedding, t.id FROM templates t JOIN subjects s ON s.id = "
            "t.subject_id WHERE t.model_id = ? AND (s.expires IS NULL OR s.expires > ?)"
        )
        if subjects is None:
            return db.execute(query + " ORDER BY t.subject_id, t.id", (model_id, now)).fetchall()
        ids = sorted(subjects)
        rows: list[Any] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows += db.execute(
                query + f" AND t.subject_id IN ({', '.join('?' * len(chunk))}) ORDER BY t.subject_id, t.id",
                (model_id, now, *chunk),
            ).fetchall()
        return rows

    def _arrays(
        self, rows: list[Any], dim: int, model_id: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
        """The rows' templates opened, as (subject ids, names, embeddings) sorted by subject id, and the
        templates that did not open per subject (another row's blob, another key, damage): those are left
        out and logged, never compared."""
        bad = next((sid for sid, _n, d, *_ in rows if d != dim), None)
        if bad is not None:
            raise RuntimeFailure(f"gallery {self.name}: a template of {bad} does not have the model's {dim} dims")
        if self.codec is None:
            raise UsageError(f"gallery {self.name}: opened without a template key; templates cannot be read")
        opened: list[np.ndarray] = []
        kept: list[Any] = []
        unreadable: dict[str, int] = {}
        for row in rows:
            try:
                template = self.codec.open(str(row[0]), model_id, row[4], row[3])
            except TemplateUnreadable as exc:
                unreadable[str(row[0])] = unreadable.get(str(row[0]), 0) + 1
                if sum(unreadable.values()) <= 3:
                    log.error("gallery %s: %s; left out", self.name, exc)
                continue
            if template.shape != (dim,):
                raise RuntimeFailure(
                    f"gallery {self.name}: a template of {row[0]} does not have the model's {dim} dims"
                )
            opened.append(template)
            kept.append(row)
        if unreadable:
            log.error(
                "gallery %s: %d template(s) of %d subject(s) do not open and are left out",
                self.name,
                sum(unreadable.values()),
                len(unreadable),
            )
        emb = np.stack(opened) if opened else np.zeros((0, dim), np.float32)
        sids = np.array([str(r[0]) for r in kept], dtype=object)
        names = np.array([str(r[1]) for r in kept], dtype=object)
        # By subject id in code point order (a server's collation may order otherwise), each subject's
        # templates in the order they were read (by template id).
        order = np.argsort(sids, kind="stable") if len(sids) else np.zeros(0, np.int64)
        return sids[order], names[order], emb[order], unreadable


class Transaction:
    """BEGIN ... COMMIT, rolled back on any exception; inside a transaction already open on the connection, it
    joins that one. SQLite: BEGIN IMMEDIATE (write: takes the write lock now) or BEGIN DEFERRED (read: a
    snapshot that never blocks a writer, in WAL mode). PostgreSQL: see kiosk.store.postgres."""

    def __init__(self, db: Db, begin: tuple[str, ...]) -> None:
        self.db = db
        self.begin = begin
        self.outer = False

    def __enter__(self) -> Db:
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


def seal_templates(db: Db, codec: TemplateCodec) -> int:
    """Seal, in place, every template of a gallery from before version 5 (clear float32 blobs): the step to
    schema version 5, inside the migration's transaction. Returns how many were sealed."""
    db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", codec.check_value())
    rows = db.execute(
        "SELECT id, subject_id, model_id, dim, embedding FROM templates WHERE key_id IS NULL ORDER BY id"
    ).fetchall()
    for template_id, subject_id, model_id, dim, blob in rows:
        clear = np.frombuffer(bytes(blob), "<f4")
        if clear.shape != (dim,):
            raise UsageError(
                f"template {template_id} of {subject_id}: {len(bytes(blob))} bytes, not a clear "
                f"{dim}-dim template; nothing was sealed"
            )
        db.execute(
            "UPDATE templates SET embedding = ?, key_id = ? WHERE id = ?",
            (codec.seal(subject_id, model_id, template_id, clear), codec.current_id(), template_id),
        )
    return len(rows)


# Every table a copy carries over, in an order foreign keys accept (meta: only the key check values; the
# target keeps its own revision and schema stamp).
COPIED = ("subjects", "templates", "flights", "manifest", "gates", "boardings", "flight_decisions", "boarding_log")


def copy_gallery(source: GalleryQueries, target: GalleryQueries) -> dict[str, int]:
    """Copy every row of `source` into the empty gallery `target` (e.g. a SQLite file into PostgreSQL), from
    one snapshot of the source, in one transaction of the target: all of it or nothing. Returns the rows
    copied per table."""
    counts: dict[str, int] = {}
    with target.transaction() as dst, source.transaction(write=False) as src:
        (held,) = dst.execute("SELECT (SELECT COUNT(*) FROM subjects) + (SELECT COUNT(*) FROM flights)").fetchone()
        if held:
            raise UsageError(f"{target.name} is not empty ({held} subjects and flights); copy into an empty gallery")
        for table in COPIED:
            columns = TABLE[table].copied_columns()
            order = "id" if table in ("templates", "boarding_log") else "1"
            # table and column names come from COPIED and the schema (code), never from input
            rows = src.execute(f"SELECT {columns} FROM {table} ORDER BY {order}").fetchall()  # noqa: S608
            marks = ", ".join("?" * (columns.count(",") + 1))
            if rows:
                dst.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", [tuple(r) for r in rows])  # noqa: S608
            counts[table] = len(rows)
        checks = src.execute("SELECT key, value FROM meta WHERE key LIKE 'key_check:%'").fetchall()
        if checks:
            dst.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [tuple(r) for r in checks],
            )
        target._after_copy(dst)
        dst.execute(BUMP)
        rebase(dst)
    log.info("copied gallery %s into %s: %s", source.name, target.name, counts)
    return counts
