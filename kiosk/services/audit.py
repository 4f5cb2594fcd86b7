"""The audit log: every decision, one JSON object a line, written before the decision leaves the verifier.

A line is written, flushed and fsynced before the event is published, so
an event a gate received is on disk even if the machine loses power a
moment later (decisions are a few a minute per gate; an fsync each costs
about a millisecond). When the log cannot be written (disk full, the path
replaced by a folder, a read-only mount) `write` says so instead of
raising: the verifier then lets nothing through that opens a door, reports
why, and tries again with the next decision, so it recovers by itself once
the log is writable. A log that is no longer at its path (deleted,
renamed away, replaced) counts as unwritable: every write checks that the
open file is still the one at the path (device and inode, before and after
the fsync) and reopens at the path, so no line goes only into a file
nobody will read. What was published while the log could not be written
(the rejects of a fail-closed gate) is kept in memory, bounded, and
written first when the log is writable again, in order, each marked
`"late": true` with the time it was written (`audited_at`). A line cut
short by a crash or a full disk is ended before the next one is appended,
and readers skip lines that do not parse.
The log is rotated daily and kept `retention.audit_days` (kiosk.boarding.retention).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from kiosk.boarding.retention import rotate_daily, rotated, today

log = logging.getLogger(__name__)

RETRY_EVERY_S = 1.0  # after a failure, reopen at most this often
MISSED_MAX = 10_000  # published lines waiting for a writable log; beyond it the oldest go, counted in a gap line


class AuditLog:
    def __init__(self, path: Path, keep_days: int = 30, *, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` (monotonic seconds) paces the reopening of an unwritable log (every RETRY_EVERY_S)."""
        self.path = path
        self.keep_days = keep_days
        self.clock = clock
        self.error = ""  # why the last write failed; "" while the log is writable
        self.failures = 0
        self._fh: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._day = today()
        self._last_try = float("-inf")
        self._missed: deque[bytes] = deque()
        self._lost = 0  # missed lines dropped because the backlog was full
        self._open()

    @property
    def pending(self) -> int:
        """Published lines not yet in the log (written as soon as it can be)."""
        return len(self._missed) + (1 if self._lost else 0)

    def _open(self) -> bool:
        self._last_try = self.clock()
        rotate_daily(self.path, self.keep_days)
        self._day = today()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "ab")
            if fh.tell() > 0:  # end a line torn by a crash or a full disk, so the next one stands alone
                with open(self.path, "rb") as tail:
                    tail.seek(-1, os.SEEK_END)
                    if tail.read(1) != b"\n":
                        fh.write(b"\n")
                        log.warning("audit log %s ended in a partial line; it is kept on a line of its own", self.path)
        except OSError as exc:
            self._failed(f"cannot open the audit log {self.path}: {exc.strerror or exc}")
            return False
        self._fh = fh
        st = os.fstat(fh.fileno())
        self._identity = (st.st_dev, st.st_ino)
        if self.error:
            log.warning("audit log %s is writable again", self.path)
        self.error = ""
        return True

    def _failed(self, why: str) -> None:
        self.failures += 1
        if why != self.error:
            log.error("%s: nothing that opens a door is published until it can be written", why)
        self.error = why
        self._close()

    def _close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None

    def _at_path(self) -> bool:
        """Is the open file still the one at the configured path (not deleted, renamed away or replaced)?"""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def _reopen_if_moved(self) -> bool:
        """The file at the path is not the open one: reopen at the path (False: it cannot be, and why is
        recorded)."""
        if self._fh is None or self._at_path():
            return self._fh is not None
        log.error(
            "audit log %s is no longer the file being written (deleted, renamed or replaced): reopening at the path",
            self.path,
        )
        self._close()
        return self._open()

    def defer(self, line: bytes) -> None:
        """A line that was published while the log could not be written: written, marked late, before the
        next line once the log is writable (held in memory, at most MISSED_MAX; a gap line counts the rest)."""
        if len(self._missed) >= MISSED_MAX:
            self._missed.popleft()
            self._lost += 1
        self._missed.append(line.rstrip(b"\n"))

    def write(self, line: bytes) -> bool:
        """Append one line durably (after any late ones); False (and `error` says why) when it could not be
        written."""
        return self._write(line.rstrip(b"\n") + b"\n")

    def check(self) -> bool:
        """Between decisions (about once a second): notice a log moved away or deleted without waiting for
        the next decision (status says so at once), retry an unwritable one, and write the late lines as
        soon as it can be, so a gate that stays quiet after an outage still gets its record."""
        if self._fh is not None:
            self._reopen_if_moved()
        elif self.clock() - self._last_try >= RETRY_EVERY_S:
            self._open()
        if self._fh is not None and self.pending:
            return self._write(b"")
        return self._fh is not None

    def _write(self, line: bytes) -> bool:
        if self._fh is not None and today() != self._day:  # a new day: rotate first
            self._fh.close()
            self._fh = None
            self._last_try = float("-inf")
        if self._fh is None and (self.clock() - self._last_try < RETRY_EVERY_S or not self._open()):
            return False
        if not self._reopen_if_moved():
            return False
        for _ in range(2):  # a second time when the path changed under the write
            if not self._append(self._late_lines() + line):
                return False
            if self._at_path():
                self._missed.clear()
                self._lost = 0
                return True
            if not self._reopen_if_moved():
                return False
        self._failed(f"the audit log {self.path} keeps changing under the writer")
        return False

    def _late_lines(self) -> bytes:
        if not self._missed and not self._lost:
            return b""
        now = time.time()
        out = []
        if self._lost:
            out.append(
                json.dumps(
                    {
                        "type": "audit_gap",
                        "lost": self._lost,
                        "late": True,
                        "audited_at": now,
                        "why": "more published lines than the backlog holds while the log was unwritable",
                    }
                ).encode()
            )
        for raw in self._missed:
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if isinstance(record, dict):
                record["late"], record["audited_at"] = True, now
                out.append(json.dumps(record, separators=(",", ":")).encode())
            else:
                out.append(raw)
        log.warning(
            "audit log %s: writing %d line(s) published while it was unwritable, marked late",
            self.path,
            len(self._missed),
        )
        return b"\n".join(out) + b"\n"

    def _append(self, data: bytes) -> bool:
        try:
            if self._fh is None:  # closed after a failed reopen: the same as a failed write
                raise OSError(f"{self.path} is not open")
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self._failed(f"cannot write the audit log {self.path}: {exc.strerror or exc}")
            return False
        return True

    def close(self) -> None:
        if self._missed or self._lost:
            log.error(
                "audit log %s: %d published line(s) could not be written before stopping", self.path, self.pending
            )
        self._close()


