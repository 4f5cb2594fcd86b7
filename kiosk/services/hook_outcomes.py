"""What a hook's `deliver(event)` may raise besides a plain failure, and what the subscriber's `Hook` does then.

A plain exception is a failed delivery: counted, logged, and the event is done with (the saved position moves
past it). A hook that retries until the receiver acknowledges (MQTT) needs two more outcomes."""

from __future__ import annotations


class StaleEvent(Exception):
    """The accept grew older than `hooks.max_accept_age_s` while waiting to be delivered: it is given up,
    counted as stale like one found too old in the queue, and never delivered late."""


class DeliveryAborted(Exception):
    """The subscriber is stopping before the receiver acknowledged the event: it is not done with, so the saved
    position stays before it and the next start fetches it again (at least once)."""
