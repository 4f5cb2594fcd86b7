"""Keys that name what they serve, on the events socket (issue 36, item 1): a gate's listener key hears its own
gates' decisions, history and heartbeat; a capture key hears no decision; idle hints reach only the camera's own
capture key. Real verifier, real captures, real CurveZMQ SUB sockets; the pure rules are checked first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml
import zmq

from kiosk.config import config_from_mapping, load_config
from kiosk.errors import ConfigError
from kiosk.messaging.channels import EventChannel
from kiosk.messaging.messages import Event, Heartbeat
from kiosk.messaging.transport import Transport, control_request, free_port, init_keys
from kiosk.services.event_access import HearingScopes
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.pipeline_helpers import Events, kiosk, make_video, people, scrape, stop, write_config
from tests.sealing_helpers import sealed_gallery

# -- the rules, without sockets ---------------------------------------------------------------------------


def _scopes(**security: Any) -> HearingScopes:
    return HearingScopes(
        config_from_mapping(
            {
                "cameras": [
                    {"id": "cam-a1", "gate": "A1", "source": 0, "key": "host-1"},
                    {"id": "cam-b1", "gate": "B1", "source": 0, "key": "host-2"},
                ],
                "security": security,
            }
        )
    )


def test_each_key_hears_what_it_serves():
    scopes = _scopes(listeners=[{"key": "gate-a", "gates": ["A1"]}], operators=[{"key": "reader-b", "gates": ["B1"]}])
    gate_a = scopes.hearer([], ["gate-a"])
    assert scopes.refusal(gate_a, "event.A1") is None and scopes.refusal(gate_a, "health.verifier") is None
    assert scopes.refusal(gate_a, "health.capture.cam-a1") is None
    for topic in ("event.", "event.B1", "health.", "", "idle.cam-a1", "health.capture.cam-b1"):
        assert scopes.refusal(gate_a, topic)[0] == "scope", topic
    assert "B1" in scopes.refusal(gate_a, "event.")[1]  # the log names the gate
    capture = scopes.hearer(["host-1"])
    assert scopes.refusal(capture, "idle.cam-a1") is None and scopes.refusal(capture, "health.verifier") is None
    for topic in ("event.", "event.A1", "idle.", "idle.cam-b1"):
        assert scopes.refusal(capture, topic)[0] == "scope", topic
    tools = scopes.hearer(["client"])
    assert scopes.refusal(tools, "event.") is None and scopes.refusal(tools, "health.") is None
    assert scopes.refusal(tools, "idle.cam-a1")[0] == "scope"  # a camera with its own key: not the tools key's
    assert scopes.refusal(scopes.hearer(["reader-b"]), "event.B1") is None
    assert scopes.refusal(scopes.hearer([], [], ["console"]), "event.") is None  # console.key: every gate
    assert scopes.refusal(scopes.hearer([]), "health.verifier")[0] == "revoked"
    assert scopes.refusal(tools, "event.Z9")[0] == "unknown_topic"


def test_default_single_host_the_shared_key_hears_everything():
    """One `client` key for tools, cameras and `kiosk run`'s subscribers: as before, it hears every topic."""
    scopes = HearingScopes(
        config_from_mapping(
            {"cameras": [{"id": "cam-a1", "gate": "A1", "source": 0}, {"id": "cam-b1", "gate": "B1", "source": 0}]}
        )
    )
    shared = scopes.hearer(["client"], ["client"])
    for topic in ("", "event.", "health.", "idle.", "idle.cam-a1", "event.B1"):
        assert scopes.refusal(shared, topic) is None, topic


