"""Gate side: hooks, heartbeat fail-closed, CurveZMQ allow-list, the reference gate controller."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
import zmq.auth

from kiosk.config import load_config
from kiosk.messaging.transport import Transport, control_request, free_port, init_keys
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.pipeline_helpers import (
    Events,
    audit,
    kiosk,
    make_video,
    people,
    read_stderr_until,
    scrape,
    stop,
    write_config,
)
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]


def load_gate_controller():
    spec = importlib.util.spec_from_file_location("gate_controller", REPO / "scripts" / "gate_controller.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_gate_controller_state_machine():
    gc = load_gate_controller().GateController("A1", open_seconds=5, max_age_s=2, heartbeat_timeout_s=3)
    t = 1000.0
    accept = {"type": "accept", "gate_id": "A1", "decided_at": t, "captured_at": t - 0.05, "event_id": "e1"}
    assert gc.handle(accept, t) == "ignore" and not gc.is_open(t)  # closed until the verifier is heard
    gc.heartbeat(t)
    assert gc.handle({**accept, "gate_id": "A2"}, t) == "ignore" and not gc.is_open(t)  # another gate
    assert gc.handle(accept, t + 0.1) == "open" and gc.is_open(t + 0.2)
    assert not gc.is_open(t + 5.2)  # open for open_seconds only
    gc.heartbeat(t + 6)
    assert gc.handle({**accept, "decided_at": t + 6 - 2.5}, t + 6) == "ignore" and not gc.is_open(t + 6)  # stale
    # Decided just now, but from a frame captured 4.8 s ago (a stalled verifier): not opened.
    assert gc.handle({**accept, "decided_at": t + 6, "captured_at": t + 6 - 4.8}, t + 6) == "ignore"
    assert (
        gc.handle({k: v for k, v in accept.items() if k != "captured_at"} | {"decided_at": t + 6}, t + 6) == "ignore"
    )  # no capture time: cannot tell, stays closed
    assert gc.handle({**accept, "decided_at": t + 6, "captured_at": t + 6 - 0.1}, t + 6) == "open"
    assert gc.handle({"type": "reject", "gate_id": "A1", "reason": "no_match"}, t + 6.5) == "close"
    assert not gc.is_open(t + 6.6)
    assert gc.handle({**accept, "decided_at": t + 7, "captured_at": t + 7}, t + 7) == "open"
    assert gc.handle({"type": "verifier_down", "gate_id": "*"}, t + 7.1) == "close" and not gc.is_open(t + 7.2)
    assert gc.handle({**accept, "decided_at": t + 7.3, "captured_at": t + 7.3}, t + 7.3) == "ignore"  # while down
    gc.handle({"type": "verifier_up", "gate_id": "*"}, t + 8)
    assert gc.handle({**accept, "decided_at": t + 8, "captured_at": t + 8}, t + 8) == "open"
    assert not gc.is_open(t + 8 + 3.5)  # heartbeats stopped: fail closed even inside open_seconds


def test_keys_init_and_curve_off_warning(tmp_path):
    res = run_cli("kiosk", "keys", "init", str(tmp_path / "keys"), "--client", "gate-a1")
    assert res.returncode == 0
    for name in (
        "server.key",
        "server.key_secret",
        "gate-a1.key",
        "gate-a1.key_secret",
        "authorized_clients/gate-a1.key",
        "authorized_subscribers/gate-a1.key",
    ):
        assert (tmp_path / "keys" / name).is_file(), name
    res = run_cli("kiosk", "keys", "init", str(tmp_path / "keys"), "--client", "gate-b1", "--role", "subscriber")
    assert res.returncode == 0
    assert (tmp_path / "keys" / "authorized_subscribers" / "gate-b1.key").is_file()
    assert not (tmp_path / "keys" / "authorized_clients" / "gate-b1.key").exists()
    res = run_cli("kiosk", "keys", "init", str(tmp_path / "keys" / "server.key"))
    assert res.returncode == 2 and "cannot use" in res.stderr and "Traceback" not in res.stderr
    assert stat.S_IMODE((tmp_path / "keys" / "server.key_secret").stat().st_mode) == 0o600
    again = run_cli("kiosk", "keys", "init", str(tmp_path / "keys"), "--client", "gate-a1")
    assert "already present" in again.stdout
    config = write_config(tmp_path, [{"id": "c", "gate": "A1", "source": 0}], security={"curve": False})
    verify = kiosk(config, "verify", quiet=False)
    try:
        read_stderr_until(verify, "CurveZMQ is OFF", 60)  # the operator is warned as the verifier starts
    finally:
        stop(verify)


class Hooked(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hooked.received.append((time.monotonic(), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class HookedGate:
    """A running gate site for the hook, allow-list and heartbeat tests: a verifier (heartbeat every 0.25 s) with
    gates A1 (a replayed video: YAO accepted, Parker rejected) and X1; `kiosk subscribe` for A1 with a webhook, a
    JSONL file, and three exec hooks (one hangs); listeners with this site's key, an intruder's key (in no
    allow-list) and a gate's subscriber-only key (given both gates to hear); A1's video decided once."""

    def __init__(self, folder: Path, engine, photos) -> None:
        crops = people(engine, photos)
        make_video(
            folder / "a1.avi",
            [
                Walk(crops["yao"], start=5, frames=60, w0=60, w1=160),
                Walk(crops["parker"], start=100, frames=60, w0=60, w1=160),
            ],
            seconds=6,
        )
        self.folder = folder
        self.config = write_config(
            folder,
            [
                {"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": False},
                {"id": "cam-x", "gate": "X1", "source": "a1.avi", "realtime": True},
            ],
            heartbeat={"interval_s": 0.25, "misses": 3},
            hooks={"exec_timeout_s": 20},
        )
        res = run_cli("kiosk-enroll", "-q", "-c", str(self.config), "add", "--id", "YAO", str(photos["yaoming.jpg"]))
        assert res.returncode == 0
        # An intruder: a key pair that is in no allow-list. A gate: allowed to subscribe only, and given both gates
        # to hear (security.listeners: without it, a subscriber key hears the verifier's own heartbeat and nothing
        # else).
        zmq.auth.create_certificates(str(folder / "keys"), "intruder")
        init_keys(folder / "keys", client_name="gate-b2", role="subscriber")
        data = yaml.safe_load(self.config.read_text())
        data["security"]["listeners"] = [{"key": "gate-b2", "gates": ["A1", "X1"]}]
        self.config.write_text(yaml.safe_dump(data, sort_keys=False))
        self.intruder_cfg, self.gate_cfg = self._config_with_key("intruder"), self._config_with_key("gate-b2")
        Hooked.received = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hooked)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/gate"
        self.verifier = kiosk(self.config, "verify")
        self.watcher = Events(self.config)
        self.spy = Events(self.intruder_cfg)
        self.gate_listener = Events(self.gate_cfg)
        self.transport = Transport(load_config(self.config), role="test")
        self.sub: subprocess.Popen | None = None
        self.sub_metrics = free_port()
        self.decided_in = 0.0  # seconds from the capture's end to both decisions at the webhook (the fixture sets it)

    def _config_with_key(self, name: str) -> Path:
        data = yaml.safe_load(self.config.read_text())
        data["security"]["client_key"] = name
        path = self.folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def start_subscriber(self) -> None:
        folder = self.folder
        self.sub = kiosk(
            self.config,
            "subscribe",
            "--gate",
            "A1",
            "--webhook",
            self.url,
            "--jsonl",
            str(folder / "hook.jsonl"),
            "--exec",
            f"cat >> {folder / 'stdin.jsonl'}",
            "--exec",
            f'echo "$KIOSK_TYPE $KIOSK_SUBJECT_ID $KIOSK_GATE_ID" >> {folder / "env.txt"}',
            "--exec",
            "sleep 15",
            "--metrics-port",
            str(self.sub_metrics),
            quiet=False,
        )

        def subscriber_hears_the_verifier() -> bool:
            try:
                return scrape(self.sub_metrics)[("kiosk_subscriber_verifier_up", ())][1] == 1
            except (OSError, KeyError):  # not listening yet, or no heartbeat heard yet
                return False

        wait_until(subscriber_hears_the_verifier, 30, "the subscriber to hear the verifier's heartbeat")

    def decisions(self) -> list[dict]:
        return [e for _, e in Hooked.received if e["type"] in ("accept", "reject")]

    def close(self) -> None:
        self.transport.close()
        self.watcher.close()
        self.spy.close()
        self.gate_listener.close()
        if self.sub is not None:
            stop(self.sub)
        stop(self.verifier)
        self.server.shutdown()


@pytest.fixture(scope="module")
def hooked_gate(tmp_path_factory, engine, photos):
    """The site, its subscriber started, and gate A1's video decided (both decisions at the webhook);
    `decided_in` is how long that took from the capture's end."""
    gate = HookedGate(tmp_path_factory.mktemp("hooked-gate"), engine, photos)
    try:
        assert gate.watcher.wait_for(lambda ev: ev.health, 30)
        gate.start_subscriber()
        capture = kiosk(gate.config, "capture", "--camera", "cam-a1")
        assert capture.wait(60) == 0
        published = time.monotonic()
        wait_until(lambda: len(gate.decisions()) >= 2, 20, "two decisions at the webhook")
        gate.decided_in = time.monotonic() - published
        yield gate
    finally:
        gate.close()


