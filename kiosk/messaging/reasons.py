"""Why a decision is a reject: the `reason` of a reject event, defined once, with whether an agent must see to it.

A `Reason` is a `str` (its value is what goes on the wire, into the audit log, the metrics' `reason` label and
the boarding report), so `json.dumps`, `==` with a plain string, `str()` and f-strings all give the bare value.

Which reasons alert an agent (`Reason.alert`, `ALERT_REASONS`): the rejects after which the passenger cannot
get through by presenting again, so a person must act.
- Passenger-side: `presentation_attack` (a photo or screen held up), `wrong_flight` (at the wrong gate),
  `already_boarded` (a second boarding), `liveness_unverified` (the liveness evidence stayed doubtful: an agent
  checks the passenger by hand, as at every e-gate; DESIGN "Presentation attacks").
- System-side: `gallery_unavailable`, `store_unavailable`, `audit_unavailable` (the verifier fails closed:
  every passenger of that gate is refused until an operator restores the gallery, the store or the audit log).
This is the console's set, which was the widest of the three that existed; the subscriber's log and the
reference gate controller (scripts/gate_controller.py, which keeps a copy as it must run without this package)
only flagged the first three, and now flag the same seven as the console.
Not alerts: `no_match`, `claim_mismatch`, `timeout` (the passenger may try again or go to the desk),
`not_enrolled` (removed or expired: the desk), `stale_frame` (withheld for the system's own lag; the
passenger's next presentation is decided afresh).
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """A reject's reason. Members compare, hash, print and serialise as their value."""

    alert: bool

    def __new__(cls, value: str, alert: bool = False) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.alert = alert
        return member

    # str's own, not Enum's: "no_match", never "Reason.NO_MATCH" (metrics labels, log lines, f-strings)
    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)

    # In the order of the decision metrics' outcomes (kiosk.services.metrics.OUTCOMES).
    NO_MATCH = "no_match"
    CLAIM_MISMATCH = "claim_mismatch"
    TIMEOUT = "timeout"
    NOT_ENROLLED = "not_enrolled"
    GALLERY_UNAVAILABLE = "gallery_unavailable", True
    STORE_UNAVAILABLE = "store_unavailable", True
    STALE_FRAME = "stale_frame"
    AUDIT_UNAVAILABLE = "audit_unavailable", True
    ALREADY_BOARDED = "already_boarded", True
    WRONG_FLIGHT = "wrong_flight", True
    PRESENTATION_ATTACK = "presentation_attack", True
    LIVENESS_UNVERIFIED = "liveness_unverified", True


# Rejects that withhold an accept for the system's own state (not the passenger's): the repeat-accept memory
# forgets the accept, so the passenger's next presentation is decided afresh.
WITHHELD = frozenset({Reason.STALE_FRAME, Reason.GALLERY_UNAVAILABLE, Reason.STORE_UNAVAILABLE})

# The reasons an agent must see to (see the module docstring).
ALERT_REASONS = frozenset(r.value for r in Reason if r.alert)


def is_alert_reason(reason: object) -> bool:
    """Does a reject with this reason (a string off the wire, or None) need an agent?"""
    return isinstance(reason, str) and reason in ALERT_REASONS
