"""The MQTT hook against a real Mosquitto (tests/mqtt_broker.py): topics and payloads, acknowledged delivery
across a broker restart, availability and the last will, retained state for late joiners, and the start-up
errors (exit 2, one line)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from kiosk.config import config_from_mapping, is_loopback
from kiosk.services import mqtt_hook as mqtt_hook_module
from kiosk.services.hook_outcomes import StaleEvent
from kiosk.services.metrics import SubscriberMetrics
from kiosk.services.mqtt_hook import TlsFiles, mqtt_hook, mqtt_target, tls_context
from kiosk.services.subscriber import Hook
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.mqtt_broker import Broker, Listener, client_certificate, encrypted_key, make_ca, make_tls, serve
from tests.pipeline_helpers import audit, kiosk, make_video, people, read_stderr_until, stop, write_config
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
EXPIRY_METRIC = "kiosk_mqtt_client_certificate_expiry_timestamp_seconds"


def _cfg(broker: Broker, **hooks):
    return config_from_mapping(
        {
            "cameras": [{"id": "cam-a1", "gate": "A1"}, {"id": "cam-b2", "gate": "B2"}],
            "hooks": {"mqtt_password_file": str(broker.password_file), **hooks},
        }
    )


def _decision(kind: str = "reject", gate: str = "A1", **extra) -> dict:
    now = time.time()
    return {
        "type": kind,
        "gate_id": gate,
        "event_id": f"e-{kind}-{now}",
        "subject_id": "P123",
        "score": 0.71,
        "reason": None if kind == "accept" else "no_match",
        "captured_at": now - 0.1,
        "decided_at": now,
        **extra,
    }


def _refused_at_start(config: Path, hooks: dict | None, *args: str) -> str:
    """`kiosk subscribe ARGS` with `config`'s hooks section replaced by `hooks` (None: as it is): exit 2 and one
    line on stderr, no traceback; that line."""
    if hooks is not None:
        data = yaml.safe_load(config.read_text())
        data["hooks"] = hooks
        config.write_text(yaml.safe_dump(data))
    res = run_cli("kiosk", "-c", str(config), "subscribe", *args)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_decisions_state_and_availability_in_process(broker):
    """The hook by itself: a decision is on its topic once deliver returns (acknowledged), the retained state
    carries no subject id or score, a heartbeat makes it `online` and fills the health topics, verifier_down
    goes on every gate's decision topic and makes everything say down, a clean close says `offline`."""
    cfg = _cfg(broker)
    hook = mqtt_hook(cfg, broker.url, None, "test")
    listener = Listener(broker)
    try:
        assert listener.wait_for(lambda li: li.on("available"), 10)
        assert listener.on("available")[-1].payload == b"offline"  # the verifier not heard yet: fail closed
        hook.observe(
            {
                "status": "ok",
                "gates": {"A1": {"flight_id": "LH123"}, "B2": {"flight_id": None}},
                "cameras": {"cam-a1": {"gate_id": "A1", "state": "ok"}, "cam-b2": {"gate_id": "B2", "state": "down"}},
            }
        )
        assert listener.wait_for(lambda li: li.on("available") and li.on("available")[-1].payload == b"online", 10)
        event = _decision("accept", subject_id="P123")
        hook(event)  # returns once the broker has it
        assert listener.wait_for(lambda li: li.on("gates/A1/decision"), 5)
        (heard,) = listener.on("gates/A1/decision")
        assert heard.json() == event and not heard.retain
        assert listener.wait_for(lambda li: any(h.json()["last_decision"] for h in li.on("gates/A1/state")), 5)
        state = listener.on("gates/A1/state")[-1].json()
        assert state == {
            "gate_id": "A1",
            "flight_id": "LH123",
            "verifier": "up",
            "last_decision": {
                "type": "accept",
                "reason": None,
                "event_id": event["event_id"],
                "decided_at": event["decided_at"],
            },
        }
        assert "P123" not in listener.on("gates/A1/state")[-1].payload.decode()
        assert listener.on("health/cameras/cam-b2")[-1].json() == {"status": "down"}
        assert listener.on("health/verifier")[-1].json() == {"status": "ok"}
        down = {"type": "verifier_down", "gate_id": "*", "event_id": "down-1", "reason": "no heartbeat"}
        hook(down)
        assert [h.json()["event_id"] for h in listener.on("gates/B2/decision")] == ["down-1"]
        assert listener.wait_for(lambda li: li.on("available")[-1].payload == b"offline", 5)
        assert listener.wait_for(lambda li: li.on("gates/A1/state")[-1].json()["verifier"] == "down", 5)
        assert listener.on("health/cameras/cam-a1")[-1].json() == {"status": "unknown"}
        hook.observe({"status": "ok"})  # a heartbeat is not `verifier_up`: that comes in order with the decisions
        hook({"type": "verifier_up", "gate_id": "*", "event_id": "up-1"})
        assert listener.wait_for(lambda li: li.on("available")[-1].payload == b"online", 5)
        # An accept too old to open a gate is never published.
        with pytest.raises(StaleEvent):
            broker.kill()
            hook(_decision("accept", captured_at=time.time() - cfg.hooks.max_accept_age_s + 0.5))
    finally:
        listener.close()
    broker.start()
    late = Listener(broker)
    try:  # a late joiner: the retained topics, not the decisions; the stale accept never went out
        assert late.wait_for(lambda li: li.on("gates/A1/state") and li.on("available"), 10)
        assert late.on("available")[-1].payload == b"online" and late.on("gates/A1/state")[-1].retain
        assert late.on("gates/A1/state")[-1].json()["last_decision"]["event_id"] == event["event_id"]
        assert not late.on("gates/A1/decision")
        assert hook.link.connected.wait(20)
        hook.close()
        assert late.wait_for(lambda li: li.on("available")[-1].payload == b"offline", 5)
    finally:
        late.close()