# The module's gate tests run in this order: the metrics and hooks first (the `sleep 15` hook is still running,
# its second event waiting), the heartbeat test last (it kills the verifier).


@pytest.mark.slow
def test_the_subscriber_counts_events_in_deliveries_per_hook_and_a_stuck_hooks_queue(hooked_gate):
    gate = hooked_gate
    m = scrape(gate.sub_metrics)

    def hook(name: str, outcome: str) -> float:
        return m[("kiosk_hook_deliveries_total", (("hook", name), ("outcome", outcome)))][1]

    url = gate.url
    assert hook(f"webhook {url}", "delivered") == 2 and hook(f"webhook {url}", "failed") == 0
    assert hook("exec sleep 15", "delivered") == 0
    assert m[("kiosk_hook_queue_depth", (("hook", "exec sleep 15"),))][1] == 1  # one running, one waiting
    assert m[("kiosk_subscriber_events_total", (("type", "accept"),))][1] == 1
    assert m[("kiosk_subscriber_events_total", (("type", "verifier_down"),))][1] == 0
    assert m[("kiosk_subscriber_verifier_up", ())][1] == 1
    assert m[("kiosk_hook_delivery_seconds_count", (("hook", f"webhook {url}"),))][1] == 2


@pytest.mark.slow
def test_every_hook_gets_every_decision_in_order_and_a_hanging_one_holds_up_no_other(hooked_gate):
    gate, folder = hooked_gate, hooked_gate.folder
    logged = [e for e in audit(gate.config) if e["gate_id"] == "A1"]
    assert [e["event_id"] for e in gate.decisions()] == [e["event_id"] for e in logged]  # every event, in order
    assert [e["type"] for e in logged] == ["accept", "reject"]
    # The hanging `sleep 15` hook did not hold up the others.
    assert gate.decided_in < 10
    assert len((folder / "hook.jsonl").read_text().splitlines()) == 2
    stdin_events = [json.loads(line) for line in (folder / "stdin.jsonl").read_text().splitlines()]
    assert [e["event_id"] for e in stdin_events] == [e["event_id"] for e in logged]
    assert (folder / "env.txt").read_text().splitlines()[0] == "accept YAO A1"


