"""The SQLite gallery, the embedded default: one file in WAL mode, one connection per process, writes one
transaction each; its online backup and restore."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

from kiosk.errors import RuntimeFailure, UsageError
from kiosk.store.queries import Db, GalleryQueries, Transaction, seal_templates
from kiosk.store.schema import (
    BASELINE,
    INDEXES,
    MIGRATIONS,
    SCHEMA_VERSION,
    SEALED_VERSION,
    SQLITE_TRIGGERS,
    create_tables,
    rebase,
)
from kiosk.store.sealing import TemplateCodec

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"  # a database file's first 16 bytes


class CorruptGallery(UsageError):
    """The file is not a usable SQLite database (restore moves such a file aside)."""


class Gallery(GalleryQueries):
    """The SQLite gallery (the embedded default). One connection per process; writes are one transaction
    each."""

    _db: sqlite3.Connection  # (a Db, with sqlite3's backup for `backup` and `restore`)

    def __init__(
        self,
        path: Path,
        *,
        create: bool = True,
        timeout: float = 10.0,
        codec: TemplateCodec | None = None,
        seal: bool = False,
    ) -> None:
        """`codec`: the template key (None: a gallery opened for what needs none, e.g. a health probe);
        `seal`: a gallery from before version 5 may be upgraded, its templates sealed in place with `codec`
        (`kiosk-enroll seal`); otherwise such a gallery with templates is refused."""
        self.path = Path(path)
        self._seal_with = codec if seal else None
        if not create and not self.path.exists():
            raise self._missing()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Without `create`, the file is opened read-write only, never made: one deleted after the check above
            # is an error, not a new empty gallery at its path.
            target, uri = (str(self.path), False) if create else (self.path.absolute().as_uri() + "?mode=rw", True)
            try:
                self._db = sqlite3.connect(
                    target, timeout=timeout, isolation_level=None, check_same_thread=False, uri=uri
                )
            except sqlite3.OperationalError:
                if not create and not self.path.exists():
                    raise self._missing() from None
                raise
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if not self._current():  # a current gallery is opened without taking the write lock
                self._migrate()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):  # another process holds it: not a config error
                raise RuntimeFailure(
                    f"gallery {self.path}: still locked by another process after {timeout:g}s ({exc}); try again"
                ) from None
            raise CorruptGallery(f"gallery {self.path}: not a usable SQLite database: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise CorruptGallery(f"gallery {self.path}: not a usable SQLite database: {exc}") from None
        except OSError as exc:
            raise UsageError(f"gallery {self.path}: cannot open: {exc}") from None
        except BaseException:  # e.g. a gallery with templates in the clear: refused, nothing left open
            if hasattr(self, "_db"):
                self._db.close()
            raise
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._fd: int | None = None  # SQLite's descriptor of the file, once looked up
        if codec is not None:
            try:
                self.use_codec(codec)
            except BaseException:
                self._db.close()
                raise

    def _missing(self) -> UsageError:
        return UsageError(
            f"gallery {self.path} does not exist: create it with `kiosk-enroll -c CONFIG init` "
            "(or enroll someone); it is never created empty behind your back"
        )

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
        with self.transaction() as db:  # the write lock: two processes opening an old file migrate it once
            for statement in create_tables("sqlite"):
                db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('revision', '0')")
            db.execute(BASELINE)
            self._upgrade(db)
            for statement in INDEXES:  # after the upgrade: some of their columns are newer than the tables
                db.execute(statement)
            for trigger in SQLITE_TRIGGERS:
                db.execute(trigger)

    def _upgrade(self, db: Db) -> None:
        """Stamp a new file, or run the migrations from its version to SCHEMA_VERSION (inside `_migrate`)."""
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            fresh = db.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 0 and "photo_sha256" in {
                r[1] for r in db.execute("PRAGMA table_info(templates)")
            }
            if not fresh:
                raise UsageError(f"gallery {self.path}: has templates but no schema version")
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise UsageError(
                f"gallery {self.path}: schema version {version} is newer than this program "
                f"reads ({SCHEMA_VERSION}); upgrade gate-kiosk"
            )
        start = version
        clear = db.execute("SELECT COUNT(*) FROM templates").fetchone()[0] if version < SEALED_VERSION else 0
        if clear and self._seal_with is None:
            raise UsageError(
                f"gallery {self.path}: schema version {version} keeps its {clear} templates in the "
                f"clear; seal them in place with `kiosk-enroll -c CONFIG seal {self.path}` (back "
                "the file up first), then start again"
            )
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            version += 1
        if clear and self._seal_with is not None:
            sealed = seal_templates(db, self._seal_with)
            log.info(
                "gallery %s: sealed %d templates in place under key %s", self.path, sealed, self._seal_with.current_id()
            )
        if version != start:
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
            log.info("gallery %s: schema upgraded from version %d to %d", self.path, start, version)

    @property
    def name(self) -> str:
        """For messages: the file."""
        return str(self.path)

    def reopen(self) -> Gallery:
        """Another connection to the same file (for a thread of its own), with the same key (checked when this
        one was opened)."""
        other = Gallery(self.path, create=False)
        other.codec = self.codec
        return other

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
        with Gallery(dest, create=False) as copy:  # (sealed blobs: the backup holds no template in the clear)
            return copy.revision()

    def restore(self, source: Path) -> int:
        """Replace the gallery's content with the backup `source`, in place, and move the revision past both,
        so running verifiers reload it within a second. Returns the new revision."""
        # Checked like any gallery file, and against this gallery's key: a backup sealed under a key this
        # process does not hold is refused before anything is replaced.
        with Gallery(source, create=False, codec=self.codec) as backup:
            before = self.revision()
            try:
                backup._db.backup(self._db)  # the whole database, under the write lock
            except sqlite3.Error as exc:
                raise RuntimeFailure(f"restore of {self.path} from {source} failed: {exc}") from None
        with self.transaction() as db:
            revision = max(before, self.revision()) + 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (str(revision),))
            rebase(db)  # the backup's change log does not lead from any running verifier's revision
        log.info("gallery %s restored from %s (revision %d)", self.path, source, revision)
        return revision

    @classmethod
    def restore_file(cls, path: Path, source: Path, codec: TemplateCodec | None = None) -> tuple[int, Path | None]:
        """`restore` into the gallery at `path`; a gallery there that is not a usable database (corrupt) is
        first moved aside, with its WAL, to `NAME.corrupt-TIMESTAMP` (kept for inspection, never deleted).
        Returns the new revision and where the corrupt file went (None if it was usable)."""
        path = Path(path)
        moved: Path | None = None
        try:
            gallery = cls(path)  # (its key does not matter: its content is replaced by the backup's)
        except CorruptGallery:
            if not path.exists():
                raise
            with cls(source, create=False, codec=codec):  # a bad backup is refused before anything is moved
                pass
            moved = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                part = Path(str(path) + suffix)
                if part.exists():
                    part.rename(Path(str(moved) + suffix))
            log.warning("gallery %s is not usable; moved it aside to %s before restoring", path, moved)
            gallery = cls(path)
        with gallery:
            gallery.codec = codec
            return gallery.restore(source), moved

    def __enter__(self) -> Gallery:
        return self

    def transaction(self, write: bool = True) -> Transaction:
        return Transaction(self._db, ("BEGIN IMMEDIATE",) if write else ("BEGIN DEFERRED",))