def test_a_hook_waits_for_the_broker_and_keeps_the_position_until_acknowledged(broker):
    """While the broker is away, deliver blocks (the position does not move); once it is back the event goes out,
    and only then is the Hook done with it."""
    cfg = _cfg(broker)
    done: list[str] = []
    hook = Hook("mqtt", mqtt_hook(cfg, broker.url, "A1", "test"), queue_size=10)
    hook.on_done = lambda e: done.append(e["event_id"])
    metrics = SubscriberMetrics(["mqtt"])
    hook.attach(metrics)  # no client certificate: no expiry series
    assert metrics.registry.get_sample_value(EXPIRY_METRIC, {"hook": "mqtt"}) is None
    listener = Listener(broker, session="test-listener")  # the broker keeps what arrives for it while it is away
    try:
        assert listener.wait_for(lambda li: li.on("available"), 10)  # subscribed
        broker.kill()
        event = _decision("reject")
        hook.submit(event)
        time.sleep(1.0)  # the broker is down: nothing to wait for but time
        assert done == [] and hook.delivered == 0
        broker.start()
        wait_until(lambda: done, 20, "the event delivered once the broker is back", every=0.05)
        assert done == [event["event_id"]] and hook.delivered == 1
        assert listener.wait_for(lambda li: li.on("gates/A1/decision"), 10)
        assert [h.json()["event_id"] for h in listener.on("gates/A1/decision")] == [event["event_id"]]
    finally:
        hook.close()
        listener.close()


def test_start_errors_are_one_line_and_exit_2(tmp_path, broker):
    config = write_config(tmp_path, [], hooks={"mqtt_password_file": str(broker.password_file)})
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)

    def subscribe(cfg_hooks: dict | None = None, *args: str) -> str:
        return _refused_at_start(config, cfg_hooks, *args)

    line = subscribe({"mqtt_password_file": str(wrong)}, "--mqtt", broker.url)
    assert "refused the connection of user 'kiosk'" in line and "mqtt_password_file" in line
    assert "--mqtt " in subscribe(None, "--mqtt", f"mqtt://kiosk@127.0.0.1:{broker.port + 0}x")  # bad port
    wrong.chmod(0o644)
    assert "readable by other users" in subscribe(None, "--mqtt", broker.url)
    broker.kill()
    assert "cannot reach 127.0.0.1" in subscribe(
        {"mqtt_password_file": str(broker.password_file)}, "--mqtt", broker.url
    )
    assert "found scheme 'tcp'" in subscribe(None, "--mqtt", "tcp://127.0.0.1:1883")
    broker.start()
    line = subscribe(None, "--mqtt", broker.url.replace("mqtt://", "mqtts://"))  # TLS to a plain MQTT port
    assert "the TLS handshake failed (is it a TLS port?)" in line, line
    data = yaml.safe_load(config.read_text())
    data["subscribers"] = [{"name": "gates", "mqtt": "http://broker:1883"}]
    config.write_text(yaml.safe_dump(data))
    line = subscribe(None, "--jsonl", str(tmp_path / "x.jsonl"))
    assert "subscribers[0].mqtt" in line and "found scheme 'http'" in line


def _gate_controller(broker: Broker, *extra: str) -> subprocess.Popen:
    """The reference gate controller at A1 on `broker` (open 120 s on an accept up to 10 s old), these options added."""
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "gate_controller.py"),
            "--gate",
            "A1",
            "--mqtt",
            broker.url,
            "--mqtt-password-file",
            str(broker.password_file),
            "--open-seconds",
            "120",
            "--max-age",
            "10",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


