"""The typed status and heartbeat (kiosk.messaging.status): a real verifier's JSON reads and writes back the same,
byte for byte, in a healthy and a degraded state; malformed input never crashes a reader."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kiosk.config import load_config
from kiosk.messaging.status import (
    GalleryStatus,
    GateHeartbeat,
    Quantiles,
    StatusError,
    StatusReply,
    VerifierHeartbeat,
    VerifierStatus,
    heartbeat_from_json,
    heartbeat_parts,
    own,
)
from kiosk.messaging.transport import ask_verifier
from tests.pipeline_helpers import Events, write_config
from tests.sealing_helpers import sealed_gallery

DIM = 8
MODEL = "stub-model"


def _stub_engine() -> SimpleNamespace:
    """What the verifier asks of its engine when no frame arrives: no model is loaded, so the test is fast."""
    return SimpleNamespace(
        providers=["CPUExecutionProvider"],
        provider_note="stub engine",
        model_id=MODEL,
        dim=DIM,
        pad=None,
        detector=None,
        recognizer=None,
    )


def _same(value, data: dict) -> None:
    """`value.to_json()` is `data`, keys in the same order and of the same types (the JSON text is the same);
    a heartbeat as heard also has the wire's envelope, `v` (encode_json adds it to the body it is given)."""
    assert value.problems == ()
    assert json.dumps(value.to_json()) == json.dumps({k: v for k, v in data.items() if k != "v"})


@pytest.fixture
def degraded_site(tmp_path: Path) -> Path:
    return make_degraded_site(tmp_path)


def make_degraded_site(tmp_path: Path) -> Path:
    """A site with two gates whose gallery holds two subjects with swapped sealed templates (they do not open)."""
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": 0}, {"id": "cam-b2", "gate": "B2", "source": 0}],
        heartbeat={"interval_s": 0.1},
        gallery={"path": "gallery.db", "stale_grace_s": 30.0},
    )
    rng = np.random.default_rng(7)
    with sealed_gallery(tmp_path / "gallery.db") as g:
        for sid in ("YAO", "DUNCAN", "PARKER"):
            emb = rng.normal(size=(1, DIM)).astype(np.float32)
            g.enroll(sid, sid.title(), emb / np.linalg.norm(emb), MODEL)
    db = sqlite3.connect(tmp_path / "gallery.db", isolation_level=None)
    (duncan,) = db.execute("SELECT embedding FROM templates WHERE subject_id = 'DUNCAN'").fetchone()
    (parker,) = db.execute("SELECT embedding FROM templates WHERE subject_id = 'PARKER'").fetchone()
    db.execute("UPDATE templates SET embedding = ? WHERE subject_id = 'DUNCAN'", (parker,))
    db.execute("UPDATE templates SET embedding = ? WHERE subject_id = 'PARKER'", (duncan,))
    db.close()
    return config


