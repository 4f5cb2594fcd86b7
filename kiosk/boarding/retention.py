"""Daily rotation and deletion of files that hold passenger ids and names (the audit log, subscriber JSONL).

`retention.audit_days` (default 30) is how long they are kept: long enough to answer an airline's or an
authority's question about a boarding after the fact, short enough that a log is not a lasting register of
who flew when. They hold no biometrics (no templates, no images) either way.

A file `NAME` written on an earlier day than today is renamed `NAME.YYYY-MM-DD` (the day of its last write)
before the next line goes in; rotated files whose day is more than `keep_days` days ago are deleted.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import date, datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"^\.(\d{4}-\d{2}-\d{2})(?:\.\d+)?$")


def today(now: float | None = None) -> date:
    return datetime.fromtimestamp(time.time() if now is None else now).date()


def rotated(path: Path) -> list[tuple[date, Path]]:
    """The rotated files of `path`, oldest first."""
    out = []
    for sibling in path.parent.glob(path.name + ".*"):
        m = _SUFFIX.match(sibling.name[len(path.name) :])
        if m:
            try:
                out.append((date.fromisoformat(m.group(1)), sibling))
            except ValueError:
                continue
    return sorted(out)


def rotate_daily(path: Path, keep_days: int, now: float | None = None) -> Path | None:
    """Rotate `path` if it was last written before today, and delete rotated files older than `keep_days`.
    Returns where the file went (None: not rotated). Errors are logged, never raised: a log that cannot be
    rotated is still written."""
    day = today(now)
    moved: Path | None = None
    try:
        if path.exists() and path.stat().st_size:
            written = today(path.stat().st_mtime)
            if written < day:
                moved = path.with_name(f"{path.name}.{written.isoformat()}")
                if moved.exists():  # a second file for that day (a clock set back): keep both
                    moved = path.with_name(f"{path.name}.{written.isoformat()}.{int(time.time())}")
                path.rename(moved)
                log.info("rotated %s to %s", path, moved.name)
        for when, old in rotated(path):
            if when < day - timedelta(days=keep_days):
                old.unlink()
                log.info("deleted %s (older than retention.audit_days: %d)", old, keep_days)
    except OSError as exc:
        log.warning("cannot rotate %s: %s", path, exc)
    return moved