def test_a_listener_for_a_gate_that_begins_another_is_a_config_error():
    data = {
        "cameras": [{"id": "a1", "gate": "A1", "source": 0}, {"id": "a10", "gate": "A10", "source": 0}],
        "security": {"listeners": [{"key": "gate-a1", "gates": ["A1"]}]},
    }
    with pytest.raises(
        ConfigError,
        match=r"security.listeners\[0\].gates\[0\]: key 'gate-a1' may hear gate 'A1' "
        r"but not A10",
    ):
        config_from_mapping(data)
    data["security"]["listeners"][0]["gates"] = ["A1", "A10"]
    config_from_mapping(data)
    data["security"]["listeners"][0]["gates"] = ["Z9"]
    with pytest.raises(ConfigError, match=r"security.listeners\[0\].gates\[0\]: expected a gate of cameras"):
        config_from_mapping(data)


def test_a_bad_listener_entry_is_exit_2_naming_the_key(tmp_path):
    config = tmp_path / "k.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cameras": [{"id": "c", "gate": "A1", "source": 0}],
                "security": {"listeners": [{"key": "../x", "gates": ["A1"]}]},
            }
        )
    )
    res = run_cli("kiosk", "-c", str(config), "verify")
    assert res.returncode == 2 and "security.listeners[0].key" in res.stderr and "Traceback" not in res.stderr


# -- a running verifier --------------------------------------------------------------------------------------


class Listener:
    """A plain SUB socket on the events socket with one key, collecting everything it receives."""

    def __init__(self, cfg: Any, key: str, topics: list[str]) -> None:
        self.transport = Transport(cfg, role=f"test {key}", client_key=key)
        # the heartbeat last: once one arrives, the earlier subscriptions have been read by the verifier
        self.sock = self.transport.event_subscriber(topics + ["health.verifier"])
        self.channel = EventChannel(self.sock)
        self.topics: list[bytes] = []
        self.events: list[Event] = []
        self.beats: list[float] = []  # heartbeats' sent_at

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not self.sock.poll(50):
                continue
            parts = self.sock.recv_multipart()
            self.topics.append(parts[0])
            message = self.channel.decode(parts)
            if isinstance(message, Event):
                self.events.append(message)
            elif isinstance(message, Heartbeat):
                self.beats.append(float(message.body.get("sent_at", 0)))

    def wait_beat_after(self, t: float, timeout: float = 15) -> None:
        """Until a heartbeat sent after `t` arrives: what the verifier published before it on this connection
        has arrived too (one connection delivers in order)."""
        end = time.monotonic() + timeout
        while not any(b > t for b in self.beats):
            assert time.monotonic() < end, f"no heartbeat after {t} (got {self.beats[-3:]})"
            self.poll(0.1)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.transport.close()


@dataclass
class Site:
    config: Path
    cfg: Any
    log: Path
    metrics_port: int
    listeners: dict[str, Listener] = field(default_factory=dict)
    tools: Events | None = None
    capture_health: list[dict] = field(default_factory=list)

    def poll_all(self, seconds: float) -> None:
        for listener in self.listeners.values():
            listener.poll(seconds / (len(self.listeners) + 1))
        assert self.tools is not None
        self.tools.poll(seconds / (len(self.listeners) + 1))