class _Gate:
    """The reference gate controller at A1 (a real process, these options) on `broker`, and the states it prints."""

    def __init__(self, broker: Broker, *controller_args: str) -> None:
        self.proc = _gate_controller(broker, *controller_args)
        self.states: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:  # the only reader of its stdout
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if '"state"' in line:
                with self._cv:
                    self.states.append(json.loads(line)["state"])
                    self._cv.notify_all()

    def wait_state(self, state: str, after: int, timeout: float) -> bool:
        """Whether it prints `state` beyond its first `after` state lines within `timeout` seconds."""
        with self._cv:
            return self._cv.wait_for(lambda: state in self.states[after:], timeout)

    def opens(self, hook, tag: str) -> list[dict]:
        """Accepts, each a new event, until the gate opens anew (it subscribes in its own time): those sent."""
        before, sent = len(self.states), []
        deadline = time.monotonic() + 30
        while not self.wait_state("open", before, 0.5 if sent else 0):
            assert time.monotonic() < deadline and self.proc.poll() is None, "the gate never opened"
            sent.append(_decision("accept", event_id=f"{tag}-{len(sent)}"))
            hook(sent[-1])  # returns once the broker has it
        return sent

    def stop(self) -> str:
        """Stop it; what it said on stderr."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)
        self._reader.join(10)
        with self.proc.stderr:  # type: ignore[union-attr]
            return self.proc.stderr.read()  # type: ignore[union-attr]


def _verifier_up(hook, broker: Broker) -> None:
    """The hook says the verifier is up: `online`, retained, on the broker."""
    listener = Listener(broker)
    try:
        hook.observe({"status": "ok", "gates": {"A1": {"flight_id": None}}, "cameras": {}})
        assert listener.wait_for(lambda li: li.on("available") and li.on("available")[-1].payload == b"online", 10)
    finally:
        listener.close()


def _gate_opens(broker: Broker, hook, *controller_args: str) -> None:
    """The reference gate controller (a real process, these options) on `broker`; the hook says the verifier is up,
    then sends accepts until the gate opens; a listener heard each of them once."""
    gate = _Gate(broker, *controller_args)
    listener = Listener(broker)
    try:
        _verifier_up(hook, broker)
        sent = gate.opens(hook, "tls")
        assert listener.wait_for(lambda li: len(li.on("gates/A1/decision")) == len(sent), 10)
        assert [h.json() for h in listener.on("gates/A1/decision")] == sent
    finally:
        listener.close()
        gate.stop()


def test_mqtts_verifies_the_broker_and_carries_decisions_to_a_gate(tmp_path, tls_broker):
    """TLS to a real Mosquitto that speaks nothing else. The hook, trusting the broker's CA, delivers decisions that a
    TLS listener and the reference gate controller (a real process, over mqtts) receive: the gate opens. At start,
    one line and exit 2, never a connection: a broker whose certificate another CA signed, a broker reached by a
    name its certificate does not carry, a CA file that is no certificate; the gate controller likewise."""
    ca = tls_broker.tls.ca
    hook = mqtt_hook(_cfg(tls_broker, mqtt_ca_file=str(ca)), tls_broker.url, None, "test")
    try:
        _gate_opens(tls_broker, hook, "--mqtt-ca-file", str(ca))
    finally:
        hook.close()

    other, _, _ = make_ca(tmp_path, "another-ca")
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    config = write_config(tmp_path, [], hooks={"mqtt_password_file": str(tls_broker.password_file)})

    def refused(ca_file: Path, url: str) -> str:
        hooks = {"mqtt_password_file": str(tls_broker.password_file), "mqtt_ca_file": str(ca_file)}
        return _refused_at_start(config, hooks, "--mqtt", url)

    line = refused(other, tls_broker.url)
    assert "TLS certificate does not verify against hooks.mqtt_ca_file" in line and "another-ca" in line, line
    line = refused(ca, tls_broker.url.replace("127.0.0.1", "localhost"))
    assert "does not verify" in line and "mismatch" in line, line  # the name is checked, not only the CA
    assert "must be up" not in line  # not told to start a broker that is up
    line = refused(junk, tls_broker.url)
    assert "hooks.mqtt_ca_file" in line and "not a PEM CA certificate bundle" in line, line
    gate = _gate_controller(tls_broker, "--mqtt-ca-file", str(other))
    out, err = gate.communicate(timeout=60)
    assert gate.returncode == 2 and "Traceback" not in err and "certificate does not verify against" in err, err
    assert out == ""  # never opened


def test_a_broker_that_wants_client_certificates_gets_this_hosts(tmp_path, mtls_broker):
    """Mutual TLS: with hooks.mqtt_cert_file and mqtt_key_file the hook is let in and delivers, and the gate
    controller with its own certificate opens; without them the broker refuses at start (one line, exit 2). A key
    others can read, a certificate without its key, or files that are no certificate and key are config errors at
    start (exit 2), before any connection."""
    tls = mtls_broker.tls
    own = {"mqtt_cert_file": str(tls.client_cert), "mqtt_key_file": str(tls.client_key)}
    hook = mqtt_hook(_cfg(mtls_broker, mqtt_ca_file=str(tls.ca), **own), mtls_broker.url, None, "test")
    try:
        _gate_opens(
            mtls_broker,
            hook,
            *("--mqtt-ca-file", str(tls.ca), "--mqtt-cert-file", str(tls.client_cert)),
            *("--mqtt-key-file", str(tls.client_key)),
        )
    finally:
        hook.close()

    config = write_config(tmp_path, [], hooks={"mqtt_password_file": str(mtls_broker.password_file)})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    junk.chmod(0o600)
    readable = tmp_path / "readable.key"
    readable.write_bytes(tls.client_key.read_bytes())
    readable.chmod(0o644)
    locked = tmp_path / "locked.key"  # encrypted: must fail at once, never ask for a passphrase on the terminal
    locked.write_bytes(encrypted_key(tls.client_key, b"passphrase"))
    locked.chmod(0o600)

    def refused(**hooks: str) -> str:
        given = {"mqtt_password_file": str(mtls_broker.password_file), "mqtt_ca_file": str(tls.ca), **hooks}
        return _refused_at_start(config, given, "--mqtt", mtls_broker.url)

    line = refused()  # the broker's alert, or (Mosquitto, at times) the session just ends: either says what to set
    assert "ended the TLS" in line and "hooks.mqtt_cert_file" in line, line
    line = refused(mqtt_cert_file=str(tls.client_cert), mqtt_key_file=str(readable))
    assert "hooks.mqtt_key_file" in line and "readable by other users" in line, line
    line = refused(mqtt_cert_file=str(tls.client_cert))
    assert "hooks.mqtt_key_file: needed with hooks.mqtt_cert_file" in line, line
    line = refused(mqtt_cert_file=str(tls.client_cert), mqtt_key_file=str(junk))
    assert "not a PEM certificate and its unencrypted private key" in line, line
    line = refused(mqtt_cert_file=str(tls.client_cert), mqtt_key_file=str(locked))
    assert "not a PEM certificate and its unencrypted private key" in line, line
    # The gate controller: half a certificate is one line and exit 2; without one, the broker's refusal comes after
    # the handshake, and is said on stderr while it retries with the gate closed.
    half = _gate_controller(mtls_broker, "--mqtt-ca-file", str(tls.ca), "--mqtt-cert-file", str(tls.client_cert))
    out, err = half.communicate(timeout=60)
    assert half.returncode == 2 and err.strip() == "--mqtt-cert-file and --mqtt-key-file: give both or neither"
    shared = _gate_controller(
        mtls_broker,
        *("--mqtt-ca-file", str(tls.ca), "--mqtt-cert-file", str(tls.client_cert)),
        *("--mqtt-key-file", str(readable)),
    )
    out, err = shared.communicate(timeout=60)
    assert (
        shared.returncode == 2
        and err.strip() == f"--mqtt-key-file {readable}: readable by other users (mode 0644); chmod 600 {readable}"
    ), err
    bare = _gate_controller(mtls_broker, "--mqtt-ca-file", str(tls.ca))
    try:
        read_stderr_until(bare, "mqtt: ", 30)
    finally:
        out, err = stop(bare)
    assert '"open"' not in out and "Traceback" not in err, err


GATE_PASSWORD = "gate-a1-secret"


def _documented_acl() -> str:
    """The Mosquitto ACL the security page tells a site to use."""
    block = re.search(r"```text\n(# The kiosk subscriber.*?)```", (REPO / "docs" / "security.md").read_text(), re.S)
    assert block, "docs/security.md: the Mosquitto ACL example is gone"
    return block.group(1)


@pytest.fixture
def acl_broker():
    """A broker behind the documented ACL, with the gate user it names."""
    yield from serve(tls=False, acl=_documented_acl(), users={"gate-a1": GATE_PASSWORD})


def test_the_documented_broker_acl_gives_each_gate_its_own_decisions_only(tmp_path, acl_broker):
    """The security page's ACL on a real Mosquitto: the hook (user kiosk) delivers; the reference gate controller
    logged in as gate-a1 opens gate A1 on an accept; a client logged in as gate-a1 that subscribes to everything
    hears A1's topics and the availability, and never B2's decisions (subject id and score) nor the health topics;
    an accept it forges, for B2 or for its own gate, reaches no one (Mosquitto acknowledges and drops it)."""
    password = tmp_path / "gate-a1.password"
    password.write_text(GATE_PASSWORD + "\n")
    password.chmod(0o600)
    gate_url = f"mqtt://gate-a1@127.0.0.1:{acl_broker.port}"
    hook = mqtt_hook(_cfg(acl_broker), acl_broker.url, None, "test")
    snoop = Listener(acl_broker, user="gate-a1", password=GATE_PASSWORD)
    try:
        assert snoop.wait_for(lambda li: li.on("available"), 10), "gate-a1 may not read the availability"
        _gate_opens(acl_broker, hook, "--mqtt", gate_url, "--mqtt-password-file", str(password))
        hook(_decision("accept", gate="B2", event_id="for-b2"))
        hook(_decision("reject", gate="A1", event_id="for-a1-after"))  # same publisher, QoS 1: in order after B2's
        heard_a1 = lambda li: [h.json()["event_id"] for h in li.on("gates/A1/decision")]  # noqa: E731
        assert snoop.wait_for(lambda li: "for-a1-after" in heard_a1(li), 10)
        topics = {h.topic for h in snoop.heard}
        assert {"kiosk/available", "kiosk/gates/A1/decision", "kiosk/gates/A1/state"} <= topics, topics
        assert all(t.startswith("kiosk/gates/A1/") or t == "kiosk/available" for t in topics), topics

        kiosk_side = Listener(acl_broker)  # user kiosk: reads everything under the prefix
        try:
            assert kiosk_side.wait_for(lambda li: li.on("available"), 10)
            for gate in ("B2", "A1"):
                forged = json.dumps(_decision("accept", gate=gate, event_id=f"forged-{gate}")).encode()
                info = snoop.client.publish(f"kiosk/gates/{gate}/decision", forged, qos=1)
                info.wait_for_publish(10)
                assert info.is_published()  # acknowledged: the broker has dealt with it
            hook(_decision("reject", gate="B2", event_id="marker"))  # the broker took the forged ones before it
            assert kiosk_side.wait_for(
                lambda li: any(h.json()["event_id"] == "marker" for h in li.on("gates/B2/decision")), 10
            )
            heard = [h.payload for h in kiosk_side.heard]
            assert not any(b"forged-" in payload for payload in heard), heard
        finally:
            kiosk_side.close()
    finally:
        snoop.close()
        hook.close()


def _sending(hook, event: dict) -> threading.Thread:
    """`hook(event)` on a thread of its own: it returns once the broker has acknowledged the event."""
    sending = threading.Thread(target=hook, args=(event,), daemon=True)
    sending.start()
    return sending


def _delivered(
    hook, listener: Listener, event: dict, timeout: float = 30, sending: threading.Thread | None = None
) -> None:
    """`hook(event)` (or the `sending` of it, already started) returns within `timeout` and the listener hears the
    event. The listener must be subscribed first: it has heard the hook's retained state."""
    assert listener.wait_for(lambda li: li.heard, 10), "the listener never subscribed"
    sending = sending or _sending(hook, event)
    sending.join(timeout)
    assert not sending.is_alive(), f"{event['event_id']} not delivered in {timeout:g}s"
    topic = f"gates/{event['gate_id']}/decision"
    assert listener.wait_for(lambda li: any(h.json()["event_id"] == event["event_id"] for h in li.on(topic)), 10)


