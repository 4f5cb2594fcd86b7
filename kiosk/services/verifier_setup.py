"""The verifier's start and stop, apart from its loop: the sockets it opens, the files it warns about, the
accepts it remembers from a previous run, the key files it rechecks, and what it logs when it is ready and
when it stops."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq

from kiosk.boarding.gates import GateFlights
from kiosk.cli_support import warn_if_readable_by_others
from kiosk.config import KioskConfig
from kiosk.messaging.channels import FrameChannel, Refusal
from kiosk.messaging.transport import Transport, client_public_key
from kiosk.pipeline.core import CameraState
from kiosk.pipeline.policy import DecisionPolicy
from kiosk.services.audit import read_tail, recent_accepts
from kiosk.services.control_access import ControlAccess, KeyScopes
from kiosk.services.event_access import EventPublisher, HearingScopes
from kiosk.services.frame_refusals import FrameRefusals
from kiosk.services.gallery_keeper import log_gates
from kiosk.services.key_watch import WatchedKey, curve_server_key, template_key
from kiosk.services.metrics import VerifierMetrics
from kiosk.services.preview import PreviewPublisher
from kiosk.store.queries import GalleryQueries
from kiosk.store.sealing import TemplateCodec, key_source
from kiosk.store.sqlite_file import Gallery

log = logging.getLogger("kiosk.services.verifier")  # the verifier's log lines, as they always were


@dataclass
class Sockets:
    """Every socket the verifier serves, with what guards each."""

    transport: Transport
    frames: zmq.Socket
    inbox: FrameChannel  # frames in: each camera's from its own capture's key only (CurveZMQ)
    refusals: FrameRefusals  # frames refused before decoding, counted
    events: EventPublisher  # events, health and idle hints out, each gate's to the keys that hear it
    control: zmq.Socket
    access: ControlAccess  # which key may make which control request
    history: zmq.Socket
    previews: PreviewPublisher


def open_sockets(
    cfg: KioskConfig,
    metrics: VerifierMetrics,
    cameras: Mapping[str, CameraState],
    gates: set[str],
    bad_message: Callable[[str], None],
    refused: Callable[[Refusal], None],
) -> Sockets:
    """Bind every socket (frames, events, control, history, previews, in that order) and log who may do what
    on the control and events sockets."""
    transport = Transport(cfg, role="verifier")
    frames = transport.frame_receiver()
    owners = None
    if cfg.security.curve:  # each camera's messages from its own capture's key only
        keys = cfg.security.keys_dir
        owners = {c.id: client_public_key(keys, c.key or cfg.security.client_key) for c in cfg.cameras}
    refusals = FrameRefusals(metrics, cameras)
    inbox = FrameChannel(frames, cameras, bad_message, owners, refused)
    events = EventPublisher(
        transport.event_publisher(),
        lambda: transport.event_publisher(bind_tries=100),
        HearingScopes(cfg),
        transport.event_names(),
        metrics,
    )
    control = transport.control_server()
    access = ControlAccess(KeyScopes.from_config(cfg), transport.control_names(), metrics)
    log.info("control: %s", access.scopes.describe())
    log.info("events: %s", events.scopes.describe())
    for problem in events.scopes.problems():
        log.warning("events: %s", problem)
    history = transport.history_server()
    previews = PreviewPublisher(transport.preview_publisher(), cfg.console.preview_fps, gates)
    return Sockets(transport, frames, inbox, refusals, events, control, access, history, previews)


def warn_readable(cfg: KioskConfig, gallery: GalleryQueries) -> None:
    """Warn about the secret files others may read: the gallery, the audit log, the keys."""
    keys = cfg.security.keys_dir
    files = [gallery.path] if isinstance(gallery, Gallery) else []
    warn_if_readable_by_others(*files, cfg.audit.path, *keys.glob("*.key_secret"), keys / "webhook.secret")


def recall_accepts(policy: DecisionPolicy, audit_path: Path, repeat_accept_s: float, now: float) -> None:
    """Remember the recent accepts of a previous run (the audit log's tail), so a verifier restarted while a
    passenger is still in view does not open the gate for them twice."""
    accepts = recent_accepts(read_tail(audit_path), now - repeat_accept_s)
    for gate, subject, captured_at in accepts:
        policy.remember_accept(gate, subject, captured_at)
    if accepts:
        log.info("recalled %d accept(s) of the last %.0fs from %s", len(accepts), repeat_accept_s, audit_path)


def watched_keys(cfg: KioskConfig, transport: Transport, codec: Callable[[], TemplateCodec | None]) -> list[WatchedKey]:
    """The key files this process loaded at start: the template key's (unless it came from the environment)
    and, with CurveZMQ on, the server key pair's secret. `codec()`: the key the gallery is sealed under now."""
    keys = []
    template = key_source(cfg).path
    if template is not None and codec() is not None:
        keys.append(template_key(template, codec))
    public = transport.server_public_key()
    if public is not None:
        keys.append(curve_server_key(transport.server_key_file, public))
    return keys


def announce(cameras: int, gallery: GalleryQueries, view: GateFlights, engine_note: str, gates: set[str]) -> None:
    """The verifier is ready: its cameras, its gallery, each gate's flight."""
    matrix = view.full
    log.info(
        "verifier ready: %d camera(s), gallery %d subjects / %d templates, %s",
        cameras,
        len(matrix),
        matrix.template_count,
        engine_note,
    )
    if not len(matrix):
        log.warning(
            "gallery %s has no subject for this model: every passenger will be rejected until someone is enrolled",
            gallery.name,
        )
    log_gates(gates, None, view)


def log_stopping(cameras: Mapping[str, CameraState], bad_messages: int, metrics: VerifierMetrics) -> None:
    lat = metrics.recent_frame.quantiles()
    dec = metrics.recent_decision.quantiles()
    log.info(
        "verifier stopping: %d frames processed (%d stale dropped), %d bad messages; frame latency "
        "p50 %.0f ms p99 %.0f ms; decision latency p50 %.0f ms p99 %.0f ms over %d decisions",
        sum(c.processed for c in cameras.values()),
        sum(c.stale for c in cameras.values()),
        bad_messages,
        lat.get("p50", 0),
        lat.get("p99", 0),
        dec.get("p50", 0),
        dec.get("p99", 0),
        int(dec.get("n", 0)),
    )