def test_a_real_verifiers_status_and_heartbeat_read_and_write_back_the_same(degraded_site: Path):
    """In process, the real Verifier: its status (and the status reply a key gets) and both heartbeat parts
    round-trip exactly, with the gallery's unreadable templates and then a stale gallery (the optional keys)."""
    from kiosk.services.verifier import Verifier

    cfg = load_config(degraded_site)
    verifier = Verifier(cfg, engine=_stub_engine())  # type: ignore[arg-type]
    events = Events(degraded_site, ("health.verifier", "health.gate."))
    try:

        def pump(until: Callable[[], bool], timeout: float = 10.0) -> None:
            end = time.monotonic() + timeout
            while not until():
                assert time.monotonic() < end, "the verifier did not get there"
                verifier.step(timeout_ms=10)
                events.poll(0.02)

        def ask_status() -> tuple[dict, dict]:
            """The status reply (asked with the tools key, which sees every id) and the status in it."""
            replies: list = []
            asker = threading.Thread(
                target=lambda: replies.append(ask_verifier(cfg, {"cmd": "status"}, role="test", timeout_ms=10_000))
            )
            asker.start()
            pump(lambda: bool(replies))  # the verifier answers between its steps
            asker.join()
            (reply,) = replies
            assert reply["ok"] and reply["caller"]["passenger_ids"] == "*"
            return reply, {k: v for k, v in reply.items() if k not in ("ok", "passenger_ids_hidden", "caller")}

        pump(lambda: bool(events.health) and set(events.gate_health) == {"A1", "B2"})
        reply, status = ask_status()
        assert status["gallery"]["unreadable_subjects"] == ["DUNCAN", "PARKER"] and status["claims"] == {}
        _same(VerifierStatus.from_json(status, strict=True), status)
        assert json.dumps(StatusReply.from_json(reply).to_json()) == json.dumps(reply)
        beat = events.health[-1]
        assert beat["gallery"]["unreadable_subject_count"] == 2
        _same(VerifierHeartbeat.from_json(beat, strict=True), beat)
        for gate, parts in events.gate_health.items():
            _same(GateHeartbeat.from_json(parts[-1], strict=True), parts[-1])
            assert heartbeat_from_json(parts[-1], gate) == GateHeartbeat.from_json(parts[-1])

        # The gallery file is deleted under it: stale, with what is refused and what to run.
        for name in ("gallery.db", "gallery.db-wal", "gallery.db-shm"):
            (degraded_site.parent / name).unlink(missing_ok=True)
        pump(lambda: "refusing" in events.health[-1]["gallery"], timeout=15)
        beat = events.health[-1]
        assert beat["status"] == "degraded" and beat["gallery"]["stale"] and "stale_for_s" in beat["gallery"]
        _same(VerifierHeartbeat.from_json(beat, strict=True), beat)
        reply, status = ask_status()
        assert json.dumps(StatusReply.from_json(reply).to_json()) == json.dumps(reply)
        assert list(status["gallery"])[-4:] == ["stale_for_s", "accepts_from_memory_s", "refusing", "action"]
        typed = VerifierStatus.from_json(status, strict=True)
        _same(typed, status)

        # The split the verifier makes, from the typed status, is what it sends.
        parts = heartbeat_parts(
            typed, boot_id="b", booted_at=1.0, sent_at=2.0, event_seq={"A1": 3}, unreadable_subjects=2
        )
        expected = {k: v for k, v in status.items() if k not in ("cameras", "gates", "claims")}
        gallery = dict(status["gallery"])
        del gallery["unreadable_subjects"]
        expected.update(gallery={**gallery, "unreadable_subject_count": 2}, boot_id="b", booted_at=1.0, sent_at=2.0)
        assert json.dumps(parts.verifier.to_json()) == json.dumps(expected)
        assert list(parts.gates) == ["A1", "B2"]
        a1 = parts.gates["A1"].to_json()
        assert json.dumps(a1) == json.dumps(
            {
                "component": "gate",
                "gate_id": "A1",
                "status": status["status"],
                "pid": status["pid"],
                "boot_id": "b",
                "booted_at": 1.0,
                "sent_at": 2.0,
                "event_seq": {"A1": 3},
                "gate": status["gates"]["A1"],
                "cameras": {"cam-a1": status["cameras"]["cam-a1"]},
            }
        )
        assert parts.gates["B2"].event_seq == {}
    finally:
        events.close()
        verifier.close()


# -- malformed input: a clear error, or a default and a note; never a crash ------------------------------------


@pytest.mark.parametrize("data", [None, [], "ok", 3, b"{}"])
def test_something_that_is_not_an_object_is_refused_clearly(data):
    for read in (VerifierStatus.from_json, VerifierHeartbeat.from_json, GateHeartbeat.from_json, heartbeat_from_json):
        with pytest.raises(StatusError, match="expected a JSON object"):
            read(data)