def _renew(folder: Path, files: dict[str, Path], key_mode: int = 0o600):
    """A new CA with a broker and a client certificate; the client's written over `files` as renewal tools do (a
    new file renamed over the old one), the key with `key_mode`."""
    folder.mkdir()
    renewed = make_tls(folder)
    for key, source in zip(files, (renewed.ca, renewed.client_cert, renewed.client_key), strict=True):
        _replace(files[key], source.read_bytes(), 0o600 if key != "mqtt_key_file" else key_mode)
    return renewed


def _replace(path: Path, data: bytes, mode: int = 0o600) -> None:
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    new.chmod(mode)
    os.replace(new, path)


def test_certificates_renewed_on_disk_are_used_at_the_next_connection(tmp_path, mtls_broker, caplog):
    """Renewal without a restart: the site replaces the CA and every certificate (a new CA signs the broker's and
    this host's), the broker restarts with its new ones, and the running hook reconnects with its files as they now
    are and delivers. Renewed files that do not load (a key that is no key; a key others can read) are said once as
    an error, and the hook goes on with what it had loaded, and tries them again at each connection: a `chmod 600`
    is enough."""
    ours = tmp_path / "kiosk-tls"
    ours.mkdir()
    files = {"mqtt_ca_file": ours / "ca.crt", "mqtt_cert_file": ours / "gate.crt", "mqtt_key_file": ours / "gate.key"}
    tls = mtls_broker.tls
    for key, source in zip(files, (tls.ca, tls.client_cert, tls.client_key), strict=True):
        _replace(files[key], source.read_bytes())
    hook = mqtt_hook(_cfg(mtls_broker, **{k: str(v) for k, v in files.items()}), mtls_broker.url, None, "test")
    listener = Listener(mtls_broker)
    _verifier_up(hook, mtls_broker)
    gate = _Gate(mtls_broker, *(f"--{k.replace('_', '-')}={v}" for k, v in files.items()))  # the same files

    def restart(tls) -> Listener:  # the broker with these files, and a listener subscribed again
        listener.close()
        mtls_broker.renew_tls(tls)  # the old CA's certificates are no longer let in, nor is the old CA trusted
        return Listener(mtls_broker)

    def said(text: str, level: int = logging.INFO) -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage() and r.levelno == level]

    try:
        _delivered(hook, listener, _decision(event_id="before-renewal"))
        gate.opens(hook, "before-renewal")
        with caplog.at_level(logging.INFO, logger="kiosk.services.mqtt_hook"):
            renewed = _renew(tmp_path / "renewed", files)
            seen = len(gate.states)
            listener = restart(renewed)
            _delivered(hook, listener, _decision(event_id="after-renewal"))
            assert said("the TLS files changed: loaded again")
            # The gate controller too: closed while it had no broker, then in again with the renewed files.
            assert gate.wait_state("closed", seen, 30), gate.states
            gate.opens(hook, "after-renewal")

            caplog.clear()  # half a renewal: the broker restarts with what it had, the hook with what it had
            _replace(files["mqtt_key_file"], b"half-written\n")
            seen = len(gate.states)
            listener = restart(renewed)
            _delivered(hook, listener, _decision(event_id="after-a-bad-renewal"))
            errors = said("do not load", logging.ERROR)
            assert len(errors) == 1, caplog.text
            assert "hooks.mqtt_key_file" in errors[0].getMessage() and "stay in use" in errors[0].getMessage()
            assert gate.wait_state("closed", seen, 30), gate.states
            gate.opens(hook, "after-a-bad-renewal")  # with the files it had

            caplog.clear()  # a renewal whose key others can read: the broker moves on, the hook cannot until chmod 600
            seen = len(gate.states)
            listener = restart(_renew(tmp_path / "newest", files, key_mode=0o644))
            event = _decision(event_id="after-chmod")
            sending = _sending(hook, event)
            wait_until(lambda: said("with the TLS files loaded before", logging.WARNING), 30, "a try with old files")
            errors = said("do not load", logging.ERROR)
            assert len(errors) == 1 and "readable by other users" in errors[0].getMessage(), caplog.text
            assert sending.is_alive()  # not delivered: the broker no longer takes the old certificate
            files["mqtt_key_file"].chmod(0o600)
            _delivered(hook, listener, event, sending=sending)
            assert said("the TLS files changed: loaded again")
            assert gate.wait_state("closed", seen, 30), gate.states
            gate.opens(hook, "newest")  # it too refused the key until chmod 600, then loaded it
    finally:
        listener.close()
        hook.close()
        err = gate.stop()
    assert err.count("TLS files renewed: connecting with them") == 2 and "Traceback" not in err, err
    assert err.count("renewed TLS files do not load") == 2 and "readable by other users" in err, err


