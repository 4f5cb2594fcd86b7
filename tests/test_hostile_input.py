"""Broken and hostile input: photos of every kind get the same checks, frame messages are bounded before
anything is decoded, and the verifier stays up with bounded memory whatever an allowed peer sends."""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import asdict

import cv2
import numpy as np
import pytest
import yaml

from kiosk.config import load_config
from kiosk.errors import ImageError
from kiosk.messaging.messages import FrameHeader
from kiosk.messaging.transport import Transport, control_request
from kiosk.tools.scenes import Walk
from kiosk.vision.images import decode_image, image_size
from tests.conftest import run_cli
from tests.pipeline_helpers import Events, kiosk, make_video, people, stop, write_config
from tests.waiting import wait_until


def _png_with_orientation(bgra: np.ndarray, orientation: int) -> bytes:
    """A PNG with an eXIf chunk holding one EXIF Orientation tag (6: turn 90 degrees clockwise to view)."""
    data = cv2.imencode(".png", bgra)[1].tobytes()
    tiff = (
        b"II*\x00"
        + struct.pack("<I", 8)
        + struct.pack("<H", 1)
        + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
        + struct.pack("<I", 0)
    )
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    return data[:33] + chunk + data[33:]  # right after the signature and IHDR


def test_rgba_photo_gets_exif_orientation_and_size_check():
    bgra = np.zeros((40, 80, 4), np.uint8)
    bgra[:, :40] = (0, 0, 255, 255)  # left half opaque red, right half transparent
    upright = decode_image(_png_with_orientation(bgra, 6), "turned.png")
    assert upright.shape == (80, 40, 3)  # turned like the colour image, not left as stored
    assert upright[0, 0].tolist() == [0, 0, 255] and upright[-1, -1].tolist() == [255, 255, 255]
    plain = decode_image(cv2.imencode(".png", bgra)[1].tobytes(), "plain.png")
    assert plain.shape == (40, 80, 3) and plain[0, -1].tolist() == [255, 255, 255]  # composited over white
    with pytest.raises(ImageError, match="too small"):
        decode_image(cv2.imencode(".png", np.zeros((8, 200, 4), np.uint8))[1].tobytes(), "strip.png")


