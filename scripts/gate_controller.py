#!/usr/bin/env python3
"""Reference gate controller: the state machine a gate vendor implements.

    python3 scripts/gate_controller.py --gate A1 --events tcp://VERIFIER:5551 \\
        --server-key keys/server.key --client-key keys/gate-a1.key_secret

or, from an MQTT broker the subscriber publishes to (`kiosk subscribe --mqtt`):

    python3 scripts/gate_controller.py --gate A1 --mqtt mqtts://gate-a1@BROKER:8883 \\
        --mqtt-password-file gate-a1.password --mqtt-ca-file site-ca.pem

On ZeroMQ the verifier's config must give this key its gate (`security.listeners: [{key: gate-a1, gates:
[A1]}]`): the verifier applies a subscription only for gates the key may hear, and a key it gives no gate
hears the heartbeat only (the gate then stays closed: no accept ever arrives).

Needs only pyzmq (or paho-mqtt 2.x for --mqtt). The gate is CLOSED by default and:
- opens for --open-seconds on an `accept` for its own gate that is fresh:
  decided less than --max-age seconds ago and of a frame captured less than
  --max-age seconds ago, by this machine's clock (a decision published late,
  or made late from an old frame, may be about someone who has left);
- stays (or goes) closed on `reject`, on an event for another gate, on a
  stale event, on `verifier_down`, and whenever no verifier heartbeat has
  been seen for --heartbeat-timeout seconds (fail closed);
- re-arms after `verifier_up`.
On MQTT the retained `<prefix>/available` stands in for the heartbeat: `online` re-arms, `offline` (the
verifier is down, or the subscriber is gone: its last will) closes, and so does losing the broker. Decisions
come at least once there: each `event_id` is acted on once. Its TLS files renewed on disk are used from the next
connection (no restart).
Each state change is printed as one JSON line (wire your relay there).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Rejects an agent must see to: a copy of kiosk.messaging.reasons.ALERT_REASONS (this script runs without the
# kiosk package; tests/test_reasons.py checks that the two are equal). See that module for why each is there.
ALERT_REASONS = (
    "presentation_attack",
    "wrong_flight",
    "already_boarded",
    "liveness_unverified",
    "gallery_unavailable",
    "store_unavailable",
    "audit_unavailable",
)


@dataclass
class GateController:
    """Closed unless a fresh accept for this gate arrived in the last `open_seconds`."""

    gate_id: str
    open_seconds: float = 5.0
    max_age_s: float = 2.0
    heartbeat_timeout_s: float = 3.0
    open_until: float = 0.0
    verifier_ok: bool = False
    last_heartbeat: float = -1e18
    log: list[dict] = field(default_factory=list)

    def is_open(self, now: float) -> bool:
        return self.verifier_ok and now - self.last_heartbeat <= self.heartbeat_timeout_s and now < self.open_until

    def _note(self, now: float, what: str, event: dict) -> None:
        self.log.append({"at": now, "action": what, "event_id": event.get("event_id"), "type": event.get("type")})

    def heartbeat(self, now: float) -> None:
        self.last_heartbeat = now
        self.verifier_ok = True

    def handle(self, event: dict, now: float) -> str:
        """Apply one event; returns what the gate did: open, close or ignore."""
        kind = event.get("type")
        if kind == "verifier_down":
            self.verifier_ok = False
            self.open_until = 0.0
            self._note(now, "close", event)
            return "close"
        if kind == "verifier_up":
            self.heartbeat(now)
            return "ignore"
        if event.get("gate_id") != self.gate_id:
            return "ignore"
        if kind == "reject":
            self.open_until = 0.0
            # Closed either way; an attack, a wrong gate, a second boarding, doubtful liveness or a verifier that
            # fails closed (gallery, store or audit unavailable) is also an alert for the agent.
            self._note(now, "alert" if event.get("reason") in ALERT_REASONS else "close", event)
            return "close"
        if kind != "accept":
            return "ignore"
        decided, captured = event.get("decided_at"), event.get("captured_at")
        if not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and now - t <= self.max_age_s and t - now <= 1.0
            for t in (decided, captured)
        ):
            self._note(now, "ignore-stale", event)
            return "ignore"
        if not self.verifier_ok or now - self.last_heartbeat > self.heartbeat_timeout_s:
            self._note(now, "ignore-verifier-down", event)
            return "ignore"
        self.open_until = now + self.open_seconds
        self._note(now, "open", event)
        return "open"


def topic_level(name: str) -> str:
    """A gate id as one MQTT topic level, as the subscriber writes it (`/`, `+`, `#`, `%` percent-encoded)."""
    return "".join(f"%{ord(c):02X}" if c in "/+#%\0" else c for c in name)


class MqttFeed:
    """What arrives from the broker, applied to the gate: availability, and each decision once (by event_id)."""

    def __init__(self, gate: GateController, prefix: str) -> None:
        self.gate = gate
        self.available_topic = f"{prefix}/available"
        self.decision_topic = f"{prefix}/gates/{topic_level(gate.gate_id)}/decision"
        self.online = False
        self._seen: deque[object] = deque(maxlen=1000)  # event ids as they came

    def lost(self, now: float) -> None:
        """No broker: nobody can tell this gate anything, so it fails closed."""
        if self.online:
            self.online = False
            self.gate.handle({"type": "verifier_down", "gate_id": "*", "event_id": None}, now)

    def message(self, topic: str, payload: bytes, now: float) -> dict | None:
        """Apply one message; the decision event it carried, if any."""
        if topic == self.available_topic:
            if payload == b"online":
                self.online = True
                self.gate.heartbeat(now)
            else:
                self.lost(now)
            return None
        if topic != self.decision_topic:
            return None
        try:
            event = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("event_id") in self._seen:
            return None
        self._seen.append(event.get("event_id"))
        self.gate.handle(event, now)
        return event

    def tick(self, now: float) -> None:
        if self.online:  # `online` holds while the broker connection stands: the MQTT heartbeat
            self.gate.heartbeat(now)


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    """The broker's certificate verified (and for the host in the URL) against --mqtt-ca-file, else the system's
    CAs; this gate's own certificate and key shown where given. ValueError, one line naming the option, for a bad
    one."""
    if bool(args.mqtt_cert_file) != bool(args.mqtt_key_file):
        raise ValueError("--mqtt-cert-file and --mqtt-key-file: give both or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and the host name checked
    try:
        if args.mqtt_ca_file:
            context.load_verify_locations(args.mqtt_ca_file)
        else:
            context.load_default_certs()
    except (OSError, ValueError) as exc:
        raise ValueError(f"--mqtt-ca-file {args.mqtt_ca_file}: not a readable PEM CA bundle ({exc})") from None
    if args.mqtt_cert_file:
        try:
            mode = os.stat(args.mqtt_key_file).st_mode & 0o777
        except OSError:
            mode = 0  # loading it says what is wrong
        if mode & 0o077:  # the gate's identity to the broker: its owner's only
            raise ValueError(
                f"--mqtt-key-file {args.mqtt_key_file}: readable by other users (mode {mode:04o}); "
                f"chmod 600 {args.mqtt_key_file}"
            )
        try:  # no passphrase: an encrypted key fails here rather than prompting
            context.load_cert_chain(args.mqtt_cert_file, args.mqtt_key_file, password=lambda: b"")
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"--mqtt-cert-file {args.mqtt_cert_file}, --mqtt-key-file {args.mqtt_key_file}: not a readable PEM "
                f"certificate and unencrypted key ({exc})"
            ) from None
    return context


class TlsRenewal:
    """The TLS files (--mqtt-ca-file, --mqtt-cert-file, --mqtt-key-file) as loaded, to see a renewal on disk: a
    file written in place, renamed over, re-owned, or a symlink pointed at a new one. The connection then starts
    over with a new TLS context (a context is not updated in place: a renewed CA of the old one's name would not
    verify). Files that do not load change nothing: said once, tried again at each failed connection."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loaded = self.stamp()
        self.failed: tuple | None = None

    def stamp(self) -> tuple:
        out = []
        for path in (self.args.mqtt_ca_file, self.args.mqtt_cert_file, self.args.mqtt_key_file):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            out.append(None if st is None else (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def renewed(self) -> ssl.SSLContext | None:
        """A context from the files on disk when they changed since loaded and load whole; else None."""
        stamp = self.stamp()
        if stamp == self.loaded:
            return None
        try:
            context = _tls_context(self.args)
        except ValueError as exc:
            if stamp != self.failed:
                self.failed = stamp
                print(f"mqtt: renewed TLS files do not load: {exc}; those loaded before stay in use", file=sys.stderr)
            return None
        self.loaded, self.failed = stamp, None
        return context


def _stop_client(client: Any) -> None:
    """A paho client replaced: disconnected and its network thread ended."""
    client.disconnect()
    client.loop_stop()


def run_mqtt(args: argparse.Namespace, gate: GateController) -> int:
    import queue
    from urllib.parse import unquote, urlsplit

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    parts = urlsplit(args.mqtt)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        print(f"--mqtt {args.mqtt}: expected mqtt://[USER@]HOST[:PORT] or mqtts://...", file=sys.stderr)
        return 2
    feed = MqttFeed(gate, args.mqtt_prefix)
    inbox: queue.Queue = queue.Queue(maxsize=10_000)
    # At start each wrong option is one line naming it, and exit 2 (the gate stays closed).
    password = None
    if parts.username:
        try:
            password = open(args.mqtt_password_file).read().strip() if args.mqtt_password_file else None
        except OSError as exc:
            print(f"--mqtt-password-file {args.mqtt_password_file}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    renewal = None
    context = None
    if parts.scheme == "mqtts":
        renewal = TlsRenewal(args)  # the files as they are before they are read: a change meanwhile is seen later
        try:
            context = _tls_context(args)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
    host, port = parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    def new_client(tls: ssl.SSLContext | None, gen: int) -> mqtt.Client:
        """A client whose callbacks queue (gen, topic, payload): what a client replaced later still queues is
        dropped by its generation."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, clean_session=True)
        client.reconnect_delay_set(0.5, 10)  # type: ignore[arg-type]  # paho hints int; it waits a float of seconds
        client.on_connect = lambda c, _u, _f, reason, _p: (
            print(f"mqtt: the broker refused the connection: {reason}", file=sys.stderr, flush=True)
            if reason.is_failure
            else c.subscribe([(feed.available_topic, 1), (feed.decision_topic, 1)])
        )
        # A lost connection, and each failed try to connect again: the gate fails closed, and TLS files renewed
        # on disk meanwhile are looked for.
        client.on_disconnect = lambda *_: inbox.put((gen, "", b""))
        client.on_connect_fail = lambda *_: inbox.put((gen, "", b""))
        client.on_message = lambda _c, _u, msg: inbox.put((gen, msg.topic, msg.payload))
        # What goes wrong while it reconnects (a broker that refuses this gate's certificate after the handshake,
        # say) is said on stderr; the gate stays closed meanwhile.
        client.on_log = lambda _c, _u, level, text: (
            print(f"mqtt: {text}", file=sys.stderr, flush=True) if level == mqtt.MQTT_LOG_ERR else None
        )
        if parts.username:
            client.username_pw_set(unquote(parts.username), password)
        if tls is not None:
            client.tls_set_context(tls)
        return client

    gen = 0
    client = new_client(context, gen)
    try:
        client.connect(host, port)
    except OSError as exc:  # ssl.SSLError is an OSError
        verify = getattr(exc, "verify_message", None)  # ssl.SSLCertVerificationError
        trusted = args.mqtt_ca_file or "the system's CAs"
        detail = f"the broker's TLS certificate does not verify against {trusted}: {verify}" if verify else exc
        print(f"--mqtt {args.mqtt}: {detail}", file=sys.stderr)
        return 2
    client.loop_start()
    was_open = False
    end = time.time() + args.run_seconds if args.run_seconds else float("inf")
    try:
        while time.time() < end:
            try:
                from_gen, topic, payload = inbox.get(timeout=0.1)
            except queue.Empty:
                from_gen, topic = gen, None
            now = time.time()
            renewed = None
            if from_gen != gen:  # from a client replaced since
                topic = None
            if topic == "":
                feed.lost(now)
                renewed = renewal.renewed() if renewal is not None else None
            elif topic is not None:
                event = feed.message(topic, payload, now)
                if event is not None and event.get("reason") in ALERT_REASONS and event.get("type") == "reject":
                    print(
                        json.dumps(
                            {
                                "gate": args.gate,
                                "alert": event.get("reason"),
                                "subject_id": event.get("subject_id"),
                                "event_id": event.get("event_id"),
                                "at": now,
                            }
                        ),
                        flush=True,
                    )
            feed.tick(now)
            state = gate.is_open(now)
            if state != was_open:
                print(json.dumps({"gate": args.gate, "state": "open" if state else "closed", "at": now}), flush=True)
                was_open = state
            if renewed is not None:  # (the gate's closing said first) a new client with the renewed files
                print("mqtt: TLS files renewed: connecting with them", file=sys.stderr, flush=True)
                # The old one stops on its own thread: it may sit in a connect, or in a full inbox this loop drains.
                threading.Thread(target=_stop_client, args=(client,), daemon=True).start()
                gen += 1
                client = new_client(renewed, gen)
                client.connect_async(host, port)
                client.loop_start()
    finally:
        client.loop_stop()
        client.disconnect()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Reference gate controller (fail-closed).")
    ap.add_argument("--gate", required=True)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--events", help="the verifier's events endpoint, e.g. tcp://10.0.0.5:5551")
    source.add_argument(
        "--mqtt",
        metavar="URL",
        help="an MQTT broker the subscriber publishes to, mqtt://[USER@]HOST[:PORT] or mqtts://...",
    )
    ap.add_argument("--mqtt-prefix", default="kiosk", help="the subscriber's hooks.mqtt_prefix")
    ap.add_argument("--mqtt-password-file", help="the password of the URL's user (one line)")
    ap.add_argument("--mqtt-ca-file", help="for mqtts://: the CA bundle of the broker's certificate")
    ap.add_argument("--mqtt-cert-file", help="for mqtts:// to a broker that wants one: this gate's certificate")
    ap.add_argument("--mqtt-key-file", help="... and its key")
    ap.add_argument("--server-key", help="the verifier's public key file (server.key); omit only with curve off")
    ap.add_argument("--client-key", help="this gate's secret key file (NAME.key_secret)")
    ap.add_argument("--open-seconds", type=float, default=5.0)
    ap.add_argument("--max-age", type=float, default=2.0, help="ignore accepts older than this (s)")
    ap.add_argument("--heartbeat-timeout", type=float, default=3.0)
    ap.add_argument("--run-seconds", type=float, default=0.0, help="stop after this long (0: run until killed)")
    args = ap.parse_args(argv)
    gate = GateController(args.gate, args.open_seconds, args.max_age, args.heartbeat_timeout)
    if args.mqtt:
        return run_mqtt(args, gate)

    import zmq
    import zmq.auth

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    if args.server_key:
        server_public, _ = zmq.auth.load_certificate(args.server_key)
        public, secret = zmq.auth.load_certificate(args.client_key)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
    for prefix in (f"event.{args.gate}", "health.verifier"):
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    sock.connect(args.events)
    was_open = False
    end = time.time() + args.run_seconds if args.run_seconds else float("inf")
    while time.time() < end:
        if sock.poll(100):
            topic, body = sock.recv_multipart()[:2]
            now = time.time()
            try:
                message = json.loads(body)
            except ValueError:
                continue
            if topic == b"health.verifier":
                gate.heartbeat(now)
            elif topic == f"event.{args.gate}".encode():  # exact match: event.A1 must not take event.A10
                gate.handle(message, now)
                if (
                    gate.log
                    and gate.log[-1]["event_id"] == message.get("event_id")
                    and gate.log[-1]["action"] == "alert"
                ):
                    print(
                        json.dumps(
                            {
                                "gate": args.gate,
                                "alert": message.get("reason"),
                                "subject_id": message.get("subject_id"),
                                "event_id": message.get("event_id"),
                                "at": now,
                            }
                        ),
                        flush=True,
                    )
        now = time.time()
        state = gate.is_open(now)
        if state != was_open:
            print(json.dumps({"gate": args.gate, "state": "open" if state else "closed", "at": now}), flush=True)
            was_open = state
    return 0


if __name__ == "__main__":
    sys.exit(main())
