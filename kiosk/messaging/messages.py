"""Wire schema (version 1): frame headers, decision events, health, control.

Every message is JSON UTF-8; frames carry a second part with the pixels.
`decode_*` validate everything they receive and raise `BadMessage` with
what was wrong; the receiving loop counts and drops such messages.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from kiosk.vision.images import image_size

VERSION = 1
Part = bytes | memoryview  # one part of a message as received: bytes, or a zero-copy frame buffer
FRAME_TOPIC = "frame."
EOF_TOPIC = "eof."
EVENT_TOPIC = "event."
HEALTH_TOPIC = "health."
IDLE_TOPIC = "idle."  # the verifier to a live capture: its scene is empty (IdleHint)
EVENT_TYPES = ("accept", "reject", "verifier_down", "verifier_up", "events_missed")
# The largest frame accepted: 4096 px a side and 4096x2304 pixels (4K UHD fits). Every receiving socket
# refuses a message part larger than the largest such frame (transport.py), and a JPEG's own size is read
# from its header before anything is decoded, so no peer can make a process allocate more than that.
MAX_SIDE = 4096
MAX_FRAME_PIXELS = 4096 * 2304
MAX_FRAME_BYTES = MAX_FRAME_PIXELS * 3
MAX_HEADER_BYTES = 16 * 1024
MAX_TOPIC_BYTES = 1024  # a topic is `frame.<camera id>`: read (and copied) only up to this long
# A frame's `seq` is a count of frames since its capture started: an unsigned 63-bit integer (what every
# consumer, SQLite and Prometheus included, holds exactly). A negative or larger one is refused.
MAX_SEQ = 2**63 - 1
# A file source's media time (`pts`, seconds): non-negative and under ~31 years of video.
MAX_PTS_S = 1e9
# How far ahead of the verifier's clock a frame's `captured_at` may be. Hosts on NTP agree within a few
# milliseconds, so only an unsynchronised capture host (or a forged header) goes past this; a frame from further
# ahead is refused, because its age would look smaller than it is and the stale-frame guard
# (`policy.max_frame_age_ms`, 500 ms by default) would pass a frame older than it allows. Within the tolerance
# that guard can be off by at most this much. Half a second: 100 times what NTP leaves, the size of the guard.
CLOCK_SKEW_TOLERANCE_S = 0.5
# How far behind the verifier's clock a frame's `captured_at` may be on arrival. The verifier holds a few dozen
# frames per camera at most, seconds' worth even on a slow CPU, and a live camera's frame older than
# `policy.max_frame_age_ms` is dropped later anyway (`too_old`): an hour is absurd for any real frame, and what
# a capture host whose clock is far behind (or a forged header) sends.
MAX_FRAME_PAST_S = 3600.0


class BadMessage(ValueError):
    """A received message that does not follow the schema."""


OUT_OF_BOUNDS = ("seq", "future", "past", "not_finite")  # why a well-formed frame header is refused


class OutOfBounds(BadMessage):
    """A well-formed frame header whose `seq` or time is out of bounds: `reason` is one of OUT_OF_BOUNDS;
    `offset_s` is captured_at minus the receiver's clock for a frame from the future or the far past."""

    def __init__(self, reason: str, message: str, offset_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.offset_s = offset_s


@dataclass
class FrameHeader:
    camera_id: str
    gate_id: str
    seq: int
    captured_at: float
    width: int
    height: int
    encoding: str = "bgr8"
    pts: float | None = None  # media time of a file source (s); None for live sources
    v: int = VERSION

    def topic(self) -> bytes:
        return (FRAME_TOPIC + self.camera_id).encode()

    @property
    def clock(self) -> float:
        """The time base tracks age on: media time for a file, capture time for a live camera."""
        return self.captured_at if self.pts is None else self.pts


@dataclass(frozen=True)
class Frame:
    """A decoded frame message as it arrived (`received_at`: wall clock)."""

    header: FrameHeader
    image: np.ndarray
    received_at: float


@dataclass(frozen=True)
class Eof:
    """A file source's end (topic `eof.<camera>`)."""

    camera_id: str


@dataclass(frozen=True)
class CaptureHealth:
    """A capture's health (topic `health.capture.<camera>`), relayed by the verifier to subscribers."""

    camera_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Heartbeat:
    """The verifier's heartbeat, every `heartbeat.interval_s`: its own health for every allow-listed key (topic
    `health.verifier`, `gate_id` None), and each gate's (topic `health.gate.<gate>`: that gate's event count,
    cameras and flight) for the keys that hear that gate."""

    body: dict[str, Any]
    gate_id: str | None = None


@dataclass(frozen=True)
class IdleHint:
    """The verifier to one camera's capture (topic `idle.<camera>` on the event socket): its scene is empty
    and unchanged as of frame `seq` (captured at `clock`), so the capture may hold back frames that do not
    differ from that one by `change` grey levels, sending one at least every `every_s`; or (`idle` false) a
    face or a track is there, or a console watches, so every frame counts. A capture that hears nothing sends
    every frame: the hint only ever saves work."""

    camera_id: str
    idle: bool
    seq: int
    clock: float
    change: float
    every_s: float

    def encode(self) -> list[bytes]:
        return encode_json(IDLE_TOPIC + self.camera_id, asdict(self))


def decode_idle(parts: list[bytes]) -> IdleHint:
    topic, data = decode_json(parts, "idle")
    camera = _require(data, "camera_id", str, "idle")
    if topic != IDLE_TOPIC + camera:
        raise BadMessage(f"idle: topic {topic[:60]!r} does not match camera_id {camera!r}")
    idle = _require(data, "idle", bool, "idle")
    seq = _require(data, "seq", int, "idle")
    numbers = [_require(data, key, (int, float), "idle") for key in ("clock", "change", "every_s")]
    if isinstance(seq, bool) or seq < 0 or any(isinstance(n, bool) or not math.isfinite(n) or n < 0 for n in numbers):
        raise BadMessage("idle: seq, clock, change and every_s must be non-negative numbers")
    return IdleHint(camera, idle, seq, float(numbers[0]), float(numbers[1]), float(numbers[2]))


@dataclass
class Event:
    """A gate decision (or a verifier state change for subscribers)."""

    type: str
    gate_id: str
    camera_id: str = ""
    track_id: int = -1
    subject_id: str | None = None
    display_name: str | None = None
    score: float | None = None
    threshold: float | None = None
    reason: str | None = None
    frames: int = 0
    captured_at: float | None = None
    decided_at: float = field(default_factory=time.time)
    latency_ms: float | None = None
    seq: int | None = None  # frame sequence number of the deciding frame
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    boot_id: str | None = None  # the publishing verifier process (new at each start)
    event_seq: int | None = None  # 1, 2, 3... per boot_id: a subscriber sees a gap and fetches what it missed
    flight_id: str | None = None  # the flight the gate was boarding (None: not boarding, plain 1:N)
    boarded_at: float | None = None  # already_boarded: when the passenger boarded ...
    boarded_gate_id: str | None = None  # ... and at which gate
    on_flights: list[str] | None = None  # wrong_flight: the flights the passenger is on
    liveness_score: float | None = None  # the weakest liveness check's score, 0-1 (null: liveness off)
    liveness_frames: int = 0  # frames of the track the liveness checks saw
    liveness_checks: dict[str, Any] | None = None  # per check (depth, texture): verdict and evidence; decided_by
    v: int = VERSION

    def topic(self) -> bytes:
        return (EVENT_TOPIC + self.gate_id).encode()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


def _require(data: dict[str, Any], key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise BadMessage(f"{where}: missing '{key}'")
    value = data[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadMessage(f"{where}: '{key}' has the wrong type")
    if not isinstance(value, kinds):
        raise BadMessage(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _json(part: Part, where: str) -> dict[str, Any]:
    try:
        data = json.loads(bytes(part).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, huge numbers, absurd nesting
        raise BadMessage(f"{where}: not JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise BadMessage(f"{where}: not a JSON object")
    if data.get("v") != VERSION:
        raise BadMessage(f"{where}: unsupported schema version {data.get('v')!r}")
    return data


def encode_frame(
    header: FrameHeader,
    image: np.ndarray | None = None,
    jpeg_quality: int = 90,
    *,
    packet: np.ndarray | bytes | None = None,
) -> list[bytes | memoryview]:
    """[topic, header JSON, pixels]; bgr8 pixels go out without a copy, and so does a `packet` (a jpeg frame
    already encoded, e.g. by the camera)."""
    if packet is not None:
        if header.encoding != "jpeg":
            raise ValueError("an encoded packet needs encoding jpeg")
        payload: bytes | memoryview = (
            np.ascontiguousarray(packet).data.cast("B") if isinstance(packet, np.ndarray) else packet
        )
    elif image is None:
        raise ValueError("a frame needs its image or an encoded packet")
    elif header.encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        payload = buf.tobytes()
    else:
        payload = np.ascontiguousarray(image).data.cast("B")
    return [header.topic(), json.dumps(asdict(header), separators=(",", ":")).encode(), payload]


def decode_frame(parts: Sequence[Part]) -> tuple[FrameHeader, np.ndarray]:
    """Validate a frame message and return its header and BGR image."""
    header = decode_frame_header(parts)
    return header, decode_frame_image(header, parts[2])


def decode_frame_header(parts: Sequence[Part]) -> FrameHeader:
    """The frame's header, validated (part count, size, JSON, types, topic, pixel size, seq and pts bounds),
    without touching the pixels: what a receiver reads before it spends anything on decoding them."""
    if len(parts) != 3:
        raise BadMessage(f"frame: expected 3 parts, got {len(parts)}")
    topic = bytes(parts[0][:MAX_TOPIC_BYTES]).decode("utf-8", "replace")
    if len(parts[1]) > MAX_HEADER_BYTES:
        raise BadMessage(f"frame: header of {len(parts[1])} bytes (at most {MAX_HEADER_BYTES})")
    data = _json(parts[1], "frame header")
    try:
        header = FrameHeader(
            camera_id=_require(data, "camera_id", str, "frame header"),
            gate_id=_require(data, "gate_id", str, "frame header"),
            seq=_require(data, "seq", int, "frame header"),
            captured_at=float(_require(data, "captured_at", (int, float), "frame header")),
            width=_require(data, "width", int, "frame header"),
            height=_require(data, "height", int, "frame header"),
            encoding=_require(data, "encoding", str, "frame header"),
            pts=float(data["pts"]) if isinstance(data.get("pts"), (int, float)) else None,
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadMessage(f"frame header: {exc}") from None
    if topic != FRAME_TOPIC + header.camera_id:
        raise BadMessage(f"frame: topic {topic!r} does not match camera_id {header.camera_id!r}")
    if not (
        0 < header.width <= MAX_SIDE
        and 0 < header.height <= MAX_SIDE
        and header.width * header.height <= MAX_FRAME_PIXELS
    ):
        raise BadMessage(
            f"frame: bad size {header.width}x{header.height} (at most {MAX_SIDE} px a side and "
            f"{MAX_FRAME_PIXELS} pixels)"
        )
    if header.encoding not in ("bgr8", "jpeg"):
        raise BadMessage(f"frame: unknown encoding {header.encoding!r}")
    if not math.isfinite(header.captured_at) or (header.pts is not None and not math.isfinite(header.pts)):
        raise OutOfBounds("not_finite", "frame: captured_at or pts is not a finite number")
    if not 0 <= header.seq <= MAX_SEQ:
        raise OutOfBounds("seq", f"frame: seq {str(header.seq)[:30]} out of range (0 to 2**63-1)")
    if header.pts is not None and not 0 <= header.pts <= MAX_PTS_S:
        raise OutOfBounds("not_finite", f"frame: pts {header.pts:.6g} out of range (0 to {MAX_PTS_S:g} s)")
    return header


def check_frame_clock(header: FrameHeader, now: float) -> None:
    """Refuse (OutOfBounds) a frame captured further ahead of `now` (the receiver's clock) than
    CLOCK_SKEW_TOLERANCE_S, or further behind it than MAX_FRAME_PAST_S."""
    offset = header.captured_at - now
    if offset > CLOCK_SKEW_TOLERANCE_S:
        raise OutOfBounds(
            "future",
            f"frame {header.seq} of camera {header.camera_id!r}: captured_at is "
            f"{offset:.3g} s ahead of this host's clock (tolerance {CLOCK_SKEW_TOLERANCE_S:g} s)",
            offset,
        )
    if -offset > MAX_FRAME_PAST_S:
        raise OutOfBounds(
            "past",
            f"frame {header.seq} of camera {header.camera_id!r}: captured_at is "
            f"{-offset:.3g} s behind this host's clock (at most {MAX_FRAME_PAST_S:g} s)",
            offset,
        )


def decode_frame_image(header: FrameHeader, payload: Part) -> np.ndarray:
    """The BGR pixels of a validated header's payload: bgr8 without a copy, a JPEG decoded only once its own
    header says it is the frame header's size (a JPEG bomb allocates nothing)."""
    if header.encoding == "bgr8":
        expected = header.width * header.height * 3
        if len(payload) != expected:
            raise BadMessage(
                f"frame: bgr8 payload of {len(payload)} bytes, {header.width}x{header.height}x3 needs {expected}"
            )
        return np.frombuffer(payload, np.uint8).reshape(header.height, header.width, 3)
    size = image_size(payload[: 256 * 1024])
    if size != (header.width, header.height):  # checked before decoding: a JPEG bomb allocates nothing
        raise BadMessage(f"frame: JPEG of size {size} does not match the header's {header.width}x{header.height}")
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.shape[:2] != (header.height, header.width):
        raise BadMessage("frame: JPEG payload does not decode to the header's size")
    return image


def encode_json(topic: str, body: dict[str, Any]) -> list[bytes]:
    body = {"v": VERSION, **body}
    return [topic.encode(), json.dumps(body, separators=(",", ":")).encode()]


def decode_json(parts: Sequence[Part], where: str) -> tuple[str, dict[str, Any]]:
    if len(parts) != 2:
        raise BadMessage(f"{where}: expected 2 parts, got {len(parts)}")
    return bytes(parts[0]).decode("utf-8", "replace"), _json(parts[1], where)


def decode_event(parts: Sequence[Part]) -> Event:
    topic, data = decode_json(parts, "event")
    return event_from_dict(data, topic)


def event_from_dict(data: dict[str, Any], topic: str | None = None) -> Event:
    """An event from its JSON object (checked like a received one; `topic` too when given)."""
    etype = _require(data, "type", str, "event")
    if etype not in EVENT_TYPES:
        raise BadMessage(f"event: unknown type {etype!r}")
    gate = _require(data, "gate_id", str, "event")
    if topic is not None and topic != EVENT_TOPIC + gate:
        raise BadMessage(f"event: topic {topic!r} does not match gate_id {gate!r}")
    seq = data.get("event_seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        raise BadMessage("event: event_seq must be a positive integer")
    for key in ("boot_id", "flight_id", "boarded_gate_id"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise BadMessage(f"event: {key} must be a string")
    flights = data.get("on_flights")
    if flights is not None and not (
        isinstance(flights, list) and len(flights) <= 100 and all(isinstance(f, str) for f in flights)
    ):
        raise BadMessage("event: on_flights must be a list of flight ids")
    checks = data.get("liveness_checks")
    if checks is not None and not isinstance(checks, dict):
        raise BadMessage("event: liveness_checks must be an object")
    known = {k: data[k] for k in Event.__dataclass_fields__ if k in data}
    try:
        return Event(**known)
    except TypeError as exc:
        raise BadMessage(f"event: {exc}") from None
