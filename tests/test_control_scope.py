"""Keys that name what they serve, on the control socket (issue 36, item 1): a capture key claims its own
cameras' gates only, an operator key the gates it is given, and `status` shows claimed passenger ids to
operator keys only. Real verifier, real CurveZMQ keys; the pure rules are checked first without sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml

from kiosk.config import CameraConfig, OperatorKeyConfig, load_config
from kiosk.messaging.messages import Event
from kiosk.messaging.transport import Transport, control_request, free_port, init_keys
from kiosk.services.control_access import KeyScopes
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.pipeline_helpers import Events, kiosk, make_video, people, scrape, write_config
from tests.sealing_helpers import sealed_gallery

# -- the rules, without sockets ---------------------------------------------------------------------------


def test_default_single_host_the_shared_client_key_is_the_tools_key():
    """One `client` key for the tools and the cameras (no `key:`): it claims every gate and sees every id."""
    scopes = KeyScopes([CameraConfig("cam-a1", "A1"), CameraConfig("cam-b2", "B2")], "client", [])
    tools = scopes.caller(["client"])
    assert tools.claims is None and tools.sees is None and tools.may_claim("Z9")
    assert "tools key" in tools.role and "capture key of cam-a1 (gate A1), cam-b2 (gate B2)" in tools.role


def test_capture_operator_and_other_keys_get_what_they_serve():
    scopes = KeyScopes(
        [
            CameraConfig("cam-a1", "A1", key="cam-host-1"),
            CameraConfig("cam-b2", "B2", key="cam-host-2"),
            CameraConfig("cam-b3", "B3", key="cam-host-2"),
        ],
        "client",
        [OperatorKeyConfig("reader-a1", ["A1"]), OperatorKeyConfig("desk", ["*"])],
    )
    cam = scopes.caller(["cam-host-2"])
    assert cam.claims == {"B2", "B3"} and cam.sees == frozenset() and not cam.may_claim("A1")
    reader = scopes.caller(["reader-a1"])
    assert reader.claims == reader.sees == {"A1"}
    assert scopes.caller(["desk"]).claims is None and scopes.caller(["client"]).sees is None
    other = scopes.caller(["cam-host-9"])  # allow-listed, but serves nothing
    assert other.claims == other.sees == frozenset() and "not in security.operators" in other.role
    both = scopes.caller(["cam-host-1", "reader-a1"])  # one public key filed under two names: the union
    assert both.claims == {"A1"} and both.sees == {"A1"}
    assert scopes.caller([]).revoked


def test_the_tools_key_listed_in_operators_gets_only_what_is_listed():
    scopes = KeyScopes([CameraConfig("cam-a1", "A1")], "client", [OperatorKeyConfig("client", [])])
    tools = scopes.caller(["client"])
    assert tools.claims == {"A1"} and tools.sees == frozenset()  # still its own camera's gate, no ids


# -- a running verifier --------------------------------------------------------------------------------------


@dataclass
class Site:
    """A verifier for gates A1 (camera key cam-host-1, plays Yao walking up) and B2 (cam-host-2), with the
    tools key `client`, a reader key for A1 and an operator desk key for every gate."""

    config: Path
    cfg: Any
    log: Path
    metrics_port: int

    def ask(self, key: str, request: dict[str, Any]) -> dict[str, Any]:
        transport = Transport(self.cfg, role=f"test {key}", client_key=key)
        try:
            reply = control_request(transport, request, timeout_ms=5000)
        finally:
            transport.close()
        assert reply is not None, f"no reply to {key}"
        return reply

    def claim(self, key: str, gate: str, subject: str) -> dict[str, Any]:
        return self.ask(key, {"cmd": "claim", "gate_id": gate, "subject_id": subject})

    def log_lines(self, text: str) -> int:
        return sum(text in line for line in self.log.read_text().splitlines())


@pytest.fixture(scope="module")
def site(tmp_path_factory, engine, photos) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("scope")
    crops = people(engine, photos)
    make_video(folder / "a1.avi", [Walk(crops["yao"], start=0, frames=40, w0=80, w1=170)], seconds=1.5)
    port = free_port()
    config = write_config(
        folder,
        [
            {"id": "cam-a1", "gate": "A1", "source": "a1.avi", "realtime": False, "key": "cam-host-1"},
            {"id": "cam-b2", "gate": "B2", "source": "b2.avi", "realtime": False, "key": "cam-host-2"},
        ],
        metrics={"port": port},
    )
    data = yaml.safe_load(config.read_text())
    data["security"]["operators"] = [{"key": "reader-a1", "gates": ["A1"]}, {"key": "desk", "gates": ["*"]}]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    for name in ("cam-host-1", "cam-host-2", "reader-a1", "desk"):
        init_keys(folder / "keys", client_name=name)  # role all: allow-listed on the control socket
    with sealed_gallery(folder / "gallery.db") as g:
        for sid, name in (("YAO", "yao"), ("PARKER", "parker")):
            big = cv2.resize(crops[name], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
            emb = engine.describe(big, engine.detector.detect(big).largest()).faces.embeddings[0]
            g.enroll(sid, sid.title(), emb[None, :], engine.model_id)
    log = folder / "verifier.log"
    with open(log, "w") as err:
        verifier = subprocess.Popen(
            [sys.executable, "-m", "kiosk.cli", "-c", str(config), "verify"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    s = Site(config, load_config(config), log, port)
    try:
        transport = Transport(s.cfg, role="test-wait")
        deadline = time.monotonic() + 60
        while control_request(transport, {"cmd": "status"}, timeout_ms=1000) is None:
            assert verifier.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
        transport.close()
        yield s
        assert verifier.poll() is None
    finally:
        if verifier.poll() is None:
            os.killpg(verifier.pid, signal.SIGTERM)
        verifier.wait(15)
    assert "Traceback" not in log.read_text()


def test_another_cameras_key_cannot_claim_a_gate_nor_spoil_its_next_passenger(site):
    """The probe of issue 36: B2's camera key renews a claim for PARKER at A1. Each is refused with one reply
    that names the gate and the key (never the subject), counted, logged once; Yao then walks up at A1 and is
    accepted, not rejected claim_mismatch."""
    events = Events(site.config, ("event.A1", "health.verifier"))
    try:
        for _ in range(5):
            reply = site.claim("cam-host-2", "A1", "PARKER")
            assert reply["ok"] is False, reply
            assert "gate 'A1'" in reply["error"] and "'cam-host-2'" in reply["error"], reply
            assert "capture key of cam-b2 (gate B2)" in reply["error"] and "PARKER" not in reply["error"]
        status = site.ask("client", {"cmd": "status"})
        assert "A1" not in status["claims"] and status["control_refused"]["claim_scope"] >= 5
        metric = scrape(site.metrics_port)[("kiosk_control_refused_total", (("reason", "claim_scope"),))]
        assert metric == ("counter", status["control_refused"]["claim_scope"])
        assert site.log_lines("claim for gate 'A1' refused for key 'cam-host-2'") == 1  # rate-limited
        assert events.wait_for(lambda ev: ev.health, 30)
        assert kiosk(site.config, "capture", "--camera", "cam-a1").wait(60) == 0
        assert events.wait_for(lambda ev: ev.events, 30)
        decisions = [(e.type, e.reason, e.subject_id) for e in events.events if isinstance(e, Event)]
        assert decisions == [("accept", None, "YAO")], decisions
    finally:
        events.close()


def test_a_cameras_key_claims_its_own_gate_only(site):
    assert site.claim("cam-host-1", "A1", "YAO")["ok"] is True
    reply = site.claim("cam-host-1", "B2", "YAO")
    assert reply["ok"] is False and "gate 'B2'" in reply["error"] and "'cam-host-1'" in reply["error"]
    assert "may claim A1" in reply["error"]


def test_operator_keys_claim_their_gates_the_tools_key_any(site):
    for key in ("client", "desk"):  # the tools key, an operator key for every gate
        for gate in ("A1", "B2"):
            assert site.claim(key, gate, "YAO")["ok"] is True, (key, gate)
    assert site.claim("reader-a1", "A1", "YAO")["ok"] is True
    reply = site.claim("reader-a1", "B2", "YAO")
    assert reply["ok"] is False and "gate 'B2'" in reply["error"] and "operator key for A1" in reply["error"]
    assert site.claim("client", "Z9", "YAO")["error"].startswith("unknown gate")  # checked as before


def test_status_shows_claimed_passenger_ids_to_operator_keys_only(site):
    assert site.claim("client", "B2", "PARKER")["ok"] is True  # B2's camera never runs here: it stays pending
    camera = site.ask("cam-host-1", {"cmd": "status"})
    assert camera["ok"] is True and camera["claims"]["B2"] is None and camera["passenger_ids_hidden"] is True
    assert "PARKER" not in json.dumps(camera)
    assert camera["caller"]["claims"] == ["A1"] and camera["caller"]["passenger_ids"] == []
    reader = site.ask("reader-a1", {"cmd": "status"})
    assert reader["claims"]["B2"] is None and "PARKER" not in json.dumps(reader)
    tools = site.ask("client", {"cmd": "status"})
    assert tools["claims"]["B2"] == "PARKER" and tools["passenger_ids_hidden"] is False
    # `kiosk status` on the camera host: works, says the subject is hidden.
    data = yaml.safe_load(site.config.read_text())
    data["security"]["client_key"] = "cam-host-1"
    cam_config = site.config.parent / "cam-host-1.yaml"
    cam_config.write_text(yaml.safe_dump(data))
    res = run_cli("kiosk", "status", "-c", str(cam_config))
    assert res.returncode == 0, res.stderr
    assert "gate B2 -> (subject hidden from this key)" in res.stdout and "PARKER" not in res.stdout


def test_a_key_deleted_from_the_allow_list_is_refused_on_its_open_connection(site):
    """Revocation without a restart reaches a connection made before it: the names are read per request."""
    transport = Transport(site.cfg, role="test desk", client_key="desk")
    sock = transport.control_client(5000)
    try:
        sock.send_json({"v": 1, "cmd": "claim", "gate_id": "B2", "subject_id": "YAO"})
        assert sock.recv_json()["ok"] is True
        (site.config.parent / "keys" / "authorized_clients" / "desk.key").unlink()
        sock.send_json({"v": 1, "cmd": "status"})
        reply = sock.recv_json()
        assert reply["ok"] is False and "revoked" in reply["error"] and "claims" not in reply
    finally:
        sock.close(linger=0)
        transport.close()
