"""`kiosk status` for a person: the verifier's status reply as a few readable lines.

`kiosk status --json` prints the reply itself, for tools.
"""

from __future__ import annotations

from kiosk.messaging.status import (
    CallerSummary,
    ClockSkewStatus,
    GalleryStatus,
    GateScope,
    Quantiles,
    StatusReply,
    VerifierStatus,
)

REFUSED_WHY = {
    "sender": "from a key that is not the camera's",
    "seq": "with seq out of range",
    "future": "captured in the future",
    "past": "captured too long ago",
    "not_finite": "with a time that is not a number",
}
CONTROL_REFUSED_WHY = {
    "claim_scope": "claim(s) for a gate the key does not serve",
    "revoked": "from a key no longer allow-listed",
}


def _ms(q: Quantiles | None) -> str:
    if q is None:
        return "n/a"
    return f"p50 {q.p50:.0f} ms, p99 {q.p99:.0f} ms"


def _gates(scope: GateScope) -> str:
    return "every gate" if scope == "*" else ", ".join(scope) if scope else "no gate"


def _bounds(skew: ClockSkewStatus | None) -> str:
    return f"tolerance {skew.tolerance_s} s ahead, {skew.max_past_s} s behind" if skew else ""


def format_status(reply: StatusReply) -> str:
    """Overall state first (what an operator looks for), then one line per camera, then the figures."""
    s = reply.status
    lines = [
        _head_line(s),
        *_camera_lines(s),
        *_gate_lines(s),
        *_gallery_lines(s.gallery),
        *_traffic_lines(s),
        *_skew_lines(s.clock_skew),
        *(f"  key file: {problem}" for problem in (s.key_files.problems if s.key_files else {}).values()),
        _claims_line(s),
        *_caller_lines(reply.caller),
        *_closing_lines(s),
    ]
    return "\n".join(lines)


def _head_line(s: VerifierStatus) -> str:
    """The one line an operator reads first: ok or not, and which cameras are down."""
    down = s.cameras_down
    head = "OK" if s.status == "ok" else s.status.upper()
    if down:
        head += f": {len(down)} of {len(s.cameras)} camera(s) down ({', '.join(down)})"
    return f"verifier {head}  (pid {s.pid}, providers {', '.join(s.providers)})"


def _camera_lines(s: VerifierStatus) -> list[str]:
    """One line per camera (its last error under it), so a dead or starved camera stands out."""
    lines = []
    for cam_id, c in sorted(s.cameras.items()):
        age = c.last_frame_age_s
        seen = f"last frame {age:.1f} s ago" if age is not None else "no frame yet"
        line = (
            f"  camera {cam_id} (gate {c.gate_id}): {c.state.upper():<5} "
            f"{seen}; {c.processed} frames processed, {c.dropped} stale dropped, "
            f"{c.tracks} track(s)"
        )
        if c.last_error:
            line += f"\n      {c.last_error}"
        lines.append(line)
    return lines


def _gate_lines(s: VerifierStatus) -> list[str]:
    """Per gate, the flight it boards, or why it decides nothing (boarding.require_flight)."""
    return [
        f"  gate {gate}: "
        + (
            f"boarding flight {info.flight_id}"
            if info.flight_id
            else "not boarding" + ("" if info.processing else " (processes nobody: boarding.require_flight)")
        )
        for gate, info in sorted(s.gates.items())
    ]


def _gallery_lines(g: GalleryStatus | None) -> list[str]:
    """The gallery's size and revision, and the templates left out because they do not open."""
    lines = [
        f"  gallery: {g.subjects if g else 0} subject(s), {g.templates if g else 0} template(s), "
        f"revision {g.revision if g else None}"
    ]
    if g is not None and g.unreadable_templates:
        lines.append(
            f"  gallery: {g.unreadable_templates} template(s) do not open with the template key and "
            f"are left out (tampered or damaged rows; re-enroll or remove): "
            f"{', '.join(g.unreadable_subjects or ())}"
        )
    return lines


def _traffic_lines(s: VerifierStatus) -> list[str]:
    """How fast frames go through, how late, and how many were refused before decoding."""
    lines = [
        f"  throughput: {s.fps:.1f} frames/s, queue {s.queue_depth}, {s.bad_messages} bad message(s) dropped",
        f"  latency: capture to processed {_ms(s.frame_latency_ms)}; capture to decision {_ms(s.decision_latency_ms)}",
    ]
    if any(s.frames_refused.values()):
        lines.append(
            "  refused before decoding: "
            + ", ".join(f"{n} {REFUSED_WHY.get(reason, reason)}" for reason, n in s.frames_refused.items() if n)
        )
    return lines


def _skew_lines(skew: ClockSkewStatus | None) -> list[str]:
    """Each camera whose capture clock is off, with what to check: its frames are refused until it is fixed."""
    lines = []
    for cam_id, sc in sorted(skew.cameras.items()) if skew else ():
        far = f"{sc.offset_s:.3g} s ahead of" if sc.offset_s > 0 else f"{-sc.offset_s:.3g} s behind"
        lines.append(
            f"  clock skew: camera {cam_id}'s capture clock is {far} this host's for {sc.for_s} s "
            f"({_bounds(skew)}): its frames are refused; check NTP on its capture host"
        )
    return lines


def _claims_line(s: VerifierStatus) -> str:
    """Who is claimed at which gate; a subject the asking key may not see is said to be hidden, not absent."""
    if not s.claims:
        return "  claims: none"
    return "  claims: " + ", ".join(
        f"gate {g} -> {sid if sid is not None else '(subject hidden from this key)'}"
        for g, sid in sorted(s.claims.items())
    )


def _caller_lines(caller: CallerSummary | None) -> list[str]:
    """What the asking key may do, so an operator knows why claims or ids are hidden (older verifiers: nothing)."""
    if caller is None:
        return []
    return [
        f"  this key: {caller.role}: may claim {_gates(caller.claims)}; sees passenger "
        f"ids of {_gates(caller.passenger_ids)}"
    ]


def _closing_lines(s: VerifierStatus) -> list[str]:
    """Refused control requests and the last error: the leads to follow when something is wrong."""
    lines = []
    if any(s.control_refused.values()):
        lines.append(
            "  control requests refused: "
            + ", ".join(
                f"{n} {CONTROL_REFUSED_WHY.get(reason, reason)}" for reason, n in s.control_refused.items() if n
            )
        )
    if s.last_error:
        lines.append(f"  last error: {s.last_error}")
    return lines
