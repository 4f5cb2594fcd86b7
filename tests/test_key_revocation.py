"""CurveZMQ allow-lists are read at each handshake: a key removed while the verifier runs is refused from the
next connection on, without a restart, and no copy of any key is left in a temporary folder."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from kiosk.config import load_config
from kiosk.messaging.transport import Transport, control_request, init_keys
from kiosk.tools.scenes import Walk, render, write_video
from tests.pipeline_helpers import kiosk, make_video, people, read_stderr_until, stop, write_config
from tests.waiting import wait_until


def test_a_removed_key_is_refused_without_a_restart(tmp_path, engine, photos):
    crops = people(engine, photos)
    make_video(tmp_path / "loop.avi", [Walk(crops["yao"], start=0, frames=20, w0=80, w1=120)], seconds=1.0)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "loop.avi", "realtime": True, "loop": True, "key": "cam-host"}],
    )
    init_keys(tmp_path / "keys", client_name="cam-host", role="all")
    data = yaml.safe_load(config.read_text())
    data["security"]["client_key"] = "cam-host"
    cam_config = tmp_path / "cam-host.yaml"
    cam_config.write_text(yaml.safe_dump(data))
    zap_dirs_before = set(Path(tempfile.gettempdir()).glob("kiosk-zap-*"))
    verifier = kiosk(config, "verify")
    admin = Transport(load_config(config), role="test-admin")

    def frames_in() -> int:
        status = control_request(admin, {"cmd": "status"}, timeout_ms=5000)
        assert status is not None
        return int(status["cameras"]["cam-a1"]["frames_in"])

    try:
        wait_until(lambda: control_request(admin, {"cmd": "status"}, timeout_ms=1000), 30, "the verifier's status")
        capture = kiosk(cam_config, "capture", "--camera", "cam-a1")
        try:
            wait_until(lambda: frames_in() > 10, 30, "the allowed capture's frames")  # allowed: its frames arrive
        finally:
            stop(capture)
        for folder in ("authorized_clients", "authorized_subscribers"):
            (tmp_path / "keys" / folder / "cam-host.key").unlink()  # revoked while the verifier runs
        before = frames_in()
        capture = kiosk(cam_config, "capture", "--camera", "cam-a1")
        try:
            read_stderr_until(capture, "refused this machine's key 'cam-host'", 30)
        finally:
            stop(capture)
        assert frames_in() == before
        assert verifier.poll() is None
    finally:
        admin.close()
        stop(verifier)
    assert set(Path(tempfile.gettempdir()).glob("kiosk-zap-*")) == zap_dirs_before


def test_a_key_file_gone_wrong_under_a_running_verifier_is_reported_at_once(tmp_path):
    """The template key made 0644, then the CurveZMQ server key replaced by another pair, under a running
    verifier whose key check runs every 0.3 s (the test override of its minute): each is in the status
    (`degraded`, `key_files`), the metric and one log line within the period, and fixing it is one more line."""
    import os
    import shutil

    import zmq.auth

    from kiosk.messaging.transport import free_port
    from kiosk.services.key_watch import KEY_CHECK_ENV
    from tests.pipeline_helpers import scrape

    port = free_port()
    write_video(tmp_path / "short.avi", render([], 5), 30.0)  # read to its end: a camera that is not down
    config = write_config(
        tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "short.avi", "realtime": False}], metrics={"port": port}
    )
    keys = tmp_path / "keys"
    verifier = kiosk(config, "verify", quiet=False, env={KEY_CHECK_ENV: "0.3"})
    admin = Transport(load_config(config), role="test-admin")

    def status_when(predicate, timeout: float) -> dict:
        def matching() -> dict | None:
            status = control_request(admin, {"cmd": "status"}, timeout_ms=2000)
            return status if status is not None and predicate(status) else None

        return wait_until(matching, timeout, "a verifier status that matches", every=0.05)

    def ok(key: str) -> float:
        return scrape(port)[("kiosk_key_file_ok", (("key", key),))][1]

    try:
        status_when(lambda s: True, 60)
        assert kiosk(config, "capture", "--camera", "cam-a1").wait(60) == 0
        status = status_when(lambda s: s["cameras"]["cam-a1"]["eof"], 10)
        assert status["status"] == "ok" and status["key_files"]["ok"], status
        assert ok("template") == 1 and ok("curve_server") == 1
        (keys / "template.key").chmod(0o644)
        started = time.monotonic()
        status = status_when(lambda s: s["status"] == "degraded", 5)
        assert time.monotonic() - started < 0.3 + 1.0  # within the period (and a status round trip)
        problem = status["key_files"]["problems"]["template"]
        assert "template.key is readable by other users (mode 0644" in problem and ok("template") == 0
        (keys / "template.key").chmod(0o600)
        status_when(lambda s: s["status"] == "ok" and s["key_files"]["ok"], 5)
        assert ok("template") == 1
        # Another CurveZMQ identity put in place of the server's: a restart would serve it to no one.
        shutil.copy(keys / "server.key_secret", tmp_path / "server.key_secret.saved")
        pub, sec = zmq.auth.create_certificates(str(tmp_path), "other")
        os.replace(sec, keys / "server.key_secret")
        os.chmod(keys / "server.key_secret", 0o600)
        status = status_when(lambda s: s["status"] == "degraded", 5)
        assert "holds another CurveZMQ key pair" in status["key_files"]["problems"]["curve_server"]
        assert ok("curve_server") == 0
        os.replace(tmp_path / "server.key_secret.saved", keys / "server.key_secret")
        status_when(lambda s: s["status"] == "ok", 5)
        assert verifier.poll() is None
    finally:
        admin.close()
        _, err = stop(verifier)
    assert err.count("is readable by other users (mode 0644") == 1, err  # one line when it changed ...
    assert err.count("is in order again") == 2  # ... and one when it was fixed
    assert err.count("holds another CurveZMQ key pair") == 1
