"""`kiosk verify`: the service around the verifier core (`kiosk.pipeline.core`).

The core decides; this shell owns what it must not: the frame, event and
control sockets, the audit log, the gallery file (reloaded in a thread when
its revision changes), the metrics server and the heartbeat. Each loop:
read what arrived (control requests, frames, capture health, end-of-source
markers), let the core step and tick, and hand its verdicts to the
gatekeeper (kiosk.pipeline.gatekeeper), which checks each against the
gallery and the boarding store, audits it and publishes it through this
service's sockets; the service tells it the gallery's state. Frames refused before decoding (another
camera's key, a seq or capture time out of bounds) are counted and followed
for clock skew (kiosk.services.frame_refusals); the key files it started
with are rechecked once a minute (kiosk.services.key_watch). Either shows
in the status at once. A control request is checked against its sender's
key before anything is done for it (kiosk.services.control_access): a claim
only for a gate the key serves, passenger ids in the status only for an
operator key's gates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import zmq

from kiosk.boarding.gates import GateFlights
from kiosk.cli_support import serve, warn_if_readable_by_others
from kiosk.config import KioskConfig
from kiosk.errors import ConfigError, UsageError
from kiosk.messaging.channels import CAPTURE_HEALTH, GATE_HEALTH, REFUSALS, VERIFIER_HEALTH, FrameChannel, Refusal
from kiosk.messaging.messages import CaptureHealth, Event, encode_json
from kiosk.messaging.transport import FRAME_HWM, FRAME_RCVHWM, Transport, client_public_key
from kiosk.pipeline.core import Verdict, VerifierCore
from kiosk.pipeline.gatekeeper import Gatekeeper
from kiosk.pipeline.policy import Decision
from kiosk.services.audit import AuditLog, RecentEvents, read_tail
from kiosk.services.control_access import Caller, ControlAccess, KeyScopes
from kiosk.services.event_access import EventPublisher, HearingScopes
from kiosk.services.frame_refusals import FrameRefusals
from kiosk.services.key_watch import KeyFileWatch, WatchedKey, curve_server_key, template_key
from kiosk.services.metrics import VerifierMetrics
from kiosk.services.metrics import serve as serve_metrics
from kiosk.services.preview import PreviewFace, PreviewPublisher
from kiosk.store.flights import SqliteBoardingStore, load_gate_flights
from kiosk.store.gallery import Gallery, GalleryMatrix, GalleryQueries, open_gallery
from kiosk.store.sealing import key_source
from kiosk.vision.engine import FaceEngine

log = logging.getLogger(__name__)

GALLERY_POLL_S = 1.0
PURGE_EVERY_S = 60.0
BAD_LOG_EVERY_S = 10.0


class Verifier:
    def __init__(self, cfg: KioskConfig, engine: FaceEngine | None = None) -> None:
        if not cfg.cameras:
            raise ConfigError(f"{cfg.source or 'config'}: cameras: the verifier needs at least one camera")
        self.cfg = cfg
        self.engine = engine or FaceEngine.from_config(cfg)
        self.gallery = open_gallery(cfg, create=False)
        keys = cfg.resolve(cfg.security.keys_dir)
        files = [self.gallery.path] if isinstance(self.gallery, Gallery) else []
        warn_if_readable_by_others(
            *files, cfg.resolve(cfg.audit.path), *keys.glob("*.key_secret"), keys / "webhook.secret"
        )
        self._gates = {c.gate for c in cfg.cameras}
        view = self._view(self.gallery)
        matrix = view.full
        self.store = SqliteBoardingStore(self.gallery)
        self._loader: threading.Thread | None = None
        self._loaded: GateFlights | None = None
        self._load_ms = 0.0
        self._gallery_error = ""  # why the search matrix may be behind the gallery (a failed reload)
        self._file_error = ""  # the gallery file deleted, replaced or corrupt under this process
        self._integrity_error = ""  # the background quick check found a corrupt page
        self._force_reload = False
        self._last_integrity = float("-inf")
        self.metrics = VerifierMetrics({c.id: c.gate for c in cfg.cameras})
        self.core = VerifierCore(
            cfg.policy, cfg.cameras, self.engine, view, pad=cfg.pad, textured=bool(cfg.models.pad), metrics=self.metrics
        )
        self.cameras = self.core.cameras
        self.metrics.gallery_stale.set_function(lambda: 1.0 if self._stale_reason() else 0.0)
        self.metrics.watch_cameras(lambda cam_id: self.cameras[cam_id].state(time.time())[0] != "down", self.cameras)
        self.transport = Transport(cfg, role="verifier")
        self.frames = self.transport.frame_receiver()
        owners = None
        if cfg.security.curve:  # each camera's messages from its own capture's key only
            keys = cfg.resolve(cfg.security.keys_dir)
            owners = {c.id: client_public_key(keys, c.key or cfg.security.client_key) for c in cfg.cameras}
        self.refusals = FrameRefusals(self.metrics, self.cameras)
        self.inbox = FrameChannel(self.frames, self.cameras, self._bad_message, owners, self._refused)
        self.events = EventPublisher(
            self.transport.event_publisher(),
            lambda: self.transport.event_publisher(bind_tries=100),
            HearingScopes(cfg),
            self.transport.event_names(),
            self.metrics,
        )
        self.control = self.transport.control_server()
        self.access = ControlAccess(KeyScopes.from_config(cfg), self.transport.control_names(), self.metrics)
        log.info("control: %s", self.access.scopes.describe())
        log.info("events: %s", self.events.scopes.describe())
        for problem in self.events.scopes.problems():
            log.warning("events: %s", problem)
        self.history = self.transport.history_server()
        self.previews = PreviewPublisher(self.transport.preview_publisher(), cfg.console.preview_fps, self._gates)
        audit_path = cfg.resolve(cfg.audit.path)
        self._recall_accepts(audit_path)
        self.audit = AuditLog(audit_path, cfg.retention.audit_days)
        self.boot_id = uuid.uuid4().hex  # with event_seq, lets a subscriber see a restart and any gap
        self.booted_at = time.time()  # a subscriber started before this boot wants all of its events
        self._event_seq: dict[str, int] = {}  # per gate: a gate's subscriber sees 1, 2, 3... and any gap
        self.recent = RecentEvents(read_tail(audit_path))  # what a subscriber that missed some can fetch
        self.metrics.audit_ok.set_function(lambda: 0.0 if self.audit.error else 1.0)
        self.gate = Gatekeeper(
            enrolment=self.gallery,
            store=self.store,
            audit=self.audit,
            publisher=self,
            forget_accept=self.core.policy.forget_accept,
            max_frame_age_ms=cfg.policy.max_frame_age_ms,
            stale_grace_s=cfg.gallery.stale_grace_s,
            counters=self.metrics,
        )
        self._stop = threading.Event()
        self._purge_now = threading.Event()  # set: look for flights due for purging now
        self._purge_now.set()
        self._bad = 0
        self._last_bad_log = 0.0
        self._last_error = ""
        self._last_heartbeat = 0.0
        self._last_gallery_poll = time.monotonic()
        self.key_files = KeyFileWatch(self._watched_keys(), self.metrics)
        self.key_files.check(time.monotonic())
        self._metrics_server = serve_metrics(self.metrics.registry, cfg.metrics.port) if cfg.metrics.port else None
        self.metrics.gallery_subjects.set(len(matrix))
        self.metrics.gallery_templates.set(matrix.template_count)
        self.metrics.gallery_unreadable.set(sum(matrix.unreadable.values()))
        for prov in self.engine.providers:
            self.metrics.provider_info.labels(provider=prov).set(1)
        log.info(
            "verifier ready: %d camera(s), gallery %d subjects / %d templates, %s",
            len(self.cameras),
            len(matrix),
            matrix.template_count,
            self.engine.provider_note,
        )
        if not len(matrix):
            log.warning(
                "gallery %s has no subject for this model: every passenger will be rejected until someone is enrolled",
                self.gallery.name,
            )
        self._log_gates(None, view)
        self._purger = threading.Thread(target=self._purge_loop, name="retention", daemon=True)
        self._purger.start()
        self._changed = threading.Event()  # a shared (PostgreSQL) gallery announced a change: reload now
        listen = getattr(self.gallery, "listen", None)
        if listen is not None:
            threading.Thread(
                target=listen, args=(self._changed, self._stop), name="gallery-listener", daemon=True
            ).start()

    def _watched_keys(self) -> list[WatchedKey]:
        """The key files this process loaded at start: the template key's (unless it came from the
        environment) and, with CurveZMQ on, the server key pair's secret."""
        keys = []
        template = key_source(self.cfg).path
        if template is not None and self.gallery.codec is not None:
            keys.append(template_key(template, lambda: self.gallery.codec))
        public = self.transport.server_public_key()
        if public is not None:
            keys.append(curve_server_key(self.transport.server_key_file, public))
        return keys

    def _view(self, gallery: GalleryQueries, previous: GateFlights | None = None) -> GateFlights:
        return load_gate_flights(
            gallery,
            self.engine.model_id,
            self.engine.dim,
            require_flight=self.cfg.boarding.require_flight,
            gates=self._gates,
            load=self.cfg.gallery.load,
            previous=previous,
        )

    def _log_gates(self, old: GateFlights | None, new: GateFlights) -> None:
        for gate in sorted(self._gates):
            flight = new.flight_of(gate)
            if old is None or old.flight_of(gate) != flight:
                log.info(
                    "gate %s: %s",
                    gate,
                    f"boarding flight {flight} ({len(new.manifests[flight])} passengers)"
                    if flight
                    else "not boarding; processes nobody"
                    if new.require_flight
                    else "not boarding; matches against everyone enrolled (1:N)",
                )

    def _purge_loop(self) -> None:
        """Purge, on schedule, the templates of flights past `retention.purge_after_departure_h` (its own
        connection; a failure is logged and tried again next round)."""
        while not self._stop.is_set():
            self._purge_now.wait(PURGE_EVERY_S)  # every minute, and at once when the gallery changed
            self._purge_now.clear()
            if self._stop.is_set():
                return
            try:
                try:
                    gallery = self.gallery.reopen()
                except UsageError as exc:  # not a usable database any more (or gone: the file check says so)
                    self._integrity(str(exc))
                    raise
                with gallery:
                    check = getattr(gallery, "integrity_problem", None)
                    # a page corrupt inside the file, which the header check cannot see (a full read of the
                    # file: at most once a round, not at each purge a gallery change brings forward)
                    if check is not None and time.monotonic() - self._last_integrity >= PURGE_EVERY_S:
                        self._last_integrity = time.monotonic()
                        self._integrity(check())
                    store = SqliteBoardingStore(gallery)
                    for flight in store.due_for_purge(time.time(), self.cfg.retention.purge_after_departure_h):
                        result = store.purge(flight)
                        self.metrics.purges.inc()
                        log.info(
                            "retention: flight %s departed more than %g h ago; templates of %d passenger(s) "
                            "deleted, %d kept for a later flight",
                            flight,
                            self.cfg.retention.purge_after_departure_h,
                            len(result.subjects_purged),
                            len(result.kept),
                        )
            except Exception as exc:  # noqa: BLE001 - retry next round
                log.warning("retention purge failed (next try in %.0fs): %s", PURGE_EVERY_S, exc)

    def _integrity(self, problem: str) -> None:
        if problem != self._integrity_error:
            if problem:
                log.error("%s", problem)
            else:
                log.info("gallery %s passes its integrity check again", self.gallery.name)
        self._integrity_error = problem

    @property
    def matrix(self) -> GalleryMatrix:
        return self.core.matrix

    def _recall_accepts(self, audit_path: Path) -> None:
        """Remember the recent accepts of a previous run (the audit log's tail), so a verifier restarted
        while a passenger is still in view does not open the gate for them twice."""
        horizon = time.time() - self.cfg.policy.repeat_accept_s
        recalled = 0
        for e in read_tail(audit_path):
            if (
                e.get("type") == "accept"
                and isinstance(e.get("captured_at"), (int, float))
                and e["captured_at"] >= horizon
                and e.get("subject_id")
            ):
                self.core.policy.remember_accept(str(e.get("gate_id")), str(e["subject_id"]), float(e["captured_at"]))
                recalled += 1
        if recalled:
            log.info(
                "recalled %d accept(s) of the last %.0fs from %s", recalled, self.cfg.policy.repeat_accept_s, audit_path
            )

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
        self._purge_now.set()
        self._publish_all(self.core.end_all(time.time()))
        lat = self.metrics.recent_frame.quantiles()
        dec = self.metrics.recent_decision.quantiles()
        log.info(
            "verifier stopping: %d frames processed (%d stale dropped), %d bad messages; frame latency "
            "p50 %.0f ms p99 %.0f ms; decision latency p50 %.0f ms p99 %.0f ms over %d decisions",
            sum(c.processed for c in self.cameras.values()),
            sum(c.stale for c in self.cameras.values()),
            self._bad,
            lat.get("p50", 0),
            lat.get("p99", 0),
            dec.get("p50", 0),
            dec.get("p99", 0),
            int(dec.get("n", 0)),
        )
        self._heartbeat(force=True, status="stopping")
        self.audit.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.gallery.close()
        self.transport.close()

    # -- the loop --------------------------------------------------------------
    def step(self, timeout_ms: int = 50) -> None:
        poller = zmq.Poller()
        poller.register(self.frames, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.history, zmq.POLLIN)
        poller.register(self.previews.sock, zmq.POLLIN)
        ready = dict(poller.poll(0 if self.core.has_pending() else timeout_ms))
        self.events.poll()  # subscriptions, each applied or refused for its sender's key (never blocks)
        if self.previews.sock in ready or self.previews.leases:  # new leases; old ones run out
            self.previews.poll()
            watched = {g for g in self._gates if self.previews.watched(g)}
            self.core.wake(watched - self.core.preview_gates)
            self.core.preview_gates = watched
        if self.control in ready:
            self._handle_control()
        if self.history in ready:
            self._handle_history()
        if self.frames in ready:
            self._drain()
        self._publish_all(self.core.step(time.time()))
        self._publish_all(self.core.tick(time.time()))
        if self.core.preview_gates:
            self._send_previews()
        self._send_hints()
        self._housekeeping()

    def _send_hints(self) -> None:
        """The core's idle hints to the captures (topic idle.<camera>, on the event socket that the captures'
        keys may subscribe to; the gates' subscribers do not take that topic)."""
        for hint in self.core.hints:
            self.events.send_multipart(hint.encode())
        self.core.hints.clear()

    def _send_previews(self) -> None:
        """The last frame of each watched gate, with its faces' boxes, tracks and decisions, at the console's
        rate (one camera's frame per gate and interval)."""
        for cam in self.cameras.values():
            view, cam.view = cam.view, None
            if view is None or not self.previews.due(cam.gate_id):
                continue
            frame, boxes, tracks = view
            faces = []
            for box, track in zip(boxes, tracks):
                outcome = track.outcome
                if outcome is None:
                    faces.append(PreviewFace(list(box), track.track_id, "collecting"))
                else:
                    kind, subject, reason, score = outcome
                    faces.append(
                        PreviewFace(
                            list(box),
                            track.track_id,
                            "accepted" if kind == "accept" else "rejected",
                            subject,
                            reason,
                            None if score is None else round(score, 3),
                        )
                    )
            try:
                self.previews.send_frame(
                    cam.gate_id,
                    cam.camera_id,
                    frame.image,
                    faces,
                    seq=frame.header.seq,
                    captured_at=frame.header.captured_at,
                )
            except (ValueError, cv2.error) as exc:  # never a reason to stop deciding
                log.warning("preview of gate %s not sent: %s", cam.gate_id, exc)
                continue
            self.metrics.previews.labels(gate=cam.gate_id).inc()

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

    def _bad_message(self, why: str) -> None:
        self._bad += 1
        self._last_error = why
        self.metrics.bad_messages.inc()
        now = time.monotonic()
        if now - self._last_bad_log >= BAD_LOG_EVERY_S:
            self._last_bad_log = now
            log.warning("dropped a malformed message (%d so far): %s", self._bad, why)

    def _refused(self, refusal: Refusal) -> None:
        """A message refused before any decode (a key that does not own the camera, a seq or capture time out
        of bounds): counted per camera and reason, and a bad message (counted, logged at most every 10 s)."""
        if self.refusals.refused(refusal, time.monotonic()):
            self._last_heartbeat = 0.0  # a clock-skew episode began: heartbeat now
        self._bad_message(refusal.why)

    def _capture_health(self, health: CaptureHealth) -> None:
        """Relay a capture's health to the subscribers and keep what `kiosk status` and metrics show."""
        self.events.send_multipart(encode_json(CAPTURE_HEALTH + health.camera_id, health.body))
        cam = self.cameras[health.camera_id]
        cam.capture_status = str(health.body.get("status", ""))[:40]
        cam.capture_error = str(health.body.get("last_error", ""))[:300]
        self.metrics.captures.update(health.camera_id, health.body)

    def _publish_all(self, verdicts: list[Verdict]) -> None:
        for verdict in verdicts:
            t0 = time.perf_counter()
            event = self.gate.admit(verdict)
            self.metrics.observe_stage("publish", (time.perf_counter() - t0) * 1000)
            self.metrics.decisions.labels(gate=event.gate_id, type=event.type, reason=event.reason or "").inc()
            self.metrics.observe_decision(event.gate_id, event.latency_ms or 0.0)
            log.info(
                "%s gate=%s camera=%s track=%d subject=%s score=%s reason=%s frames=%d latency=%.0fms",
                event.type.upper(),
                event.gate_id,
                event.camera_id,
                verdict.track_id,
                event.subject_id,
                event.score,
                event.reason,
                event.frames,
                event.latency_ms or 0.0,
            )

    # -- the gatekeeper's publisher port -----------------------------------------------------------------
    def event(self, verdict: Verdict, d: Decision) -> Event:
        """The event a decision goes out as, with its gate's next sequence number."""
        cam = verdict.camera
        decided_at = time.time()
        return Event(
            boot_id=self.boot_id,
            event_seq=self._event_seq.get(cam.gate_id, 0) + 1,
            type=d.type,
            gate_id=cam.gate_id,
            camera_id=cam.camera_id,
            track_id=verdict.track_id,
            subject_id=d.subject_id,
            display_name=d.display_name,
            score=None if d.score is None else round(d.score, 4),
            threshold=self.cfg.policy.accept_threshold,
            reason=d.reason,
            frames=d.frames,
            captured_at=d.captured_at,
            decided_at=decided_at,
            latency_ms=round((decided_at - d.captured_at) * 1000, 1),
            seq=d.seq,
            event_id=d.event_id,
            flight_id=d.flight_id,
            boarded_at=d.boarded_at,
            boarded_gate_id=d.boarded_gate_id,
            on_flights=d.on_flights,
            liveness_score=None if d.liveness_score is None else round(d.liveness_score, 4),
            liveness_frames=d.liveness_frames,
            liveness_checks=d.liveness_checks,
        )

    def publish(self, verdict: Verdict, event: Event) -> None:
        """An audited event to the gates, the history a subscriber that missed it fetches, and a watching
        console (the face crop it was decided on)."""
        self._event_seq[event.gate_id] = event.event_seq or 0
        self.recent.add(event)
        self.events.send_multipart([event.topic(), event.to_json()])
        if verdict.crop is not None and self.previews.wants_crops(event.gate_id):
            try:
                self.previews.send_crop(event.gate_id, dataclasses.asdict(event), verdict.crop)
            except (ValueError, cv2.error) as exc:
                log.warning("decision crop of %s not sent: %s", event.event_id, exc)

    # -- periodic --------------------------------------------------------------
    def _housekeeping(self) -> None:
        if self._loader is not None and not self._loader.is_alive():
            self._loader.join()
            self._adopt()
        mono = time.monotonic()
        if self.events.check_revoked(mono):  # a revoked key's subscriptions dropped: every peer resubscribes
            self._last_heartbeat = 0.0
        if mono - self._last_gallery_poll >= GALLERY_POLL_S or self._changed.is_set():
            self._last_gallery_poll = mono
            self._changed.clear()
            self._check_gallery_file()
            self._reload_gallery()
            self._update_stale()
            self.audit.check()
            self.gate.retry_records()
        if self.refusals.tick(mono) | self.key_files.check(mono):
            self._last_heartbeat = 0.0  # a changed status goes out at once
        self._heartbeat()

    def _stale_reason(self) -> str:
        return self._file_error or self._integrity_error or self._gallery_error

    def _check_gallery_file(self) -> None:
        """Is the gallery file still there and still the one open? A file put back at the path (`kiosk-enroll
        restore`, a copy) that opens as a gallery is switched to and loaded; anything else is stale."""
        problem = self.gallery.file_problem()
        if problem and isinstance(self.gallery, Gallery):
            try:
                fresh = Gallery(self.gallery.path, create=False, codec=self.gallery.codec)
            except Exception:  # noqa: BLE001 - nothing usable at the path yet
                fresh = None
            if fresh is not None and not fresh.file_problem():
                log.warning("%s; switching to the gallery now at %s", problem, fresh.path)
                old, self.gallery = self.gallery, fresh
                self.store = SqliteBoardingStore(fresh)
                self.gate.use(fresh, self.store)
                old.close()
                self._force_reload = True
                self._integrity_error = ""
                problem = ""
            elif fresh is not None:
                fresh.close()
        if problem != self._file_error:
            if problem:
                log.error("%s", problem)
            else:
                log.info("gallery file %s is in place again", self.gallery.name)
        self._file_error = problem

    def _update_stale(self) -> None:
        """Stale: say so at once (heartbeat, status, metrics, console), and tell the gatekeeper, which goes on
        accepting from memory for `gallery.stale_grace_s`, then refuses every accept until the gallery is back
        (a boarding gate whose file is gone, at once: its boarded marks would go into a deleted file)."""
        reason = self._stale_reason()
        was = self.gate.stale_since
        self.gate.gallery_state(reason, file_gone=bool(self._file_error), remedy=self._restore_hint())
        if reason and was is None:
            log.error(
                "gallery stale (%s): deciding from the %d subject(s) in memory for %.0f s more, then every "
                "accept is refused",
                reason,
                len(self.matrix),
                self.cfg.gallery.stale_grace_s,
            )
            self._last_heartbeat = 0.0  # heartbeat now
        elif not reason and was is not None:
            log.info("gallery %s is current again (stale for %.0f s)", self.gallery.name, time.monotonic() - was)
            self._last_heartbeat = 0.0

    def _restore_hint(self) -> str:
        config = f"-c {self.cfg.source} " if self.cfg.source else ""
        if self._file_error or self._integrity_error:
            return f"run `kiosk-enroll {config}restore BACKUP` (a corrupt file is moved aside first)"
        return "check the gallery's database (see the error)"

    def _reload_gallery(self, wait: bool = False) -> None:
        """Pick up gallery changes. The new matrix is built in a thread (a large one takes a second) and
        swapped in when ready, so frames keep flowing; `wait` blocks until it is in."""
        loader = self._loader
        if loader is not None:
            if loader.is_alive() and not wait:
                return
            loader.join()
            self._adopt()
        try:
            revision = self.gallery.revision()
        except Exception as exc:  # noqa: BLE001 - a locked or broken DB must not stop the gate
            self._last_error = self._gallery_error = f"gallery: {exc}"
            log.warning("gallery revision check failed: %s", exc)
            return
        expired = self.matrix.next_expiry is not None and time.time() >= self.matrix.next_expiry
        if self._force_reload:
            self._force_reload, expired = False, True
        if revision == self.matrix.revision and not expired:
            if self._gallery_error:  # the gallery answers again and nothing changed meanwhile
                log.info("gallery %s answers again (revision %d)", self.gallery.name, revision)
                self._gallery_error = ""
                if self._last_error.startswith("gallery"):
                    self._last_error = ""
            return
        self._purge_now.set()  # a flight rescheduled (or added) may be due now
        self._loader = threading.Thread(target=self._load_matrix, name="gallery-loader", daemon=True)
        self._loader.start()
        if wait:
            self._loader.join()
            self._adopt()

    def _load_matrix(self) -> None:
        try:
            # Its own connection (this runs in a thread); a gallery file that vanished is an error here,
            # never a new empty gallery: the verifier keeps deciding from the matrix it has and says so.
            started = time.perf_counter()
            with self.gallery.reopen() as gallery:
                self._loaded = self._view(gallery, self.core.flights)
            self._load_ms = (time.perf_counter() - started) * 1000
        except Exception as exc:  # noqa: BLE001 - keep serving the old matrix
            self._last_error = self._gallery_error = f"gallery reload: {exc}"
            log.warning("gallery reload failed, keeping revision %d: %s", self.matrix.revision, exc)

    def _adopt(self) -> None:
        loaded, self._loaded, self._loader = self._loaded, None, None
        if loaded is None:
            return
        self._log_gates(self.core.flights, loaded)
        self.core.adopt(loaded)
        self._gallery_error = ""
        if self._last_error.startswith("gallery"):
            self._last_error = ""
        self.metrics.gallery_subjects.set(len(loaded.full))
        self.metrics.gallery_templates.set(loaded.full.template_count)
        self.metrics.gallery_unreadable.set(sum(loaded.full.unreadable.values()))
        log.info(
            "gallery reloaded: revision %d, %d subjects, %d templates%s (%.0f ms)",
            loaded.revision,
            len(loaded.full),
            loaded.full.template_count,
            "" if loaded.full.scope is None else " of its gates' flights",
            self._load_ms,
        )

    def status(self) -> dict[str, Any]:
        now = time.time()
        states = {c.camera_id: c.state(now) for c in self.cameras.values()}
        down = sorted(cid for cid, (state, _) in states.items() if state == "down")
        return {
            "component": "verifier",
            "status": (
                "degraded"
                if down
                or self.audit.error
                or self._stale_reason()
                or self.gate.record_failing
                or self.matrix.unreadable
                or self.refusals.skewed
                or self.key_files.problems
                else "ok"
            ),
            "cameras_down": down,
            "pid": os.getpid(),
            "providers": self.engine.providers,
            "fps": round(self.core.fps(now), 2),
            "drops": sum(c.stale for c in self.cameras.values()),
            "queue_depth": sum(len(c.pending) for c in self.cameras.values()),
            "bad_messages": self._bad,
            "last_error": self.core.last_error or self.gate.last_error or self._last_error,
            "frames_refused": {reason: sum(c[reason] for c in self.refusals.counts.values()) for reason in REFUSALS},
            "control_refused": dict(self.access.counts),
            "events_refused": dict(self.events.counts),
            "clock_skew": self.refusals.status(time.monotonic()),
            "key_files": self.key_files.status(),
            "audit": {
                "ok": not self.audit.error,
                "error": self.audit.error,
                "failures": self.audit.failures,
                "pending": self.audit.pending,
            },
            "boarding_store": {"ok": not self.gate.record_failing, "decisions_waiting": len(self.gate.unrecorded)},
            "frame_latency_ms": self.metrics.recent_frame.quantiles(),
            "stages_ms": {stage: window.quantiles() for stage, window in self.metrics.recent_stage.items()},
            "frames_processed": sum(c.processed for c in self.cameras.values()),
            "faces_detected": self.core.faces_total,
            "first_captured_at": self.core.first_captured_at,
            "last_done_at": self.core.last_done_at,
            "decision_latency_ms": self.metrics.recent_decision.quantiles(),
            "deciding_frame_latency_ms": self.metrics.recent_deciding.quantiles(),
            "gallery": self._gallery_status(),
            "cameras": {
                c.camera_id: {
                    "gate_id": c.gate_id,
                    "state": states[c.camera_id][0],
                    "last_error": states[c.camera_id][1],
                    "frames_in": c.frames_in,
                    "processed": c.processed,
                    "idle_skipped": c.idle_skipped,
                    "dropped": c.stale,
                    "too_old": c.too_old,
                    "refused": dict(self.refusals.counts[c.camera_id]),
                    "eof": c.eof,
                    "not_boarding": c.not_boarding,
                    "tracks": len(c.tracker.tracks),
                    "wakes": [list(w) for w in c.wakes],
                    "last_frame_age_s": round(now - c.last_frame_at, 1) if c.last_frame_at else None,
                }
                for c in self.cameras.values()
            },
            "claims": {g: c.subject_id for g, c in self.core.policy.claims.items()},
            "previews": self.previews.status(),
            "gates": {
                g: {"flight_id": self.core.flights.flight_of(g), "processing": not self.core.flights.idle(g)}
                for g in sorted(self._gates)
            },
        }

    def _gallery_status(self) -> dict[str, Any]:
        reason = self._stale_reason()
        status: dict[str, Any] = {
            "subjects": len(self.matrix),
            "templates": self.matrix.template_count,
            "stale": bool(reason),
            "error": reason,
            "revision": self.matrix.revision,
        }
        if self.matrix.unreadable:  # sealed templates that do not open: tampering or damage, left out
            status["unreadable_templates"] = sum(self.matrix.unreadable.values())
            status["unreadable_subjects"] = sorted(self.matrix.unreadable)[:20]
        stale_for = self.gate.stale_for()
        if reason and stale_for is not None:
            left = max(0.0, self.cfg.gallery.stale_grace_s - stale_for)
            status["stale_for_s"] = round(stale_for, 1)
            status["accepts_from_memory_s"] = round(left, 1)
            boarding = any(self.core.flights.flight_of(g) for g in self._gates)
            status["refusing"] = self.gate.refusing(boarding) or "nothing yet"
            status["action"] = self._restore_hint()
        return status

    def _heartbeat(self, force: bool = False, status: str | None = None) -> None:
        mono = time.monotonic()
        if not force and mono - self._last_heartbeat < self.cfg.heartbeat.interval_s:
            return
        self._last_heartbeat = mono
        body = self.status()
        if status is not None:
            body["status"] = status
        sent_at = time.time()
        stamp = {
            "status": body["status"],
            "pid": body["pid"],
            "boot_id": self.boot_id,
            "booted_at": self.booted_at,
            "sent_at": sent_at,
        }
        # Each gate's part (its event count, cameras: whether someone is there now; its flight) goes on its own
        # topic, to the keys that hear that gate (kiosk.services.event_access); the verifier's own health to every
        # allow-listed key. Passenger ids go on neither: no claims, and the subjects whose templates do not open
        # only as a count (their ids are in `status`, for the tools key).
        cameras, gates = body.pop("cameras"), body.pop("gates")
        del body["claims"]
        gallery = body["gallery"]
        if "unreadable_subjects" in gallery:
            gallery["unreadable_subject_count"] = len(self.matrix.unreadable)
            del gallery["unreadable_subjects"]
        body.update(stamp)
        self.events.send_multipart(encode_json(VERIFIER_HEALTH, body))
        for gate in sorted(self._gates):
            self.events.send_multipart(
                encode_json(
                    GATE_HEALTH + gate,
                    {
                        "component": "gate",
                        "gate_id": gate,
                        **stamp,
                        "event_seq": {gate: self._event_seq[gate]} if gate in self._event_seq else {},
                        "gate": gates.get(gate, {}),
                        "cameras": {cid: cam for cid, cam in cameras.items() if cam["gate_id"] == gate},
                    },
                )
            )

    def _handle_history(self) -> None:
        """`{"cmd": "events", "cursors": {gate: [boot_id, event_seq]}, "gate_id": G or null}`: the events each
        gate's subscriber missed since its cursor (see RecentEvents.since), of the gates the asking key may hear
        (kiosk.services.event_access): a request for another gate is refused, cursors of other gates are left
        out and named in the reply's `withheld_gates`."""
        try:
            raw = self.history.recv_multipart(copy=False)
            hearer = self.events.hearer(_sender(raw[0]))
            parts = [p.bytes for p in raw]
            if len(parts) != 1:
                raise ValueError(f"expected one message part, got {len(parts)}")
            request = json.loads(parts[0])
            if not isinstance(request, dict) or request.get("cmd") != "events":
                raise ValueError('expected {"cmd": "events", "cursors": {...}}')
            cursors, gate = request.get("cursors"), request.get("gate_id")
            if (
                not isinstance(cursors, dict)
                or len(cursors) > 10_000
                or (gate is not None and not isinstance(gate, str))
            ):
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
            if gate is not None and not hearer.hears_gate(gate):
                self.history.send_json(self.events.refuse_history(hearer, gate))
                return
            withheld = sorted(g for g in parsed if not hearer.hears_gate(g))
            if withheld:
                self.events.refuse_history(hearer, withheld[0])  # counted and logged
            events, complete = self.recent.since({g: c for g, c in parsed.items() if hearer.hears_gate(g)}, gate)
            reply = {"ok": True, "boot_id": self.boot_id, "complete": complete, "events": events}
            if withheld:
                reply["withheld_gates"] = [g[:40] for g in withheld[:100]]
                reply["note"] = f"events of gate(s) this key may not hear are left out ({hearer.describe()})"
        except (ValueError, RecursionError) as exc:
            self._bad_message(f"history: {exc}"[:300])
            reply = {"ok": False, "error": f"bad request: {exc}"}
        self.history.send_json(reply)

    def _handle_control(self) -> None:
        """One request, one reply, whatever arrived: a malformed request (several parts, not JSON) gets an
        error reply, never an exception that would stop every gate."""
        try:
            parts = self.control.recv_multipart(copy=False)
            caller = self.access.caller(_sender(parts[0]))
            if len(parts) != 1:
                raise ValueError(f"expected one message part, got {len(parts)}")
            request = json.loads(parts[0].bytes)
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            reply = self._control(request, caller)
        except (ValueError, RecursionError) as exc:
            self._bad_message(f"control: {exc}"[:300])
            reply = {"ok": False, "error": f"bad request: {exc}"}
        self.control.send_json(reply)

    def _control(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """A request its sender's key may make (kiosk.services.control_access), checked before anything else
        is done for it (a refused claim costs no gallery reload)."""
        cmd = req.get("cmd")
        refusal = self.access.refusal(caller, str(cmd), req.get("gate_id"))
        if refusal is not None:
            return refusal
        if cmd == "status":
            return {"ok": True, **self.access.redact(self.status(), caller)}
        if cmd == "claim" and req.get("subject_id") not in self.matrix.subject_ids:
            self._reload_gallery(wait=True)  # enrolled a moment ago?
        return self.core.control(req, time.time())


def _sender(first: zmq.Frame) -> str | None:
    """The z85 public key ZAP authenticated a message's sender with (None with CurveZMQ off)."""
    try:
        return first.get("User-Id")  # type: ignore[no-any-return]
    except zmq.ZMQError:
        return None


def run_verifier(cfg: KioskConfig) -> int:
    return serve(Verifier(cfg))
