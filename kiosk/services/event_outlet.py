"""The gatekeeper's publisher port in the verifier: an audited decision goes out as an event, to the gates'
subscribers (the events socket), to the history a subscriber that missed it fetches, and as its face crop to
a console watching the gate. Each gate's events are numbered 1, 2, 3... within a boot, so a subscriber sees
a restart (the boot id) and any gap."""

from __future__ import annotations

import dataclasses
import logging
import time

import cv2

from kiosk.messaging.messages import Event
from kiosk.pipeline.core import Verdict
from kiosk.pipeline.policy import Decision
from kiosk.services.audit import RecentEvents
from kiosk.services.event_access import EventPublisher
from kiosk.services.metrics import VerifierMetrics
from kiosk.services.preview import PreviewPublisher

log = logging.getLogger("kiosk.services.verifier")  # the verifier's log lines, as they always were


class EventOutlet:
    """Numbers and sends the events of one verifier run (`boot_id`)."""

    def __init__(
        self,
        boot_id: str,
        events: EventPublisher,
        recent: RecentEvents,
        previews: PreviewPublisher,
        threshold: float,
    ) -> None:
        """`threshold`: the accept threshold each event states."""
        self.boot_id = boot_id
        self.events = events
        self.recent = recent
        self.previews = previews
        self.threshold = threshold
        self.event_seq: dict[str, int] = {}  # per gate: the last event's number

    def event(self, verdict: Verdict, d: Decision) -> Event:
        """The event a decision goes out as, with its gate's next sequence number."""
        cam = verdict.camera
        decided_at = time.time()
        return Event(
            boot_id=self.boot_id,
            event_seq=self.event_seq.get(cam.gate_id, 0) + 1,
            type=d.type,
            gate_id=cam.gate_id,
            camera_id=cam.camera_id,
            track_id=verdict.track_id,
            subject_id=d.subject_id,
            display_name=d.display_name,
            score=None if d.score is None else round(d.score, 4),
            threshold=self.threshold,
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
        self.event_seq[event.gate_id] = event.event_seq or 0
        self.recent.add(event)
        self.events.send_multipart([event.topic(), event.to_json()])
        if verdict.crop is not None and self.previews.wants_crops(event.gate_id):
            try:
                self.previews.send_crop(event.gate_id, dataclasses.asdict(event), verdict.crop)
            except (ValueError, cv2.error) as exc:
                log.warning("decision crop of %s not sent: %s", event.event_id, exc)


def observe_decision(metrics: VerifierMetrics, verdict: Verdict, event: Event, publish_ms: float) -> None:
    """A decision the gatekeeper let out (`publish_ms`: its way through), counted and logged."""
    metrics.observe_stage("publish", publish_ms)
    metrics.decisions.labels(gate=event.gate_id, type=event.type, reason=event.reason or "").inc()
    metrics.observe_decision(event.gate_id, event.latency_ms or 0.0)
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
