"""The verifier's two request sockets: control (`status`, `claim`, ...) and history (the events a gate's
subscriber missed). One request, one reply, whatever arrived: a malformed request (several parts, not JSON,
a bad shape) gets an error reply and counts as a bad message, never an exception that would stop every gate.
Each request is checked against its sender's key first (kiosk.services.control_access,
kiosk.services.event_access)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import zmq

from kiosk.messaging.status import VerifierStatus
from kiosk.services.audit import RecentEvents
from kiosk.services.control_access import Caller, ControlAccess
from kiosk.services.event_access import EventPublisher

MAX_CURSORS = 10_000


def sender(first: zmq.Frame) -> str | None:
    """The z85 public key ZAP authenticated a message's sender with (None with CurveZMQ off)."""
    try:
        user = first.get("User-Id")
    except zmq.ZMQError:
        return None
    return user if isinstance(user, str) else None


class ControlRequests:
    """The control socket: a request its sender's key may make, checked before anything else is done for it
    (a refused claim costs no gallery reload)."""

    def __init__(
        self,
        sock: zmq.Socket,
        access: ControlAccess,
        *,
        status: Callable[[], VerifierStatus],
        enrolled: Callable[[object], bool],
        refresh_gallery: Callable[[], None],
        decide: Callable[[dict[str, Any], float], dict[str, Any]],
        bad_message: Callable[[str], None],
    ) -> None:
        """`enrolled(subject_id)`: in the search matrix now; `refresh_gallery()`: pick up the gallery's changes
        before returning; `decide(request, now)`: the core's answer to every other request."""
        self.sock = sock
        self.access = access
        self._status = status
        self._enrolled = enrolled
        self._refresh_gallery = refresh_gallery
        self._decide = decide
        self._bad_message = bad_message

    def handle(self) -> None:
        """Read one request and send its reply."""
        try:
            parts = self.sock.recv_multipart(copy=False)
            caller = self.access.caller(sender(parts[0]))
            if len(parts) != 1:
                raise ValueError(f"expected one message part, got {len(parts)}")
            request = json.loads(parts[0].bytes)
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            reply = self.answer(request, caller)
        except (ValueError, RecursionError) as exc:
            self._bad_message(f"control: {exc}"[:300])
            reply = {"ok": False, "error": f"bad request: {exc}"}
        self.sock.send_json(reply)

    def answer(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        cmd = req.get("cmd")
        refusal = self.access.refusal(caller, str(cmd), req.get("gate_id"))
        if refusal is not None:
            return refusal
        if cmd == "status":
            return {"ok": True, **self.access.redact(self._status().to_json(), caller)}
        if cmd == "claim" and not self._enrolled(req.get("subject_id")):
            self._refresh_gallery()  # enrolled a moment ago?
        return self._decide(req, time.time())


def parse_history(raw: bytes) -> tuple[dict[str, tuple[str, int]], str | None]:
    """`{"cmd": "events", "cursors": {gate: [boot_id, event_seq]}, "gate_id": G or null}` -> its cursors and
    gate; ValueError for anything else."""
    request = json.loads(raw)
    if not isinstance(request, dict) or request.get("cmd") != "events":
        raise ValueError('expected {"cmd": "events", "cursors": {...}}')
    cursors, gate = request.get("cursors"), request.get("gate_id")
    if not isinstance(cursors, dict) or len(cursors) > MAX_CURSORS or (gate is not None and not isinstance(gate, str)):
        raise ValueError("cursors must be a mapping gate -> [boot_id, event_seq]")
    parsed = {}
    for g, cur in cursors.items():
        if not (
            isinstance(cur, list)
            and len(cur) == 2
            and isinstance(cur[0], str)
            and isinstance(cur[1], int)
            and not isinstance(cur[1], bool)
        ):
            raise ValueError(f"cursor of gate {str(g)[:40]!r} must be [boot_id, event_seq]")
        parsed[str(g)] = (cur[0], cur[1])
    return parsed, gate


class HistoryRequests:
    """The history socket: the events each gate's subscriber missed since its cursor (see RecentEvents.since),
    of the gates the asking key may hear (kiosk.services.event_access): a request for another gate is refused,
    cursors of other gates are left out and named in the reply's `withheld_gates`."""

    def __init__(
        self,
        sock: zmq.Socket,
        events: EventPublisher,
        recent: RecentEvents,
        boot_id: str,
        bad_message: Callable[[str], None],
    ) -> None:
        self.sock = sock
        self.events = events
        self.recent = recent
        self.boot_id = boot_id
        self._bad_message = bad_message

    def handle(self) -> None:
        """Read one request and send its reply."""
        try:
            raw = self.sock.recv_multipart(copy=False)
            hearer = self.events.hearer(sender(raw[0]))
            parts = [p.bytes for p in raw]
            if len(parts) != 1:
                raise ValueError(f"expected one message part, got {len(parts)}")
            cursors, gate = parse_history(parts[0])
            if gate is not None and not hearer.hears_gate(gate):
                self.sock.send_json(self.events.refuse_history(hearer, gate))
                return
            withheld = sorted(g for g in cursors if not hearer.hears_gate(g))
            if withheld:
                self.events.refuse_history(hearer, withheld[0])  # counted and logged
            events, complete = self.recent.since({g: c for g, c in cursors.items() if hearer.hears_gate(g)}, gate)
            reply: dict[str, Any] = {"ok": True, "boot_id": self.boot_id, "complete": complete, "events": events}
            if withheld:
                reply["withheld_gates"] = [g[:40] for g in withheld[:100]]
                reply["note"] = f"events of gate(s) this key may not hear are left out ({hearer.describe()})"
        except (ValueError, RecursionError) as exc:
            self._bad_message(f"history: {exc}"[:300])
            reply = {"ok": False, "error": f"bad request: {exc}"}
        self.sock.send_json(reply)
