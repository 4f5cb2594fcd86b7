"""Preview frames and decision face crops for the operator console, sent only while someone watches.

The verifier's preview socket is an XPUB: ZeroMQ hands it every new subscription (b"\\x01" + prefix) and the
end of the last one of a prefix (b"\\x00" + prefix, also when the subscriber goes away). A gate's frames are
encoded (downscaled JPEG) and sent only while a subscription covers `preview.<gate>`, at most
`console.preview_fps` a second; a decision's face crop only while one covers `crop.<gate>`. With no console
connected the verifier encodes and sends nothing: an unwatched system pays one non-blocking read per loop.

Messages: [topic, JSON header, JPEG]. Topics end in NUL so that watching gate A1 is not watching A10.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import zmq

log = logging.getLogger(__name__)

PREVIEW_MAX_WIDTH = 640
JPEG_QUALITY = 75
MAX_SUBSCRIPTIONS = 1000  # prefixes remembered; a subscriber sending more is ignored beyond (bounded memory)


def preview_topic(gate_id: str) -> bytes:
    return f"preview.{gate_id}\x00".encode()


def crop_topic(gate_id: str) -> bytes:
    return f"crop.{gate_id}\x00".encode()


@dataclass
class PreviewFace:
    """One face in a preview frame: its box (x1, y1, x2, y2), its track and what was decided for it."""

    box: list[float]
    track_id: int
    state: str  # "collecting" | "accepted" | "rejected"
    subject_id: str | None = None
    reason: str | None = None
    score: float | None = None


def encode_jpeg(image: np.ndarray, max_width: int = PREVIEW_MAX_WIDTH) -> tuple[bytes, float]:
    """The image as JPEG, downscaled to at most `max_width` pixels wide; returns it and the scale applied."""
    scale = min(1.0, max_width / max(1, image.shape[1]))
    if scale < 1.0:
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes(), scale


class PreviewPublisher:
    """Owns the verifier's XPUB preview socket: which gates are watched, and the rate per gate."""

    def __init__(self, sock: zmq.Socket, fps: float) -> None:
        self.sock = sock
        self.interval = 1.0 / fps
        self.subscriptions: set[bytes] = set()
        self._last: dict[str, float] = {}
        self.frames_sent = 0
        self.crops_sent = 0
        self.dropped = 0  # a viewer's queue was full

    def poll(self) -> None:
        """Take the subscription changes waiting (never blocks)."""
        while True:
            try:
                msg = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg or msg[0] not in (0, 1):
                continue  # (XPUB passes other messages from subscribers through: none is expected)
            prefix = bytes(msg[1:])
            if msg[0] == 1:
                if prefix not in self.subscriptions:
                    if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
                        log.warning("preview: more than %d subscriptions; ignoring %r", MAX_SUBSCRIPTIONS,
                                    prefix[:40])
                        continue
                    self.subscriptions.add(prefix)
                    log.info("preview: a console subscribed to %r", prefix.rstrip(b"\x00").decode(errors="replace"))
            elif prefix in self.subscriptions:
                self.subscriptions.discard(prefix)
                log.info("preview: no console watches %r any more", prefix.rstrip(b"\x00").decode(errors="replace"))

    def _covered(self, topic: bytes) -> bool:
        return any(topic.startswith(prefix) for prefix in self.subscriptions)

    def watched(self, gate_id: str) -> bool:
        return self._covered(preview_topic(gate_id))

    def due(self, gate_id: str, now: float | None = None) -> bool:
        """Watched, and its last preview is at least one interval old."""
        now = time.monotonic() if now is None else now
        return self.watched(gate_id) and now - self._last.get(gate_id, -1e9) >= self.interval

    def _send(self, parts: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(parts, zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def send_frame(self, gate_id: str, camera_id: str, image: np.ndarray, faces: list[PreviewFace], *, seq: int,
                   captured_at: float) -> None:
        """One preview of `gate_id`: the frame as JPEG with its faces (boxes given in the frame's pixels, sent in
        the JPEG's)."""
        self._last[gate_id] = time.monotonic()
        jpeg, scale = encode_jpeg(image)
        for face in faces:
            face.box = [round(float(v) * scale, 1) for v in face.box[:4]]
        header = {"v": 1, "gate_id": gate_id, "camera_id": camera_id, "seq": seq, "captured_at": captured_at,
                  "width": round(image.shape[1] * scale), "height": round(image.shape[0] * scale),
                  "faces": [asdict(f) for f in faces]}
        if self._send([preview_topic(gate_id), json.dumps(header).encode(), jpeg]):
            self.frames_sent += 1

    def wants_crops(self, gate_id: str) -> bool:
        return self._covered(crop_topic(gate_id))

    def send_crop(self, gate_id: str, event: dict, crop: np.ndarray) -> None:
        """The face crop a decision was made on, with the event's id and outcome (for the console's feed)."""
        jpeg, _ = encode_jpeg(crop)
        header = {"v": 1, **{k: event.get(k) for k in ("event_id", "gate_id", "camera_id", "type", "reason",
                                                        "subject_id", "score", "track_id", "decided_at")}}
        if self._send([crop_topic(gate_id), json.dumps(header).encode(), jpeg]):
            self.crops_sent += 1

    def status(self) -> dict:
        watched = sorted({p[len(b"preview."):].rstrip(b"\x00").decode(errors="replace")
                          for p in self.subscriptions if p.startswith(b"preview.")})
        return {"watched": watched, "frames_sent": self.frames_sent, "crops_sent": self.crops_sent,
                "dropped": self.dropped}
