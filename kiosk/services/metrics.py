"""Prometheus metrics of the verifier and the subscribers, with `prometheus_client`, by the book.

Counters are cumulative and end in `_total`; latencies are histograms in
seconds (`_seconds`), so `rate()` and `histogram_quantile()` work; every
labelled series a dashboard expects (each camera, each stage, each
decision outcome) exists from zero at start. Capture processes report
their counts in their health messages; the verifier exports them as
counters of the camera (`kiosk_capture_*`), so one scrape of the verifier
covers its cameras, wherever they run. `kiosk status` needs recent p50/p99
figures, which histograms cannot give exactly: `LatencyWindow` keeps the
last samples for that.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiosk.messaging.channels import REFUSALS
from kiosk.messaging.reasons import Reason

log = logging.getLogger(__name__)

# From half a millisecond (a search) to ten seconds (a decision held by a stall).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
STAGES = ("transport", "detect", "track", "align", "quality", "select", "embed", "match", "pad", "decide", "publish")
# Decision outcomes that exist from the start (type, reason): an accept and every reject reason.
OUTCOMES = (("accept", ""),) + tuple(("reject", reason.value) for reason in Reason)


class LatencyWindow:
    """The last `size` samples of one latency, for `kiosk status` and bench (p50/p99 in ms)."""

    def __init__(self, size: int = 20000) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._samples.append(ms)

    def quantiles(self) -> dict[str, float]:
        with self._lock:
            data = list(self._samples)
        if not data:
            return {}
        p50, p99 = np.percentile(data, [50, 99])
        return {"p50": float(p50), "p99": float(p99), "n": float(len(data))}


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> WSGIServer | None:
    """Serve /metrics of `registry` on host:port in a daemon thread; None (and a warning) if the port is taken.
    The returned server has `shutdown()`."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("metrics: cannot listen on %s:%d (%s); metrics are off", host, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server


class _CaptureCounts(Collector):
    """The counts each capture process reports in its health messages, exported as the camera's counters.
    A restarted capture counts from zero again; a report lower than the last one starts a new run, whose
    counts add to the earlier runs', so the exported counters never go down."""

    COUNTS = ("sent", "drops", "held", "faults")  # cumulative in a capture's health message; "fps" is a gauge

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_camera: dict[str, dict[str, float]] = {}  # exported values, and "fps"
        self._last: dict[str, dict[str, Any]] = {}  # the capture's own last report, and its run

    def set_cameras(self, cameras: Iterable[str]) -> None:
        for cam in cameras:
            self.update(cam, {})

    def update(self, camera: str, body: dict[str, Any]) -> None:
        values = {
            k: float(body[k])
            for k in (*self.COUNTS, "fps")
            if isinstance(body.get(k), (int, float)) and not isinstance(body.get(k), bool) and 0 <= body[k] < 1e15
        }
        with self._lock:
            row = self._by_camera.setdefault(camera, dict.fromkeys((*self.COUNTS, "fps"), 0.0))
            last = self._last.setdefault(camera, {**dict.fromkeys(self.COUNTS, 0.0), "run": None})
            run = body.get("started_at")
            # A new capture run (restarted process: another start time, or any count lower than before)
            # counts from zero again.
            if (run is not None and last["run"] is not None and run != last["run"]) or any(
                values.get(k, last[k]) < last[k] for k in self.COUNTS
            ):
                for key in self.COUNTS:
                    last[key] = 0.0
            if run is not None:
                last["run"] = run
            for key in self.COUNTS:
                if key in values:
                    row[key] += values[key] - last[key]
                    last[key] = values[key]
            if "fps" in values:
                row["fps"] = values["fps"]

    def collect(self) -> Iterable[Metric]:
        sent = CounterMetricFamily(
            "kiosk_capture_frames_sent", "frames the capture sent to the verifier", labels=["camera"]
        )
        drops = CounterMetricFamily(
            "kiosk_capture_frames_dropped",
            "frames the capture dropped because the verifier's queue was full",
            labels=["camera"],
        )
        held = CounterMetricFamily(
            "kiosk_capture_frames_held",
            "frames the capture held back: the verifier said the scene was empty and they had not changed",
            labels=["camera"],
        )
        faults = CounterMetricFamily(
            "kiosk_capture_faults", "camera faults (cannot open, no frames)", labels=["camera"]
        )
        fps = GaugeMetricFamily(
            "kiosk_capture_fps", "frames per second the camera delivers to the capture (last 5 s)", labels=["camera"]
        )
        with self._lock:
            for cam, v in sorted(self._by_camera.items()):
                sent.add_metric([cam], v["sent"])
                drops.add_metric([cam], v["drops"])
                held.add_metric([cam], v["held"])
                faults.add_metric([cam], v["faults"])
                fps.add_metric([cam], v["fps"])
        return [sent, drops, held, faults, fps]


