"""`kiosk status` for a person: the verifier's status reply as a few readable lines.

`kiosk status --json` prints the reply itself, for tools.
"""

from __future__ import annotations

from typing import Any

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


def _ms(q: Any) -> str:
    if not isinstance(q, dict) or "p50" not in q:
        return "n/a"
    return f"p50 {q['p50']:.0f} ms, p99 {q['p99']:.0f} ms"


def _gates(value: Any) -> str:
    return (
        "every gate" if value == "*" else ", ".join(map(str, value)) if isinstance(value, list) and value else "no gate"
    )


def format_status(s: dict[str, Any]) -> str:
    """Overall state first (what an operator looks for), then one line per camera, then the figures."""
    down = s.get("cameras_down") or []
    head = "OK" if s.get("status") == "ok" else str(s.get("status", "?")).upper()
    if down:
        head += f": {len(down)} of {len(s.get('cameras', {}))} camera(s) down ({', '.join(down)})"
    lines = [f"verifier {head}  (pid {s.get('pid')}, providers {', '.join(s.get('providers', []))})"]
    for cam_id, c in sorted(s.get("cameras", {}).items()):
        age = c.get("last_frame_age_s")
        seen = f"last frame {age:.1f} s ago" if isinstance(age, (int, float)) else "no frame yet"
        line = (
            f"  camera {cam_id} (gate {c.get('gate_id')}): {str(c.get('state', '?')).upper():<5} "
            f"{seen}; {c.get('processed', 0)} frames processed, {c.get('dropped', 0)} stale dropped, "
            f"{c.get('tracks', 0)} track(s)"
        )
        if c.get("last_error"):
            line += f"\n      {c['last_error']}"
        lines.append(line)
    for gate, info in sorted((s.get("gates") or {}).items()):
        flight = info.get("flight_id") if isinstance(info, dict) else None
        lines.append(
            f"  gate {gate}: "
            + (
                f"boarding flight {flight}"
                if flight
                else "not boarding" + ("" if info.get("processing") else " (processes nobody: boarding.require_flight)")
            )
        )
    g = s.get("gallery", {})
    lines.append(
        f"  gallery: {g.get('subjects', 0)} subject(s), {g.get('templates', 0)} template(s), "
        f"revision {g.get('revision')}"
    )
    if g.get("unreadable_templates"):
        lines.append(
            f"  gallery: {g['unreadable_templates']} template(s) do not open with the template key and "
            f"are left out (tampered or damaged rows; re-enroll or remove): "
            f"{', '.join(g.get('unreadable_subjects', []))}"
        )
    lines.append(
        f"  throughput: {s.get('fps', 0):.1f} frames/s, queue {s.get('queue_depth', 0)}, "
        f"{s.get('bad_messages', 0)} bad message(s) dropped"
    )
    lines.append(
        f"  latency: capture to processed {_ms(s.get('frame_latency_ms'))}; "
        f"capture to decision {_ms(s.get('decision_latency_ms'))}"
    )
    refused = s.get("frames_refused") or {}
    if any(refused.values()):
        lines.append(
            "  refused before decoding: "
            + ", ".join(f"{n} {REFUSED_WHY.get(reason, reason)}" for reason, n in refused.items() if n)
        )
    skew = s.get("clock_skew") or {}
    for cam_id, c in sorted((skew.get("cameras") or {}).items()):
        offset = c.get("offset_s", 0.0)
        far = f"{offset:.3g} s ahead of" if offset > 0 else f"{-offset:.3g} s behind"
        lines.append(
            f"  clock skew: camera {cam_id}'s capture clock is {far} this host's for {c.get('for_s')} s "
            f"(tolerance {skew.get('tolerance_s')} s ahead, {skew.get('max_past_s')} s behind): its "
            f"frames are refused; check NTP on its capture host"
        )
    for problem in (s.get("key_files") or {}).get("problems", {}).values():
        lines.append(f"  key file: {problem}")
    claims = s.get("claims") or {}
    lines.append(
        "  claims: "
        + (
            ", ".join(
                f"gate {g} -> {sid if sid is not None else '(subject hidden from this key)'}"
                for g, sid in sorted(claims.items())
            )
            if claims
            else "none"
        )
    )
    caller = s.get("caller")
    if isinstance(caller, dict):
        lines.append(
            f"  this key: {caller.get('role')}: may claim {_gates(caller.get('claims'))}; sees passenger "
            f"ids of {_gates(caller.get('passenger_ids'))}"
        )
    refused = s.get("control_refused") or {}
    if any(refused.values()):
        lines.append(
            "  control requests refused: "
            + ", ".join(f"{n} {CONTROL_REFUSED_WHY.get(reason, reason)}" for reason, n in refused.items() if n)
        )
    if s.get("last_error"):
        lines.append(f"  last error: {s['last_error']}")
    return "\n".join(lines)
