"""Preview frames and decision face crops for the operator console, sent only while someone watches.

The verifier's preview socket is a ROUTER: it knows each console connection (its routing id) and the key it
authenticated with (the ZAP User-Id on every message). A console's connection says which gates it watches in a
lease, `{"v": 1, "cmd": "watch", "previews": [gates], "crops": [gates]}`, renewed every LEASE_RENEW_S; a lease
not renewed within LEASE_S ends (a console that died stops costing anything), an empty one ends at once. Only
the verifier's own gates are taken; a key holds at most MAX_CONNECTIONS_PER_KEY leases (a new one pushes out
that key's oldest, never another key's), and the table holds at most MAX_LEASES: so one key cannot take the
others' share, and memory stays bounded whatever a peer sends (nothing it sends is kept but a lease of known
gates). A gate's frames are encoded (downscaled JPEG) once, only while some lease holds it, at most
`console.preview_fps` a second, and sent to each connection that holds it; a decision's face crop likewise
for `crops`. With no console connected the verifier encodes and sends nothing: an unwatched system pays one
non-blocking read per loop.

Messages to a console: [topic, JSON header, JPEG], the topic `preview.<gate>` or `crop.<gate>` ending in NUL.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import zmq

if TYPE_CHECKING:
    from kiosk.pipeline.core import CameraState
    from kiosk.pipeline.tracking import Track

log = logging.getLogger(__name__)
verifier_log = logging.getLogger("kiosk.services.verifier")  # the sending's lines, as the verifier logged them

PREVIEW_MAX_WIDTH = 640
JPEG_QUALITY = 75
LEASE_S = 3.0  # a watch not renewed for this long ends
LEASE_RENEW_S = 1.0  # how often a console renews its watch
MAX_CONNECTIONS_PER_KEY = 16  # leases one console key holds at once (its connections)
MAX_LEASES = 1000  # leases in all
MAX_GATES_PER_LEASE = 1000
REFUSED_LOG_EVERY_S = 60.0
POLL_BUDGET_S = 0.005  # time a verifier step gives the consoles' requests


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
        image = cv2.resize(
            image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA
        )
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes(), scale


def watch_request(previews: list[str] | set[str], crops: list[str] | set[str]) -> bytes:
    """A console's lease: the gates whose frames and whose decision crops it wants (empty lists: none)."""
    return json.dumps({"v": 1, "cmd": "watch", "previews": sorted(previews), "crops": sorted(crops)}).encode()


@dataclass
class Lease:
    """What one console connection watches, and until when."""

    key: str
    previews: frozenset[str]
    crops: frozenset[str]
    until: float


