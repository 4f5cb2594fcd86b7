"""Gate side: hooks, heartbeat fail-closed, CurveZMQ allow-list, the reference gate controller."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
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

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hooked.received.append((time.monotonic(), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_hooks_heartbeat_and_allow_list(tmp_path, engine, photos):
    crops = people(engine, photos)
    make_video(
        tmp_path / "a1.avi",
        [
            Walk(crops["yao"], start=5, frames=60, w0=60, w1=160),
            Walk(crops["parker"], start=100, frames=60, w0=60, w1=160),
        ],
        seconds=6,
    )
    config = write_config(
        tmp_path,
        [
            {"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": False},
            {"id": "cam-x", "gate": "X1", "source": "a1.avi", "realtime": True},
        ],
        heartbeat={"interval_s": 0.25, "misses": 3},
        hooks={"exec_timeout_s": 20},
    )
    res = run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"]))
    assert res.returncode == 0
    # An intruder: a key pair that is in no allow-list. A gate: allowed to subscribe only, and given both gates to
    # hear (security.listeners: without it, a subscriber key hears the verifier's own heartbeat and nothing else).
    zmq.auth.create_certificates(str(tmp_path / "keys"), "intruder")
    init_keys(tmp_path / "keys", client_name="gate-b2", role="subscriber")
    data = yaml.safe_load(config.read_text())
    data["security"]["listeners"] = [{"key": "gate-b2", "gates": ["A1", "X1"]}]
    config.write_text(yaml.safe_dump(data, sort_keys=False))

    def config_with_key(name: str) -> Path:
        data = yaml.safe_load(config.read_text())
        data["security"]["client_key"] = name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    intruder_cfg, gate_cfg = config_with_key("intruder"), config_with_key("gate-b2")

    Hooked.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hooked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/gate"

    verifier = kiosk(config, "verify")
    watcher = Events(config)
    spy = Events(intruder_cfg)
    gate_listener = Events(gate_cfg)
    sub = None
    try:
        assert watcher.wait_for(lambda ev: ev.health, 30)
        sub = kiosk(
            config,
            "subscribe",
            "--gate",
            "A1",
            "--webhook",
            url,
            "--jsonl",
            str(tmp_path / "hook.jsonl"),
            "--exec",
            f"cat >> {tmp_path / 'stdin.jsonl'}",
            "--exec",
            f'echo "$KIOSK_TYPE $KIOSK_SUBJECT_ID $KIOSK_GATE_ID" >> {tmp_path / "env.txt"}',
            "--exec",
            "sleep 15",
            "--metrics-port",
            str(sub_metrics := free_port()),
            quiet=False,
        )

        def subscriber_hears_the_verifier() -> bool:
            try:
                return scrape(sub_metrics)[("kiosk_subscriber_verifier_up", ())][1] == 1
            except (OSError, KeyError):  # not listening yet, or no heartbeat heard yet
                return False

        wait_until(subscriber_hears_the_verifier, 30, "the subscriber to hear the verifier's heartbeat")
        # The intruder's capture gets no frame in (the operator is told why); the intruder's subscriber hears nothing.
        rogue = kiosk(intruder_cfg, "capture", "--camera", "cam-x")
        try:
            read_stderr_until(rogue, "refused this machine's key 'intruder'", 30)
        finally:
            stop(rogue)
        # A gate's key (subscriber role) cannot push frames either.
        gate_capture = kiosk(gate_cfg, "capture", "--camera", "cam-x")
        try:
            read_stderr_until(gate_capture, "refused this machine's key 'gate-b2'", 30)
        finally:
            stop(gate_capture)
        transport = Transport(load_config(config), role="test")
        status = control_request(transport, {"cmd": "status"})
        assert status["cameras"]["cam-x"]["frames_in"] == 0
        gate_transport = Transport(load_config(gate_cfg), role="test-gate")
        assert control_request(gate_transport, {"cmd": "status"}, timeout_ms=1500) is None  # no claims either
        gate_transport.close()
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert capture.wait(60) == 0
        t_published = time.monotonic()
        decisions = lambda: [e for _, e in Hooked.received if e["type"] in ("accept", "reject")]  # noqa: E731
        wait_until(lambda: len(decisions()) >= 2, 20, "two decisions at the webhook")
        logged = [e for e in audit(config) if e["gate_id"] == "A1"]
        assert [e["event_id"] for e in decisions()] == [e["event_id"] for e in logged]  # every event, in order
        assert [e["type"] for e in logged] == ["accept", "reject"]
        # The hanging `sleep 15` hook did not hold up the others.
        assert time.monotonic() - t_published < 10
        assert len((tmp_path / "hook.jsonl").read_text().splitlines()) == 2
        stdin_events = [json.loads(line) for line in (tmp_path / "stdin.jsonl").read_text().splitlines()]
        assert [e["event_id"] for e in stdin_events] == [e["event_id"] for e in logged]
        assert (tmp_path / "env.txt").read_text().splitlines()[0] == "accept YAO A1"
        # The subscriber's own metrics: events in, deliveries per hook, the stuck hook's queue.
        m = scrape(sub_metrics)
        hook = lambda name, outcome: m[("kiosk_hook_deliveries_total", (("hook", name), ("outcome", outcome)))][1]  # noqa: E731
        assert hook(f"webhook {url}", "delivered") == 2 and hook(f"webhook {url}", "failed") == 0
        assert hook("exec sleep 15", "delivered") == 0
        assert m[("kiosk_hook_queue_depth", (("hook", "exec sleep 15"),))][1] == 1  # one running, one waiting
        assert m[("kiosk_subscriber_events_total", (("type", "accept"),))][1] == 1
        assert m[("kiosk_subscriber_events_total", (("type", "verifier_down"),))][1] == 0
        assert m[("kiosk_subscriber_verifier_up", ())][1] == 1
        assert m[("kiosk_hook_delivery_seconds_count", (("hook", f"webhook {url}"),))][1] == 2
        assert gate_listener.wait_for(lambda ev: ev.health and len(ev.events) >= 2, 10)
        assert [e.type for e in gate_listener.events] == ["accept", "reject"]
        spy.poll(0.5)  # an absence: a short listen (the allowed listener has had everything by now)
        assert spy.events == [] and spy.health == []

        # Heartbeat watch: kill the verifier; verifier_down within the window; restart; verifier_up.
        pid = status["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: any(e["type"] == "verifier_down" for _, e in Hooked.received), 10, "verifier_down")
        down = [t for t, e in Hooked.received if e["type"] == "verifier_down"]
        assert down and down[0] - killed < 0.25 * 3 + 1.0
        verifier.wait(5)
        verifier = kiosk(config, "verify")
        wait_until(lambda: any(e["type"] == "verifier_up" for _, e in Hooked.received), 30, "verifier_up")
        assert [e["type"] for _, e in Hooked.received][-2:] == ["verifier_down", "verifier_up"]
        transport.close()
    finally:
        watcher.close()
        spy.close()
        gate_listener.close()
        if sub is not None:
            stop(sub)
        stop(verifier)
        server.shutdown()


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
