"""The gallery's schema, described once: both backends' DDL, the migrations and the change log's SQL.

SQLite (kiosk.store.sqlite_file) and PostgreSQL (kiosk.store.postgres) hold the same tables under the same
version number, so `kiosk-enroll migrate` can copy one into the other table by table. The tables are a
list of `Table`s here and each backend's CREATE statements are made from it (`create_tables`); only the
change log's triggers are written twice, because SQLite's trigger bodies and PostgreSQL's trigger functions
share no syntax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # (queries imports this module)
    from kiosk.store.queries import Db

Dialect = Literal["sqlite", "postgres"]

SCHEMA_VERSION = 5
# Version 2: templates.photo_sha256 (the photo a template came from), unique per subject and model, so
# re-running the same import or add enrolls nothing new.
# Version 3: flights, their manifests, gate assignments, boarded marks (one per flight and subject: the
# primary key is the guarantee that nobody boards twice), decisions at boarding gates and the log of
# boarding actions (undo, purge). See kiosk.store.flights.
# Version 4: subject_changes, the subjects each revision changed (logged by triggers), so a verifier reloads
# only those; meta 'baseline' is the revision from which that log is complete (older: reload everything).
# Version 5: templates sealed at rest (kiosk.store.sealing): templates.embedding holds the sealed blob and
# templates.key_id the key that sealed it; meta 'key_check:<key id>' a sealed check value per key, so a
# process given the wrong key stops at start. Templates of an older gallery are sealed in place by
# `kiosk-enroll seal` (kiosk.store.sealed_upgrade), never by merely opening it.
SEALED_VERSION = 5

TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {
        "text": "TEXT",
        "real": "REAL",
        "integer": "INTEGER",
        "bigint": "INTEGER",
        "blob": "BLOB",
        "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
    },
    "postgres": {
        "text": "TEXT",
        "real": "DOUBLE PRECISION",
        "integer": "INTEGER",
        "bigint": "BIGINT",
        "blob": "BYTEA",
        "serial": "BIGSERIAL PRIMARY KEY",
    },
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a key of TYPES[dialect]
    rest: str = ""  # NOT NULL, DEFAULT ..., REFERENCES ...: the same words in both dialects


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()  # several columns (one column's is in its `rest`, or its type)

    def create(self, dialect: Dialect) -> str:
        parts = [" ".join(filter(None, (c.name, TYPES[dialect][c.type], c.rest))) for c in self.columns]
        if self.primary_key:
            parts.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(parts)})"

    def copied_columns(self) -> str:
        """The columns a copy into another gallery carries: all of them but a boarding log's row id (the
        target numbers its own log). A template keeps its id: the id is part of what its seal covers."""
        return ", ".join(c.name for c in self.columns if not (c.type == "serial" and self.name != "templates"))


def _c(name: str, type_: str, rest: str = "") -> Column:
    return Column(name, type_, rest)


TABLES: tuple[Table, ...] = (
    Table("meta", (_c("key", "text", "PRIMARY KEY"), _c("value", "text", "NOT NULL"))),
    Table(
        "subjects",
        (
            _c("id", "text", "PRIMARY KEY"),
            _c("name", "text", "NOT NULL DEFAULT ''"),
            _c("created", "real", "NOT NULL"),
            _c("expires", "real"),
            _c("metadata", "text", "NOT NULL DEFAULT '{}'"),
        ),
    ),
    Table(
        "templates",
        (
            _c("id", "serial"),
            _c("subject_id", "text", "NOT NULL REFERENCES subjects(id) ON DELETE CASCADE"),
            _c("model_id", "text", "NOT NULL"),
            _c("dim", "integer", "NOT NULL"),
            _c("embedding", "blob", "NOT NULL"),
            _c("quality", "text", "NOT NULL DEFAULT '{}'"),
            _c("created", "real", "NOT NULL"),
            _c("photo_sha256", "text"),
            _c("key_id", "text"),
        ),
    ),
    Table(
        "flights",
        (
            _c("id", "text", "PRIMARY KEY"),
            _c("departs", "real", "NOT NULL"),
            _c("created", "real", "NOT NULL"),
            _c("purged_at", "real"),
        ),
    ),
    Table(
        "manifest",
        (
            _c("flight_id", "text", "NOT NULL REFERENCES flights(id) ON DELETE CASCADE"),
            _c("subject_id", "text", "NOT NULL"),
            _c("added", "real", "NOT NULL"),
        ),
        ("flight_id", "subject_id"),
    ),
    Table(
        "gates",
        (
            _c("gate_id", "text", "PRIMARY KEY"),
            _c("flight_id", "text", "NOT NULL REFERENCES flights(id)"),
            _c("opened", "real", "NOT NULL"),
        ),
    ),
    Table(
        "boardings",
        (
            _c("flight_id", "text", "NOT NULL"),
            _c("subject_id", "text", "NOT NULL"),
            _c("gate_id", "text", "NOT NULL"),
            _c("camera_id", "text"),
            _c("boarded_at", "real", "NOT NULL"),
            _c("score", "real"),
            _c("event_id", "text"),
        ),
        ("flight_id", "subject_id"),
    ),
    Table(
        "flight_decisions",
        (
            _c("event_id", "text", "PRIMARY KEY"),
            _c("flight_id", "text", "NOT NULL"),
            _c("gate_id", "text"),
            _c("type", "text", "NOT NULL"),
            _c("reason", "text"),
            _c("subject_id", "text"),
            _c("candidate_id", "text"),
            _c("score", "real"),
            _c("at", "real", "NOT NULL"),
        ),
    ),
    Table(
        "subject_changes",
        (_c("revision", "bigint", "NOT NULL"), _c("subject_id", "text", "NOT NULL")),
        ("revision", "subject_id"),
    ),
    Table(
        "boarding_log",
        (
            _c("id", "serial"),
            _c("at", "real", "NOT NULL"),
            _c("action", "text", "NOT NULL"),
            _c("flight_id", "text"),
            _c("subject_id", "text"),
            _c("gate_id", "text"),
            _c("detail", "text", "NOT NULL DEFAULT ''"),
        ),
    ),
)
TABLE = {t.name: t for t in TABLES}

# Made after the migrations (some of their columns are newer than the tables). The index on
# templates(model_id) of versions before 4 is gone: nearly every template has the one model, and SQLite's
# planner preferred it over the subject index to read a few subjects' templates (a scan of all of them).
INDEXES = (
    "CREATE INDEX IF NOT EXISTS templates_subject ON templates(subject_id)",
    "CREATE UNIQUE INDEX IF NOT EXISTS templates_photo ON templates(subject_id, model_id, photo_sha256)",
    "CREATE INDEX IF NOT EXISTS templates_key ON templates(key_id)",
    "CREATE INDEX IF NOT EXISTS subjects_expires ON subjects(expires)",
    "CREATE INDEX IF NOT EXISTS manifest_subject ON manifest(subject_id)",
    "CREATE INDEX IF NOT EXISTS flight_decisions_flight ON flight_decisions(flight_id)",
    "DROP INDEX IF EXISTS templates_model",
)

# From version -> the statements that bring its tables to version + 1 (tables new in a version are made by
# create_tables). The step to version 5 also seals every template: kiosk.store.sealed_upgrade.
MIGRATIONS: dict[int, list[str]] = {
    1: ["ALTER TABLE templates ADD COLUMN photo_sha256 TEXT"],
    2: [],
    3: [],
    4: ["ALTER TABLE templates ADD COLUMN key_id TEXT"],
}


def create_tables(dialect: Dialect) -> list[str]:
    return [t.create(dialect) for t in TABLES]


# The change log starts at the revision a gallery has when it gets the table (0 for a new one).
BASELINE = (
    "INSERT INTO meta (key, value) SELECT 'baseline', value FROM meta WHERE key = 'revision' "
    "ON CONFLICT (key) DO NOTHING"
)
BUMP = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'"
CHANGES_KEPT = 50_000  # revisions of change log kept; a verifier further behind reloads everything

# Every change to a subject or its templates, whoever writes it (the project, or SQL run by hand), logs the
# subject under the revision its transaction is about to commit: the one after the current (writers take
# turns under the write lock, so no verifier's snapshot holds that revision without the change).
# (NOT EXISTS, not OR IGNORE: a trigger's conflict clause yields to its statement's, e.g. an upsert's.)
_LOG_ROW = (
    "INSERT INTO subject_changes (revision, subject_id) SELECT CAST(m.value AS INTEGER) + 1, {row} "
    "FROM meta m WHERE m.key = 'revision' AND NOT EXISTS (SELECT 1 FROM subject_changes c "
    "WHERE c.revision = CAST(m.value AS INTEGER) + 1 AND c.subject_id = {row})"
)
SQLITE_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS {table}_{what.lower()}_logged AFTER {what} ON {table} BEGIN "
    + "; ".join(_LOG_ROW.format(row=f"{version}.{column}") for version in versions)
    + "; END"
    for table, column in (("subjects", "id"), ("templates", "subject_id"))
    for what, versions in (("INSERT", ("NEW",)), ("DELETE", ("OLD",)), ("UPDATE", ("OLD", "NEW")))
]
CHANGES_CHANNEL = "kiosk_changes"  # PostgreSQL's NOTIFY channel of gallery and boarding changes
POSTGRES_TRIGGERS = [
    """CREATE OR REPLACE FUNCTION kiosk_log_change() RETURNS trigger AS $$
        BEGIN  -- TG_ARGV[0]: the column holding the subject id
            IF TG_OP != 'INSERT' THEN
                INSERT INTO subject_changes (revision, subject_id)
                SELECT CAST(value AS BIGINT) + 1, to_jsonb(OLD) ->> TG_ARGV[0] FROM meta WHERE key = 'revision'
                ON CONFLICT DO NOTHING;
            END IF;
            IF TG_OP != 'DELETE' THEN
                INSERT INTO subject_changes (revision, subject_id)
                SELECT CAST(value AS BIGINT) + 1, to_jsonb(NEW) ->> TG_ARGV[0] FROM meta WHERE key = 'revision'
                ON CONFLICT DO NOTHING;
            END IF;
            RETURN NULL;
        END $$ LANGUAGE plpgsql""",
    "DROP TRIGGER IF EXISTS kiosk_subject_changed ON subjects",
    """CREATE TRIGGER kiosk_subject_changed AFTER INSERT OR UPDATE OR DELETE ON subjects FOR EACH ROW
        EXECUTE FUNCTION kiosk_log_change('id')""",
    "DROP TRIGGER IF EXISTS kiosk_template_changed ON templates",
    """CREATE TRIGGER kiosk_template_changed AFTER INSERT OR UPDATE OR DELETE ON templates FOR EACH ROW
        EXECUTE FUNCTION kiosk_log_change('subject_id')""",
    # Every revision bump is announced to the verifier hosts that LISTEN (delivered at commit).
    f"""CREATE OR REPLACE FUNCTION kiosk_announce() RETURNS trigger AS $$
        BEGIN PERFORM pg_notify('{CHANGES_CHANNEL}', NEW.value); RETURN NEW; END $$ LANGUAGE plpgsql""",
    "DROP TRIGGER IF EXISTS kiosk_revision ON meta",
    """CREATE TRIGGER kiosk_revision AFTER UPDATE ON meta FOR EACH ROW WHEN (NEW.key = 'revision')
        EXECUTE FUNCTION kiosk_announce()""",
]


def prune_changes(db: Db) -> None:
    """Forget the change log's revisions beyond the last CHANGES_KEPT (a verifier that far behind reloads
    everything)."""
    (revision,) = db.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'revision'").fetchone()
    if revision > CHANGES_KEPT:
        db.execute("DELETE FROM subject_changes WHERE revision <= ?", (revision - CHANGES_KEPT,))
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'baseline' AND CAST(value AS INTEGER) < ?",
            (str(revision - CHANGES_KEPT), revision - CHANGES_KEPT),
        )


def rebase(db: Db) -> None:
    """The gallery's content was replaced wholesale (restore, copy): the change log leads nowhere now; every
    verifier behind the current revision reloads everything."""
    db.execute("DELETE FROM subject_changes")
    db.execute("UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'revision') WHERE key = 'baseline'")