class PreviewPublisher:
    """Owns the verifier's ROUTER preview socket: the consoles' leases, and the rate per gate."""

    def __init__(self, sock: zmq.Socket, fps: float, gates: set[str] | None = None) -> None:
        self.sock = sock
        self.interval = 1.0 / fps
        self.gates = set(gates or ())
        self.leases: dict[bytes, Lease] = {}  # routing id -> lease (insertion order: oldest renewal first)
        self._watched: dict[str, list[bytes]] = {}  # gate -> connections that want its frames
        self._cropped: dict[str, list[bytes]] = {}
        self.refused: dict[str, int] = {}  # key -> requests refused (at most MAX_LEASES keys)
        self._refused_logged: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self.frames_sent = 0
        self.crops_sent = 0
        self.dropped = 0  # a viewer's queue was full

    def poll(self, budget_s: float = POLL_BUDGET_S, now: float | None = None) -> None:
        """Take the leases waiting and end the expired ones. Never blocks, and stops after `budget_s` (a
        request costs ~60 us): a flood waits in its own connection's queue (10 messages, then TCP pushes back
        on the sender) and cannot hold the frame loop; ROUTER reads the connections in turn, so another
        console's renewal is read within a few messages."""
        now = time.monotonic() if now is None else now
        changed = False
        stop_at = time.perf_counter() + budget_s
        while time.perf_counter() < stop_at:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            changed |= self._take(parts, now)
        expired = [rid for rid, lease in self.leases.items() if lease.until < now]
        for rid in expired:
            del self.leases[rid]
        if changed or expired:
            self._index()

    def _take(self, parts: list[zmq.Frame], now: float) -> bool:
        rid = bytes(parts[0].bytes)
        try:
            key = str(parts[-1].get("User-Id") or "-")
        except zmq.ZMQError:  # no ZAP (security.curve off): every peer is one
            key = "-"
        try:
            if len(parts) != 2:
                raise ValueError(f"expected one message part, got {len(parts) - 1}")
            request = json.loads(parts[1].bytes)
            if not isinstance(request, dict) or request.get("v") != 1 or request.get("cmd") != "watch":
                raise ValueError('not a {"v": 1, "cmd": "watch", ...} request')
            wanted = []
            for field_name in ("previews", "crops"):
                gates = request.get(field_name, [])
                if not isinstance(gates, list) or len(gates) > MAX_GATES_PER_LEASE:
                    raise ValueError(f"{field_name} must be a list of at most {MAX_GATES_PER_LEASE} gate ids")
                wanted.append(frozenset(g for g in gates if isinstance(g, str) and g in self.gates))
                if len(wanted[-1]) < len(gates):
                    self._refuse(key, f"{len(gates) - len(wanted[-1])} gate(s) this verifier does not serve")
        except (ValueError, RecursionError) as exc:
            self._refuse(key, str(exc)[:120])
            return False
        previews, crops = wanted
        old = self.leases.pop(rid, None)
        if not previews and not crops:
            return old is not None  # an empty lease: nothing watched any more
        if old is None:
            mine = [r for r, lease in self.leases.items() if lease.key == key]
            if len(mine) >= MAX_CONNECTIONS_PER_KEY:  # this key's oldest goes, never another key's
                del self.leases[mine[0]]
            elif len(self.leases) >= MAX_LEASES:
                self._refuse(key, f"{MAX_LEASES} leases are held already")
                return False
        self.leases[rid] = Lease(key, previews, crops, now + LEASE_S)  # re-inserted: the newest renewal last
        return old is None or (old.previews, old.crops) != (previews, crops)

    def _index(self) -> None:
        watched: dict[str, list[bytes]] = {}
        cropped: dict[str, list[bytes]] = {}
        for rid, lease in self.leases.items():
            for gate in lease.previews:
                watched.setdefault(gate, []).append(rid)
            for gate in lease.crops:
                cropped.setdefault(gate, []).append(rid)
        for gate in set(watched) - set(self._watched):
            log.info("preview: a console watches gate %s", gate)
        for gate in set(self._watched) - set(watched):
            log.info("preview: no console watches gate %s any more", gate)
        self._watched, self._cropped = watched, cropped

    def _refuse(self, key: str, why: str) -> None:
        if key not in self.refused and len(self.refused) >= MAX_LEASES:
            self.refused.pop(next(iter(self.refused)))
        self.refused[key] = self.refused.get(key, 0) + 1
        now = time.monotonic()
        if now - self._refused_logged.get(key, -1e9) >= REFUSED_LOG_EVERY_S:
            if len(self._refused_logged) >= MAX_LEASES:
                self._refused_logged.clear()
            self._refused_logged[key] = now
            log.warning(
                "preview: a request from console key %s refused (%s; %d refused from it so far)",
                key[:12],
                why,
                self.refused[key],
            )

    def watched(self, gate_id: str) -> bool:
        return gate_id in self._watched

    def due(self, gate_id: str, now: float | None = None) -> bool:
        """Watched, and its last preview is at least one interval old."""
        now = time.monotonic() if now is None else now
        return self.watched(gate_id) and now - self._last.get(gate_id, -1e9) >= self.interval

    def _send(self, to: list[bytes], parts: list[bytes]) -> int:
        """To each connection in `to`; a full queue (a slow viewer) drops that one's copy. Returns how many
        were sent."""
        sent = 0
        for rid in to:
            try:
                self.sock.send_multipart([rid, *parts], zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                self.dropped += 1
            except zmq.ZMQError:  # the connection is gone: its lease runs out
                self.dropped += 1
        return sent

    def send_frame(
        self, gate_id: str, camera_id: str, image: np.ndarray, faces: list[PreviewFace], *, seq: int, captured_at: float
    ) -> None:
        """One preview of `gate_id`: the frame as JPEG with its faces (boxes given in the frame's pixels, sent in
        the JPEG's)."""
        self._last[gate_id] = time.monotonic()
        jpeg, scale = encode_jpeg(image)
        for face in faces:
            face.box = [round(float(v) * scale, 1) for v in face.box[:4]]
        header = {
            "v": 1,
            "gate_id": gate_id,
            "camera_id": camera_id,
            "seq": seq,
            "captured_at": captured_at,
            "width": round(image.shape[1] * scale),
            "height": round(image.shape[0] * scale),
            "faces": [asdict(f) for f in faces],
        }
        if self._send(self._watched.get(gate_id, []), [preview_topic(gate_id), json.dumps(header).encode(), jpeg]):
            self.frames_sent += 1

    def wants_crops(self, gate_id: str) -> bool:
        return gate_id in self._cropped

    def send_crop(self, gate_id: str, event: dict, crop: np.ndarray) -> None:
        """The face crop a decision was made on, with the event's id and outcome (for the console's feed)."""
        jpeg, _ = encode_jpeg(crop)
        header = {
            "v": 1,
            **{
                k: event.get(k)
                for k in (
                    "event_id",
                    "gate_id",
                    "camera_id",
                    "type",
                    "reason",
                    "subject_id",
                    "score",
                    "track_id",
                    "decided_at",
                )
            },
        }
        if self._send(self._cropped.get(gate_id, []), [crop_topic(gate_id), json.dumps(header).encode(), jpeg]):
            self.crops_sent += 1

    def status(self) -> dict:
        return {
            "watched": sorted(self._watched),
            "frames_sent": self.frames_sent,
            "crops_sent": self.crops_sent,
            "dropped": self.dropped,
            "consoles": len(self.leases),
            "refused": sum(self.refused.values()),
        }


def send_previews(previews: PreviewPublisher, cameras: Iterable[CameraState], sent: Callable[[str], None]) -> None:
    """The last frame of each watched gate, with its faces' boxes, tracks and decisions, at the console's rate
    (one camera's frame per gate and interval); `sent` counts them per gate."""
    for cam in cameras:
        view, cam.view = cam.view, None
        if view is None or not previews.due(cam.gate_id):
            continue
        frame, boxes, tracks = view
        try:
            previews.send_frame(
                cam.gate_id,
                cam.camera_id,
                frame.image,
                [preview_face(box, track) for box, track in zip(boxes, tracks, strict=False)],
                seq=frame.header.seq,
                captured_at=frame.header.captured_at,
            )
        except (ValueError, cv2.error) as exc:  # never a reason to stop deciding
            verifier_log.warning("preview of gate %s not sent: %s", cam.gate_id, exc)
            continue
        sent(cam.gate_id)


def preview_face(box: Iterable[float], track: Track) -> PreviewFace:
    """A face as the console draws it: still collecting, or its track's outcome."""
    if track.outcome is None:
        return PreviewFace(list(box), track.track_id, "collecting")
    kind, subject, reason, score = track.outcome
    return PreviewFace(
        list(box),
        track.track_id,
        "accepted" if kind == "accept" else "rejected",
        subject,
        reason,
        None if score is None else round(score, 3),
    )