@pytest.mark.slow
def test_a_subscriber_key_hears_its_gates_and_a_key_in_no_allow_list_hears_nothing(hooked_gate):
    gate = hooked_gate
    assert gate.gate_listener.wait_for(lambda ev: ev.health and len(ev.events) >= 2, 10)
    assert [e.type for e in gate.gate_listener.events] == ["accept", "reject"]
    gate.spy.poll(0.5)  # an absence: a short listen (the allowed listener has had everything by now)
    assert gate.spy.events == [] and gate.spy.health == []


@pytest.mark.slow
def test_a_key_in_no_allow_list_and_a_subscriber_key_push_no_frame_and_make_no_claim(hooked_gate):
    gate = hooked_gate
    # The intruder's capture gets no frame in, and the operator is told why.
    rogue = kiosk(gate.intruder_cfg, "capture", "--camera", "cam-x")
    try:
        read_stderr_until(rogue, "refused this machine's key 'intruder'", 30)
    finally:
        stop(rogue)
    # A gate's key (subscriber role) cannot push frames either.
    gate_capture = kiosk(gate.gate_cfg, "capture", "--camera", "cam-x")
    try:
        read_stderr_until(gate_capture, "refused this machine's key 'gate-b2'", 30)
    finally:
        stop(gate_capture)
    assert control_request(gate.transport, {"cmd": "status"})["cameras"]["cam-x"]["frames_in"] == 0
    gate_transport = Transport(load_config(gate.gate_cfg), role="test-gate")
    try:
        assert control_request(gate_transport, {"cmd": "status"}, timeout_ms=1500) is None  # no claims either
    finally:
        gate_transport.close()


