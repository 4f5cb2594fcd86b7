"""The gallery and boarding state on PostgreSQL, for a site with many verifier hosts (README "Airport
scale"). `PgGallery` runs the gallery's own SQL (kiosk.store.gallery.GalleryQueries) and so the boarding
store's, through a connection adapter.

- The password never sits in a config's text or a log line: a URL that carries one is refused; it is read
  from a file (`password_file`, e.g. a Kubernetes or systemd secret) or the environment (`KIOSK_PG_PASSWORD`,
  else libpq's own `PGPASSWORD`).
- The schema is created and migrated by the project, in one transaction, under an advisory lock: several
  hosts starting at once migrate it once. Its version is the SQLite gallery's (the same tables, PostgreSQL
  types), so `kiosk-enroll migrate` can copy one into the other table by table.
- Errors are one line that names the server (host, port, database), never the password.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from kiosk.config import pg_url_problem
from kiosk.errors import ConfigError, RuntimeFailure, UsageError
from kiosk.files import read_regular_file
from kiosk.store.gallery import BASELINE, GalleryQueries, _Transaction

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4  # kiosk.store.gallery.SCHEMA_VERSION: the same tables
PASSWORD_ENV = "KIOSK_PG_PASSWORD"
MIGRATION_LOCK = 0x6B696F736B  # pg_advisory_xact_lock key: b"kiosk"
WRITE_LOCK = 0x6B696F736B01  # every write transaction holds it: writers take turns, as on SQLite's write lock
CHANGES_CHANNEL = "kiosk_changes"  # NOTIFY channel of gallery and boarding changes

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS subjects (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        created DOUBLE PRECISION NOT NULL,
        expires DOUBLE PRECISION,
        metadata TEXT NOT NULL DEFAULT '{}')""",
    """CREATE TABLE IF NOT EXISTS templates (
        id BIGSERIAL PRIMARY KEY,
        subject_id TEXT NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
        model_id TEXT NOT NULL,
        dim INTEGER NOT NULL,
        embedding BYTEA NOT NULL,
        quality TEXT NOT NULL DEFAULT '{}',
        created DOUBLE PRECISION NOT NULL,
        photo_sha256 TEXT)""",
    "CREATE INDEX IF NOT EXISTS templates_subject ON templates(subject_id)",
    "DROP INDEX IF EXISTS templates_model",  # (version 4: see kiosk.store.gallery.MIGRATIONS)
    "CREATE INDEX IF NOT EXISTS subjects_expires ON subjects(expires)",
    "CREATE UNIQUE INDEX IF NOT EXISTS templates_photo ON templates(subject_id, model_id, photo_sha256)",
    """CREATE TABLE IF NOT EXISTS flights (
        id TEXT PRIMARY KEY,
        departs DOUBLE PRECISION NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        purged_at DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS manifest (
        flight_id TEXT NOT NULL REFERENCES flights(id) ON DELETE CASCADE,
        subject_id TEXT NOT NULL,
        added DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (flight_id, subject_id))""",
    "CREATE INDEX IF NOT EXISTS manifest_subject ON manifest(subject_id)",
    """CREATE TABLE IF NOT EXISTS gates (
        gate_id TEXT PRIMARY KEY,
        flight_id TEXT NOT NULL REFERENCES flights(id),
        opened DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS boardings (
        flight_id TEXT NOT NULL,
        subject_id TEXT NOT NULL,
        gate_id TEXT NOT NULL,
        camera_id TEXT,
        boarded_at DOUBLE PRECISION NOT NULL,
        score DOUBLE PRECISION,
        event_id TEXT,
        PRIMARY KEY (flight_id, subject_id))""",
    """CREATE TABLE IF NOT EXISTS flight_decisions (
        event_id TEXT PRIMARY KEY,
        flight_id TEXT NOT NULL,
        gate_id TEXT,
        type TEXT NOT NULL,
        reason TEXT,
        subject_id TEXT,
        candidate_id TEXT,
        score DOUBLE PRECISION,
        at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS flight_decisions_flight ON flight_decisions(flight_id)",
    """CREATE TABLE IF NOT EXISTS subject_changes (
        revision BIGINT NOT NULL,
        subject_id TEXT NOT NULL,
        PRIMARY KEY (revision, subject_id))""",
    """CREATE TABLE IF NOT EXISTS boarding_log (
        id BIGSERIAL PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        action TEXT NOT NULL,
        flight_id TEXT,
        subject_id TEXT,
        gate_id TEXT,
        detail TEXT NOT NULL DEFAULT '')""",
    # Every change to a subject or its templates is logged for the verifiers (see kiosk.store.gallery.TRIGGERS).
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


@dataclass(frozen=True)
class PgTarget:
    """Where the shared store is: a libpq URL without a password, and the password from its secret."""

    url: str
    password: str | None = None

    @property
    def where(self) -> str:
        """host:port/database, for messages."""
        parts = urlsplit(self.url)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


def target(url: str, password_file: Path | None = None, *, key: str = "gallery.url") -> PgTarget:
    """The target of `url`, its password from `password_file`, else $KIOSK_PG_PASSWORD (else libpq's
    PGPASSWORD or .pgpass). A URL with a password in it is refused (kiosk.config.pg_url_problem)."""
    problem = pg_url_problem(url)
    if problem:
        raise ConfigError(f"{key}: {problem}")
    password = None
    if password_file is not None:
        data = read_regular_file(password_file, 4096, "password file", error=UsageError)
        password = data.decode("utf-8", "replace").strip() or None
        if password is None:
            raise UsageError(f"{password_file}: the password file is empty")
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    return PgTarget(url, password)


def connect(where: PgTarget, *, timeout_s: float = 5.0, autocommit: bool = True) -> psycopg.Connection:
    """A connection, or RuntimeFailure with one line naming the server (never the password)."""
    try:
        return psycopg.connect(where.url, password=where.password, connect_timeout=max(1, int(timeout_s)),
                               autocommit=autocommit, application_name="gate-kiosk")
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        if where.password:
            first = first.replace(where.password, "***")
        raise RuntimeFailure(f"database {where.where} unreachable: {first}") from None


def migrate(conn: psycopg.Connection) -> int:
    """Create the schema or bring it to SCHEMA_VERSION, in one transaction under an advisory lock (hosts that
    start together migrate once). Returns the version found before (0: a new database)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        found = schema_version(conn)
        if found > SCHEMA_VERSION:
            raise UsageError(f"database schema version {found} is newer than this program reads "
                             f"({SCHEMA_VERSION}); upgrade gate-kiosk")
        if found == SCHEMA_VERSION:
            return found
        for statement in SCHEMA:
            conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("INSERT INTO meta VALUES ('revision', '0') ON CONFLICT (key) DO NOTHING")
        conn.execute(BASELINE)
        conn.execute("INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE SET value = "
                     "EXCLUDED.value", (str(SCHEMA_VERSION),))
        log.info("database: schema %s to version %d", "created" if found == 0 else f"upgraded from {found}",
                 SCHEMA_VERSION)
    return found


