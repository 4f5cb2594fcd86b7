"""`kiosk verify`: the service around the verifier core (`kiosk.pipeline.core`).

The core decides; this shell owns what it must not: the frame, event and control sockets, the audit log,
the metrics server and the heartbeat. Each loop: read what arrived (control and history requests, frames,
capture health, end-of-source markers), let the core step and tick, and hand its verdicts to the gatekeeper
(kiosk.pipeline.gatekeeper), which checks each against the gallery and the boarding store, audits it and
publishes it through this service's sockets; the service tells it the gallery's state. Frames refused before
decoding (another camera's key, a seq or capture time out of bounds) are counted and followed for clock skew
(kiosk.services.frame_refusals); the key files it started with are rechecked once a minute
(kiosk.services.key_watch). Either shows in the status at once. A control request is checked against its
sender's key before anything is done for it (kiosk.services.control_access, kiosk.services.verifier_requests): a claim
only for a gate the key serves, passenger ids in the status only for an operator key's gates.

Two threads work beside the loop and hand it what they find: the gallery watch (kiosk.services.gallery_watch:
the gallery file, its revision, a new search view built off the loop) and the retention purge
(kiosk.services.retention_purger). Their errors, and the last bad message, go to one health registry
(kiosk.services.health); the status and heartbeat are cut from it all in kiosk.services.verifier_status.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import zmq

from kiosk.boarding.gates import GateFlights
from kiosk.cli_support import serve
from kiosk.config import KioskConfig
from kiosk.errors import ConfigError
from kiosk.messaging.channels import CAPTURE_HEALTH, Refusal
from kiosk.messaging.messages import CaptureHealth, encode_json
from kiosk.messaging.status import VerifierStatus
from kiosk.messaging.transport import FRAME_HWM, FRAME_RCVHWM
from kiosk.pipeline.core import Verdict, VerifierCore
from kiosk.pipeline.gatekeeper import Gatekeeper
from kiosk.services.audit import AuditLog, RecentEvents, read_tail
from kiosk.services.event_outlet import EventOutlet, observe_decision
from kiosk.services.gallery_keeper import GalleryKeeper, count_gallery
from kiosk.services.gallery_watch import GALLERY_POLL_S, GalleryWatch
from kiosk.services.health import MESSAGES, HealthRegistry
from kiosk.services.key_watch import KeyFileWatch
from kiosk.services.metrics import VerifierMetrics
from kiosk.services.metrics import serve as serve_metrics
from kiosk.services.preview import send_previews
from kiosk.services.retention_purger import RetentionPurger
from kiosk.services.verifier_requests import ControlRequests, HistoryRequests
from kiosk.services.verifier_setup import (
    Sockets,
    announce,
    log_stopping,
    open_sockets,
    recall_accepts,
    warn_readable,
    watched_keys,
)
from kiosk.services.verifier_status import HeartbeatClock, heartbeat_messages, verifier_status
from kiosk.store.flights import SqliteBoardingStore, load_gate_flights
from kiosk.store.gallery import GalleryMatrix, GalleryQueries, open_gallery
from kiosk.vision.engine import FaceEngine

log = logging.getLogger(__name__)

BAD_LOG_EVERY_S = 10.0


class Verifier:
    """The service: its sockets, read each loop, and the threads and records around the core (see the
    module's docstring)."""

    def __init__(self, cfg: KioskConfig, engine: FaceEngine | None = None) -> None:
        if not cfg.cameras:
            raise ConfigError(f"{cfg.source or 'config'}: cameras: the verifier needs at least one camera")
        self.cfg = cfg
        self.engine = engine or FaceEngine.from_config(cfg)
        gallery = open_gallery(cfg, create=False)
        warn_readable(cfg, gallery)
        self.gates = {c.gate for c in cfg.cameras}
        view = self._view(gallery)
        self.health = HealthRegistry()  # the gallery's, its file's and the last bad message's errors
        self.metrics = VerifierMetrics({c.id: c.gate for c in cfg.cameras})
        self.core = VerifierCore(
            cfg.policy, cfg.cameras, self.engine, view, pad=cfg.pad, textured=bool(cfg.models.pad), metrics=self.metrics
        )
        self.cameras = self.core.cameras
        self.metrics.gallery_stale.set_function(lambda: 1.0 if self.keeper.stale_reason() else 0.0)
        self.metrics.watch_cameras(lambda cam_id: self.cameras[cam_id].state(time.time())[0] != "down", self.cameras)
        io = open_sockets(cfg, self.metrics, self.cameras, self.gates, self._bad_message, self._refused)
        self.transport, self.frames, self.inbox, self.refusals = io.transport, io.frames, io.inbox, io.refusals
        self.events, self.access, self.previews = io.events, io.access, io.previews
        self._open_audit()
        store = SqliteBoardingStore(gallery)
        self.gate = Gatekeeper(
            enrolment=gallery,
            store=store,
            audit=self.audit,
            publisher=self.outlet,
            forget_accept=self.core.policy.forget_accept,
            max_frame_age_ms=cfg.policy.max_frame_age_ms,
            stale_grace_s=cfg.gallery.stale_grace_s,
            counters=self.metrics,
        )
        self._open_requests(io)
        self._stop = threading.Event()
        self.bad = 0  # malformed or refused messages
        self._last_bad_log = 0.0
        self.heartbeat = HeartbeatClock(cfg.heartbeat.interval_s)
        self._last_poll = time.monotonic()
        self._watch_gallery(gallery, store, view)
        self.key_files = KeyFileWatch(watched_keys(cfg, self.transport, lambda: self.gallery.codec), self.metrics)
        self.key_files.check(time.monotonic())
        self._metrics_server = serve_metrics(self.metrics.registry, cfg.metrics.port) if cfg.metrics.port else None
        count_gallery(self.metrics, view.full)
        for prov in self.engine.providers:
            self.metrics.provider_info.labels(provider=prov).set(1)
        announce(len(self.cameras), gallery, view, self.engine.provider_note, self.gates)
        self.purger.start()
        self.watch.start()

    # -- start -----------------------------------------------------------------
    def _open_audit(self) -> None:
        """The audit log, the accepts it remembers, and where the audited events go out (kiosk.services.
        event_outlet), with the recent ones a subscriber that missed some can fetch."""
        audit_path = self.cfg.audit.path
        recall_accepts(self.core.policy, audit_path, self.cfg.policy.repeat_accept_s, time.time())
        self.audit = AuditLog(audit_path, self.cfg.retention.audit_days)
        self.boot_id = uuid.uuid4().hex  # with event_seq, lets a subscriber see a restart and any gap
        self.booted_at = time.time()  # a subscriber started before this boot wants all of its events
        self.recent = RecentEvents(read_tail(audit_path))  # what a subscriber that missed some can fetch
        self.outlet = EventOutlet(
            self.boot_id, self.events, self.recent, self.previews, self.cfg.policy.accept_threshold
        )
        self.metrics.audit_ok.set_function(lambda: 0.0 if self.audit.error else 1.0)

    def _open_requests(self, io: Sockets) -> None:
        self.control = ControlRequests(
            io.control,
            self.access,
            status=self.status,
            enrolled=lambda subject: subject in self.matrix.subject_ids,
            refresh_gallery=lambda: self.keeper.refresh(),
            decide=self.core.control,
            bad_message=self._bad_message,
        )
        self.history = HistoryRequests(io.history, self.events, self.recent, self.boot_id, self._bad_message)

    def _watch_gallery(self, gallery: GalleryQueries, store: SqliteBoardingStore, view: GateFlights) -> None:
        """The retention purge (at once, then every minute and when the gallery changes), the gallery watch (its
        file and revision, every second) and what the loop applies of what the watch finds."""
        self.purger = RetentionPurger(
            lambda: self.watch.gallery(), self.cfg.retention.purge_after_departure_h, self.health, self.metrics
        )
        self.watch = GalleryWatch(gallery, view, self._view, self.health, on_change=self.purger.wake)
        self.keeper = GalleryKeeper(
            gallery,
            store,
            core=self.core,
            gate=self.gate,
            watch=self.watch,
            health=self.health,
            metrics=self.metrics,
            gates=self.gates,
            stale_grace_s=self.cfg.gallery.stale_grace_s,
            config_source=self.cfg.source,
            heartbeat_now=self.heartbeat.soon,
        )

    def _view(self, gallery: GalleryQueries, previous: GateFlights | None = None) -> GateFlights:
        return load_gate_flights(
            gallery,
            self.engine.model_id,
            self.engine.dim,
            require_flight=self.cfg.boarding.require_flight,
            gates=self.gates,
            load=self.cfg.gallery.load,
            previous=previous,
        )

    @property
    def matrix(self) -> GalleryMatrix:
        return self.core.matrix

    @property
    def gallery(self) -> GalleryQueries:
        """The gallery the gatekeeper confirms and boards in now."""
        return self.keeper.gallery

    # -- lifecycle -------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        self._heartbeat(force=True)
        while not self._stop.is_set():
            self.step(timeout_ms=50)
        return 0

    def close(self) -> None:
        self._stop.set()
        self.purger.stop()
        self.watch.stop()
        self._publish_all(self.core.end_all(time.time()))
        log_stopping(self.cameras, self.bad, self.metrics)
        self._heartbeat(force=True, status="stopping")
        self.audit.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.watch.join(timeout=5.0)  # (a load in progress ends first) before the gallery it checks is closed
        self.keeper.gallery.close()
        self.transport.close()

    # -- the loop --------------------------------------------------------------
    def step(self, timeout_ms: int = 50) -> None:
        poller = zmq.Poller()
        poller.register(self.frames, zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        poller.register(self.history.sock, zmq.POLLIN)
        poller.register(self.previews.sock, zmq.POLLIN)
        ready = dict(poller.poll(0 if self.core.has_pending() else timeout_ms))
        self.events.poll()  # subscriptions, each applied or refused for its sender's key (never blocks)
        if self.previews.sock in ready or self.previews.leases:  # new leases; old ones run out
            self.previews.poll()
            watched = {g for g in self.gates if self.previews.watched(g)}
            self.core.watch(watched)
        if self.control.sock in ready:
            self.control.handle()
        if self.history.sock in ready:
            self.history.handle()
        if self.frames in ready:
            self._drain()
        self._publish_all(self.core.step(time.time()))
        self._publish_all(self.core.tick(time.time()))
        if self.core.preview_gates:
            send_previews(self.previews, self.cameras.values(), lambda g: self.metrics.previews.labels(gate=g).inc())
        self._send_hints()
        self._housekeeping()

    def _send_hints(self) -> None:
        """The core's idle hints to the captures (topic idle.<camera>, on the event socket that the captures'
        keys may subscribe to; the gates' subscribers do not take that topic)."""
        for hint in self.core.take_hints():
            self.events.send_multipart(hint.encode())

    def _drain(self) -> None:
        """Read waiting messages into the core, until a replay camera's backlog is full (back-pressure). Up to
        what every capture's queues can hold (its send and our receive high-water marks, a few more in kernel
        buffers, health): after a long step a live camera's newest frame is then among those read, not behind
        its older ones. The bound keeps a step's reading finite while captures keep sending."""
        budget = (FRAME_HWM + FRAME_RCVHWM + 4) * len(self.cameras)
        while budget > 0 and not self.core.backlog_full():
            message = self.inbox.recv()
            if message is None:
                break
            budget -= 1
            if isinstance(message, CaptureHealth):
                self._capture_health(message)
            else:
                self.core.offer(message, time.time())

    def _capture_health(self, health: CaptureHealth) -> None:
        """Relay a capture's health to the subscribers and keep what `kiosk status` and metrics show."""
        self.events.send_multipart(encode_json(CAPTURE_HEALTH + health.camera_id, health.body))
        cam = self.cameras[health.camera_id]
        cam.capture_status = str(health.body.get("status", ""))[:40]
        cam.capture_error = str(health.body.get("last_error", ""))[:300]
        self.metrics.captures.update(health.camera_id, health.body)

    def _publish_all(self, verdicts: list[Verdict]) -> None:
        """Each verdict through the gatekeeper (kiosk.pipeline.gatekeeper): audited, then published."""
        for verdict in verdicts:
            t0 = time.perf_counter()
            event = self.gate.admit(verdict)
            observe_decision(self.metrics, verdict, event, (time.perf_counter() - t0) * 1000)

    def _bad_message(self, why: str) -> None:
        self.bad += 1
        self.health.report(MESSAGES, why, latest=True)
        self.metrics.bad_messages.inc()
        now = time.monotonic()
        if now - self._last_bad_log >= BAD_LOG_EVERY_S:
            self._last_bad_log = now
            log.warning("dropped a malformed message (%d so far): %s", self.bad, why)

    def _refused(self, refusal: Refusal) -> None:
        """A message refused before any decode (a key that does not own the camera, a seq or capture time out
        of bounds): counted per camera and reason, and a bad message (counted, logged at most every 10 s)."""
        if self.refusals.refused(refusal, time.monotonic()):
            self.heartbeat.soon()  # a clock-skew episode began: heartbeat now
        self._bad_message(refusal.why)

    # -- periodic --------------------------------------------------------------
    def _housekeeping(self) -> None:
        self.keeper.apply()  # what the gallery watch found (kiosk.services.gallery_watch)
        mono = time.monotonic()
        if self.events.check_revoked(mono):  # a revoked key's subscriptions dropped: every peer resubscribes
            self.heartbeat.soon()
        if mono - self._last_poll >= GALLERY_POLL_S:
            self._last_poll = mono
            self.keeper.update_stale()
            self.audit.check()
            self.gate.retry_records()
        if self.refusals.tick(mono) | self.key_files.check(mono):
            self.heartbeat.soon()  # a changed status goes out at once
        self._heartbeat()

    # -- status (kiosk.services.verifier_status) ---------------------------------------------------------
    def status(self) -> VerifierStatus:
        return verifier_status(self)

    def _heartbeat(self, force: bool = False, status: str | None = None) -> None:
        if self.heartbeat.due(force):
            for message in heartbeat_messages(self, status):
                self.events.send_multipart(message)


def run_verifier(cfg: KioskConfig) -> int:
    return serve(Verifier(cfg))
