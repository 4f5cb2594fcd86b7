"""The verifier's status (`kiosk status`, the control socket's `status`) and the heartbeat cut from it.

Read from the running verifier on its main loop, as the typed values of kiosk.messaging.status, whose
`to_json()` is the wire's and the tools' format (see DESIGN.md's heartbeat and status)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING

from kiosk.messaging.channels import GATE_HEALTH, REFUSALS, VERIFIER_HEALTH
from kiosk.messaging.messages import encode_json
from kiosk.messaging.status import (
    AuditStatus,
    BoardingStoreStatus,
    CameraStatus,
    ClockSkewStatus,
    GalleryStatus,
    GateStatus,
    KeyFilesStatus,
    PreviewStatus,
    Quantiles,
    VerifierStatus,
    heartbeat_parts,
    own,
)
from kiosk.services.metrics import LatencyWindow

if TYPE_CHECKING:
    from kiosk.services.verifier import Verifier


class HeartbeatClock:
    """When the next heartbeat is due: every `interval_s`, or at once after `soon()` (a changed status)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = 0.0

    def soon(self) -> None:
        self._last = 0.0

    def due(self, force: bool = False) -> bool:
        """True (and counted as sent) when a heartbeat should go now."""
        mono = time.monotonic()
        if not force and mono - self._last < self.interval_s:
            return False
        self._last = mono
        return True


def verifier_status(v: Verifier) -> VerifierStatus:
    now = time.time()
    states = {c.camera_id: c.state(now) for c in v.cameras.values()}
    down = sorted(cid for cid, (state, _) in states.items() if state == "down")
    return VerifierStatus(
        component="verifier",
        status="degraded" if down or _degraded(v) else "ok",
        cameras_down=tuple(down),
        pid=os.getpid(),
        providers=tuple(v.engine.providers),
        fps=round(v.core.fps(now), 2),
        drops=sum(c.stale for c in v.cameras.values()),
        queue_depth=sum(len(c.pending) for c in v.cameras.values()),
        bad_messages=v.bad,
        last_error=v.core.last_error or v.gate.last_error or v.health.latest(),
        frames_refused={reason: sum(c[reason] for c in v.refusals.counts.values()) for reason in REFUSALS},
        control_refused=dict(v.access.counts),
        events_refused=dict(v.events.counts),
        clock_skew=own(ClockSkewStatus.read, v.refusals.status(time.monotonic()), "clock_skew"),
        key_files=own(KeyFilesStatus.read, v.key_files.status(), "key_files"),
        audit=AuditStatus(
            ok=not v.audit.error, error=v.audit.error, failures=v.audit.failures, pending=v.audit.pending
        ),
        boarding_store=BoardingStoreStatus(ok=not v.gate.record_failing, decisions_waiting=len(v.gate.unrecorded)),
        frame_latency_ms=_quantiles(v.metrics.recent_frame),
        stages_ms={stage: _quantiles(window) for stage, window in v.metrics.recent_stage.items()},
        frames_processed=sum(c.processed for c in v.cameras.values()),
        faces_detected=v.core.faces_total,
        first_captured_at=v.core.first_captured_at,
        last_done_at=v.core.last_done_at,
        decision_latency_ms=_quantiles(v.metrics.recent_decision),
        deciding_frame_latency_ms=_quantiles(v.metrics.recent_deciding),
        gallery=gallery_status(v),
        cameras=_cameras(v, now, states),
        claims={g: c.subject_id for g, c in v.core.policy.claims.items()},
        previews=own(PreviewStatus.read, v.previews.status(), "previews"),
        gates={
            g: GateStatus(flight_id=v.core.flights.flight_of(g), processing=not v.core.flights.idle(g))
            for g in sorted(v.gates)
        },
    )


def _quantiles(window: LatencyWindow) -> Quantiles | None:
    """A latency window's p50, p99 and count (None: no sample yet)."""
    return own(Quantiles.read, window.quantiles(), "latency")


def _degraded(v: Verifier) -> bool:
    """Something other than a camera down that makes the verifier `degraded`."""
    return bool(
        v.audit.error
        or v.keeper.stale_reason()
        or v.gate.record_failing
        or v.matrix.unreadable
        or v.refusals.skewed
        or v.key_files.problems
    )


def _cameras(v: Verifier, now: float, states: dict[str, tuple[str, str]]) -> dict[str, CameraStatus]:
    return {
        c.camera_id: CameraStatus(
            gate_id=c.gate_id,
            state=states[c.camera_id][0],
            last_error=states[c.camera_id][1],
            frames_in=c.frames_in,
            processed=c.processed,
            idle_skipped=c.idle_skipped,
            dropped=c.stale,
            too_old=c.too_old,
            refused=dict(v.refusals.counts[c.camera_id]),
            eof=c.eof,
            not_boarding=c.not_boarding,
            tracks=len(c.tracker.tracks),
            wakes=tuple((seq, ms) for seq, ms in c.wakes),
            last_frame_age_s=round(now - c.last_frame_at, 1) if c.last_frame_at else None,
        )
        for c in v.cameras.values()
    }


def gallery_status(v: Verifier) -> GalleryStatus:
    reason = v.keeper.stale_reason()
    matrix = v.matrix
    unreadable = matrix.unreadable  # sealed templates that do not open: tampering or damage, left out
    gallery = GalleryStatus(
        subjects=len(matrix),
        templates=matrix.template_count,
        stale=bool(reason),
        error=reason,
        revision=matrix.revision,
        unreadable_templates=sum(unreadable.values()) if unreadable else None,
        unreadable_subjects=tuple(sorted(unreadable)[:20]) if unreadable else None,
    )
    stale_for = v.gate.stale_for()
    if reason and stale_for is not None:
        boarding = any(v.core.flights.flight_of(g) for g in v.gates)
        gallery = dataclasses.replace(
            gallery,
            stale_for_s=round(stale_for, 1),
            accepts_from_memory_s=round(max(0.0, v.cfg.gallery.stale_grace_s - stale_for), 1),
            refusing=v.gate.refusing(boarding) or "nothing yet",
            action=v.keeper.restore_hint(),
        )
    return gallery


def heartbeat_messages(v: Verifier, status: str | None = None) -> list[list[bytes]]:
    """The heartbeat: the verifier's health to every allow-listed key, each gate's part (its event count,
    cameras: whether someone is there now; its flight) on its own topic, to the keys that hear that gate
    (kiosk.services.event_access). Passenger ids go on neither: no claims, and the subjects whose templates
    do not open only as a count (their ids are in `status`, for the tools key)."""
    body = verifier_status(v)
    if status is not None:
        body = dataclasses.replace(body, status=status)
    parts = heartbeat_parts(
        body,
        boot_id=v.boot_id,
        booted_at=v.booted_at,
        sent_at=time.time(),
        event_seq=v.outlet.event_seq,
        unreadable_subjects=len(v.matrix.unreadable),
    )
    messages = [encode_json(VERIFIER_HEALTH, parts.verifier.to_json())]
    messages += [encode_json(GATE_HEALTH + gate, part.to_json()) for gate, part in parts.gates.items()]
    return messages
