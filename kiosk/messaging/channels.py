"""Typed channels: every received message as a value of its type, decoded and validated in one place.

`FrameChannel` is the verifier's side of the frame socket:
`recv()` -> `Frame | Eof | CaptureHealth`. `EventChannel` is any
subscriber's side of the event socket (gate hooks, bench, demo, tests):
`recv()` -> `Event | Heartbeat | CaptureHealth`. A malformed message is
never returned and never raised: it is handed to `on_bad` (count it, log it
now and then) and the channel goes on. `wait_until_eof()` is the one way to
know that a run's file sources have been read and decided (supervisor,
bench, tests).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Union

import zmq

from kiosk.messaging.messages import (EOF_TOPIC, EVENT_TOPIC, FRAME_TOPIC, HEALTH_TOPIC, BadMessage,
                                      CaptureHealth, Eof, Event, Frame, Heartbeat, decode_event, decode_frame,
                                      decode_json)

FrameMessage = Union[Frame, Eof, CaptureHealth]
EventMessage = Union[Event, Heartbeat, CaptureHealth]
OnBad = Callable[[str], None]
DECODE_ERRORS = (BadMessage, ValueError, TypeError, OverflowError, RecursionError)
VERIFIER_HEALTH = HEALTH_TOPIC + "verifier"
CAPTURE_HEALTH = HEALTH_TOPIC + "capture."


def _ignore(_why: str) -> None:
    pass


def _capture_health(topic: str, parts: list[Any], cameras: Iterable[str] | None) -> CaptureHealth:
    _, body = decode_json(parts, "health")
    cam_id = str(body.get("camera_id", ""))
    if topic != CAPTURE_HEALTH + cam_id or (cameras is not None and cam_id not in cameras):
        raise BadMessage(f"health message {topic[:60]!r} is not from a configured camera")
    return CaptureHealth(cam_id, body)


class FrameChannel:
    """What the captures send: frames, end-of-source markers and their health, for known cameras only."""

    def __init__(self, sock: zmq.Socket, cameras: Iterable[str], on_bad: OnBad = _ignore,
                 owners: dict[str, str] | None = None) -> None:
        """`owners`: camera id -> the z85 public key allowed to speak for it (None: CurveZMQ is off)."""
        self.sock = sock
        self.cameras = frozenset(cameras)
        self.on_bad = on_bad
        self.owners = owners

    def recv(self, max_reads: int = 16) -> FrameMessage | None:
        """The next valid message waiting, or None when nothing is (never blocks; reads at most `max_reads`
        raw messages, so a flood of malformed ones cannot hold the caller)."""
        for _ in range(max_reads):
            try:
                raw = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            message = self.decode([p.bytes if i < 2 else p.buffer for i, p in enumerate(raw)], time.time())
            if message is not None and self._from_owner(message, raw[0]):
                return message
        return None

    def _from_owner(self, message: FrameMessage, first: zmq.Frame) -> bool:
        """A camera's messages come from its own capture key only (ZAP's User-Id: the sender's public key)."""
        if self.owners is None:
            return True
        camera = message.header.camera_id if isinstance(message, Frame) else message.camera_id
        try:
            sender = first.get("User-Id")
        except zmq.ZMQError:
            sender = None
        if sender != self.owners.get(camera):
            self.on_bad(f"a message for camera {camera!r} from a key that is not its capture's "
                        f"(cameras[].key); dropped")
            return False
        return True

    def decode(self, parts: list[Any], now: float) -> FrameMessage | None:
        topic = bytes(parts[0]).decode("utf-8", "replace") if parts else ""
        try:
            if topic.startswith(FRAME_TOPIC):
                header, image = decode_frame(parts)
                if header.camera_id not in self.cameras:
                    raise BadMessage(f"frame from unknown camera {header.camera_id!r}")
                return Frame(header, image, now)
            if topic.startswith(HEALTH_TOPIC):
                return _capture_health(topic, parts, self.cameras)
            if topic.startswith(EOF_TOPIC):
                _, body = decode_json(parts, "eof")
                cam_id = str(body.get("camera_id"))
                if cam_id not in self.cameras or topic != EOF_TOPIC + cam_id:
                    raise BadMessage(f"eof from unknown camera {body.get('camera_id')!r}")
                return Eof(cam_id)
            raise BadMessage(f"unknown topic {topic[:40]!r}")
        except DECODE_ERRORS as exc:
            self.on_bad(f"{exc.__class__.__name__}: {exc}"[:300])
            return None


class EventChannel:
    """What the verifier publishes: decisions, its heartbeat and the captures' health it relays."""

    def __init__(self, sock: zmq.Socket, on_bad: OnBad = _ignore) -> None:
        self.sock = sock
        self.on_bad = on_bad

    def recv(self, timeout_ms: int = 0) -> EventMessage | None:
        """The next valid message within `timeout_ms`, or None."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            wait = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(wait):
                return None
            message = self.decode(self.sock.recv_multipart())
            if message is not None:
                return message

    def decode(self, parts: list[bytes]) -> EventMessage | None:
        topic = parts[0].decode("utf-8", "replace") if parts else ""
        try:
            if topic == VERIFIER_HEALTH:
                return Heartbeat(decode_json(parts, "health")[1])
            if topic.startswith(CAPTURE_HEALTH):
                return _capture_health(topic, parts, None)
            if topic.startswith(EVENT_TOPIC):
                return decode_event(parts)
            raise BadMessage(f"unknown topic {topic[:40]!r}")
        except DECODE_ERRORS as exc:
            self.on_bad(f"{exc.__class__.__name__}: {exc}"[:300])
            return None


def sources_done(status: dict[str, Any] | None, cameras: Iterable[str]) -> bool:
    """From a verifier status reply: every camera in `cameras` has reached its end and been processed."""
    if not status or not status.get("ok"):
        return False
    known = status.get("cameras", {})
    return all(known.get(cid, {}).get("eof") for cid in cameras) and status.get("queue_depth") == 0


def wait_until_eof(ask: Callable[[], dict[str, Any] | None], cameras: Iterable[str], *, timeout_s: float,
                   every_s: float = 0.1, while_waiting: Callable[[], None] = lambda: None) -> bool:
    """Ask the verifier's status (`ask`) until the file sources `cameras` are read and decided; False on
    timeout. `while_waiting` runs between asks (e.g. to take events off a socket)."""
    cameras = list(cameras)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        while_waiting()
        if sources_done(ask(), cameras):
            return True
        time.sleep(every_s)
    return False
