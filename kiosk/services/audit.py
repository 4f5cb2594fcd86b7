"""The audit log: every decision, one JSON object a line, written before the decision leaves the verifier.

A line is written, flushed and fsynced before the event is published, so
an event a gate received is on disk even if the machine loses power a
moment later (decisions are a few a minute per gate; an fsync each costs
about a millisecond). When the log cannot be written (disk full, the path
replaced by a folder, a read-only mount) `write` says so instead of
raising: the verifier then lets nothing through that opens a door, reports
why, and tries again with the next decision, so it recovers by itself once
the log is writable. A line cut short by a crash or a full disk is ended
before the next one is appended, and readers skip lines that do not parse.
The log is rotated daily and kept `retention.audit_days` (kiosk.boarding.retention).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

from kiosk.boarding.retention import rotate_daily, rotated, today

log = logging.getLogger(__name__)

RETRY_EVERY_S = 1.0  # after a failure, reopen at most this often


class AuditLog:
    def __init__(self, path: Path, keep_days: int = 30) -> None:
        self.path = path
        self.keep_days = keep_days
        self.error = ""  # why the last write failed; "" while the log is writable
        self.failures = 0
        self._fh: BinaryIO | None = None
        self._day = today()
        self._last_try = float("-inf")
        self._open()

    def _open(self) -> bool:
        self._last_try = time.monotonic()
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
                        log.warning("audit log %s ended in a partial line; it is kept on a line of its own",
                                    self.path)
        except OSError as exc:
            self._failed(f"cannot open the audit log {self.path}: {exc.strerror or exc}")
            return False
        self._fh = fh
        if self.error:
            log.warning("audit log %s is writable again", self.path)
        self.error = ""
        return True

    def _failed(self, why: str) -> None:
        self.failures += 1
        if why != self.error:
            log.error("%s: nothing that opens a door is published until it can be written", why)
        self.error = why
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None

    def write(self, line: bytes) -> bool:
        """Append one line durably; False (and `error` says why) when it could not be written."""
        if self._fh is not None and today() != self._day:  # a new day: rotate first
            self._fh.close()
            self._fh = None
            self._last_try = float("-inf")
        if self._fh is None and (time.monotonic() - self._last_try < RETRY_EVERY_S or not self._open()):
            return False
        assert self._fh is not None
        try:
            self._fh.write(line.rstrip(b"\n") + b"\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self._failed(f"cannot write the audit log {self.path}: {exc.strerror or exc}")
            return False
        return True

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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


class RecentEvents:
    """The last events published (seeded from the audit log's tail at start, so a restarted verifier can still
    serve what its previous run published), for subscribers that missed some."""

    def __init__(self, seed: list[dict[str, Any]], size: int = 2000) -> None:
        self._events: deque[dict[str, Any]] = deque(
            (e for e in seed if isinstance(e.get("boot_id"), str) and isinstance(e.get("event_seq"), int)),
            maxlen=size)

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
                new = mine[at + 1:]
            else:
                new = [e for e in mine if not (e["boot_id"] == boot and e["event_seq"] <= seq)]
            prev = (boot, seq)
            for e in new:
                if not ((e["boot_id"] == prev[0] and e["event_seq"] == prev[1] + 1)
                        or (e["boot_id"] != prev[0] and e["event_seq"] == 1)):
                    complete = False
                prev = (e["boot_id"], e["event_seq"])
            out += new
        return out, complete