def test_a_client_certificate_out_of_its_dates_is_said_before_the_broker_refuses_it(
    tmp_path, mtls_broker, caplog, monkeypatch
):
    """An expired client certificate, or one not valid yet by this host's clock (a gate whose clock is wrong), stops
    the start: one line naming the key and the date, exit 2, no connection. One that expires within 14 days is
    warned of at start and again while the subscriber runs (every CERT_CHECK_S; months pass between the two), and
    still delivers."""
    tls = mtls_broker.tls
    config = write_config(tmp_path, [], hooks={"mqtt_password_file": str(mtls_broker.password_file)})

    def refused(cert: Path, key: Path) -> str:
        hooks = {"mqtt_password_file": str(mtls_broker.password_file), "mqtt_ca_file": str(tls.ca)}
        hooks |= {"mqtt_cert_file": str(cert), "mqtt_key_file": str(key)}
        return _refused_at_start(config, hooks, "--mqtt", mtls_broker.url)

    day = timedelta(days=1)
    line = refused(*client_certificate(tls, tmp_path, "expired", (-30 * day, -day)))
    assert "hooks.mqtt_cert_file" in line and "expired on" in line and "renew it" in line, line
    line = refused(*client_certificate(tls, tmp_path, "not-yet", (day, 30 * day)))
    assert "hooks.mqtt_cert_file" in line and "not valid before" in line and "clock says" in line, line

    # A certificate issued a minute ahead of this host's clock (the broker's a little ahead) is no config error.
    files = TlsFiles(tls.ca, *client_certificate(tls, tmp_path, "just-issued", (timedelta(minutes=1), 30 * day)))
    assert tls_context(files)[0] is not None

    cert, key = client_certificate(tls, tmp_path, "soon", (-30 * day, 3 * day))
    soon_copy = tmp_path / "soon-as-issued.crt"
    soon_copy.write_bytes(cert.read_bytes())
    monkeypatch.setattr(mqtt_hook_module, "CERT_CHECK_S", 0.1)
    with caplog.at_level(logging.DEBUG, logger="kiosk.services.mqtt_hook"):
        cfg = _cfg(mtls_broker, mqtt_ca_file=str(tls.ca), mqtt_cert_file=str(cert), mqtt_key_file=str(key))
        hook = mqtt_hook(cfg, mtls_broker.url, None, "test")
        metrics = SubscriberMetrics(["mqtt"])  # the expiry as a metric, for an alert
        wrapped = Hook("mqtt", hook, queue_size=10)
        wrapped.attach(metrics)
        listener = Listener(mtls_broker)

        def exported() -> float | None:
            return metrics.registry.get_sample_value(EXPIRY_METRIC, {"hook": "mqtt"})

        try:
            assert exported() == _not_after(cert)
            expiring = lambda: [r for r in caplog.records if "expires on" in r.getMessage()]  # noqa: E731
            wait_until(lambda: len(expiring()) >= 3, 10, "the warning at start and again while it runs")
            assert "in 3.0 days" in expiring()[0].getMessage() or "in 2.9 days" in expiring()[0].getMessage()
            _delivered(hook, listener, _decision(event_id="with-a-certificate-soon-to-expire"))
            # Renewed on disk: the connection up keeps the old one, and the warnings stop (the next one loads it).
            renewed, renewed_key = client_certificate(tls, tmp_path, "renewed", (-day, 30 * day))
            _replace(cert, renewed.read_bytes())
            _replace(key, renewed_key.read_bytes())
            caplog.clear()
            checked = lambda: [r for r in caplog.records if "is valid until" in r.getMessage()]  # noqa: E731
            wait_until(lambda: len(checked()) >= 3, 10, "checks after the renewal")
            assert not expiring(), caplog.text
            assert exported() == _not_after(renewed) > _not_after(soon_copy)
        finally:
            listener.close()
            wrapped.close()  # and the MQTT hook in it