def _jpeg_bomb(width: int = 16000, height: int = 16000) -> bytes:
    """A small JPEG whose header says width x height: decoding it allocates width*height*3 bytes."""
    data = bytearray(cv2.imencode(".jpg", np.full((360, 640, 3), 128, np.uint8))[1].tobytes())
    i = 2
    while data[i + 1] not in (0xC0, 0xC2):
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    data[i + 5 : i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_jpeg_bomb_and_huge_message_from_an_allowed_key(tmp_path, engine, photos):
    """An allowed capture key sends a JPEG bomb (640x360 header, 16000x16000 inside) and a 200 MB message:
    the verifier stays up, its peak memory stays where it was, and real frames before and after are decided."""
    assert image_size(_jpeg_bomb()) == (16000, 16000)
    crops = people(engine, photos)
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=40, w0=80, w1=170)], seconds=1.5)
    make_video(tmp_path / "parker.avi", [Walk(crops["parker"], start=0, frames=40, w0=80, w1=170)], seconds=1.5)
    config = write_config(
        tmp_path, [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": False, "encoding": "jpeg"}]
    )
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    verifier = kiosk(config, "verify")
    events = Events(config, ("event.", "health.verifier"))
    transport = Transport(load_config(config), role="test-hostile")
    try:
        assert events.wait_for(lambda ev: ev.health, 30)
        pid = events.health[-1]["pid"]
        assert kiosk(config, "capture", "--camera", "cam-a1").wait(60) == 0
        assert events.wait_for(lambda ev: [e.type for e in ev.events] == ["accept"], 20)
        baseline = _peak_rss_mb(pid)
        push = transport.frame_sender()
        header = FrameHeader("cam-a1", "A1", 10_000, time.time(), 640, 360, "jpeg")
        head = json.dumps(asdict(header)).encode()
        push.send_multipart([header.topic(), head, _jpeg_bomb()])
        huge = np.zeros(200 * 1024 * 1024, np.uint8)
        sent = push.send_multipart([header.topic(), head, memoryview(huge)], copy=False, track=True)
        # ZeroMQ lets go of the 200 MB once it is written or dropped: the verifier cuts the connection when it
        # reads the part's size (over MAXMSGSIZE), and counts nothing (ZeroMQ drops it before it is a message).
        assert sent is not None
        sent.wait(30)
        del huge

        def bomb_refused() -> dict | None:  # read and counted as a bad message
            status = control_request(transport, {"cmd": "status"})
            return status if status is not None and status["bad_messages"] >= 1 else None

        assert wait_until(bomb_refused, 20, "the JPEG bomb refused", every=0.2)["pid"] == pid  # the same process
        assert _peak_rss_mb(pid) < baseline + 60, (baseline, _peak_rss_mb(pid))
        # Real frames after the attack still get their decision.
        cfg2 = tmp_path / "after.yaml"
        data = yaml.safe_load(config.read_text())
        data["cameras"][0]["source"] = "parker.avi"
        cfg2.write_text(yaml.safe_dump(data))
        assert kiosk(cfg2, "capture", "--camera", "cam-a1").wait(60) == 0
        assert events.wait_for(lambda ev: [e.type for e in ev.events] == ["accept", "reject"], 20)
        assert verifier.poll() is None
    finally:
        events.close()
        transport.close()
        _, err = stop(verifier)
    assert "Traceback" not in err


def test_files_are_private_and_a_readable_gallery_is_reported(tmp_path, photos):
    (tmp_path / "site").mkdir()
    config = write_config(tmp_path / "site", [{"id": "cam-a1", "gate": "A1", "source": 0}])
    (tmp_path / "site" / "gallery.db").unlink()  # made by the test's helper; here kiosk-enroll makes it
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    gallery = tmp_path / "site" / "gallery.db"
    assert gallery.stat().st_mode & 0o777 == 0o600
    res = run_cli("kiosk", "keys", "init", str(tmp_path / "newkeys"))
    assert res.returncode == 0
    assert (tmp_path / "newkeys").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "newkeys" / "webhook.secret").stat().st_mode & 0o777 == 0o600
    gallery.chmod(0o644)  # copied in by hand, say
    verifier = kiosk(config, "verify", quiet=False)
    try:
        wait_until((tmp_path / "site" / "events.jsonl").exists, 30, "the verifier's audit log", every=0.2)
        assert (tmp_path / "site" / "events.jsonl").stat().st_mode & 0o777 == 0o600
    finally:
        _, err = stop(verifier)
    assert f"{gallery} is readable by other users (mode 644)" in err


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header (IHDR, CRC fixed) says width x height, 16-bit: decoding it would
    allocate width*height*6 bytes."""
    data = bytearray(cv2.imencode(".png", np.zeros((20, 20, 3), np.uint16))[1].tobytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_enrollment_input_is_bounded(tmp_path, photos):
    """A manifest naming a device, a FIFO, a huge-dimension PNG and a folder: each row refused with its line,
    at once, and the rest enrolled; a name with U+2028 and a quoted newline stays one row."""
    import os

    config = write_config(tmp_path, [])
    fifo = tmp_path / "photo.fifo"
    os.mkfifo(fifo)
    (tmp_path / "huge.png").write_bytes(_png_claiming(6000, 6000))
    (tmp_path / "folder.jpg").mkdir()
    manifest = tmp_path / "flight.csv"
    manifest.write_text(
        "id,name,photo\n"
        "P1,/dev/zero,/dev/zero\n"
        f"P2,a FIFO,{fifo}\n"
        "P3,huge,huge.png\n"
        "P4,folder,folder.jpg\n"
        f'P5,"Line\u2028Separator and a\nnewline",{photos["yaoming.jpg"]}\n',
        encoding="utf-8",
    )
    t0 = time.monotonic()
    res = run_cli("kiosk-enroll", "-c", str(config), "import", "--no-progress", str(manifest), timeout=120)
    assert time.monotonic() - t0 < 60 and "Traceback" not in res.stderr
    assert res.returncode == 2, res.stdout + res.stderr
    out = res.stdout
    assert "5 row(s), 1 enrolled, 0 already enrolled from the same photo, 4 refused" in out
    assert "line 2 id=P1: refused (unreadable): /dev/zero: not a regular file" in out
    assert f"line 3 id=P2: refused (unreadable): {fifo}: not a regular file" in out
    assert "line 4 id=P3: refused (unreadable)" in out and "6000x6000 px, more than 25 megapixels" in out
    assert "line 5 id=P4: refused (unreadable)" in out and "is a directory" in out
    listed = json.loads(run_cli("kiosk-enroll", "-c", str(config), "list", "--json").stdout)["subjects"]
    assert [(s["id"], s["name"]) for s in listed] == [("P5", "Line\u2028Separator and a\nnewline")]
    # The manifest itself is bounded too.
    res = run_cli("kiosk-enroll", "-c", str(config), "import", "/dev/zero", timeout=30)
    assert res.returncode == 2 and "not a regular file" in res.stderr
