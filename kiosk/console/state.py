"""What the console knows, fed by its ZeroMQ listener and read by the web handlers (thread-safe, bounded).

Everything is in memory and bounded: the last FEED_SIZE events, the face crops of the last `console.crops`
decisions, one preview frame per gate. Nothing biometric is written anywhere unless `console.crops_dir` names
a folder for the crops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiosk.messaging.reasons import is_alert_reason
from kiosk.messaging.status import (
    CameraStatus,
    GalleryStatus,
    GateHeartbeat,
    Heartbeat,
    VerifierHeartbeat,
    heartbeat_from_json,
    quantiles_json,
)
from kiosk.store.sealing import TemplateCodec

log = logging.getLogger(__name__)

FEED_SIZE = 200
ALERT_TYPES = {"verifier_down", "camera_down"}


def crop_context(name: str) -> str:
    """What a crop file's seal is bound to: its name (a file renamed to another event's does not open)."""
    return f"console-crop\x00{name}"


def open_crop(path: Path, codec: TemplateCodec) -> bytes:
    """The JPEG in a sealed crop file of console.crops_dir (`kiosk console --open-crop`)."""
    return codec.open_bytes(crop_context(path.name.removesuffix(".crop")), path.read_bytes())


def is_alert(event: dict[str, Any]) -> bool:
    return event.get("type") in ALERT_TYPES or is_alert_reason(event.get("reason"))


class ConsoleState:
    def __init__(
        self,
        gates: dict[str, list[str]],
        *,
        crops: int,
        heartbeat_timeout_s: float,
        crops_dir: Path | None = None,
        codec: TemplateCodec | None = None,
    ) -> None:
        self.gates = gates  # gate -> its cameras (from the config)
        self.max_crops = crops
        self.crops_dir = crops_dir
        self.codec = codec  # seals the crops written to crops_dir (the template key; required with one)
        if crops_dir is not None and codec is None:
            raise ValueError("console.crops_dir needs the template key: crops on disk are sealed")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.lock = threading.Lock()
        self.verifier: VerifierHeartbeat | None = None  # its own heartbeat
        self.gate_beats: dict[str, GateHeartbeat] = {}  # gate -> its part of the heartbeat
        self.gate_beats_at: dict[str, float] = {}
        self.verifier_at = 0.0
        self.verifier_state = "unknown"  # up | down | unknown (never heard)
        self.captures: dict[str, dict[str, Any]] = {}
        self.feed: deque[dict[str, Any]] = deque(maxlen=FEED_SIZE)
        self.last: dict[str, dict[str, Any]] = {}  # gate -> its last decision
        self.crops: OrderedDict[str, tuple[bytes, dict[str, Any]]] = OrderedDict()
        self.previews: dict[str, tuple[int, dict[str, Any], bytes]] = {}  # gate -> (counter, header, jpeg)
        self.flights: dict[str, dict[str, int]] = {}  # flight -> passengers, boarded (from the store, if reachable)
        self.viewers: dict[str, int] = {}
        self.camera_fps: dict[str, float] = {}  # from the processed counts of consecutive heartbeats
        self.changes: deque[tuple[str, str]] = deque()  # ("watch" | "unwatch", gate) for the listener
        self._counter = 0
        self.bad_messages = 0

    # -- fed by the listener ---------------------------------------------------
    def add_event(self, event: dict[str, Any]) -> None:
        event = {**event, "alert": is_alert(event)}
        with self.lock:
            self.feed.appendleft(event)
            if event.get("gate_id") in self.gates:
                self.last[str(event["gate_id"])] = event

    def add_heartbeat(self, body: Mapping[str, Any] | Heartbeat, gate: str | None = None) -> None:
        """The verifier's heartbeat: its own health (`gate` None), or one gate's part (its cameras and flight), as
        received (read with from_json) or read already. A camera that went down (or came back) since its gate's
        last one is an event in the feed (down: an alert)."""
        beat = heartbeat_from_json(body, gate) if isinstance(body, Mapping) else body
        now = time.time()
        changes = []
        with self.lock:
            if isinstance(beat, GateHeartbeat):
                gate = gate if gate is not None else beat.gate_id
                previous = self.gate_beats.get(gate)
                before = previous.cameras if previous is not None else {}
                seen_at = self.gate_beats_at.get(gate)
                for cid, cam in beat.cameras.items():
                    if cid not in before:
                        continue
                    was, state = before[cid].state, cam.state
                    if state != was and "down" in (state, was):
                        changes.append(
                            {
                                "type": "camera_down" if state == "down" else "camera_up",
                                "gate_id": cam.gate_id,
                                "camera_id": cid,
                                "decided_at": now,
                                "reason": cam.last_error or None,
                            }
                        )
                    done = cam.processed - before[cid].processed  # frames a second
                    if seen_at and now > seen_at and done >= 0:
                        self.camera_fps[cid] = round(done / (now - seen_at), 1)
                self.gate_beats[gate], self.gate_beats_at[gate] = beat, now
            else:
                self.verifier = beat
            self.verifier_at = now
            self.verifier_state = "down" if beat.status == "stopping" else "up"
        for change in changes:
            self.add_event(change)

    def add_capture_health(self, camera_id: str, body: dict[str, Any]) -> None:
        with self.lock:
            self.captures[camera_id] = {**body, "received_at": time.time()}

    def add_preview(self, gate: str, header: dict[str, Any], jpeg: bytes) -> None:
        with self.lock:
            self._counter += 1
            self.previews[gate] = (self._counter, header, jpeg)

    def add_crop(self, header: dict[str, Any], jpeg: bytes) -> None:
        event_id = str(header.get("event_id") or "")
        if not event_id:
            return
        with self.lock:
            self.crops[event_id] = (jpeg, header)
            while len(self.crops) > self.max_crops:
                self.crops.popitem(last=False)
        if self.crops_dir is not None and self.codec is not None:  # (a codec comes with crops_dir: __init__)
            try:
                self.crops_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                name = "".join(c if c.isalnum() or c in "-_" else "_" for c in event_id[:64])
                path = self.crops_dir / f"{name}.crop"
                path.write_bytes(self.codec.seal_bytes(crop_context(name), jpeg))
                path.chmod(0o600)
            except OSError as exc:
                log.warning("decision crop not kept in %s: %s", self.crops_dir, exc)

    def check_verifier(self) -> None:
        """A heartbeat missing for longer than the timeout: the verifier is down (an alert in the feed)."""
        with self.lock:
            silent = self.verifier_state == "up" and time.time() - self.verifier_at > self.heartbeat_timeout_s
        if silent:
            with self.lock:
                self.verifier_state = "down"
            for gate in self.gates:
                self.add_event(
                    {
                        "type": "verifier_down",
                        "gate_id": gate,
                        "decided_at": time.time(),
                        "reason": f"no heartbeat for {self.heartbeat_timeout_s:g} s",
                    }
                )
            log.warning("verifier heartbeat missing for %.0f s", self.heartbeat_timeout_s)

    # -- viewers (the web handlers) ----------------------------------------------
    def watch(self, gate: str) -> None:
        with self.lock:
            self.viewers[gate] = self.viewers.get(gate, 0) + 1
            if self.viewers[gate] == 1:
                self.changes.append(("watch", gate))

    def unwatch(self, gate: str) -> None:
        with self.lock:
            self.viewers[gate] = max(0, self.viewers.get(gate, 0) - 1)
            if self.viewers[gate] == 0:
                self.changes.append(("unwatch", gate))
                self.previews.pop(gate, None)  # an old frame is never shown to the next viewer

    def preview(self, gate: str) -> tuple[int, dict[str, Any], bytes] | None:
        with self.lock:
            return self.previews.get(gate)

    def crop(self, event_id: str) -> bytes | None:
        with self.lock:
            found = self.crops.get(event_id)
        return found[0] if found else None

    # -- views -----------------------------------------------------------------
    def boarding_flights(self) -> set[str]:
        """The flights the gates board, as their parts of the heartbeat say (the overview's boarded counts)."""
        with self.lock:
            return {b.gate.flight_id for b in self.gate_beats.values() if b.gate is not None and b.gate.flight_id}

    def events(self, gate: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with self.lock:
            chosen = [e for e in self.feed if gate is None or e.get("gate_id") == gate][:limit]
            return [{**e, "has_crop": str(e.get("event_id")) in self.crops} for e in chosen]

    def status(self) -> dict[str, Any]:
        """The console's status JSON: the verifier's health, each configured gate's, and the last alerts."""
        now = time.time()
        with self.lock:
            heard = {cid: cam for beat in self.gate_beats.values() for cid, cam in beat.cameras.items()}
            verifier = self._verifier_view(now)
            gates = [self._gate_view(gate, cameras, heard) for gate, cameras in sorted(self.gates.items())]
            alerts = [e for e in self.feed if e.get("alert")][:10]
        return {"verifier": verifier, "gates": gates, "alerts": alerts, "time": now}

    def _verifier_view(self, now: float) -> dict[str, Any]:
        """The verifier as its own heartbeat last said (None throughout before the first); the lock is held."""
        hb = self.verifier
        gallery = hb.gallery if hb is not None else None
        return {
            "state": self.verifier_state,
            "heartbeat_age_s": round(now - self.verifier_at, 1) if self.verifier_at else None,
            "status": hb.status if hb else None,
            "fps": hb.fps if hb else None,
            "frame_latency_ms": quantiles_json(hb.frame_latency_ms) if hb else None,
            "decision_latency_ms": quantiles_json(hb.decision_latency_ms) if hb else None,
            "gallery": _gallery_view(gallery),
            "providers": list(hb.providers) if hb else None,
            "last_error": hb.last_error if hb else None,
        }

    def _gate_view(self, gate: str, cameras: list[str], heard: dict[str, CameraStatus]) -> dict[str, Any]:
        """One gate's tile: its cameras (as its part of the heartbeat said), flight, last decision; the lock is held."""
        camera_states = [self._camera_view(cid, heard.get(cid)) for cid in cameras]
        beat = self.gate_beats.get(gate)
        gate_hb = beat.gate if beat is not None else None
        flight_id = gate_hb.flight_id if gate_hb else None
        flight = self.flights.get(flight_id) if flight_id else None
        last = self.last.get(gate)
        hb = self.verifier
        gallery = hb.gallery if hb is not None else None
        return {
            "gate_id": gate,
            "camera_state": _gate_camera_state({c["state"] for c in camera_states}),
            "cameras": camera_states,
            "fps": round(sum(c["fps"] or 0 for c in camera_states), 1),
            "verifier_state": self.verifier_state,
            "flight_id": flight_id,
            "flight": None if flight is None else {**flight, "remaining": flight["passengers"] - flight["boarded"]},
            "gallery_subjects": gallery.subjects if gallery else None,
            "last_decision": None if last is None else {k: last.get(k) for k in LAST_DECISION_KEYS},
            "watched": self.viewers.get(gate, 0) > 0,
        }

    def _camera_view(self, cid: str, c: CameraStatus | None) -> dict[str, Any]:
        """One camera of a gate; its state is unknown while the verifier is not up (an old heartbeat says nothing)."""
        return {
            "camera_id": cid,
            "state": c.state if c is not None and self.verifier_state == "up" else "unknown",
            "last_error": c.last_error if c else None,
            "last_frame_age_s": c.last_frame_age_s if c else None,
            "fps": self.camera_fps.get(cid),
        }


LAST_DECISION_KEYS = (
    "event_id",
    "type",
    "subject_id",
    "display_name",
    "score",
    "reason",
    "latency_ms",
    "decided_at",
    "alert",
)


def _gallery_view(gallery: GalleryStatus | None) -> dict[str, Any]:
    """The gallery figures an operator acts on (None throughout when the heartbeat did not say)."""
    return {
        "subjects": gallery.subjects if gallery else None,
        "stale": gallery.stale if gallery else None,
        "error": gallery.error if gallery else None,
        "refusing": gallery.refusing if gallery else None,
        "accepts_from_memory_s": gallery.accepts_from_memory_s if gallery else None,
        "action": gallery.action if gallery else None,
    }


def _gate_camera_state(states: set[str]) -> str:
    """A gate's cameras in one word: down if any is, up only if every one is up (or ended), else unknown."""
    return "down" if "down" in states else "up" if states <= {"up", "ended"} and states else "unknown"