def test_a_field_of_the_wrong_type_takes_its_default_and_is_named():
    beat = VerifierHeartbeat.from_json(
        {
            "status": 7,
            "fps": "fast",
            "pid": True,
            "providers": ["CPU", 3],
            "frames_refused": {"seq": 2, "future": "x"},
            "gallery": {"subjects": "many", "stale": "yes", "unreadable_subjects": "P1", "revision": 4},
            "audit": [],
            "frame_latency_ms": {"p50": 1.0},
            "stages_ms": {"detect": {"p50": 1, "p99": 2, "n": 3}, "embed": "slow"},
            "boot_id": 12,
        }
    )
    assert (beat.status, beat.fps, beat.pid, beat.providers, beat.boot_id) == ("unknown", 0.0, 0, (), None)
    assert beat.frames_refused == {"seq": 2}
    assert beat.gallery == GalleryStatus(subjects=0, templates=0, stale=False, error="", revision=4)
    assert beat.audit is None and beat.frame_latency_ms is None
    assert beat.stages_ms["detect"] is not None and beat.stages_ms["embed"] is None
    named = " ".join(beat.problems)
    for field in ("status", "fps", "pid", "providers", "frames_refused", "gallery.subjects", "gallery.stale"):
        assert f"health.verifier.{field}:" in named
    assert "health.verifier.audit" in named and "stages_ms.embed" in named and "frame_latency_ms" in named


def test_a_peer_of_another_version_may_lack_or_add_fields():
    older = VerifierStatus.from_json({"status": "ok", "cameras": {"cam-a1": {"gate_id": "A1"}}, "new": {"x": 1}})
    assert older.problems == () and older.gallery is None and older.cameras["cam-a1"].state == "unknown"
    assert "new" not in older.to_json() and older.to_json()["gallery"] == {}
    part = GateHeartbeat.from_json({"gate_id": "A1", "gate": {}, "cameras": {"c": "down", "d": {"state": "up"}}})
    assert part.gate is None and part.to_json()["gate"] == {} and list(part.cameras) == ["d"]
    assert part.problems == ("health.gate.cameras.c: expected an object, got str",)


def test_the_wakes_and_the_claims_keep_their_shape():
    cam = {"gate_id": "A1", "wakes": [[5, 12.5], [9, 3]]}
    assert VerifierStatus.from_json({"cameras": {"c": cam}}).cameras["c"].wakes == ((5, 12.5), (9, 3))
    bad = VerifierStatus.from_json({"cameras": {"c": {"wakes": [[5]]}}, "claims": {"A1": None, "B2": 4}})
    assert bad.cameras["c"].wakes == () and bad.claims == {"A1": None}
    assert any("wakes" in p for p in bad.problems) and any("claims" in p for p in bad.problems)


def test_the_heartbeat_gallery_counts_every_unreadable_subject_not_only_the_listed_ones():
    listed = tuple(f"P{i:02}" for i in range(20))
    gallery = GalleryStatus(3, 5, False, "", 1, unreadable_templates=30, unreadable_subjects=listed)
    beat = gallery.for_heartbeat(25).to_json()
    assert beat["unreadable_subject_count"] == 25 and "unreadable_subjects" not in beat
    assert gallery.for_heartbeat().unreadable_subject_count == 20
    clean = GalleryStatus(3, 5, False, "", 1)
    assert clean.for_heartbeat(0) is clean


def test_this_process_own_values_are_read_strictly():
    """A part the verifier's own modules made (own) or a test's value (strict) may lack nothing: a drift between
    a module and this schema fails loudly instead of sending defaults."""
    assert own(Quantiles.read, {"p50": 1.0, "p99": 2.0, "n": 3.0}, "frame_latency_ms") == Quantiles(1.0, 2.0, 3.0)
    assert own(Quantiles.read, {}, "frame_latency_ms") is None
    with pytest.raises(StatusError, match="gallery.templates: missing"):
        own(GalleryStatus.read, {"subjects": 1, "stale": False, "error": "", "revision": 2}, "gallery")
    with pytest.raises(StatusError, match="gallery.stale: expected true or false"):
        own(GalleryStatus.read, {"subjects": 1, "templates": 1, "stale": "no", "error": "", "revision": 2}, "gallery")
    with pytest.raises(StatusError, match=r"status.stages_ms: missing; .* \(and 23 more\)"):
        VerifierStatus.from_json({}, strict=True)
    optional = {"subjects": 1, "templates": 1, "stale": False, "error": "", "revision": 2}
    assert own(GalleryStatus.read, optional, "gallery").to_json() == optional  # the optional keys may be absent


