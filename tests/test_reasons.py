"""Reject reasons are defined once (kiosk.messaging.reasons) with whether an agent must see to them: the console,
the subscriber's log (kiosk.services.subscriber uses the same `is_alert_reason` as the console), the metrics and
the reference gate controller (a standalone script with its own copy) agree."""

from __future__ import annotations

import json

from kiosk.console.state import is_alert
from kiosk.messaging.reasons import ALERT_REASONS, Reason
from kiosk.services.metrics import OUTCOMES
from tests.test_gate_side import load_gate_controller

EXPECTED_ALERTS = {
    "presentation_attack",
    "wrong_flight",
    "already_boarded",
    "liveness_unverified",
    "gallery_unavailable",
    "store_unavailable",
    "audit_unavailable",
}


def test_a_reason_is_its_bare_string_everywhere_it_goes():
    reason = Reason.ALREADY_BOARDED
    percent = "%s" % reason  # noqa: UP031 - %-formatting is one of the ways tested
    assert reason == "already_boarded" and str(reason) == f"{reason}" == percent == "already_boarded"
    assert json.dumps({"reason": reason}) == '{"reason": "already_boarded"}'
    assert Reason("wrong_flight") is Reason.WRONG_FLIGHT and {"no_match": 1}[Reason.NO_MATCH] == 1


def test_the_alert_reasons_are_one_set_and_the_gate_controller_keeps_an_equal_copy():
    assert ALERT_REASONS == EXPECTED_ALERTS == {r.value for r in Reason if r.alert}
    assert set(load_gate_controller().ALERT_REASONS) == ALERT_REASONS


def test_the_console_and_the_gate_controller_alert_on_the_same_rejects():
    gc = load_gate_controller().GateController("A1")
    for reason in Reason:
        event = {"type": "reject", "gate_id": "A1", "reason": reason.value, "event_id": reason.value}
        assert is_alert(event) is reason.alert, reason
        gc.handle(event, 0.0)
        assert gc.log[-1]["action"] == ("alert" if reason.alert else "close"), reason
    assert not is_alert({"type": "reject", "reason": ["not", "a", "string"]})


def test_every_reason_has_a_decision_metric_from_the_start_in_the_order_it_always_had():
    assert OUTCOMES == (
        ("accept", ""),
        ("reject", "no_match"),
        ("reject", "claim_mismatch"),
        ("reject", "timeout"),
        ("reject", "not_enrolled"),
        ("reject", "gallery_unavailable"),
        ("reject", "store_unavailable"),
        ("reject", "stale_frame"),
        ("reject", "audit_unavailable"),
        ("reject", "already_boarded"),
        ("reject", "wrong_flight"),
        ("reject", "presentation_attack"),
        ("reject", "liveness_unverified"),
    )