class VerifierMetrics:
    """Everything the verifier exports, in its own registry (no process-global state)."""

    def __init__(self, cameras: dict[str, str], stages: Iterable[str] = STAGES) -> None:
        r = self.registry = CollectorRegistry()
        cams = sorted(cameras)
        self.frames_in = Counter("kiosk_frames_in", "frames received from the captures", ["camera"], registry=r)
        self.frames_processed = Counter(
            "kiosk_frames_processed", "frames run through the pipeline", ["camera"], registry=r
        )
        self.frames_stale = Counter(
            "kiosk_frames_dropped",
            "stale frames dropped (a newer frame of the camera arrived first)",
            ["camera"],
            registry=r,
        )
        self.frames_too_old = Counter(
            "kiosk_frames_too_old",
            "live frames dropped because they were older than policy.max_frame_age_ms when their turn came (a stall)",
            ["camera"],
            registry=r,
        )
        self.faces = Counter("kiosk_faces_detected", "faces detected", ["camera"], registry=r)
        self.frames_idle = Counter(
            "kiosk_frames_idle_skipped",
            "frames not run through the detector: no open "
            "track and the scene unchanged since the last detection (policy.idle_change)",
            ["camera"],
            registry=r,
        )
        self.frames_not_boarding = Counter(
            "kiosk_frames_not_boarding",
            "frames dropped unprocessed because the camera's gate boards no flight (boarding.require_flight)",
            ["camera"],
            registry=r,
        )
        self.gate_boarding = Gauge("kiosk_gate_boarding", "1 while a flight is open on the gate", ["gate"], registry=r)
        self.store_failures = Counter(
            "kiosk_boarding_store_failures",
            "boarding marks or decision records the store could not take (an accept among them was rejected)",
            registry=r,
        )
        self.purges = Counter(
            "kiosk_flights_purged", "flights whose passengers' templates were purged after departure", registry=r
        )
        self.bad_messages = Counter("kiosk_bad_messages", "malformed messages dropped", registry=r)
        self.frames_refused = Counter(
            "kiosk_frames_refused",
            "messages for a camera refused before any decode: "
            "from a key that is not its capture's (reason sender), or a frame whose seq "
            "or captured_at is out of bounds (seq, future, past, not_finite)",
            ["camera", "reason"],
            registry=r,
        )
        self.clock_skew = Gauge(
            "kiosk_clock_skew_exceeded",
            "1 while the camera's capture clock is out of the clock-skew tolerance (its frames are refused)",
            ["camera"],
            registry=r,
        )
        self.key_file_ok = Gauge(
            "kiosk_key_file_ok",
            "1 while the key file the verifier loaded is still there, "
            "private (no group/other access) and holds the key in use; 0: a restart would "
            "fail or serve another identity",
            ["key"],
            registry=r,
        )
        self.control_refused = Counter(
            "kiosk_control_refused",
            "control requests refused for the sender's key: "
            "a claim for a gate it does not serve (claim_scope), any request from a key "
            "no longer in authorized_clients/ (revoked)",
            ["reason"],
            registry=r,
        )
        self.events_refused = Counter(
            "kiosk_event_subscriptions_refused",
            "subscriptions on the events socket not "
            "applied for the sender's key: a topic reaching gates or idle hints it may "
            "not hear (scope), a key no longer allow-listed (revoked), a topic nothing "
            "is published on (unknown_topic), one read after a non-subscription message "
            "(unpaired)",
            ["reason"],
            registry=r,
        )
        self.previews = Counter(
            "kiosk_preview_frames", "preview frames sent to a watching console", ["gate"], registry=r
        )
        self.decisions = Counter("kiosk_decisions", "decisions published", ["gate", "type", "reason"], registry=r)
        self.embeddings_deferred = Counter(
            "kiosk_embeddings_deferred",
            "faces whose embedding waited for a later frame (policy.max_embeddings_per_frame)",
            registry=r,
        )
        self.stage_seconds = Histogram(
            "kiosk_stage_seconds", "time per pipeline stage per step", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.frame_latency = Histogram(
            "kiosk_frame_latency_seconds",
            "capture to end of processing, per frame",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decision_latency = Histogram(
            "kiosk_decision_latency_seconds",
            "capture of the deciding frame to the decision's publication",
            ["gate"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.wake_latency = Histogram(
            "kiosk_wake_latency_seconds",
            "capture of the frame a face was first found "
            "in at an empty gate to the end of its detection (policy.idle_change)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gallery_subjects = Gauge("kiosk_gallery_subjects", "enrolled subjects in the search matrix", registry=r)
        self.gallery_templates = Gauge("kiosk_gallery_templates", "templates in the search matrix", registry=r)
        self.gallery_unreadable = Gauge(
            "kiosk_gallery_unreadable_templates",
            "templates of the gallery that do not "
            "open with the template key (another row's blob, another key, damage): "
            "left out of every search",
            registry=r,
        )
        self.audit_failures = Counter(
            "kiosk_audit_failures",
            "decisions the audit log could not hold (an accept among them was published as reject audit_unavailable)",
            registry=r,
        )
        self.audit_ok = Gauge("kiosk_audit_ok", "1 while the audit log is writable", registry=r)
        self.gallery_stale = Gauge(
            "kiosk_gallery_stale",
            "1 while the last gallery reload failed (the search "
            "matrix may be behind; accepts are still confirmed against the gallery)",
            registry=r,
        )
        self.provider_info = Gauge("kiosk_provider_info", "ONNX Runtime providers in use (1)", ["provider"], registry=r)
        self.camera_up = Gauge(
            "kiosk_camera_up", "1 while the camera delivers frames (or its file has ended)", ["camera"], registry=r
        )
        self.captures = _CaptureCounts()
        r.register(self.captures)
        self.captures.set_cameras(cams)
        for cam in cams:
            for counter in (
                self.frames_in,
                self.frames_processed,
                self.frames_stale,
                self.frames_too_old,
                self.faces,
                self.frames_not_boarding,
                self.frames_idle,
            ):
                counter.labels(camera=cam)
            for reason in REFUSALS:
                self.frames_refused.labels(camera=cam, reason=reason)
            self.clock_skew.labels(camera=cam).set(0)
        for stage in stages:
            self.stage_seconds.labels(stage=stage)
        for gate in sorted(set(cameras.values())):
            self.gate_boarding.labels(gate=gate)
            self.decision_latency.labels(gate=gate)
            for etype, reason in OUTCOMES:
                self.decisions.labels(gate=gate, type=etype, reason=reason)
        # Recent figures for `kiosk status` and bench.
        self.recent_stage = {stage: LatencyWindow() for stage in stages}
        self.recent_frame = LatencyWindow()
        self.recent_decision = LatencyWindow()
        self.recent_deciding = LatencyWindow()  # frames with a face being decided: any could have been deciding

    def watch_cameras(self, up: Callable[[str], bool], cameras: Iterable[str]) -> None:
        """`kiosk_camera_up` is read from `up(camera)` at each scrape."""
        for cam in cameras:

            def reading(cam: str = cam) -> float:
                return 1.0 if up(cam) else 0.0

            self.camera_up.labels(camera=cam).set_function(reading)

    # the gatekeeper's failure counters (kiosk.pipeline.gatekeeper.FailureCounters)
    def store_failed(self) -> None:
        self.store_failures.inc()

    def audit_failed(self) -> None:
        self.audit_failures.inc()

    def observe_stage(self, stage: str, ms: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(ms / 1000.0)
        window = self.recent_stage.get(stage)
        if window is not None:
            window.add(ms)

    def observe_frame(self, ms: float) -> None:
        self.frame_latency.observe(max(0.0, ms) / 1000.0)
        self.recent_frame.add(ms)

    def observe_deciding_frame(self, ms: float) -> None:
        self.recent_deciding.add(ms)

    def observe_decision(self, gate: str, ms: float) -> None:
        self.decision_latency.labels(gate=gate).observe(max(0.0, ms) / 1000.0)
        self.recent_decision.add(ms)


class SubscriberMetrics:
    """What a `kiosk subscribe` process exports: events in, deliveries per hook, the verifier's liveness."""

    def __init__(self, hooks: Iterable[str]) -> None:
        r = self.registry = CollectorRegistry()
        self.events = Counter(
            "kiosk_subscriber_events",
            "events received from the verifier (and made here: verifier_down/up)",
            ["type"],
            registry=r,
        )
        self.bad_messages = Counter("kiosk_subscriber_bad_messages", "malformed messages dropped", registry=r)
        self.deliveries = Counter(
            "kiosk_hook_deliveries", "events handed to a hook, by outcome", ["hook", "outcome"], registry=r
        )
        self.delivery_seconds = Histogram(
            "kiosk_hook_delivery_seconds", "time a hook took per event", ["hook"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("kiosk_hook_queue_depth", "events waiting for a hook", ["hook"], registry=r)
        self.fetched = Counter(
            "kiosk_subscriber_fetched_events",
            "events fetched from the verifier's history after a gap, a restart or a start",
            registry=r,
        )
        self.verifier_up = Gauge(
            "kiosk_subscriber_verifier_up", "1 while the verifier's heartbeat is heard", registry=r
        )
        self.mqtt_certificate_expiry = Gauge(
            "kiosk_mqtt_client_certificate_expiry_timestamp_seconds",
            "when the client certificate an MQTT hook shows its broker expires (Unix time; renewed on disk counts)",
            ["hook"],
            registry=r,
        )
        for etype in ("accept", "reject", "verifier_down", "verifier_up", "events_missed"):
            self.events.labels(type=etype)
        for hook in hooks:
            for outcome in ("delivered", "failed", "dropped", "stale"):
                self.deliveries.labels(hook=hook, outcome=outcome)
            self.delivery_seconds.labels(hook=hook)