LISTENERS = {  # name -> (key, topics)
    "gate_a": ("gate-a", ["event.", "event.B1", "event.A1"]),
    "capture_a": ("cam-host-1", ["event.", "event.A1"]),
    "idle_own": ("cam-host-1", ["idle.cam-idle"]),
    "idle_other_capture": ("cam-host-2", ["idle.", "idle.cam-idle"]),
    "idle_gate_a": ("gate-a", ["idle.", "idle.cam-idle"]),
    "idle_tools": ("client", ["idle.cam-idle"]),
    "gate_health_a": ("gate-a", ["health.gate.", "health.gate.B1", "health.gate.C1", "health.gate.A1"]),
    "gate_health_capture": ("cam-host-2", ["health.gate.", "health.gate.B1"]),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory, engine, photos) -> Iterator[Site]:
    """Gates A1 (camera key cam-host-1) and B1 (cam-host-2), each with Yao walking up (file sources), a live
    camera cam-idle at gate C1 (cam-host-1) watching an empty scene (it gets idle hints), the tools key
    `client`, and a gate controller key `gate-a` (authorized_subscribers/ only) listening to A1."""
    folder = tmp_path_factory.mktemp("events")
    crops = people(engine, photos)
    for name in ("a1", "b1"):
        make_video(folder / f"{name}.avi", [Walk(crops["yao"], start=0, frames=40, w0=80, w1=170)], seconds=1.5)
    make_video(folder / "empty.avi", [], seconds=8)
    port = free_port()
    config = write_config(
        folder,
        [
            {"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": False, "key": "cam-host-1"},
            {"id": "cam-b1", "gate": "B1", "source": "b1.avi", "realtime": False, "key": "cam-host-2"},
            {"id": "cam-idle", "gate": "C1", "source": "empty.avi", "realtime": True, "key": "cam-host-1"},
        ],
        metrics={"port": port},
    )
    data = yaml.safe_load(config.read_text())
    data["security"]["listeners"] = [{"key": "gate-a", "gates": ["A1"]}]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    for name in ("cam-host-1", "cam-host-2"):
        init_keys(folder / "keys", client_name=name)
    init_keys(folder / "keys", client_name="gate-a", role="subscriber")
    with sealed_gallery(folder / "gallery.db") as g:
        big = cv2.resize(crops["yao"], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
        emb = engine.describe(big, engine.detector.detect(big).largest()).faces.embeddings[0]
        g.enroll("YAO", "Yao", emb[None, :], engine.model_id)
    log = folder / "verifier.log"
    with open(log, "w") as err:
        verifier = subprocess.Popen(
            [sys.executable, "-m", "kiosk.cli", "-c", str(config), "verify"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    s = Site(config, load_config(config), log, port)
    captures: list[subprocess.Popen] = []
    try:
        s.tools = Events(config, ("event.", "health."))  # the tools key: every gate, every camera's health
        assert s.tools.wait_for(lambda ev: ev.health, 60), log.read_text()[-3000:]
        s.listeners = {name: Listener(s.cfg, key, topics) for name, (key, topics) in LISTENERS.items()}
        start = time.time()
        for listener in s.listeners.values():  # connected, subscriptions read
            listener.wait_beat_after(start)
        captures = [kiosk(config, "capture", "--camera", cam) for cam in ("cam-a1", "cam-b1", "cam-idle")]
        assert captures[0].wait(60) == 0 and captures[1].wait(60) == 0
        gates = lambda ev: {e.gate_id for e in ev.events if isinstance(e, Event)}  # noqa: E731
        end = time.monotonic() + 30
        while gates(s.tools) != {"A1", "B1"}:
            assert time.monotonic() < end, s.tools.events
            s.poll_all(0.3)
        # the idle camera's capture got hints and held frames back (the idle hold, end to end)
        end = time.monotonic() + 30
        while not any(h.get("camera_id") == "cam-idle" and h.get("held", 0) > 0 for h in s.tools.health):
            assert time.monotonic() < end, [h for h in s.tools.health if h.get("camera_id") == "cam-idle"][-2:]
            s.poll_all(0.3)
        after = time.time()
        for listener in s.listeners.values():  # everything published before now has reached each listener
            listener.wait_beat_after(after)
        yield s
        assert verifier.poll() is None
    finally:
        for listener in s.listeners.values():
            listener.close()
        if s.tools is not None:
            s.tools.close()
        for capture in captures:
            stop(capture)
        if verifier.poll() is None:
            os.killpg(verifier.pid, signal.SIGTERM)
        verifier.wait(15)
    assert "Traceback" not in log.read_text()


def test_a_gate_key_hears_its_gate_and_nothing_of_another(site):
    """gate-a subscribed to `event.`, `event.B1` and `event.A1`: A1's decision only, while the tools key heard
    both gates; the refusals are counted, in the metric, and logged naming the gate."""
    assert {e.gate_id for e in site.tools.events} == {"A1", "B1"}
    heard = site.listeners["gate_a"]
    assert [(e.gate_id, e.type) for e in heard.events] == [("A1", "accept")]
    assert not any(t.startswith(b"event.B1") for t in heard.topics)
    transport = Transport(site.cfg, role="test")
    try:
        status = control_request(transport, {"cmd": "status"}, 5000)
    finally:
        transport.close()
    assert status is not None and status["events_refused"]["scope"] >= 2
    metric = scrape(site.metrics_port)[("kiosk_event_subscriptions_refused_total", (("reason", "scope"),))]
    assert metric == ("counter", status["events_refused"]["scope"])
    text = site.log.read_text()
    assert "subscription to 'event.B1' refused for key 'gate-a'" in text and "gate(s) B1" in text


def test_a_capture_key_receives_no_events(site):
    heard = site.listeners["capture_a"]
    assert heard.events == [] and heard.beats  # connected all along: the heartbeat came
    assert not any(t.startswith(b"event.") for t in heard.topics)


def test_idle_hints_reach_only_the_cameras_own_capture_key(site):
    assert any(t == b"idle.cam-idle" for t in site.listeners["idle_own"].topics)
    for name in ("idle_other_capture", "idle_gate_a", "idle_tools"):
        heard = site.listeners[name]
        assert not any(t.startswith(b"idle.") for t in heard.topics), name
        assert heard.beats, name


def _history(site: Site, key: str, request: dict[str, Any]) -> dict[str, Any]:
    transport = Transport(site.cfg, role=f"test {key}", client_key=key)
    sock = transport.history_client(5000)
    try:
        sock.send_json({"v": 1, "cmd": "events", **request})
        return sock.recv_json()  # type: ignore[no-any-return]
    finally:
        sock.close(linger=0)
        transport.close()


def test_history_gives_a_gate_key_its_gates_events_only(site):
    cursors = {"A1": ["earlier-boot", 0], "B1": ["earlier-boot", 0]}
    tools = _history(site, "client", {"cursors": cursors, "gate_id": None})
    assert {e["gate_id"] for e in tools["events"]} == {"A1", "B1"}  # they are held
    reply = _history(site, "gate-a", {"cursors": cursors, "gate_id": None})
    assert reply["ok"] is True and {e["gate_id"] for e in reply["events"]} == {"A1"}
    assert reply["withheld_gates"] == ["B1"] and "gate-a" in reply["note"]
    assert "B1" not in json.dumps(reply["events"])
    refused = _history(site, "gate-a", {"cursors": cursors, "gate_id": "B1"})
    assert refused["ok"] is False and "gate 'B1'" in refused["error"] and "events" not in refused


def test_the_heartbeat_carries_no_passenger_ids(site):
    """The heartbeat goes to every allow-listed key: no claims, no subject ids."""
    assert site.tools.health and all("claims" not in h for h in site.tools.health if h.get("component") == "verifier")
    assert "YAO" not in json.dumps([h for h in site.tools.health if h.get("component") == "verifier"])


def test_each_gate_s_part_of_the_heartbeat_reaches_only_the_keys_that_hear_that_gate(site):
    """Whether someone is at a gate now (its cameras' state, tracks, idle skips; its event count) is that gate's
    part of the heartbeat (`health.gate.<gate>`): gate-a hears A1's and not B1's or C1's; a capture key hears
    none; the verifier's own heartbeat, which every key hears, carries nothing per gate or camera."""
    assert set(site.tools.gate_health) == {"A1", "B1", "C1"}
    c1 = site.tools.gate_health["C1"][-1]
    assert set(c1["cameras"]) == {"cam-idle"} and {"state", "tracks", "idle_skipped"} <= set(c1["cameras"]["cam-idle"])
    # the tools' listener has read a heartbeat sent after A1's decision
    assert site.tools.wait_for(lambda ev: ev.gate_health["A1"][-1]["event_seq"] == {"A1": 1}, 15)
    own = [h for h in site.tools.health if h.get("component") == "verifier"]
    assert own and not any({"cameras", "gates", "event_seq", "claims"} & set(h) for h in own)
    gate_a = site.listeners["gate_health_a"]
    assert b"health.gate.A1" in gate_a.topics
    assert not any(t.startswith((b"health.gate.B1", b"health.gate.C1")) for t in gate_a.topics)
    capture = site.listeners["gate_health_capture"]
    assert capture.beats and not any(t.startswith(b"health.gate.") for t in capture.topics)


def test_a_revoked_key_loses_its_live_subscriptions(site):
    """Deleting gate-a's key file drops its applied subscriptions within seconds (the events socket is bound
    again; every other peer resubscribes), without a verifier restart."""
    gate_a = Listener(site.cfg, "gate-a", ["event.A1"])
    other = site.listeners["capture_a"]
    try:
        gate_a.wait_beat_after(time.time())
        (site.config.parent / "keys" / "authorized_subscribers" / "gate-a.key").unlink()
        revoked_at = time.time()
        end = time.monotonic() + 20
        while "rebinding the events socket" not in site.log.read_text():
            assert time.monotonic() < end
            gate_a.poll(0.2)
        other.wait_beat_after(time.time())  # the others are back ...
        site.tools.poll(1)
        gate_a.poll(3)
        assert not any(b > revoked_at + 2 for b in gate_a.beats)  # ... the revoked key is not
    finally:
        gate_a.close()


def test_kiosk_subscribe_with_a_gate_key_subscribes_to_its_gates():
    """`kiosk subscribe` on a gate host (client_key: its listener key) asks for each of its gates, since the
    verifier refuses `event.` from that key; the tools key keeps `event.`."""
    from kiosk.services.subscriber import own_gates

    data = {
        "cameras": [
            {"id": "cam-a1", "gate": "A1", "source": 0},
            {"id": "cam-a2", "gate": "A2", "source": 0},
            {"id": "cam-b1", "gate": "B1", "source": 0},
        ],
        "security": {"listeners": [{"key": "gate-a", "gates": ["A1", "A2"]}]},
    }
    assert own_gates(config_from_mapping(data)) is None  # the tools key
    data["security"]["client_key"] = "gate-a"
    assert own_gates(config_from_mapping(data)) == {"A1", "A2"}


def test_subscriptions_read_after_a_non_subscription_message_are_not_applied():
    """An XSUB peer can send a plain message up the events socket; libzmq then pairs the next subscriptions with
    the wrong connection, so they are refused until the queue is empty, and applied again after. (A socket whose
    queue the test fills: with a real one, whether two messages are queued together is up to timing.)"""
    from kiosk.services.event_access import EventPublisher
    from kiosk.services.metrics import VerifierMetrics

    class Frame:
        def __init__(self, data: bytes) -> None:
            self.bytes = data

        def get(self, name: str) -> str:
            return "tools-public-key"

    class Socket:
        def __init__(self) -> None:
            self.queue: list[Frame] = []
            self.applied: list[tuple[int, bytes]] = []

        def recv(self, flags: int = 0, copy: bool = True) -> Frame:
            if not self.queue:
                raise zmq.Again()
            return self.queue.pop(0)

        def setsockopt(self, option: int, value: bytes) -> None:
            self.applied.append((option, value))

    cfg = config_from_mapping({"cameras": [{"id": "cam-a1", "gate": "A1", "source": 0}]})
    sock = Socket()
    events = EventPublisher(
        sock,
        lambda: sock,
        HearingScopes(cfg),
        None,  # type: ignore[arg-type]
        VerifierMetrics({"cam-a1": "A1"}),
    )
    events.hearer = lambda sender: HearingScopes(cfg).hearer(["client"])  # type: ignore[method-assign]
    sock.queue = [Frame(b"not a subscription"), Frame(b"\x01event.A1"), Frame(b"\x01health.verifier")]
    events.poll()
    assert sock.applied == [] and events.counts["unpaired"] == 3
    sock.queue = [Frame(b"\x01event.A1")]  # the queue was empty in between: in step again
    events.poll()
    assert sock.applied == [(zmq.SUBSCRIBE, b"event.A1")] and events.counts["unpaired"] == 3
