"""A Motion JPEG source read as the camera's own packets: decoded only as far as needed, sent as it came."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from kiosk.config import load_config
from kiosk.messaging.messages import decode_frame, decode_json
from kiosk.messaging.transport import Transport
from kiosk.services.capture import Capture, VideoSource
from kiosk.tools.scenes import write_video
from kiosk.vision.scene_change import unchanged
from tests.pipeline_helpers import write_config

FRAMES = 12
BROKEN = 5  # the frame whose packet the test breaks


def scene(i: int) -> np.ndarray:
    """A still gate area with sensor noise, and a bright square that moves a little each frame."""
    rng = np.random.default_rng(i)
    image = np.full((240, 320, 3), 120, np.uint8)
    image[150:] = 70
    image = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    image[40:90, 20 + 8 * i : 70 + 8 * i] = 230
    return image


def packets(path: Path) -> list[bytes]:
    """The file's JPEG packets, as OpenCV's FFmpeg backend hands them over."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    assert cap.set(cv2.CAP_PROP_FORMAT, -1)
    out = []
    while True:
        ok, packet = cap.read()
        if not ok:
            return out
        out.append(packet.tobytes())


def break_packet(path: Path, index: int) -> None:
    """Overwrite the start-of-frame marker of one frame's JPEG, so its size cannot be read and it decodes to
    nothing (what a camera's corrupted frame looks like)."""
    data = bytearray(path.read_bytes())
    at = -1
    for _ in range(index + 1):
        at = data.index(b"\xff\xd8\xff", at + 1)
    sof = data.index(b"\xff\xc0", at)
    data[sof + 1] = 0x01
    path.write_bytes(bytes(data))


def test_a_motion_jpeg_file_is_read_as_packets_that_decode_as_the_frames_do(tmp_path):
    path = write_video(tmp_path / "gate.avi", [scene(i) for i in range(FRAMES)])
    source = VideoSource(str(path), live=False, fps=None)
    assert source.open() and source.packets
    decoded = cv2.VideoCapture(str(path))
    for i in range(FRAMES):
        frame = source.read()
        ok, reference = decoded.read()
        assert ok and frame.jpeg is not None and (frame.width, frame.height) == (320, 240)
        image = frame.image()
        assert image.shape == reference.shape
        assert np.abs(image.astype(int) - reference).mean() < 1.5  # libjpeg and FFmpeg's decoder agree
        if i == 0:
            first = frame.thumb()
        else:  # the quarter-size grey thumbnail sees the square move, and nothing else
            assert not unchanged(frame.thumb(), first, 12.0)
    assert source.read() is None
    source.close()


@pytest.mark.parametrize("encoding", ["jpeg", "bgr8"])
def test_the_capture_sends_the_cameras_own_jpeg_or_decodes_it_and_skips_a_broken_packet(tmp_path, encoding):
    path = write_video(tmp_path / "gate.avi", [scene(i) for i in range(FRAMES)])
    break_packet(path, BROKEN)
    expected = packets(path)
    assert len(expected) == FRAMES
    cfg = load_config(
        write_config(
            tmp_path, [{"id": "cam1", "gate": "G1", "source": "gate.avi", "realtime": False, "encoding": encoding}]
        )
    )
    verifier = Transport(cfg, role="verifier")
    frames = verifier.frame_receiver()
    capture = Capture(cfg, "cam1")
    runner = threading.Thread(target=capture.run, daemon=True)
    runner.start()
    got: dict[int, tuple] = {}
    eof = health = None
    try:
        while eof is None:
            assert frames.poll(10_000), "the capture stopped sending"
            parts = frames.recv_multipart()
            if parts[0].startswith(b"eof."):
                eof = decode_json(parts, "eof")[1]
            elif parts[0].startswith(b"health."):
                health = decode_json(parts, "health")[1]
            elif parts[0].startswith(b"frame."):
                header, image = decode_frame(parts)
                got[header.seq] = (header, bytes(parts[2]), image)
        runner.join(10)
    finally:
        capture.stop()
        capture.close()
        frames.close()
        verifier.close()
    assert sorted(got) == [i for i in range(FRAMES) if i != BROKEN]
    assert eof["sent"] == FRAMES - 1 and eof["frames"] == FRAMES
    assert health["faults"] == 1 and f"frame {BROKEN} " in health["last_error"]  # said, and the stream went on
    for seq, (header, payload, image) in got.items():
        assert header.encoding == encoding and (header.width, header.height) == (320, 240)
        if encoding == "jpeg":
            assert payload == expected[seq]  # as the camera encoded it: not decoded, not encoded again
        else:
            assert np.array_equal(image, cv2.imdecode(np.frombuffer(expected[seq], np.uint8), cv2.IMREAD_COLOR))
