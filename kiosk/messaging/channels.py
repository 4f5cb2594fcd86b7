"""Typed channels: every received message as a value of its type, decoded and validated in one place.

`FrameChannel` is the verifier's side of the frame socket:
`recv()` -> `Frame | Eof | CaptureHealth`. It settles who sent a message
before it reads it: the camera named in the topic and the sender's key
(ZAP's User-Id) must match `cameras[].key`, so a key that does not own a
camera costs a topic comparison, never a JSON parse or an image decode; a
frame's header and its bounds (seq, captured_at against this host's clock)
come next, and its pixels last. `EventChannel` is any
subscriber's side of the event socket (gate hooks, bench, demo, tests):
`recv()` -> `Event | Heartbeat | CaptureHealth`. A malformed message is
never returned and never raised: it is handed to `on_bad` (count it, log it
now and then) and the channel goes on. `wait_until_eof()` is the one way to
know that a run's file sources have been read and decided (supervisor,
bench, tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from kiosk.messaging.messages import (
    EOF_TOPIC,
    EVENT_TOPIC,
    FRAME_TOPIC,
    HEALTH_TOPIC,
    MAX_TOPIC_BYTES,
    BadMessage,
    CaptureHealth,
    Eof,
    Event,
    Frame,
    Heartbeat,
    OutOfBounds,
    Part,
    check_frame_clock,
    decode_event,
    decode_frame_header,
    decode_frame_image,
    decode_json,
)
from kiosk.messaging.status import VerifierStatus

FrameMessage = Frame | Eof | CaptureHealth
EventMessage = Event | Heartbeat | CaptureHealth
OnBad = Callable[[str], None]
DECODE_ERRORS = (BadMessage, ValueError, TypeError, OverflowError, RecursionError)
VERIFIER_HEALTH = HEALTH_TOPIC + "verifier"
GATE_HEALTH = HEALTH_TOPIC + "gate."  # + gate id: one gate's part of the heartbeat
CAPTURE_HEALTH = HEALTH_TOPIC + "capture."


def _ignore(_why: str) -> None:
    pass


def _capture_health(topic: str, parts: Sequence[Part], cameras: Iterable[str] | None) -> CaptureHealth:
    _, body = decode_json(parts, "health")
    cam_id = str(body.get("camera_id", ""))
    if topic != CAPTURE_HEALTH + cam_id or (cameras is not None and cam_id not in cameras):
        raise BadMessage(f"health message {topic[:60]!r} is not from a configured camera")
    return CaptureHealth(cam_id, body)


REFUSALS = ("sender", "seq", "future", "past", "not_finite")  # "sender": a key that does not own the camera


@dataclass(frozen=True)
class Refusal:
    """A message for a configured camera that was refused: from a key that is not its capture's ("sender"), or
    a frame whose seq or capture time is out of bounds (kiosk.messaging.messages.OUT_OF_BOUNDS).
    `offset_s`: captured_at minus the receiver's clock, for "future" and "past"."""

    camera_id: str
    reason: str
    why: str
    offset_s: float | None = None


OnRefused = Callable[[Refusal], None]