def test_readers_take_a_malformed_heartbeat_without_falling_over():
    """The console and the MQTT hook read an odd heartbeat with defaults: no exception, nothing made up."""
    from kiosk.console.state import ConsoleState
    from kiosk.services.mqtt_hook import MqttHook

    state = ConsoleState({"A1": ["cam-a1"]}, crops=1, heartbeat_timeout_s=5)
    state.add_heartbeat({"status": "ok", "fps": "fast", "gallery": 3, "frame_latency_ms": [1]})
    odd_part = {"gate_id": "A1", "gate": {"flight_id": 7}, "cameras": {"cam-a1": {"state": 1, "processed": "x"}}}
    state.add_heartbeat(odd_part, "A1")
    view = state.status()
    assert view["verifier"]["fps"] == 0.0 and view["verifier"]["gallery"]["subjects"] is None
    assert view["gates"][0]["cameras"][0]["state"] == "unknown" and view["gates"][0]["flight_id"] is None

    sent: list[tuple[str, bytes]] = []
    hook = MqttHook(SimpleNamespace(set_retained=lambda t, p: sent.append((t, p))), "k", ["A1"], 10.0)
    hook.observe({"status": ["ok"], "gates": "all", "cameras": {"cam-a1": {"gate_id": "A1", "state": "down"}}})
    hook.observe(odd_part)
    # The odd part's camera names no gate of this hook: what the first one said stands.
    assert dict(sent)["k/health/cameras/cam-a1"] == b'{"status":"down"}'
    assert dict(sent)["k/gates/A1/state"] == b'{"gate_id":"A1","flight_id":null,"verifier":"up","last_decision":null}'
    assert dict(sent)["k/health/verifier"] == b'{"status":"unknown"}' and dict(sent)["k/available"] == b"online"


def test_the_console_counts_the_flights_the_gates_parts_say_they_board():
    from kiosk.console.state import ConsoleState

    state = ConsoleState({"A1": ["cam-a1"], "B2": ["cam-b2"]}, crops=1, heartbeat_timeout_s=5)
    state.add_heartbeat({"status": "ok"})  # the verifier's own part names no gate
    assert state.boarding_flights() == set()
    state.add_heartbeat({"gate_id": "A1", "gate": {"flight_id": "LH123", "processing": True}}, "A1")
    state.add_heartbeat({"gate_id": "B2", "gate": {"flight_id": None, "processing": False}}, "B2")
    assert state.boarding_flights() == {"LH123"}


def test_a_flood_of_odd_fields_is_told_by_its_first_ones():
    status = VerifierStatus.from_json({"cameras": {str(i): i for i in range(1000)}})
    assert status.cameras == {} and len(status.problems) == 50


def test_a_redacted_reply_reads_and_writes_back_the_same():
    """What a key that serves one gate gets: no unreadable subjects (their count stays), claims hidden, its
    scope as lists."""
    gallery = {"subjects": 1, "templates": 1, "stale": False, "error": "", "revision": 3, "unreadable_templates": 2}
    caller = {"keys": ["reader-a1"], "role": "operator", "claims": ["A1"], "passenger_ids": []}
    reply = {"ok": True, "status": "degraded", "gallery": gallery, "claims": {"A1": None}}
    reply |= {"passenger_ids_hidden": True, "caller": caller}
    typed = StatusReply.from_json(reply)
    assert typed.caller is not None and typed.caller.claims == ("A1",) and typed.caller.passenger_ids == ()
    assert typed.status.gallery is not None and typed.status.gallery.unreadable_subjects is None
    out = typed.to_json()
    assert {k: out[k] for k in reply} == reply and list(out)[-2:] == ["passenger_ids_hidden", "caller"]