def _tail_lines(path: Path, tail_bytes: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - tail_bytes))
            return fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def read_tail(path: Path, tail_bytes: int = 1 << 20) -> list[dict[str, Any]]:
    """The audit log's last records (objects only; a torn or foreign line is skipped), reaching into the
    last rotated file when today's is short (a restart just after midnight still knows the last accepts)."""
    lines = _tail_lines(path, tail_bytes)
    size = sum(len(line) + 1 for line in lines)
    older = rotated(path)
    if size < tail_bytes and older:
        lines = _tail_lines(older[-1][1], tail_bytes - size) + lines
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the tail window or by a crash mid-write
        if isinstance(record, dict):
            records.append(record)
    return records


def recent_accepts(records: list[dict[str, Any]], horizon: float) -> list[tuple[str, str, float]]:
    """(gate, subject, captured_at) of the accepts among `records` (the audit log's tail) captured at or after
    `horizon`: what a restarted verifier must remember so as not to open a gate twice for one passenger."""
    return [
        (str(e.get("gate_id")), str(e["subject_id"]), float(e["captured_at"]))
        for e in records
        if e.get("type") == "accept"
        and isinstance(e.get("captured_at"), (int, float))
        and e["captured_at"] >= horizon
        and e.get("subject_id")
    ]


class RecentEvents:
    """The last events published (seeded from the audit log's tail at start, so a restarted verifier can still
    serve what its previous run published), for subscribers that missed some."""

    def __init__(self, seed: list[dict[str, Any]], size: int = 2000) -> None:
        self._events: deque[dict[str, Any]] = deque(
            (e for e in seed if isinstance(e.get("boot_id"), str) and isinstance(e.get("event_seq"), int)), maxlen=size
        )

    def add(self, event: Any) -> None:
        self._events.append(dataclasses.asdict(event))

    def since(self, cursors: dict[str, tuple[str, int]], gate: str | None) -> tuple[list[dict[str, Any]], bool]:
        """For each gate with a cursor (boot_id, event_seq) (only `gate` if given): the events published after
        it, in order. `complete` is False when some may be missing: the cursor's event is no longer held and
        what follows does not continue it (same boot, next number; or a new boot starting at 1)."""
        held = list(self._events)
        out: list[dict[str, Any]] = []
        complete = True
        for gate_id, (boot, seq) in cursors.items():
            if gate is not None and gate_id != gate:
                continue
            mine = [e for e in held if e.get("gate_id") == gate_id]
            at = next((i for i, e in enumerate(mine) if e["boot_id"] == boot and e["event_seq"] == seq), None)
            if at is not None:
                new = mine[at + 1 :]
            else:
                new = [e for e in mine if not (e["boot_id"] == boot and e["event_seq"] <= seq)]
            prev = (boot, seq)
            for e in new:
                if not (
                    (e["boot_id"] == prev[0] and e["event_seq"] == prev[1] + 1)
                    or (e["boot_id"] != prev[0] and e["event_seq"] == 1)
                ):
                    complete = False
                prev = (e["boot_id"], e["event_seq"])
            out += new
        return out, complete