def _not_after(cert: Path) -> float:
    """When the certificate in `cert` expires, Unix time."""
    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()


def test_plain_mqtt_is_called_out_only_where_it_leaves_the_machine(caplog):
    """The start warns of plain MQTT (password and decisions in clear) to any host but this machine, and of TLS
    settings a plain URL does not use."""
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("10.0.0.7", "broker.example", "192.168.1.20", "fe80::1", ""))
    cfg = config_from_mapping({"cameras": [{"id": "cam-a1", "gate": "A1"}]})

    def warned(url: str, config=cfg) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kiosk.services.mqtt_hook"):
            mqtt_target(config, url)
        return " ".join(r.getMessage() for r in caplog.records)

    assert "cross the network unencrypted" in warned("mqtt://kiosk@10.0.0.7:1883")
    assert warned("mqtt://kiosk@127.0.0.1:1883") == warned("mqtts://kiosk@10.0.0.7:8883") == ""
    with_ca = config_from_mapping({"cameras": [{"id": "cam-a1", "gate": "A1"}], "hooks": {"mqtt_ca_file": __file__}})
    assert "hooks.mqtt_ca_file" in warned("mqtt://kiosk@127.0.0.1:1883", with_ca)  # a site that meant TLS


def test_gate_controller_feed_fails_closed_on_offline_and_acts_once_per_event():
    from tests.test_gate_side import load_gate_controller

    gc_module = load_gate_controller()
    gate = gc_module.GateController("A/1", open_seconds=5, max_age_s=2, heartbeat_timeout_s=3)
    feed = gc_module.MqttFeed(gate, "site")
    assert feed.decision_topic == "site/gates/A%2F1/decision"
    t = 1000.0
    accept = {"type": "accept", "gate_id": "A/1", "decided_at": t, "captured_at": t, "event_id": "e1"}
    feed.message(feed.decision_topic, json.dumps(accept).encode(), t)
    assert not gate.is_open(t)  # nobody said `online` yet
    feed.message("site/available", b"online", t)
    assert feed.message(feed.decision_topic, json.dumps(accept).encode(), t) is None  # e1 was acted on (ignored)
    feed.message(feed.decision_topic, json.dumps({**accept, "event_id": "e2"}).encode(), t)
    assert gate.is_open(t + 0.1)
    feed.message("site/available", b"offline", t + 0.2)  # the last will, or the verifier down
    assert not gate.is_open(t + 0.3)
    feed.message("site/available", b"online", t + 1)
    feed.message(feed.decision_topic, json.dumps({**accept, "event_id": "e3", "decided_at": t + 1}).encode(), t + 1)
    assert gate.is_open(t + 1.1)
    feed.lost(t + 1.2)  # the broker connection dropped
    assert not gate.is_open(t + 1.3)


