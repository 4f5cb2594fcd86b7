"""At-least-once to the gates: a subscriber that was down fetches what it missed, each event is handed on
once, and a verifier restart inside the heartbeat window is still told to the gate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiosk.tools.scenes import Walk
from tests.pipeline_helpers import (
    Events,
    audit,
    kiosk,
    make_video,
    people,
    read_stderr_until,
    stop,
    write_config,
)
from tests.waiting import wait_until


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class RejectingGate:
    """Gate A1 under a real verifier, capture and jsonl subscriber (`out`): someone not enrolled walks up, then
    nobody for a second, over and over: a reject every 2.4 s. `events` is this test's own subscriber."""

    config: Path
    out: Path
    verifier: subprocess.Popen
    sub: subprocess.Popen
    events: Events
    capture: subprocess.Popen | None = None
    sub_err: str = ""

    def restart_verifier(self) -> None:
        self.verifier.wait(10)
        self.verifier = kiosk(self.config, "verify")


@contextmanager
def rejecting_gate(tmp_path, engine, photos, interval_s: float) -> Iterator[RejectingGate]:
    """Started, with one reject handed to the subscriber's hook; everything stopped on leaving."""
    crops = people(engine, photos)
    make_video(tmp_path / "walk.avi", [Walk(crops["parker"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "walk.avi", "realtime": True, "loop": True}],
        heartbeat={"interval_s": interval_s, "misses": 20},
    )
    out = tmp_path / "gate-a1.jsonl"
    gate = RejectingGate(
        config, out, kiosk(config, "verify"), _subscriber(config, out), Events(config, ("event.", "health.verifier"))
    )
    try:
        assert gate.events.wait_for(lambda ev: ev.health, 30)
        gate.capture = kiosk(config, "capture", "--camera", "cam-a1")
        wait_until(
            lambda: any(e["type"] == "reject" for e in _jsonl(out)), 30, "a reject handed to the hook", every=0.2
        )
        yield gate
    finally:
        gate.events.close()
        if gate.capture is not None:
            stop(gate.capture)
        _, gate.sub_err = stop(gate.sub)
        stop(gate.verifier)


def _handed_ids(out: Path) -> set[str]:
    """The decisions the subscriber's hook has written."""
    return {e["event_id"] for e in _jsonl(out) if e["type"] in ("accept", "reject")}


def _heard_ids(events: Events) -> set[str]:
    """The decisions this test's own subscriber has heard."""
    return {e.event_id for e in events.events if e.type in ("accept", "reject")}


def _subscriber(config: Path, out: Path) -> subprocess.Popen:
    return kiosk(config, "subscribe", "--gate", "A1", "--jsonl", str(out), "--name", "gate-a1", quiet=False)


@pytest.mark.slow  # two restarts under a running gate
def test_a_restarted_subscriber_misses_no_event_and_a_quick_verifier_restart_is_seen(tmp_path, engine, photos):
    with rejecting_gate(tmp_path, engine, photos, interval_s=0.5) as gate:
        events = gate.events
        assert events.wait_for(lambda ev: ev.events, 10)  # heard here too (the hook has it)
        os.killpg(gate.sub.pid, signal.SIGKILL)  # the subscriber dies; decisions go on without it
        gate.sub.wait(10)
        missed_from = len(events.events)
        assert events.wait_for(lambda ev: len(ev.events) >= missed_from + 2, 20)
        gate.sub = _subscriber(gate.config, gate.out)
        # Back, it has fetched what it missed (and so heard this verifier: its restart will be news).
        assert events.wait_for(lambda ev: _heard_ids(ev) <= _handed_ids(gate.out), 30)
        # The verifier restarts faster than heartbeat.misses x interval (10 s): no heartbeat is missed.
        pid, old_boots = events.health[-1]["pid"], {e.boot_id for e in events.events}
        os.kill(pid, signal.SIGKILL)
        gate.restart_verifier()
        assert events.wait_for(lambda ev: ev.health and ev.health[-1]["pid"] != pid, 30)

        def restart_told_and_handed_on(ev) -> bool:  # the gate heard the restart, then the new process's decisions
            states = [(e["type"], e["reason"]) for e in _jsonl(gate.out) if e["type"].startswith("verifier_")]
            return (
                ("verifier_down", "the verifier restarted (new boot id)") in states
                and states[-1][0] == "verifier_up"
                and any(e.boot_id not in old_boots for e in ev.events)
                and _heard_ids(ev) <= _handed_ids(gate.out)
            )

        assert events.wait_for(restart_told_and_handed_on, 30)
    config, out, sub_err = gate.config, gate.out, gate.sub_err
    handed = _jsonl(out)
    decisions = [e["event_id"] for e in handed if e["type"] in ("accept", "reject")]
    # At least once: the one event a hook had written when the subscriber was killed, before its position
    # was saved, may come twice; nothing else does.
    assert len(decisions) - len(set(decisions)) <= 1
    logged = [e["event_id"] for e in audit(config) if e["gate_id"] == "A1"]
    missing = [i for i in logged if i not in decisions]
    assert not missing or missing == logged[-len(missing) :] and len(missing) <= 1, missing  # at most the last one
    assert set(logged[:-1]) <= set(decisions) and len(logged) >= 4
    states = [(e["type"], e["reason"]) for e in handed if e["type"].startswith("verifier_")]
    assert ("verifier_down", "the verifier restarted (new boot id)") in states
    assert states[-1][0] == "verifier_up", (states, sub_err[-3000:])


@pytest.mark.slow  # a restart under a running gate
def test_a_restart_is_told_to_the_gate_before_any_decision_of_the_new_process(tmp_path, engine, photos):
    """The new verifier's first decision can reach the subscriber before its first heartbeat: the subscription
    comes back after the restart, and PUB drops what it sent before (here the subscriber is held with SIGSTOP
    across the restart, and heartbeats are 10 s apart while a decision comes every 2.4 s). A gate that follows the
    README closes on `verifier_down`, so the restart's `verifier_down` and `verifier_up` must come first."""
    with rejecting_gate(tmp_path, engine, photos, interval_s=10.0) as gate:
        out = gate.out
        first_boot = _jsonl(out)[-1]["boot_id"]
        assert first_boot
        pid = gate.events.health[-1]["pid"]
        os.kill(gate.sub.pid, signal.SIGSTOP)
        os.kill(pid, signal.SIGKILL)
        gate.restart_verifier()
        # The new process decides (heard here) while the subscriber is held: its first heartbeat is gone for it.
        assert gate.events.wait_for(lambda ev: any(e.boot_id not in (None, first_boot) for e in ev.events), 60)
        os.kill(gate.sub.pid, signal.SIGCONT)
        wait_until(
            lambda: any(
                e.get("boot_id") not in (None, first_boot) for e in _jsonl(out) if e["type"] in ("accept", "reject")
            ),
            30,
            "a decision of the new process handed to the hook",
            every=0.2,
        )
    sub_err = gate.sub_err
    handed = _jsonl(out)
    new = [i for i, e in enumerate(handed) if e["type"] in ("accept", "reject") and e["boot_id"] != first_boot]
    assert new, sub_err[-3000:]
    before = [(e["type"], e["reason"]) for e in handed[: new[0]]]
    assert ("verifier_down", "the verifier restarted (new boot id)") in before, (before, sub_err[-3000:])
    assert before[-1] == ("verifier_up", "the verifier is back after a restart"), (before, sub_err[-3000:])


def test_a_subscriber_that_joins_late_gets_the_events_of_a_verifier_that_started_after_it(tmp_path, engine, photos):
    """The slow join `kiosk run` risks: the subscriber starts first, but its connection comes up only after the
    verifier has decided (here: the subscriber is stopped with SIGSTOP until then). It has no position yet, so
    no gap to see; the verifier's heartbeat says it booted after the subscriber started, so the subscriber
    fetches that boot's events from the start."""
    crops = people(engine, photos)
    make_video(tmp_path / "walk.avi", [Walk(crops["parker"], start=0, frames=36, w0=80, w1=170)], seconds=1.5)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "walk.avi", "realtime": False}],
        heartbeat={"interval_s": 0.5, "misses": 20},
    )
    out = tmp_path / "gate-a1.jsonl"
    sub = kiosk(config, "subscribe", "--gate", "A1", "--jsonl", str(out), "--name", "gate-a1", quiet=False)
    verifier = capture = None
    events = None
    try:
        read_stderr_until(sub, "subscriber gate-a1:", 30)  # constructed: it is running
        os.kill(sub.pid, signal.SIGSTOP)
        verifier = kiosk(config, "verify")
        events = Events(config, ("event.", "health.verifier"))
        assert events.wait_for(lambda ev: ev.health, 30)
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert capture.wait(60) == 0
        assert events.wait_for(lambda ev: ev.events, 20)
        decided = [e.event_id for e in events.events]
        os.kill(sub.pid, signal.SIGCONT)
        wait_until(lambda: _handed_ids(out) >= set(decided), 20, "the decisions handed to the hook", every=0.2)
        assert [e["event_id"] for e in _jsonl(out) if e["type"] in ("accept", "reject")] == decided
    finally:
        if events is not None:
            events.close()
        os.kill(sub.pid, signal.SIGCONT)
        stop(sub)
        if verifier is not None:
            stop(verifier)
