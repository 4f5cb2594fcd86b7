"""The verifier's history request parsing, without sockets: every malformed shape is a ValueError (an error
reply and a bad message), never another exception that would stop the loop."""

from __future__ import annotations

import json

import pytest

from kiosk.services.verifier_requests import MAX_CURSORS, parse_history


def _raw(request: object) -> bytes:
    return json.dumps(request).encode()


def test_a_history_request_gives_its_cursors_and_gate():
    cursors, gate = parse_history(
        _raw({"cmd": "events", "cursors": {"A1": ["boot", 3], "7": ["b", 0]}, "gate_id": "A1"})
    )
    assert cursors == {"A1": ("boot", 3), "7": ("b", 0)} and gate == "A1"
    assert parse_history(_raw({"cmd": "events", "cursors": {}})) == ({}, None)


@pytest.mark.parametrize(
    "request_",
    [
        ["events"],
        {"cmd": "status", "cursors": {}},
        {"cmd": "events"},
        {"cmd": "events", "cursors": [], "gate_id": None},
        {"cmd": "events", "cursors": {}, "gate_id": 7},
        {"cmd": "events", "cursors": {"A1": ["boot"]}},
        {"cmd": "events", "cursors": {"A1": [1, 2]}},
        {"cmd": "events", "cursors": {"A1": ["boot", True]}},
        {"cmd": "events", "cursors": {"A1": ["boot", 1.5]}},
        {"cmd": "events", "cursors": {str(i): ["b", i] for i in range(MAX_CURSORS + 1)}},
    ],
)
def test_a_malformed_history_request_is_a_value_error(request_):
    with pytest.raises(ValueError):
        parse_history(_raw(request_))


def test_bytes_that_are_not_json_are_a_value_error():
    with pytest.raises(ValueError):
        parse_history(b"\xff not json")
