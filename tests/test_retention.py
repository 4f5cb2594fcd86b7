"""Files with passenger ids (the audit log, subscriber JSONL) rotate daily and go after retention.audit_days."""

from __future__ import annotations

import json
import os
import time
from datetime import date, timedelta

from kiosk.boarding import retention
from kiosk.services import audit as audit_module
from kiosk.services.audit import AuditLog, read_tail
from kiosk.services.subscriber import jsonl_hook

DAY = 86400.0


def _aged(path, days: float, text: str = '{"type": "accept"}\n'):
    path.write_text(text)
    t = time.time() - days * DAY
    os.utime(path, (t, t))
    return path


def test_the_audit_log_rotates_by_day_and_deletes_what_is_older_than_the_retention(tmp_path, monkeypatch):
    log_path = _aged(tmp_path / "events.jsonl", 2, '{"type": "accept", "subject_id": "OLD"}\n')
    two_days_ago = (date.today() - timedelta(days=2)).isoformat()
    expired = _aged(tmp_path / f"events.jsonl.{(date.today() - timedelta(days=40)).isoformat()}", 40)
    kept = _aged(tmp_path / f"events.jsonl.{(date.today() - timedelta(days=10)).isoformat()}", 10)
    unrelated = _aged(tmp_path / "events.jsonl.bak", 400)  # not ours: never touched
    log = AuditLog(log_path, keep_days=30)
    assert log.write(b'{"type": "reject", "subject_id": "NEW"}')
    assert (tmp_path / f"events.jsonl.{two_days_ago}").read_text().count("OLD") == 1
    assert not expired.exists() and kept.exists() and unrelated.exists()
    assert [json.loads(line)["subject_id"] for line in log_path.read_text().splitlines()] == ["NEW"]
    # A restart just after midnight still sees the last accepts: the tail reaches into the rotated file.
    assert [r.get("subject_id") for r in read_tail(log_path)] == ["OLD", "NEW"]
    # Midnight passes while the log is open: the next write starts a new file.
    tomorrow = date.today() + timedelta(days=1)
    monkeypatch.setattr(audit_module, "today", lambda now=None: tomorrow)
    monkeypatch.setattr(retention, "today", lambda now=None: tomorrow if now is None else date.fromtimestamp(now))
    assert log.write(b'{"type": "accept", "subject_id": "LATE"}')
    log.close()
    assert [json.loads(line)["subject_id"] for line in log_path.read_text().splitlines()] == ["LATE"]
    assert "NEW" in (tmp_path / f"events.jsonl.{date.today().isoformat()}").read_text()


def test_subscriber_jsonl_files_rotate_the_same_way(tmp_path):
    path = _aged(tmp_path / "gate-a1.jsonl", 3)
    expired = _aged(tmp_path / f"gate-a1.jsonl.{(date.today() - timedelta(days=9)).isoformat()}", 9)
    deliver = jsonl_hook(path, keep_days=7)
    deliver({"type": "accept", "subject_id": "P1"})
    assert not expired.exists()
    assert (tmp_path / f"gate-a1.jsonl.{(date.today() - timedelta(days=3)).isoformat()}").exists()
    assert json.loads(path.read_text())["subject_id"] == "P1"