class FrameChannel:
    """What the captures send: frames, end-of-source markers and their health, for known cameras only, each
    from its own capture's key."""

    TOPICS = ((FRAME_TOPIC, "frame"), (EOF_TOPIC, "eof"), (CAPTURE_HEALTH, "health"))

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        cameras: Iterable[str],
        on_bad: OnBad = _ignore,
        owners: dict[str, str] | None = None,
        on_refused: OnRefused | None = None,
    ) -> None:
        """`owners`: camera id -> the z85 public key allowed to speak for it (None: CurveZMQ is off).
        `on_refused`: told of each refused message (default: `on_bad` with why)."""
        self.sock = sock
        self.cameras = frozenset(cameras)
        self.on_bad = on_bad
        self.owners = owners
        self.on_refused = on_refused or (lambda refusal: on_bad(refusal.why))

    def recv(self, max_reads: int = 16) -> FrameMessage | None:
        """The next valid message waiting, or None when nothing is (never blocks; reads at most `max_reads`
        raw messages, so a flood of malformed or refused ones cannot hold the caller)."""
        for _ in range(max_reads):
            try:
                raw = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            message = self.admit(raw, time.time())
            if message is not None:
                return message
        return None

    def admit(self, raw: list[zmq.Frame], now: float) -> FrameMessage | None:
        """One received message, checked cheapest first: the camera its topic names and whether the sender's
        key owns that camera (no JSON, no pixels: all a refused sender costs), then the header and its bounds,
        then the pixels. None (and `on_bad` or `on_refused` told) for anything refused."""
        try:
            topic, camera, kind = self._route(raw[0])
        except BadMessage as exc:
            self.on_bad(f"{exc.__class__.__name__}: {exc}"[:300])
            return None
        if not self._from_owner(camera, raw[0]):
            return None
        parts: list[Part] = [topic.encode()] + [p.buffer for p in raw[1:]]
        try:
            if kind == "frame":
                header = decode_frame_header(parts)
                check_frame_clock(header, now)
                return Frame(header, decode_frame_image(header, parts[2]), now)
            if kind == "health":
                return _capture_health(topic, parts, self.cameras)
            _, body = decode_json(parts, "eof")
            if body.get("camera_id") != camera:
                raise BadMessage(f"eof: topic {topic[:60]!r} does not match camera_id {body.get('camera_id')!r}")
            return Eof(camera)
        except OutOfBounds as exc:
            self.on_refused(Refusal(camera, exc.reason, str(exc)[:300], exc.offset_s))
            return None
        except DECODE_ERRORS as exc:
            self.on_bad(f"{exc.__class__.__name__}: {exc}"[:300])
            return None

    def _route(self, first: zmq.Frame) -> tuple[str, str, str]:
        """(topic, camera, kind) from the topic alone; BadMessage for an unknown topic or camera."""
        if len(first) > MAX_TOPIC_BYTES:
            raise BadMessage(f"topic of {len(first)} bytes (at most {MAX_TOPIC_BYTES})")
        topic = first.bytes.decode("utf-8", "replace")
        for prefix, kind in self.TOPICS:
            if topic.startswith(prefix):
                camera = topic[len(prefix) :]
                if camera not in self.cameras:
                    raise BadMessage(f"{kind} from unknown camera {camera[:60]!r}")
                return topic, camera, kind
        raise BadMessage(f"unknown topic {topic[:40]!r}")

    def _from_owner(self, camera: str, first: zmq.Frame) -> bool:
        """A camera's messages come from its own capture key only (ZAP's User-Id: the sender's public key)."""
        if self.owners is None:
            return True
        try:
            sender = first.get("User-Id")
        except zmq.ZMQError:
            sender = None
        if sender != self.owners.get(camera):
            self.on_refused(
                Refusal(
                    camera,
                    "sender",
                    f"a message for camera {camera!r} from a key that is not "
                    f"its capture's (cameras[].key); dropped undecoded",
                )
            )
            return False
        return True


class EventChannel:
    """What the verifier publishes: decisions, its heartbeat and the captures' health it relays."""

    def __init__(self, sock: zmq.Socket[bytes], on_bad: OnBad = _ignore) -> None:
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
            if topic.startswith(GATE_HEALTH):
                body = decode_json(parts, "gate health")[1]
                gate = topic[len(GATE_HEALTH) :]
                if body.get("gate_id") != gate:
                    raise BadMessage(
                        f"gate health: topic {topic[:60]!r} does not match gate_id {str(body.get('gate_id'))[:40]!r}"
                    )
                return Heartbeat(body, gate)
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
    if not status or not status.get("ok") or "queue_depth" not in status:  # an older reply says nothing of it
        return False
    reply = VerifierStatus.from_json(status, "status reply")
    return all(cid in reply.cameras and reply.cameras[cid].eof for cid in cameras) and reply.queue_depth == 0


def wait_until_eof(
    ask: Callable[[], dict[str, Any] | None],
    cameras: Iterable[str],
    *,
    timeout_s: float,
    every_s: float = 0.1,
    while_waiting: Callable[[], None] = lambda: None,
) -> bool:
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
