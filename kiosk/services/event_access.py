"""Who may hear what on the verifier's events socket: gates' decisions, heartbeat, capture health, idle hints.

Being allow-listed on the events socket (`authorized_subscribers/`,
`authorized_clients/`) only lets a key connect. What it hears follows from
what it serves, by its key names, as on the control socket
(kiosk.services.control_access, whose `KeyScopes` this reuses):

- the tools key (`security.client_key`) and the console's key
  (`console.key`, from `authorized_consoles/`) hear every gate;
- an operator key (`security.operators`) hears the gates it serves;
- a listening key (`security.listeners`: a gate controller, a dashboard)
  hears the gates it is given, and can claim nothing;
- a capture key (`cameras[].key`) hears no decision: only the idle hints of
  its own cameras (topic `idle.<camera>`: "this gate is empty now" is for the
  capture that holds frames back, nobody else);
- every allow-listed key hears the verifier's own heartbeat
  (`health.verifier`: its health, no passenger id, nothing per gate); each
  gate's part of it (`health.gate.<gate>`: that gate's event count, its
  cameras' state and tracks, which say whether someone is there now, and its
  flight) and a camera's relayed health (`health.capture.<camera>`) go to the
  keys that hear that gate.

How: the events socket is an XPUB in manual mode (`zmq.XPUB_MANUAL`), still
what any plain SUB connects to. A peer's subscription reaches the verifier as
a message carrying the peer's key (ZAP's User-Id), and takes effect only when
the verifier applies it to that peer's connection (`setsockopt(SUBSCRIBE)`
right after reading it). A subscription is a topic prefix, so it is applied
only when every topic the verifier can publish that starts with it (each
configured gate's, camera's and the heartbeat's) may go to that key: `event.`
from a key for gate A1 is refused (it also matches B1), and so is `event.A1`
when a gate A10 exists that the key may not hear (name gates so that none is
a prefix of another, or give the key both; config validation says so for
`security.listeners`). A refused subscription is simply not applied: the
peer hears nothing of it, the refusal is counted
(`kiosk_event_subscriptions_refused_total{reason}`, `events_refused` in the
status) and logged once per key, reason and topic, then at most every
`LOG_EVERY_S`.

Revocation: the key's names are read from the allow-list folders at each
subscription (`ClientNames`), so a revoked key's new subscriptions are
refused. An XPUB can change only the connection whose subscription it just
read, so to drop subscriptions already applied for a key whose file has
since been removed the verifier closes the events socket and binds a new one
(`check_revoked`, once a second): every peer reconnects and resubscribes
(ZAP then refuses the revoked key), and `kiosk subscribe` fetches what it
missed in that fraction of a second from the history socket.

One libzmq detail this guards against: a peer that sends a message that is
not a subscription (an XSUB can) shifts the XPUB's record of which connection
the next subscriptions came from. Subscriptions read after such a message,
until the queue is empty, are refused ("unpaired"), never applied to a
connection they may not have come from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import zmq

from kiosk.config import KioskConfig
from kiosk.messaging.channels import CAPTURE_HEALTH, GATE_HEALTH, VERIFIER_HEALTH
from kiosk.messaging.messages import EVENT_TOPIC, IDLE_TOPIC
from kiosk.messaging.transport import ClientNames
from kiosk.services.control_access import Gates, KeyScopes, gates_text, union_of
from kiosk.services.keyed_log import KeyedLog
from kiosk.services.metrics import VerifierMetrics

log = logging.getLogger(__name__)

# scope: the topic reaches something the key may not hear; revoked: the key is in no allow-list now;
# unknown_topic: the prefix matches nothing this verifier publishes; unpaired: read after a non-subscription
# message (see the module docstring)
REFUSED_REASONS = ("scope", "revoked", "unknown_topic", "unpaired")


@dataclass(frozen=True)
class Hearer:
    """What one key may hear now: events (and camera health) of `gates` (None: every gate), idle hints of
    `idle_cameras`, and the heartbeat unless `revoked`."""

    names: tuple[str, ...]
    gates: Gates
    idle_cameras: frozenset[str] = field(default_factory=frozenset)
    revoked: bool = False

    def hears_gate(self, gate: str) -> bool:
        return not self.revoked and (self.gates is None or gate in self.gates)

    def describe(self) -> str:
        if self.revoked:
            return "a key in no allow-list now (revoked)"
        what = f"events of {gates_text(self.gates)}"
        if self.idle_cameras:
            what += ", idle hints of " + ", ".join(sorted(self.idle_cameras))
        return f"key {'/'.join(self.names)!r} ({what})"


class HearingScopes:
    """What each key name may hear, from the config alone (no files, no sockets)."""

    def __init__(self, cfg: KioskConfig) -> None:
        self.keys = KeyScopes.from_config(cfg)
        self.console_key = cfg.console.key
        self.listeners: dict[str, Gates] = {
            s.key: None if s.gates == ["*"] else frozenset(s.gates) for s in cfg.security.listeners
        }
        self.camera_gate = {c.id: c.gate for c in cfg.cameras}
        self.topics: list[tuple[str, str, str]] = [(VERIFIER_HEALTH, "heartbeat", "")]  # (topic, kind, gate/cam)
        self.topics += [(EVENT_TOPIC + g, "event", g) for g in sorted(set(self.camera_gate.values()))]
        self.topics += [(GATE_HEALTH + g, "event", g) for g in sorted(set(self.camera_gate.values()))]
        self.topics += [(CAPTURE_HEALTH + c, "health", c) for c in sorted(self.camera_gate)]
        self.topics += [(IDLE_TOPIC + c, "idle", c) for c in sorted(self.camera_gate)]

    def hearer(self, clients: Iterable[str], listeners: Iterable[str] = (), consoles: Iterable[str] = ()) -> Hearer:
        """The rights of a key allow-listed under these names: `clients` in authorized_clients/ (tools,
        operator and capture keys), `listeners` in authorized_subscribers/, `consoles` in authorized_consoles/."""
        clients, listeners, consoles = set(clients), set(listeners), set(consoles)
        names = tuple(sorted(clients | listeners | consoles))
        if not names:
            return Hearer((), frozenset(), revoked=True)
        scopes: list[Gates] = [self.keys.caller(clients).sees] if clients else []
        scopes += [self.listeners[n] for n in clients | listeners if n in self.listeners]
        if self.console_key in consoles:
            scopes.append(None)
        idle = frozenset(c.id for n in clients for c in self.keys.cameras.get(n, []))
        return Hearer(names, union_of(scopes), idle)

    def describe(self) -> str:
        """One line for the verifier's start: who hears what on the events socket."""
        ops = ", ".join(f"{n}: {gates_text(g)}" for n, g in sorted(self.keys.operators.items()))
        lis = ", ".join(f"{n}: {gates_text(g)}" for n, g in sorted(self.listeners.items())) or "none"
        return (
            f"events heard by operator and tools keys ({ops}), the console key {self.console_key!r} (every "
            f"gate), listener keys ({lis}); idle hints by each camera's capture key only; the heartbeat by "
            "every allow-listed key"
        )

    def problems(self) -> list[str]:
        """What a key is meant to hear but cannot, because an id is a prefix of another it may not hear (a
        capture's idle hints; an operator's gates): said at the verifier's start."""
        out = []
        for name, cams in sorted(self.keys.cameras.items()):
            hearer = self.hearer([name])
            for cam in cams:
                refused = self.refusal(hearer, IDLE_TOPIC + cam.id)
                if refused:
                    out.append(
                        f"camera {cam.id!r}: its capture (key {name!r}) cannot hear its idle hints, so it "
                        f"never holds frames back: {refused[1]}; rename the camera"
                    )
        for name, gates in sorted(self.keys.operators.items()):
            hearer = self.hearer([name])
            for gate in sorted(gates or ()):
                refused = self.refusal(hearer, EVENT_TOPIC + gate)
                if refused:
                    out.append(f"operator key {name!r} cannot subscribe to gate {gate!r} alone: {refused[1]}")
        return out

    def refusal(self, hearer: Hearer, prefix: str) -> tuple[str, str] | None:
        """(reason, why) when a subscription to `prefix` may not be applied for `hearer`; None when it may:
        every topic this verifier publishes that starts with `prefix` is one the key may hear."""
        if hearer.revoked:
            return "revoked", "the key is in no allow-list now (revoked)"
        matched = [t for t in self.topics if t[0].startswith(prefix)]
        if not matched:
            return "unknown_topic", "it matches no topic this verifier publishes (gates and cameras of its config)"
        gates = sorted(
            {g for _, kind, g in matched if kind == "event" and not hearer.hears_gate(g)}
            | {
                self.camera_gate[c]
                for _, kind, c in matched
                if kind == "health" and not hearer.hears_gate(self.camera_gate[c])
            }
        )
        idle = sorted(c for _, kind, c in matched if kind == "idle" and c not in hearer.idle_cameras)
        if not gates and not idle:
            return None
        parts = []
        if gates:
            parts.append(
                f"it reaches gate(s) {', '.join(gates[:10])}{' ...' if len(gates) > 10 else ''} that "
                f"this key may not hear (it hears {gates_text(hearer.gates)}; security.listeners or "
                "security.operators give a key its gates)"
            )
        if idle:
            parts.append(
                f"it reaches the idle hints of camera(s) {', '.join(idle[:10])}"
                f"{' ...' if len(idle) > 10 else ''}, which only that camera's capture key hears"
            )
        return "scope", "; ".join(parts)