@pytest.mark.slow  # a real verifier, capture, subscriber and gate controller; two kills
def test_real_pipeline_on_mqtt_decisions_late_join_last_will_and_verifier_down(tmp_path, engine, photos, broker):
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
        [{"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": False}],
        # a 5 s window: wide enough for a verifier still loading its models when the subscriber starts (a busy
        # machine), so the gate hears no verifier_down before the first decision; the kill below is told in 5 s
        heartbeat={"interval_s": 0.5, "misses": 10},
        hooks={"mqtt_password_file": str(broker.password_file)},
    )
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    listener = Listener(broker)
    verifier = kiosk(config, "verify")
    sub = kiosk(config, "subscribe", "--gate", "A1", "--mqtt", broker.url, quiet=False)
    controller = _gate_controller(broker)
    late = None
    try:
        online = lambda li: li.on("available") and li.on("available")[-1].payload == b"online"  # noqa: E731
        assert listener.wait_for(online, 60), broker.log()
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert capture.wait(60) == 0
        assert listener.wait_for(lambda li: len(li.on("gates/A1/decision")) >= 2, 30)
        logged = [e for e in audit(config) if e["gate_id"] == "A1"]
        assert [e["type"] for e in logged] == ["accept", "reject"]
        assert [h.json() for h in listener.on("gates/A1/decision")] == logged  # the event JSON, each once
        # A late joiner gets the retained state: the last decision without who or how well it matched.
        late = Listener(broker)
        assert late.wait_for(lambda li: li.on("gates/A1/state") and online(li), 10)
        state = late.on("gates/A1/state")[-1]
        assert state.retain and state.json() == {
            "gate_id": "A1",
            "flight_id": None,
            "verifier": "up",
            "last_decision": {k: logged[-1][k] for k in ("type", "reason", "event_id", "decided_at")},
        }
        assert late.on("health/verifier")[-1].json()["status"] in ("ok", "degraded")
        # The subscriber dies: the broker says its last will.
        os.killpg(sub.pid, signal.SIGKILL)
        sub.wait(10)
        assert late.wait_for(lambda li: li.on("available")[-1].payload == b"offline", 10)
        sub = kiosk(config, "subscribe", "--gate", "A1", "--mqtt", broker.url, quiet=False)
        assert late.wait_for(lambda li: li.on("available")[-1].payload == b"online", 30)
        # The verifier dies: the subscriber says so on every topic a gate may listen to.
        os.killpg(verifier.pid, signal.SIGKILL)
        verifier.wait(10)
        assert late.wait_for(lambda li: li.on("available")[-1].payload == b"offline", 10)
        assert late.wait_for(
            lambda li: li.on("gates/A1/decision") and li.on("gates/A1/decision")[-1].json()["type"] == "verifier_down",
            10,
        )
        assert late.wait_for(lambda li: li.on("gates/A1/state")[-1].json()["verifier"] == "down", 10)
    finally:
        listener.close()
        if late is not None:
            late.close()
        gate_out, gate_err = stop(controller)
        stop(verifier)
        _, sub_err = stop(sub)
    assert "Traceback" not in sub_err, sub_err[-2000:]
    # The gate controller on MQTT opened for the accept (open for 120 s) and closed on the subscriber's last
    # will; it opens again only for a new accept.
    states = [json.loads(line)["state"] for line in gate_out.splitlines() if '"state"' in line]
    assert states == ["open", "closed"], (gate_out, gate_err[-2000:])