@functools.lru_cache(maxsize=512)
def _pg_sql(statement: str) -> str:
    """The gallery's SQL (sqlite3 style, `?` placeholders) for psycopg (`%s`)."""
    return statement.replace("%", "%%").replace("?", "%s")


class PgDb:
    """A psycopg connection (autocommit; transactions are explicit BEGIN ... COMMIT) answering the sqlite3 calls
    the gallery code makes: execute, executemany, in_transaction, close. A connection the server dropped (a
    restart, a network cut) is replaced by a background thread, trying once a second; until it is back every
    call fails at once, so a verifier deciding an accept fails closed and its frame loop never waits on a
    connect to an unreachable host."""

    RETRY_S = 1.0

    def __init__(self, conn: psycopg.Connection, where: PgTarget) -> None:
        self.conn = conn
        self.where = where
        self._closed = False
        self._reconnecting: threading.Thread | None = None

    def _usable(self) -> psycopg.Connection:
        conn = self.conn
        if not (conn.closed or conn.broken):
            return conn
        if self._reconnecting is None or not self._reconnecting.is_alive():
            self._reconnecting = threading.Thread(target=self._reconnect, name="db-reconnect", daemon=True)
            self._reconnecting.start()
        raise RuntimeFailure(f"database {self.where.where} unreachable (reconnecting)")

    def _reconnect(self) -> None:
        while not self._closed:
            try:
                conn = connect(self.where, timeout_s=2.0)
            except RuntimeFailure as exc:
                log.debug("%s", exc)
                time.sleep(self.RETRY_S)
                continue
            if self._closed:
                conn.close()
                return
            self.conn = conn
            log.warning("database %s: reconnected", self.where.where)
            return

    def execute(self, sql: str, params: tuple | list = ()) -> psycopg.Cursor:
        cur = self._usable().cursor()
        cur.execute(_pg_sql(sql), params)  # type: ignore[arg-type]
        return cur

    def executemany(self, sql: str, rows: list) -> psycopg.Cursor:
        cur = self._usable().cursor()
        cur.executemany(_pg_sql(sql), list(rows))  # type: ignore[arg-type]
        return cur

    @property
    def in_transaction(self) -> bool:
        if self.conn.closed or self.conn.broken:  # whatever was open died with the connection
            return False
        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        self._closed = True
        self.conn.close()


