"""The gallery and boarding state on PostgreSQL, for a site with many verifier hosts (README "Airport
scale"). `PgGallery` runs the gallery's own SQL (kiosk.store.queries.GalleryQueries) and so the boarding
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import TupleRow

from kiosk.config import pg_url_problem
from kiosk.errors import ConfigError, RuntimeFailure, UsageError
from kiosk.files import read_regular_file
from kiosk.store.queries import Db, GalleryQueries, Transaction, seal_templates
from kiosk.store.schema import (
    BASELINE,
    CHANGES_CHANNEL,
    INDEXES,
    MIGRATIONS,
    POSTGRES_TRIGGERS,
    SCHEMA_VERSION,
    create_tables,
)
from kiosk.store.sealing import TemplateCodec

log = logging.getLogger(__name__)

PASSWORD_ENV = "KIOSK_PG_PASSWORD"  # noqa: S105 - the name of the variable, not a password
MIGRATION_LOCK = 0x6B696F736B  # pg_advisory_xact_lock key: b"kiosk"
WRITE_LOCK = 0x6B696F736B01  # every write transaction holds it: writers take turns, as on SQLite's write lock


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


def connect(where: PgTarget, *, timeout_s: float = 5.0, autocommit: bool = True) -> psycopg.Connection[TupleRow]:
    """A connection, or RuntimeFailure with one line naming the server (never the password)."""
    try:
        return psycopg.connect(
            where.url,
            password=where.password,
            connect_timeout=max(1, int(timeout_s)),
            autocommit=autocommit,
            application_name="gate-kiosk",
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        if where.password:
            first = first.replace(where.password, "***")
        raise RuntimeFailure(f"database {where.where} unreachable: {first}") from None


def migrate(conn: psycopg.Connection[TupleRow], where: PgTarget, seal_with: TemplateCodec | None = None) -> int:
    """Create the schema or bring it to SCHEMA_VERSION, in one transaction under an advisory lock (hosts that
    start together migrate once). A database from before version 5 with templates is upgraded only with
    `seal_with` (`kiosk-enroll seal`), its templates sealed in place in the same transaction. Returns the
    version found before (0: a new database)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        found = schema_version(conn)
        if found > SCHEMA_VERSION:
            raise UsageError(
                f"database schema version {found} is newer than this program reads "
                f"({SCHEMA_VERSION}); upgrade gate-kiosk"
            )
        if found == SCHEMA_VERSION:
            return found
        clear = _count(conn, "SELECT COUNT(*) FROM templates") if found else 0
        if clear and seal_with is None:
            raise UsageError(
                f"database {where.where}: schema version {found} keeps its {clear} templates in the "
                "clear; seal them in place with `kiosk-enroll -c CONFIG seal` (back it up first), "
                "then start again"
            )
        for statement in create_tables("postgres"):
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('revision', '0') ON CONFLICT (key) DO NOTHING")
        conn.execute(BASELINE)
        for version in range(found or SCHEMA_VERSION, SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
        for statement in (*INDEXES, *POSTGRES_TRIGGERS):
            conn.execute(statement)
        if clear and seal_with is not None:
            sealed = seal_templates(PgDb(conn, where), seal_with)
            log.info(
                "database %s: sealed %d templates in place under key %s", where.where, sealed, seal_with.current_id()
            )
        conn.execute(
            "INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (str(SCHEMA_VERSION),),
        )
        log.info(
            "database: schema %s to version %d", "created" if found == 0 else f"upgraded from {found}", SCHEMA_VERSION
        )
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

    def __init__(self, conn: psycopg.Connection[TupleRow], where: PgTarget) -> None:
        self.conn = conn
        self.where = where
        self._closed = False
        self._reconnecting: threading.Thread | None = None

    def _usable(self) -> psycopg.Connection[TupleRow]:
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

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> psycopg.Cursor[TupleRow]:
        cur = self._usable().cursor()
        cur.execute(_pg_sql(sql), params)
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> psycopg.Cursor[TupleRow]:
        cur = self._usable().cursor()
        cur.executemany(_pg_sql(sql), list(rows))
        return cur

    @property
    def in_transaction(self) -> bool:
        if self.conn.closed or self.conn.broken:  # whatever was open died with the connection
            return False
        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        self._closed = True
        self.conn.close()


def _count(conn: psycopg.Connection[TupleRow], query: str) -> int:
    """The one value of a one-row query (an aggregate, a test: there is always a row)."""
    row = conn.execute(query).fetchone()
    if row is None:
        raise RuntimeFailure(f"{query}: no row")
    return int(row[0])


def schema_version(conn: psycopg.Connection[TupleRow]) -> int:
    """The database's gallery schema version; 0 where there is none."""
    if not _count(conn, "SELECT to_regclass('meta') IS NOT NULL"):
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


class PgGallery(GalleryQueries):
    """The gallery in a PostgreSQL database, shared by every host that names it. Write transactions hold one
    advisory lock (writers take turns, as on SQLite: an enrollment's duplicate check and insert, a boarded
    mark's checks and insert, are never interleaved with another host's); reads are REPEATABLE READ snapshots
    that never wait for a writer."""

    _db: PgDb

    def __init__(
        self,
        where: PgTarget,
        *,
        create: bool = False,
        timeout_s: float = 5.0,
        codec: TemplateCodec | None = None,
        seal: bool = False,
    ) -> None:
        """`codec` and `seal`: as kiosk.store.sqlite_file.Gallery's."""
        self.where = where
        conn = connect(where, timeout_s=timeout_s)
        try:
            version = schema_version(conn)
            if version == 0 and not create:
                raise UsageError(
                    f"database {where.where} holds no gallery: create it with `kiosk-enroll -c CONFIG "
                    "init` (or `kiosk-enroll migrate`)"
                )
            if version != SCHEMA_VERSION:
                migrate(conn, where, codec if seal else None)
            self._db = PgDb(conn, where)
            if codec is not None:
                self.use_codec(codec)
        except BaseException:
            conn.close()
            raise

    @property
    def name(self) -> str:
        """For messages: the server and database (never the password)."""
        return f"postgresql://{self.where.where}"

    def reopen(self) -> PgGallery:
        other = PgGallery(self.where)
        other.codec = self.codec  # (checked when this one was opened)
        return other

    def transaction(self, write: bool = True) -> Transaction:
        if write:
            return Transaction(self._db, ("BEGIN", f"SELECT pg_advisory_xact_lock({WRITE_LOCK})"))
        return Transaction(self._db, ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",))

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

    def _after_copy(self, db: Db) -> None:
        for table in ("templates", "boarding_log"):
            db.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM {table}"  # noqa: S608 - table names from the tuple above
            )

    def backup(self, dest: Path) -> int:
        raise UsageError(f"{self.name}: back up a PostgreSQL gallery with the server's own tools (pg_dump)")

    def restore(self, source: Path) -> int:
        raise UsageError(f"{self.name}: restore a PostgreSQL gallery with the server's own tools (pg_restore)")