@pytest.mark.slow  # a gate deciding every 2.4 s through a broker crash
def test_a_broker_restart_mid_stream_loses_no_decision(tmp_path, engine, photos, broker):
    """Mosquitto is SIGKILLed while decisions go on and started again on the same port: the subscriber waits
    with what the broker has not acknowledged and publishes it once the broker is back. A listener with a
    persistent session (the broker keeps what arrives for it while it reconnects) hears every decision of the
    audit log; a repeat is at most the one in flight when the broker died, with its own event_id."""
    crops = people(engine, photos)
    make_video(tmp_path / "walk.avi", [Walk(crops["parker"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "walk.avi", "realtime": True, "loop": True}],
        hooks={"mqtt_password_file": str(broker.password_file)},
    )
    listener = Listener(broker, session="restart-listener")
    verifier = kiosk(config, "verify")
    sub = kiosk(config, "subscribe", "--gate", "A1", "--mqtt", broker.url, quiet=False)
    capture = None

    def decided() -> list[str]:
        return [e["event_id"] for e in audit(config) if e["gate_id"] == "A1"]

    def heard() -> list[str]:
        return [
            h.json()["event_id"] for h in listener.on("gates/A1/decision") if h.json()["type"] in ("accept", "reject")
        ]

    try:
        assert listener.wait_for(lambda li: li.on("available") and li.on("available")[-1].payload == b"online", 60)
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert listener.wait_for(lambda li: len(heard()) >= 2, 60)
        broker.kill()  # just after a decision: the next one comes in about 2.4 s
        before = len(decided())
        wait_until(lambda: len(decided()) >= before + 2, 30, "two decisions with no broker", every=0.1)
        broker.start()
        target = decided()
        assert listener.wait_for(lambda li: set(heard()) >= set(target), 60), (target, heard(), broker.log())
    finally:
        listener.close()
        if capture is not None:
            stop(capture)
        stop(verifier)
        _, sub_err = stop(sub)
    got = heard()
    assert len(got) - len(set(got)) <= 1, got
    assert list(dict.fromkeys(got))[: len(target)] == target  # every one, in the order decided
    assert "connection to" in sub_err and "lost" in sub_err and "Traceback" not in sub_err


def test_kiosk_run_starts_a_configured_mqtt_subscriber(tmp_path):
    from kiosk.config import load_config
    from kiosk.services.supervisor import Supervisor

    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "a1.avi"}],
        subscribers=[{"name": "broker", "mqtt": "mqtts://kiosk@broker.example:8883"}],
    )
    sup = Supervisor(load_config(config), config)
    (child,) = sup.subscribers
    assert child.argv[child.argv.index("--mqtt") + 1] == "mqtts://kiosk@broker.example:8883"
    assert child.argv[child.argv.index("--name") + 1] == "broker"