def schema_version(conn: psycopg.Connection) -> int:
    """The database's gallery schema version; 0 where there is none."""
    if not conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


class PgGallery(GalleryQueries):
    """The gallery in a PostgreSQL database, shared by every host that names it. Write transactions hold one
    advisory lock (writers take turns, as on SQLite: an enrollment's duplicate check and insert, a boarded
    mark's checks and insert, are never interleaved with another host's); reads are REPEATABLE READ snapshots
    that never wait for a writer."""

    def __init__(self, where: PgTarget, *, create: bool = False, timeout_s: float = 5.0) -> None:
        self.where = where
        conn = connect(where, timeout_s=timeout_s)
        try:
            version = schema_version(conn)
            if version == 0 and not create:
                raise UsageError(f"database {where.where} holds no gallery: create it with `kiosk-enroll -c CONFIG "
                                 "init` (or `kiosk-enroll migrate`)")
            if version != SCHEMA_VERSION:
                migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._db = PgDb(conn, where)

    @property
    def name(self) -> str:  # type: ignore[override]
        """For messages: the server and database (never the password)."""
        return f"postgresql://{self.where.where}"

    def reopen(self) -> PgGallery:
        return PgGallery(self.where)

    def _transaction(self, write: bool = True) -> _Transaction:
        if write:
            return _Transaction(self._db, ("BEGIN", f"SELECT pg_advisory_xact_lock({WRITE_LOCK})"))
        return _Transaction(self._db, ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",))

    def listen(self, changed: threading.Event, stop: threading.Event) -> None:
        """Until `stop`: LISTEN for the database's change announcements and set `changed` at each (a thread's
        body; its own connection, re-made after a drop). A verifier so reloads within milliseconds of another
        host's enrollment instead of at its next one-second revision poll."""
        while not stop.is_set():
            try:
                with connect(self.where, timeout_s=2.0) as conn:
                    conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    changed.set()  # (re)connected: whatever changed meanwhile is picked up
                    while not stop.is_set():
                        for _note in conn.notifies(timeout=0.5, stop_after=1):
                            changed.set()
            except Exception as exc:  # noqa: BLE001 - keep listening; the one-second poll covers the gap
                log.debug("database %s: change listener: %s", self.where.where, exc)
                stop.wait(1.0)

    def backup(self, dest: Path) -> int:
        raise UsageError(f"{self.name}: back up a PostgreSQL gallery with the server's own tools (pg_dump)")

    def restore(self, source: Path) -> int:
        raise UsageError(f"{self.name}: restore a PostgreSQL gallery with the server's own tools (pg_restore)")