class EventPublisher:
    """The verifier's events socket (an XPUB in manual mode) with its subscriptions checked per key; publish with
    `send_multipart`, call `poll()` each loop and `check_revoked()` now and then."""

    LOG_EVERY_S = 30.0
    MAX_LOGGED = 1000  # bounded whatever keys and topics are tried
    MAX_APPLIED_KEYS = 10_000  # keys whose subscriptions were applied (each one allow-listed; bounded anyway)
    REVOKE_CHECK_S = 1.0

    def __init__(
        self,
        sock: zmq.Socket,
        rebind: Callable[[], zmq.Socket],
        scopes: HearingScopes,
        names: tuple[ClientNames, ClientNames, ClientNames] | None,
        metrics: VerifierMetrics,
    ) -> None:
        """`sock`: the bound events socket; `rebind` binds a fresh one (after a revocation); `names`: the
        allow-lists (authorized_clients/, authorized_subscribers/, authorized_consoles/), None with CurveZMQ
        off."""
        self._make_socket = rebind
        self.sock = sock
        self.scopes = scopes
        self.names = names
        self.metrics = metrics
        self.counts = dict.fromkeys(REFUSED_REASONS, 0)
        for reason in REFUSED_REASONS:
            metrics.events_refused.labels(reason=reason).inc(0)
        self._log = KeyedLog(log, "events", self.LOG_EVERY_S, self.MAX_LOGGED)
        self._applied: set[str] = set()  # senders (z85 keys) with at least one subscription applied
        self._unpaired = False  # a non-subscription message was read since the queue was last empty
        self._last_revoke_check = time.monotonic()
        self.rebinds = 0

    def send_multipart(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def hearer(self, sender: str | None) -> Hearer:
        """What the key `sender` (ZAP's User-Id, z85) may hear now; with CurveZMQ off, everything (no sender is
        known: authentication was turned off explicitly)."""
        if self.names is None:
            return Hearer(("(curve off)",), None, frozenset(self.scopes.camera_gate))
        if not sender:
            return Hearer((), frozenset(), revoked=True)
        clients, listeners, consoles = (n.names_of(sender) for n in self.names)
        return self.scopes.hearer(clients, listeners, consoles)

    def poll(self, max_reads: int = 64) -> None:
        """Apply or refuse the subscriptions waiting (at most `max_reads` messages, so a flood cannot hold the
        verifier's loop)."""
        for _ in range(max_reads):
            try:
                frame = self.sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._unpaired = False  # the queue is empty: libzmq's pairing is in step again
                return
            data = frame.bytes
            if not data or data[0] not in (0, 1):
                self._unpaired = True
                self._refuse(
                    _sender(frame),
                    "unpaired",
                    repr(data[:20]),
                    "a message that is not a subscription (an XSUB peer?) was dropped; subscriptions "
                    "read until the queue is empty are refused",
                )
                continue
            topic, sender = data[1:], _sender(frame)
            if data[0] == 0:  # unsubscribe: a connection gone (no sender) or a peer's own cancel
                if not self._unpaired:
                    self.sock.setsockopt(zmq.UNSUBSCRIBE, topic)
                continue
            text = topic.decode("utf-8", "replace")
            if self._unpaired:
                self._refuse(
                    sender,
                    "unpaired",
                    text,
                    f"subscription to {text[:60]!r} refused: read after a "
                    "message that was not a subscription, its connection is not known for sure",
                )
                continue
            hearer = self.hearer(sender)
            refusal = self.scopes.refusal(hearer, text)
            if refusal is not None:
                self._refuse(
                    sender,
                    refusal[0],
                    text,
                    f"subscription to {text[:60]!r} refused for {hearer.describe()}: {refusal[1]}",
                    hearer.names,
                )
                continue
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
            if sender and len(self._applied) < self.MAX_APPLIED_KEYS:
                self._applied.add(sender)

    def check_revoked(self, now: float) -> bool:
        """Once a second: a key with subscriptions applied that is in no allow-list now drops them all, by a
        new events socket (see the module docstring). True when the socket was replaced."""
        if self.names is None or now - self._last_revoke_check < self.REVOKE_CHECK_S:
            return False
        self._last_revoke_check = now
        gone = [s for s in self._applied if self.hearer(s).revoked]
        if not gone:
            return False
        log.warning(
            "events: %d key(s) with live subscriptions are no longer allow-listed (%s...); rebinding the "
            "events socket so that every peer resubscribes and the revoked ones are refused",
            len(gone),
            ", ".join(sorted(s[:8] for s in gone)[:5]),
        )
        self.sock.close(linger=0)
        self.sock = self._make_socket()
        self._applied.clear()
        self._unpaired = False
        self.rebinds += 1
        return True

    def refuse_history(self, hearer: Hearer, gate: str) -> dict[str, str | bool]:
        """The history socket's reply to a key asking for a gate it may not hear (counted and logged as a
        refused subscription: the same rule)."""
        why = f"history of gate {gate[:40]!r} refused for {hearer.describe()}"
        self._refuse(None, "revoked" if hearer.revoked else "scope", f"history {gate[:40]}", why, hearer.names)
        return {"ok": False, "error": why}

    def _refuse(self, sender: str | None, reason: str, what: str, why: str, names: tuple[str, ...] = ()) -> None:
        self.counts[reason] += 1
        self.metrics.events_refused.labels(reason=reason).inc()
        self._log.warning((names or ((sender or "?")[:8],), reason, what[:60]), why)

    def close(self) -> None:
        self.sock.close(linger=0)


def _sender(frame: zmq.Frame) -> str | None:
    try:
        user = frame.get("User-Id")  # (a str: the ZAP handler's user id)
        return user if isinstance(user, str) else None
    except zmq.ZMQError:
        return None
