"""The capture's side of idle hints (IdleHold), rule by rule, over a real ZeroMQ PUB/SUB pair."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from kiosk.messaging.messages import IDLE_TOPIC, IdleHint
from kiosk.services.capture import IdleHold
from kiosk.vision.scene_change import thumbnail

FPS = 30.0


@pytest.fixture
def link():
    """An XPUB the test publishes hints on (it reports the capture's subscription, so nothing is sent before
    the capture listens) and the IdleHold listening on a SUB for camera cam1."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.bind("inproc://hints")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, (IDLE_TOPIC + "cam1").encode())
    sub.connect("inproc://hints")
    assert pub.poll(2000) and pub.recv() == b"\x01" + (IDLE_TOPIC + "cam1").encode()
    yield pub, sub, IdleHold(sub, "cam1")
    ctx.destroy(linger=0)


def tell(pub: zmq.Socket, sub: zmq.Socket, parts: list[bytes]) -> None:
    pub.send_multipart(parts)
    assert sub.poll(2000)  # arrived (not read: the hold reads it)


def hint(seq: int, *, idle: bool = True, camera: str = "cam1", every_s: float = 1.0) -> list[bytes]:
    parts = IdleHint(camera, idle, seq, seq / FPS, 12.0, every_s).encode()
    return [(IDLE_TOPIC + camera).encode(), parts[1]] if camera != "cam1" else parts


RNG = np.random.default_rng(3)
SCENE = np.full((240, 320, 3), 140, np.uint8)
SCENE[150:] = 90


def still() -> np.ndarray:
    """The empty scene with fresh sensor noise (sigma 3)."""
    return np.clip(SCENE + RNG.normal(0, 3, SCENE.shape), 0, 255).astype(np.uint8)


def moved() -> np.ndarray:
    image = still()
    image[60:140, 120:200] = 40  # someone steps in: a dark 80x80 patch
    return image


def held(hold: IdleHold, seq: int, image: np.ndarray, now: float = 0.0) -> bool:
    return hold.hold(seq, seq / FPS, thumbnail(image), now)


def test_without_a_hint_every_frame_goes(link):
    _, _, hold = link
    assert not any(held(hold, seq, still()) for seq in range(40))


def test_a_hint_holds_unchanged_frames_sends_one_a_second_and_the_first_changed_one(link):
    pub, sub, hold = link
    for seq in range(3):
        assert not held(hold, seq, still())
    tell(pub, sub, hint(1))
    # Frame 2 was the last sent (clock 2/30): frames until a second after it are held, then one goes.
    assert all(held(hold, seq, still()) for seq in range(3, 32))
    assert not held(hold, 32, still())  # the safety net (32/30 - 2/30 = 1 s)
    assert held(hold, 33, still())  # the hint still holds: the verifier will renew it from frame 32
    assert not held(hold, 34, moved())  # something moved: sent at once ...
    assert not any(held(hold, seq, still()) for seq in range(35, 45))  # ... and every frame until told again


def test_a_hint_that_names_no_frame_sent_a_lapsed_one_and_another_cameras_hold_nothing(link):
    pub, sub, hold = link
    for seq in range(3):
        held(hold, seq, still())
    wrong_clock = IdleHint("cam1", True, 1, 5.0, 12.0, 1.0).encode()  # seq 1 of an earlier run of this capture
    tell(pub, sub, wrong_clock)
    assert not held(hold, 3, still())
    tell(pub, sub, hint(1, camera="cam10"))  # the subscription is a prefix: cam10's hint reaches cam1's socket
    assert not held(hold, 4, still())
    tell(pub, sub, hint(4))
    assert held(hold, 5, still(), now=0.0)
    assert not held(hold, 6, still(), now=3.6)  # not renewed for three safety-net intervals: lapsed


def test_busy_ends_the_hold_and_a_malformed_hint_is_counted_not_raised(link):
    pub, sub, hold = link
    for seq in range(3):
        held(hold, seq, still())
    tell(pub, sub, hint(2))
    assert held(hold, 3, still())
    tell(pub, sub, [(IDLE_TOPIC + "cam1").encode(), b'{"camera_id": "cam1", "idle": "yes"}'])
    tell(pub, sub, [(IDLE_TOPIC + "cam1").encode(), b"\xff not json"])
    assert held(hold, 4, still()) and hold.bad == 2
    tell(pub, sub, hint(4, idle=False))
    assert not any(held(hold, seq, still()) for seq in range(5, 10))


def test_no_socket_no_hold():
    hold = IdleHold(None, "cam1")
    assert not any(hold.hold(seq, seq / FPS, thumbnail(still()), 0.0) for seq in range(10))
