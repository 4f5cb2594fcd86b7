"""Hostile or mistaken input: malformed messages, hung hooks, bad expiry dates, failing children."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest

from kiosk.messaging.messages import BadMessage, decode_event, decode_frame
from tests.conftest import run_cli
from tests.pipeline_helpers import kiosk, stop, write_config
from tests.sealing_helpers import sealed_gallery
from tests.waiting import wait_until


@pytest.mark.parametrize(
    "header",
    [
        b"[" * 200_000,  # nesting deep enough to blow the JSON parser's stack
        b'{"v":1,"camera_id":"c","gate_id":"g","seq":1,"captured_at":1' + b"0" * 400 + b',"width":2,"height":2,'
        b'"encoding":"bgr8"}',  # a float overflow
        b'{"v":1,"camera_id":"c","gate_id":"g","seq":' + b"9" * 5000 + b"}",  # past the int-digit limit
        b'{"v":1,"camera_id":"c","gate_id":"g","seq":1,"captured_at":1.0,"width":2,"height":2,"encoding":"bgr8",'
        b'"pts":NaN}',
        b"\xff\xfe not utf-8",
    ],
)
def test_malformed_frames_are_bad_messages_not_crashes(header):
    with pytest.raises(BadMessage):
        decode_frame([b"frame.c", header, b"\x00" * 12])


def test_event_validation():
    with pytest.raises(BadMessage, match="unknown type"):
        decode_event([b"event.A1", json.dumps({"v": 1, "type": "open_sesame", "gate_id": "A1"}).encode()])
    with pytest.raises(BadMessage, match="does not match"):
        decode_event([b"event.A2", json.dumps({"v": 1, "type": "accept", "gate_id": "A1"}).encode()])
    with pytest.raises(BadMessage, match="schema version"):
        decode_event([b"event.A1", json.dumps({"v": 9, "type": "accept", "gate_id": "A1"}).encode()])


def test_hung_exec_hook_is_killed_with_its_children():
    from kiosk.services.subscriber import exec_hook

    marker = f"sleep {37 + time.time() % 1:.4f}"
    deliver = exec_hook(f"{marker}; true", timeout_s=0.5)
    with pytest.raises(RuntimeError, match="timed out"):
        deliver({"type": "accept", "event_id": "x"})
    wait_until(
        lambda: not subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split(),
        5,
        f"no process left running {marker!r}",
    )


def test_expiry_dates(tmp_path, photos):
    config = write_config(tmp_path, [])
    res = run_cli(
        "kiosk-enroll", "-c", str(config), "add", "--id", "P", "--expires", "2001-01-01", str(photos["yaoming.jpg"])
    )
    assert res.returncode == 2 and "in the past" in res.stderr
    assert not (tmp_path / "gallery.db").exists()
    today = time.strftime("%Y-%m-%d")
    res = run_cli("kiosk-enroll", "-c", str(config), "add", "--id", "P", "--expires", today, str(photos["yaoming.jpg"]))
    assert res.returncode == 0, res.stderr  # a bare date is valid through that whole day
    listing = json.loads(run_cli("kiosk-enroll", "-c", str(config), "list", "--json").stdout)
    assert listing["subjects"][0]["expires"] > time.time()


def test_matrix_knows_when_to_rebuild_for_expiry(tmp_path):
    rng = np.random.default_rng(0)
    e = rng.normal(size=(2, 8)).astype(np.float32)
    with sealed_gallery(tmp_path / "g.db") as g:
        g.enroll("soon", "", e[:1], "m", expires=time.time() + 5)
        g.enroll("later", "", e[1:], "m", expires=time.time() + 500)
        m = g.matrix("m", 8)
        assert m.subject_ids == ["later", "soon"] and m.next_expiry == pytest.approx(time.time() + 5, abs=1)
        assert g.matrix("m", 8, now=time.time() + 10).subject_ids == ["later"]


def test_missing_gallery_is_an_error_for_list_and_remove(tmp_path):
    config = write_config(tmp_path, [])
    for args in (["list"], ["remove", "X"]):
        res = run_cli("kiosk-enroll", "-c", str(config), *args)
        assert res.returncode == 2 and "does not exist" in res.stderr
    assert not (tmp_path / "gallery.db").exists()


def test_run_stops_with_exit_2_when_a_child_has_a_config_error(tmp_path):
    config = write_config(
        tmp_path,
        [{"id": "c", "gate": "A1", "source": 0}],
        transport={"frames": "127.0.0.1:1", "events": "tcp://127.0.0.1:1", "control": "tcp://127.0.0.1:1"},
    )
    run = kiosk(config, "run", quiet=False)
    try:
        assert run.wait(60) == 2
    finally:
        out, err = stop(run)
    assert "configuration or usage error" in err
