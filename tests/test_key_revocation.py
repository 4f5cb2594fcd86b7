"""CurveZMQ allow-lists are read at each handshake: a key removed while the verifier runs is refused from the
next connection on, without a restart, and no copy of any key is left in a temporary folder."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from kiosk.config import load_config
from kiosk.messaging.transport import Transport, control_request, init_keys
from kiosk.tools.scenes import Walk
from tests.pipeline_helpers import kiosk, make_video, people, stop, write_config


def test_a_removed_key_is_refused_without_a_restart(tmp_path, engine, photos):
    crops = people(engine, photos)
    make_video(tmp_path / "loop.avi", [Walk(crops["yao"], start=0, frames=20, w0=80, w1=120)], seconds=1.0)
    config = write_config(tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "loop.avi", "realtime": True,
                                      "loop": True, "key": "cam-host"}])
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
        deadline = time.monotonic() + 30
        while control_request(admin, {"cmd": "status"}, timeout_ms=1000) is None:
            assert time.monotonic() < deadline
        capture = kiosk(cam_config, "capture", "--camera", "cam-a1")
        time.sleep(3.0)
        _, err = stop(capture)
        assert frames_in() > 10, err  # allowed: its frames arrive
        for folder in ("authorized_clients", "authorized_subscribers"):
            (tmp_path / "keys" / folder / "cam-host.key").unlink()  # revoked while the verifier runs
        before = frames_in()
        capture = kiosk(cam_config, "capture", "--camera", "cam-a1")
        time.sleep(3.0)
        _, err = stop(capture)
        assert "refused this machine's key 'cam-host'" in err
        assert frames_in() == before
        assert verifier.poll() is None
    finally:
        admin.close()
        stop(verifier)
    assert set(Path(tempfile.gettempdir()).glob("kiosk-zap-*")) == zap_dirs_before
