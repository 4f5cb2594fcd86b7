"""The console's ZeroMQ side: one thread that hears the verifier's events and heartbeat, its decision crops,
and (only for the gates someone has open in a browser) its preview frames.

It connects with the console's own CurveZMQ key (`console.key`, role console: it can listen to the events and,
alone with other consoles, to the previews; it can never send frames or claims). Every message is validated
and a bad one is dropped and counted. The previews it wants are a lease it renews every second (see
kiosk.services.preview), changed only in this thread (ZeroMQ sockets are not thread-safe), on the viewers'
requests queued in ConsoleState.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import zmq

from kiosk.config import KioskConfig
from kiosk.console.state import ConsoleState
from kiosk.messaging.channels import EventChannel
from kiosk.messaging.messages import CaptureHealth, Event, Heartbeat
from kiosk.messaging.status import heartbeat_from_json
from kiosk.messaging.transport import Transport
from kiosk.services.preview import LEASE_RENEW_S, crop_topic, preview_topic, watch_request

log = logging.getLogger(__name__)

HEADER_MAX = 64 * 1024
BAD_LOG_EVERY_S = 30.0


class FeedDecoder:
    """The checks of what the feed receives, apart from its sockets: a bad message is dropped, counted in the
    state and logged now and then (every BAD_LOG_EVERY_S of `clock`); a good one goes into the state."""

    def __init__(self, state: ConsoleState, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.clock = clock
        self._last_bad_log = float("-inf")

    def bad(self, why: str) -> None:
        self.state.bad_messages += 1
        now = self.clock()
        if now - self._last_bad_log >= BAD_LOG_EVERY_S:
            self._last_bad_log = now
            log.warning("dropped a malformed message (%d so far): %s", self.state.bad_messages, why)

    def on_event(self, message: Event | Heartbeat | CaptureHealth) -> None:
        if isinstance(message, Heartbeat):
            # Read typed here (decode_json made sure the body is a JSON object, so this never raises).
            self.state.add_heartbeat(heartbeat_from_json(message.body, message.gate_id), message.gate_id)
        elif isinstance(message, CaptureHealth):
            self.state.add_capture_health(message.camera_id, message.body)
        else:
            self.state.add_event(asdict(message))

    def on_preview(self, parts: list[bytes]) -> None:
        try:
            if len(parts) != 3:
                raise ValueError(f"expected 3 parts, got {len(parts)}")
            topic, raw, jpeg = parts
            if len(raw) > HEADER_MAX:
                raise ValueError("header too large")
            header: Any = json.loads(raw)
            if not isinstance(header, dict) or header.get("v") != 1:
                raise ValueError("header is not a version 1 object")
            if not jpeg.startswith(b"\xff\xd8"):
                raise ValueError("not a JPEG")
            gate = str(header.get("gate_id"))
            if gate not in self.state.gates:
                raise ValueError(f"gate {gate[:40]!r} is not configured")
            if topic == preview_topic(gate):
                faces = header.get("faces")
                if not isinstance(faces, list) or len(faces) > 100:
                    raise ValueError("faces must be a list (at most 100)")
                self.state.add_preview(gate, header, jpeg)
            elif topic == crop_topic(gate):
                self.state.add_crop(header, jpeg)
            else:
                raise ValueError(f"topic {topic[:40]!r} does not match gate {gate[:40]!r}")
        except (ValueError, TypeError, RecursionError) as exc:
            self.bad(f"preview: {exc}"[:300])


class ConsoleFeed(FeedDecoder):
    """The decoder with its sockets and its thread (FeedDecoder alone is the same checks without sockets)."""

    def __init__(self, cfg: KioskConfig, state: ConsoleState) -> None:
        super().__init__(state)
        self.cfg = cfg
        self.transport = Transport(cfg, role="console", client_key=cfg.console.key)
        self.events = EventChannel(self.transport.event_subscriber(["event.", "health."]), self.bad)
        self.previews = self.transport.preview_subscriber()
        self._watching: set[str] = set()  # gates whose frames a browser here has open
        self._renewed = float("-inf")
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="console-feed", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        try:  # the verifier stops sending at once instead of when the lease runs out
            self.previews.send(watch_request([], []), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.transport.close()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.events.sock, zmq.POLLIN)
        poller.register(self.previews, zmq.POLLIN)
        while not self._stop.is_set():
            self._apply_watchers()
            ready = dict(poller.poll(100))
            for _ in range(64):  # bounded per round: the watcher changes and the clock are looked at too
                message = self.events.recv(0) if self.events.sock in ready else None
                if message is None:
                    break
                self.on_event(message)
            if self.previews in ready:
                for _ in range(16):
                    try:
                        parts = self.previews.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.on_preview(parts)
            self.state.check_verifier()

    def _apply_watchers(self) -> None:
        """Renew the lease (kiosk.services.preview): at once when a gate is opened or closed, else every
        LEASE_RENEW_S. Crops of every gate are always wanted (the feed shows them)."""
        changed = False
        while True:
            with self.state.lock:
                if not self.state.changes:
                    break
                what, gate = self.state.changes.popleft()
            (self._watching.add if what == "watch" else self._watching.discard)(gate)
            changed = True
            log.info("console: %s gate %s's preview", "watching" if what == "watch" else "stopped watching", gate)
        now = time.monotonic()
        if changed or now - self._renewed >= LEASE_RENEW_S:
            self._renewed = now
            try:
                self.previews.send(watch_request(self._watching, list(self.state.gates)), zmq.NOBLOCK)
            except zmq.Again:  # not connected yet, or the verifier is slow: the next renewal says it again
                pass