@pytest.mark.slow
def test_a_killed_verifier_is_verifier_down_within_the_heartbeat_window_and_its_restart_verifier_up(hooked_gate):
    """Last of the module's tests: it kills the site's verifier (and starts another)."""
    gate = hooked_gate
    pid = control_request(gate.transport, {"cmd": "status"})["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: any(e["type"] == "verifier_down" for _, e in Hooked.received), 10, "verifier_down")
    down = [t for t, e in Hooked.received if e["type"] == "verifier_down"]
    assert down[0] - killed < 0.25 * 3 + 1.0
    gate.verifier.wait(5)
    gate.verifier = kiosk(gate.config, "verify")
    wait_until(lambda: any(e["type"] == "verifier_up" for _, e in Hooked.received), 30, "verifier_up")
    assert [e["type"] for _, e in Hooked.received][-2:] == ["verifier_down", "verifier_up"]


def test_subscribe_needs_a_hook_and_a_valid_webhook(tmp_path):
    config = write_config(tmp_path, [{"id": "c", "gate": "A1", "source": 0}])
    res = run_cli("kiosk", "-c", str(config), "subscribe")
    assert res.returncode == 2 and "no hooks" in res.stderr
    res = run_cli("kiosk", "-c", str(config), "subscribe", "--webhook", "ftp://x")
    assert res.returncode == 2 and "expected an http" in res.stderr
    res = run_cli("kiosk", "-c", str(config), "subscribe", "--python", "no_such_module:fn")
    assert res.returncode == 2 and "cannot load 'no_such_module:fn'" in res.stderr


RECORDED: list = []


def record(event: dict) -> None:
    RECORDED.append(event)


def test_python_hook_and_bounded_queue(tmp_path):
    from kiosk.config import config_from_mapping
    from kiosk.services.subscriber import Hook, build_hooks

    cfg = config_from_mapping({"hooks": {"python": ["tests.test_gate_side:record"], "queue_size": 5}})
    (hook,) = build_hooks(cfg, jsonl=[], execs=[], webhooks=[])
    hook.submit({"type": "accept", "event_id": "x"})
    hook.close()
    assert RECORDED == [{"type": "accept", "event_id": "x"}] and hook.delivered == 1

    gate, delivering = threading.Event(), threading.Event()
    slow = Hook("slow", lambda e: delivering.set() or gate.wait(5), queue_size=2)
    slow.submit({"event_id": "0"})
    assert delivering.wait(5), "the first event never reached delivery"
    for i in range(1, 6):
        slow.submit({"event_id": str(i)})
    assert slow.dropped == 3  # one in delivery, two queued, the rest dropped and counted
    gate.set()
    slow.close()
    failing = Hook("failing", lambda e: 1 / 0, queue_size=2)
    failing.submit({"event_id": "y"})
    failing.close()
    assert failing.failed == 1
