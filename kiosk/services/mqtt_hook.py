"""The `mqtt` hook: decisions, gate state, availability and health on an MQTT broker (paho-mqtt 2.x).

Topics, under `hooks.mqtt_prefix` (default `kiosk`):
- `<prefix>/gates/<gate>/decision`: each event of the gate, the event JSON as the other hooks get it, QoS 1, not
  retained. `verifier_down`, `verifier_up` and `events_missed` (gate `*` for an all-gates subscriber) go on the
  decision topic of every gate this subscriber serves: a gate that listens to its decisions only still hears
  that it must fail closed.
- `<prefix>/gates/<gate>/state`: retained, `{"gate_id", "flight_id", "verifier": "up"|"down"|"unknown",
  "last_decision": {"type", "reason", "event_id", "decided_at"} | null}`: no subject id, no score (a retained
  message is served to anyone who subscribes later).
- `<prefix>/available`: retained `online` while connected and the verifier is up; `offline` when the verifier
  is down or not heard yet, on a clean stop, and as the last will (the broker says it when this process dies).
- `<prefix>/health/verifier` and `<prefix>/health/cameras/<camera>`: retained `{"status": ...}` only (the
  verifier's ok/degraded/down; a camera's state as the verifier sees it, `unknown` while the verifier is down).

Delivery is at least once: `deliver(event)` returns only once the broker has acknowledged (PUBACK) every
decision-topic message of the event, so the subscriber's saved position (Hook.on_done) moves only past what
the broker holds. While the broker is away it waits, the link reconnecting with backoff (0.5 s doubling to
30 s): a broker outage loses nothing the Hook's queue holds. Meanwhile new events wait in the Hook's bounded
queue (`hooks.queue_size`); an outage longer than that queue drops the oldest decisions, counted and logged,
as for any hook (memory stays bounded). An accept is never delivered late: it is given up (`StaleEvent`,
counted stale) once older than `hooks.max_accept_age_s` since its capture, checked again before each
re-publish. A message in flight when a connection drops is published again on the next one, so a subscriber
may see an event twice: gates deduplicate by `event_id`.

All paho calls happen on one thread (the link's), which owns the connection: each connection is a new paho
client, so an accept given up while the broker was away is not left in a paho queue to be sent later.

At start the broker must answer: the first connection is made before the subscriber starts; a broker that
refuses the login or cannot be reached is one line and exit 2 (`kiosk run` stops: the site is set up wrong).
After a successful start, an outage (or a refusal) is retried for as long as it lasts.
"""

from __future__ import annotations

import json
import logging
import ssl
import stat
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from kiosk.config import MQTT_SCHEMES, KioskConfig, is_loopback, mqtt_url_problem
from kiosk.errors import ConfigError, UsageError
from kiosk.files import read_regular_file
from kiosk.messaging.status import (
    CameraStatus,
    GateHeartbeat,
    GateStatus,
    Heartbeat,
    VerifierStatus,
    heartbeat_from_json,
)
from kiosk.services.hook_outcomes import DeliveryAborted, StaleEvent

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
KEEPALIVE_S = 15
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
LOOP_S = 0.025  # the link thread's network wait: the most a new event waits before it goes out
CERT_RENEW_DAYS = 14  # a client certificate with fewer days left is warned of, at start and every CERT_CHECK_S
CERT_CHECK_S = 6 * 3600.0
CLOCK_SLACK = timedelta(minutes=5)  # a certificate issued just now is not refused for a clock a little behind
STOP_FLUSH_S = 2.0  # how long a clean stop waits for the broker to take `offline`
STATE_EVENTS = ("verifier_down", "verifier_up", "events_missed")
DECISION_FIELDS = ("type", "reason", "event_id", "decided_at")  # what a retained gate state shows of a decision


def topic_level(name: str) -> str:
    """A gate or camera id as one topic level: `/`, `+`, `#` and `%` percent-encoded, so no id can add a
    level or a wildcard (ids without them, the usual, are unchanged)."""
    return "".join(f"%{ord(c):02X}" if c in "/+#%\0" else c for c in name)


@dataclass(frozen=True)
class TlsFiles:
    """The files behind mqtts:// (hooks.mqtt_ca_file, mqtt_cert_file, mqtt_key_file): read at start, and again
    before a reconnect when one of them has changed (a certificate renewed on disk needs no restart)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def stamp(self) -> tuple[tuple[int, ...] | None, ...]:
        """What changes when a file is rewritten, replaced (renamed over, or a symlink pointed at a new file, as
        renewal tools do) or has its owner or mode changed: device, inode, ctime, mtime, size of each."""
        out: list[tuple[int, ...] | None] = []
        for path in (self.ca_file, self.cert_file, self.key_file):
            try:
                st = path.stat() if path is not None else None
            except OSError:
                st = None
            out.append(None if st is None else (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size))
        return tuple(out)


@dataclass(frozen=True)
class MqttTarget:
    """Where to publish: the broker from the URL, the user from it, the password from its file."""

    url: str
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None = field(default=None, repr=False)
    tls_files: TlsFiles = TlsFiles()
    # mqtts://: built at start from tls_files as they were then (tls_stamp); the link builds a new one when they
    # change, and keeps the one it has when the new files do not load (a file changed or gone cannot end the link)
    context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    tls_stamp: tuple[tuple[int, ...] | None, ...] = ()
    cert_until: datetime | None = None  # when the client certificate in `context` expires

    @property
    def ca_file(self) -> Path | None:
        return self.tls_files.ca_file

    @property
    def cert_file(self) -> Path | None:
        return self.tls_files.cert_file


def refuse_if_others_read(path: Path, key: str) -> None:
    """ConfigError naming `key` when `path` is a file other users can read (a secret must be its owner's)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # the reader says what is wrong
    if stat.S_ISREG(mode) and mode & 0o077:
        raise ConfigError(f"{key}: {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); chmod 600 {path}")


def read_password_file(path: Path) -> str:
    """The password in `path` (one line); refused, like the template key, when others can read the file."""
    refuse_if_others_read(path, "hooks.mqtt_password_file")
    data = read_regular_file(path, 4096, "password file", error=ConfigError)
    password = data.decode("utf-8", "replace").strip()
    if not password:
        raise ConfigError(f"hooks.mqtt_password_file: {path} is empty")
    return password


def tls_context(files: TlsFiles) -> tuple[ssl.SSLContext, datetime | None]:
    """The TLS settings of mqtts:// connections (ConfigError naming the key at fault): the broker's certificate
    verified, and for the host the URL names, against hooks.mqtt_ca_file (else the system's CAs); this host's
    certificate and key (hooks.mqtt_cert_file, hooks.mqtt_key_file: both or neither, the key its owner's only and
    not encrypted) shown to a broker that wants one. With them, when that certificate expires (None: no client
    certificate, or dates that cannot be read)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname, as paho's tls_set
    ca = files.ca_file
    try:
        if ca is None:
            context.load_default_certs()
        else:
            context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError, ValueError) as exc:
        problem = "no such file" if ca is not None and not ca.is_file() else f"not a PEM CA certificate bundle ({exc})"
        raise ConfigError(f"hooks.mqtt_ca_file: {ca}: {problem}") from None
    cert, key = files.cert_file, files.key_file
    if cert is None and key is None:
        return context, None
    if cert is None or key is None:
        given, missing = (
            ("mqtt_cert_file", "mqtt_key_file") if cert is not None else ("mqtt_key_file", "mqtt_cert_file")
        )
        raise ConfigError(f"hooks.{missing}: needed with hooks.{given} (a client certificate and its key go together)")
    for name, path in (("mqtt_cert_file", cert), ("mqtt_key_file", key)):
        if not path.is_file():
            raise ConfigError(f"hooks.{name}: {path}: no such file")
    refuse_if_others_read(key, "hooks.mqtt_key_file")
    try:  # no passphrase: an encrypted key fails here instead of OpenSSL asking on the terminal
        context.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"hooks.mqtt_cert_file, hooks.mqtt_key_file: {cert}, {key}: not a PEM certificate and its unencrypted "
            f"private key ({exc})"
        ) from None
    try:
        valid_from, valid_until = certificate_validity(cert)
    except ConfigError as exc:  # OpenSSL took it (a form cryptography does not read): its dates go unwatched
        log.warning("mqtt: %s: its dates cannot be read, so its expiry is not watched", exc)
        return context, None
    now = datetime.now(timezone.utc)
    if now + CLOCK_SLACK < valid_from:
        raise ConfigError(
            f"hooks.mqtt_cert_file: {cert}: not valid before {_utc(valid_from)}, and this host's clock says "
            f"{_utc(now)}: set its time (NTP) or use a certificate valid now"
        )
    if now >= valid_until:
        raise ConfigError(f"hooks.mqtt_cert_file: {cert}: expired on {_utc(valid_until)}: renew it")
    say_if_expiring(cert, valid_until, now)
    return context, valid_until


def certificate_validity(path: Path) -> tuple[datetime, datetime]:
    """When the first certificate in the PEM file `path` (a chain starts with the host's own) is valid: from, until."""
    try:
        first = x509.load_pem_x509_certificates(read_regular_file(path, 1 << 20, "certificate", error=ConfigError))[0]
    except ConfigError as exc:
        raise ConfigError(f"hooks.mqtt_cert_file: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"hooks.mqtt_cert_file: {path}: not a PEM certificate ({exc})") from None
    return first.not_valid_before_utc, first.not_valid_after_utc


def say_if_expiring(path: Path, valid_until: datetime, now: datetime) -> None:
    """A warning while the client certificate in use has less than CERT_RENEW_DAYS left (an error once expired):
    the broker refuses an expired one at the next connection."""
    left = valid_until - now
    if left <= timedelta(0):
        log.error(
            "mqtt: hooks.mqtt_cert_file %s expired on %s: the broker refuses it at the next connection; renew it",
            path,
            _utc(valid_until),
        )
    elif left < timedelta(days=CERT_RENEW_DAYS):
        log.warning(
            "mqtt: hooks.mqtt_cert_file %s expires on %s (in %.1f days): renew it (a renewed file is read at the "
            "next connection, no restart)",
            path,
            _utc(valid_until),
            left / timedelta(days=1),
        )


def _utc(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def mqtt_target(cfg: KioskConfig, url: str, key: str = "--mqtt") -> MqttTarget:
    """The target of `url` with the password of `hooks.mqtt_password_file`; ConfigError naming `key`."""
    problem = mqtt_url_problem(url)
    if problem:
        raise ConfigError(f"{key}: {problem}")
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = None
    if cfg.hooks.mqtt_password_file is not None:
        if username is None:
            raise ConfigError(f"{key}: hooks.mqtt_password_file is set but {url} names no user (mqtt://USER@HOST:PORT)")
        password = read_password_file(cfg.hooks.mqtt_password_file)
    host, tls = parts.hostname or "", parts.scheme == "mqtts"
    files = TlsFiles(cfg.hooks.mqtt_ca_file, cfg.hooks.mqtt_cert_file, cfg.hooks.mqtt_key_file)
    stamp = files.stamp()  # before they are read: a change while they are read is seen at the next connection
    context, cert_until = tls_context(files) if tls else (None, None)
    if not tls:
        unused = [f"hooks.{k}" for k in ("mqtt_ca_file", "mqtt_cert_file") if getattr(cfg.hooks, k) is not None]
        if not is_loopback(host):  # to this machine it never crosses a network
            log.warning(
                "%s %s: plain MQTT to another host: the broker password and every decision cross the network "
                "unencrypted; use mqtts:// (the broker's CA in hooks.mqtt_ca_file)",
                key,
                url,
            )
        if unused:
            log.warning("%s %s: plain MQTT: %s not used (only mqtts:// does TLS)", key, url, ", ".join(unused))
    return MqttTarget(
        url,
        host,
        parts.port or MQTT_SCHEMES[parts.scheme],
        tls,
        username,
        password,
        files,
        context,
        stamp,
        cert_until,
    )


class BrokerRefused(Exception):
    """The broker answered CONNECT with a refusal (bad user or password, not authorised, ...)."""


class BrokerUnreachable(Exception):
    """No CONNACK: the broker cannot be reached, its TLS does not verify, or it did not answer in time."""


class BrokerUntrusted(BrokerUnreachable):
    """The broker's TLS certificate does not verify (another CA, or not for the name in the URL)."""

    hint = "hooks.mqtt_ca_file must hold the CA that signed the broker's certificate, and the URL name its host"


class ClientUntrusted(BrokerUnreachable):
    """The broker ended the TLS handshake or session with an alert before answering: what one that wants a client
    certificate does when it is shown none, or one it does not accept."""

    hint = (
        "a broker that wants a client certificate does this without one it accepts: hooks.mqtt_cert_file and "
        "hooks.mqtt_key_file, a certificate its client CA signed and the key"
    )


@dataclass
class _Request:
    """Messages one `deliver` waits for: each is published (again, on each new connection) until acknowledged."""

    messages: list[tuple[str, bytes, bool]]  # topic, payload, retain
    give_up: Callable[[], bool]
    acked: set[int] = field(default_factory=set)
    sent: dict[int, paho.MQTTMessageInfo] = field(default_factory=dict)  # on the current connection
    cancelled: bool = False  # given up by the caller while the broker was away: never to be published
    outcome: str | None = None  # "acked", "stale"
    done: threading.Event = field(default_factory=threading.Event)


class MqttLink:
    """One connection at a time to the broker, owned by one thread: reconnects with backoff, publishes the
    retained topics whenever they change (all of them again on each new connection), and publishes requests
    until the broker acknowledges each message."""

    def __init__(self, target: MqttTarget, will_topic: str, client_id: str) -> None:
        self.target = target
        self.will_topic = will_topic
        self.client_id = client_id
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}  # topic -> latest payload
        self._sent_retained: dict[str, bytes] = {}  # what the current connection has been given
        self._incoming: deque[_Request] = deque()
        self._pending: list[_Request] = []  # the link thread's: published, not yet all acknowledged
        self._stop = threading.Event()
        self._client: paho.Client | None = None
        self.connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._context = target.context
        self._tls_loaded = target.tls_stamp  # the TLS files as they were when _context was built
        self._tls_failed: tuple[tuple[int, ...] | None, ...] | None = None  # as they were when a load last failed
        self._tls_problem: str | None = None  # why the files on disk do not load, while older ones are in use
        self._cert_until = target.cert_until  # when the client certificate in use expires
        self._next_cert_check = time.monotonic() + CERT_CHECK_S

    # -- the connection ---------------------------------------------------------
    def _tls(self) -> ssl.SSLContext | None:
        """The TLS settings for a new connection (a live one keeps those it was made with): loaded again when a
        file behind them has changed since (a certificate or CA renewed on disk). Changed files that do not load
        leave the ones loaded before in use; they are tried again at each connection (a renewal that writes the
        certificate and the key one after the other, a key still to be `chmod 600`ed) and said once per change."""
        if self._context is None:
            return None
        stamp = self.target.tls_files.stamp()
        if stamp == self._tls_loaded:  # (again: a bad change undone)
            self._tls_failed = self._tls_problem = None
            return self._context
        try:
            context, until = tls_context(self.target.tls_files)
        except Exception as exc:  # noqa: BLE001 - a ConfigError, or a library on a strange file: not the link's end
            self._tls_problem = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            if stamp != self._tls_failed:
                self._tls_failed = stamp
                log.error(
                    "mqtt: the TLS files changed and do not load: %s; the ones loaded before stay in use (tried "
                    "again at each connection)",
                    exc,
                )
            return self._context
        self._context, self._cert_until, self._tls_loaded = context, until, stamp
        self._tls_failed = self._tls_problem = None
        log.info("mqtt: the TLS files changed: loaded again for the connection to %s", self.target.url)
        return context

    def _check_certificate(self) -> None:
        """Every CERT_CHECK_S: the client certificate, soon to expire or expired, is said (a subscriber runs for
        months; the warning at start is long gone by then). One renewed on disk since it was loaded is what counts:
        the connection up needs no valid certificate any more, the next one loads the renewed file."""
        self._next_cert_check = time.monotonic() + CERT_CHECK_S  # first: a check that fails is not retried at once
        until = self.certificate_until()
        cert = self.target.tls_files.cert_file
        if until is None or cert is None:
            return
        log.debug("mqtt: the client certificate is valid until %s", _utc(until))
        say_if_expiring(cert, until, datetime.now(timezone.utc))

    def certificate_until(self) -> datetime | None:
        """When this host's client certificate expires: the one in use, or the one renewed on disk since it was
        loaded when that lasts longer (the next connection loads it). None: no client certificate."""
        cert = self.target.tls_files.cert_file
        if self._cert_until is None or cert is None:
            return None
        until = self._cert_until
        if self.target.tls_files.stamp() != self._tls_loaded:
            try:
                until = max(until, certificate_validity(cert)[1])
            except ConfigError:
                pass  # the next connection says what is wrong with it
        return until

    def _open(self) -> paho.Client:
        """A new client, connected (CONNACK accepted), or BrokerRefused / BrokerUnreachable."""
        t = self.target
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True, protocol=paho.MQTTv311
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        if t.username is not None:
            client.username_pw_set(t.username, t.password)
        context = self._tls()
        if context is not None:
            client.tls_set_context(context)
        client.will_set(self.will_topic, b"offline", qos=1, retain=True)
        answer: dict[str, Any] = {}
        client.on_connect = lambda _c, _u, _f, reason, _p: answer.setdefault("reason", reason)
        errors: list[str] = []  # paho's own account of a failed read: over TLS 1.3 the broker's alert is only there
        client.on_log = lambda _c, _u, level, text: errors.append(text) if level == paho.MQTT_LOG_ERR else None
        try:
            client.connect(t.host, t.port, keepalive=KEEPALIVE_S)
        except ssl.SSLCertVerificationError as exc:
            trusted = f"hooks.mqtt_ca_file ({t.ca_file})" if t.ca_file else "the system's CAs (no hooks.mqtt_ca_file)"
            raise BrokerUntrusted(
                f"{t.host}:{t.port}: its TLS certificate does not verify against {trusted}: {exc.verify_message}"
            ) from None
        except OSError as exc:  # ssl.SSLError among them
            detail = exc.strerror or exc
            if isinstance(exc, ssl.SSLError) and "ALERT" in str(exc.reason):  # the broker refused the handshake
                raise ClientUntrusted(f"{t.host}:{t.port} ended the TLS handshake with an alert: {detail}") from None
            if t.tls and isinstance(exc, ssl.SSLError | ConnectionResetError):  # a plain MQTT port cuts a TLS hello
                raise BrokerUnreachable(
                    f"{t.host}:{t.port}: the TLS handshake failed (is it a TLS port?): {detail}"
                ) from None
            raise BrokerUnreachable(f"cannot reach {t.host}:{t.port}: {detail}") from None
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while "reason" not in answer and time.monotonic() < deadline:
            if client.loop(0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS and "reason" not in answer:
                said = errors[0] if errors else ""  # the first: what ended it (later ones say it is gone)
                if t.tls and "ALERT" in said.upper():  # e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED after the handshake
                    raise ClientUntrusted(f"{t.host}:{t.port} ended the TLS session with an alert: {said}")
                maybe = (
                    "; a broker that wants a client certificate also does this to a client without one "
                    "(hooks.mqtt_cert_file, hooks.mqtt_key_file)"
                    if t.tls and t.cert_file is None
                    else ""
                )
                raise BrokerUnreachable(
                    f"{t.host}:{t.port} ended the {'TLS session' if t.tls else 'connection'} before answering"
                    + (f" ({said})" if said else "")
                    + maybe
                )
        client.on_log = None  # the connection stands: nothing more to keep
        reason = answer.get("reason")
        if reason is None:
            raise BrokerUnreachable(f"{t.host}:{t.port} did not answer within {CONNECT_TIMEOUT_S:g}s")
        if reason.is_failure:
            raise BrokerRefused(
                f"{t.host}:{t.port} refused the connection{f' of user {t.username!r}' if t.username else ''}: {reason}"
            )
        return client

    def start(self) -> None:
        """Connect once, now (errors raised to the caller); then keep the connection on the link's thread."""
        self._client = self._open()
        self.connected.set()
        log.info("mqtt: connected to %s as %s", self.target.url, self.client_id)
        self._thread = threading.Thread(target=self._run, name=f"mqtt {self.target.host}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff, next_try, refused_told = BACKOFF_START_S, 0.0, False
        while not self._stop.is_set():
            if time.monotonic() >= self._next_cert_check:
                try:
                    self._check_certificate()
                except Exception:  # advisory: never the end of the link
                    log.exception("mqtt: checking the client certificate's dates failed")
            client = self._client
            if client is None:
                if time.monotonic() < next_try:
                    self._stop.wait(min(0.2, next_try - time.monotonic()))
                    continue
                try:
                    client = self._open()
                except (BrokerRefused, BrokerUnreachable) as exc:
                    if not isinstance(exc, BrokerRefused) or not refused_told:
                        stale = (
                            f" (with the TLS files loaded before: those on disk do not load: {self._tls_problem})"
                            if self._tls_problem
                            else ""
                        )
                        log.warning("mqtt: %s%s; retry in %.1fs", exc, stale, backoff)
                    refused_told = isinstance(exc, BrokerRefused)
                    next_try, backoff = time.monotonic() + backoff, min(backoff * 2, BACKOFF_MAX_S)
                    continue
                log.info("mqtt: connected to %s again", self.target.url)
                backoff, refused_told = BACKOFF_START_S, False
                with self._lock:
                    self._sent_retained = {}
                    self._client = client
                self.connected.set()
                for req in self._pending:
                    req.sent.clear()  # the old connection's copies are gone with it: publish again
            if self._step(client) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning(
                    "mqtt: connection to %s lost; reconnecting (%d event(s) waiting for the broker)",
                    self.target.url,
                    len(self._pending) + len(self._incoming),
                )
                self.connected.clear()
                with self._lock:
                    self._client = None
                next_try = time.monotonic() + backoff
        self._close_client()

    def _step(self, client: paho.Client) -> MQTTErrorCode:
        """Publish what changed and what waits, run the network once, collect acknowledgements."""
        with self._lock:
            changed = [(t, p) for t, p in self._retained.items() if self._sent_retained.get(t) != p]
            self._sent_retained.update(changed)
            while self._incoming:
                self._pending.append(self._incoming.popleft())
        for topic, payload in changed:
            client.publish(topic, payload, qos=1, retain=True)
        for req in list(self._pending):
            if req.cancelled or (not req.sent and req.give_up()):  # about to go out (again): too old to go at all
                self._finish(req, "stale")
                continue
            for i, (topic, payload, retain) in enumerate(req.messages):
                if i not in req.acked and i not in req.sent:
                    req.sent[i] = client.publish(topic, payload, qos=1, retain=retain)
        rc = client.loop(LOOP_S)
        for req in list(self._pending):
            for i, info in list(req.sent.items()):
                if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and info.is_published():
                    req.acked.add(i)
            if len(req.acked) == len(req.messages):
                self._finish(req, "acked")
        return rc

    def _finish(self, req: _Request, outcome: str) -> None:
        self._pending.remove(req)
        req.outcome = outcome
        req.done.set()

    def _close_client(self) -> None:
        client, self._client = self._client, None
        self.connected.clear()
        if client is not None:
            client.disconnect()
            client.loop(0.1)

    # -- what callers use -------------------------------------------------------
    def set_retained(self, topic: str, payload: bytes) -> None:
        """The latest value of a retained topic; published by the link when it differs from the last sent."""
        with self._lock:
            self._retained[topic] = payload

    def publish_acked(self, messages: list[tuple[str, bytes, bool]], give_up: Callable[[], bool]) -> None:
        """Return once the broker has acknowledged every (topic, payload, retain) message (QoS 1); StaleEvent when
        `give_up()` says so before one goes out (again); DeliveryAborted when the link stops first."""
        req = _Request(messages, give_up)
        with self._lock:
            self._incoming.append(req)
        while not req.done.wait(0.1):
            if self._stop.is_set():
                raise DeliveryAborted()
            if not self.connected.is_set() and give_up():
                with self._lock:
                    req.cancelled = True
                    if req in self._incoming:
                        self._incoming.remove(req)
                raise StaleEvent()
        if req.outcome == "stale":
            raise StaleEvent()

    def close(self, last: tuple[str, bytes] | None = None) -> None:
        """Stop. `last` (a retained topic and its value, e.g. `offline`) goes out first: the broker gets
        STOP_FLUSH_S to be reached and to acknowledge it. (Stopped while the broker is away, it cannot: a broker
        that keeps retained messages across its own restart then still says what it said last.)"""
        if last is not None:
            self.set_retained(*last)  # so that no reconnect in the meantime says otherwise
            if self.connected.wait(STOP_FLUSH_S):
                req = _Request([(last[0], last[1], True)], lambda: False)
                with self._lock:
                    self._incoming.append(req)
                req.done.wait(STOP_FLUSH_S)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)


class MqttHook:
    """`deliver(event)` for the subscriber's Hook; `observe(heartbeat)` for the verifier's health. See the module."""

    def __init__(
        self, link: MqttLink, prefix: str, gates: list[str], max_accept_age_s: float, only_gate: str | None = None
    ) -> None:
        self.link = link
        self.only_gate = only_gate  # the subscriber's --gate: other gates of the heartbeat are not ours
        self.prefix = prefix
        self.max_accept_age_s = max_accept_age_s
        self._lock = threading.Lock()
        self._gates: dict[str, dict[str, Any]] = {}  # gate -> {"flight_id", "last_decision"}
        self._cameras: dict[str, str] = {}
        self._verifier = "unknown"  # up, down, unknown
        self._verifier_status = "unknown"  # the heartbeat's: ok, degraded
        for gate in gates:
            self._gate(gate)
        self._publish_state()

    @property
    def available_topic(self) -> str:
        return f"{self.prefix}/available"

    def _gate(self, gate: str) -> dict[str, Any]:
        return self._gates.setdefault(gate, {"flight_id": None, "last_decision": None})

    def _publish_state(self) -> None:
        """Hand the link the current value of every retained topic (it sends only what changed). Under _lock."""
        p, up = self.prefix, self._verifier == "up"
        for gate, state in self._gates.items():
            self.link.set_retained(
                f"{p}/gates/{topic_level(gate)}/state",
                _json(
                    {
                        "gate_id": gate,
                        "flight_id": state["flight_id"],
                        "verifier": self._verifier,
                        "last_decision": state["last_decision"],
                    }
                ),
            )
        self.link.set_retained(
            f"{p}/health/verifier", _json({"status": self._verifier_status if up else self._verifier})
        )
        for camera, status in self._cameras.items():
            self.link.set_retained(
                f"{p}/health/cameras/{topic_level(camera)}", _json({"status": status if up else "unknown"})
            )
        self.link.set_retained(self.available_topic, b"online" if up else b"offline")

    def observe(self, heartbeat: Heartbeat | VerifierStatus | Mapping[str, Any]) -> None:
        """A verifier heartbeat: its own part (ok/degraded) or one gate's (`gate_id`: its flight and cameras'
        states). The first one says the verifier is up; after a `verifier_down`, only `verifier_up` does (in order
        with the decisions). A JSON object is read first: a whole status (`gates` and `cameras`, as a verifier sent
        before its heartbeat came in parts) as such, else as a heartbeat."""
        beat = _read_heartbeat(heartbeat) if isinstance(heartbeat, Mapping) else heartbeat
        if beat.status == "stopping":
            return
        with self._lock:
            if self._verifier == "unknown":
                self._verifier = "up"
            self._verifier_status = beat.status
            gates: dict[str, GateStatus | None] = {}
            cameras: dict[str, CameraStatus] = {}
            if isinstance(beat, GateHeartbeat):  # one gate's part (health.gate.<gate>)
                gates, cameras = {beat.gate_id: beat.gate}, beat.cameras
            elif isinstance(beat, VerifierStatus):
                gates, cameras = dict(beat.gates), beat.cameras
            for gate, info in gates.items():
                if info is not None and (self.only_gate is None or gate == self.only_gate):
                    self._gate(gate)["flight_id"] = info.flight_id
            for camera, cam in cameras.items():
                if cam.gate_id in self._gates:
                    self._cameras[camera] = cam.state
            self._publish_state()

    def _too_old(self, event: dict[str, Any]) -> bool:
        captured = event.get("captured_at")
        return (
            event.get("type") == "accept"
            and isinstance(captured, (int, float))
            and time.time() - captured > self.max_accept_age_s
        )

    def __call__(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type"))
        gate = str(event.get("gate_id"))
        payload = _json(event)
        if kind in STATE_EVENTS:
            with self._lock:
                if kind != "events_missed":  # the retained topics say it first: `offline` before the event
                    self._verifier = "down" if kind == "verifier_down" else "up"
                    self._publish_state()
                gates = [gate] if gate in self._gates else sorted(self._gates)
            if not gates:
                log.warning("mqtt: %s: no gate known yet to publish it to (availability says it)", kind)
                return
            self.link.publish_acked(
                [(f"{self.prefix}/gates/{topic_level(g)}/decision", payload, False) for g in gates], lambda: False
            )
            return
        with self._lock:
            self._gate(gate)
        self.link.publish_acked(
            [(f"{self.prefix}/gates/{topic_level(gate)}/decision", payload, False)], lambda: self._too_old(event)
        )
        with self._lock:  # the retained state follows the decision the broker has taken
            self._gate(gate)["last_decision"] = {k: event.get(k) for k in DECISION_FIELDS}
            self._publish_state()

    def certificate_expiry(self) -> float | None:
        """Unix time at which this host's MQTT client certificate expires (a metric); None without one."""
        until = self.link.certificate_until()
        return None if until is None else until.timestamp()

    def close(self) -> None:
        """The subscriber stops: `offline` (retained) goes out before the connection is closed."""
        self.link.close(last=(self.available_topic, b"offline"))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def mqtt_hook(cfg: KioskConfig, url: str, gate: str | None, name: str, key: str = "--mqtt") -> MqttHook:
    """Connect now (exit 2 with one line if the broker refuses or cannot be reached) and return the hook."""
    target = mqtt_target(cfg, url, key)
    prefix = cfg.hooks.mqtt_prefix
    client_id = f"kiosk-{name}-{uuid.uuid4().hex[:8]}"
    link = MqttLink(target, f"{prefix}/available", client_id)
    try:
        link.start()
    except BrokerRefused as exc:
        hint = (
            " (check the user in the URL and hooks.mqtt_password_file)"
            if target.username
            else " (the broker may need a user: mqtt://USER@HOST:PORT and hooks.mqtt_password_file)"
        )
        raise UsageError(f"{key} {url}: {exc}{hint}") from None
    except (BrokerUntrusted, ClientUntrusted) as exc:
        raise UsageError(f"{key} {url}: {exc} ({exc.hint})") from None
    except BrokerUnreachable as exc:
        raise UsageError(
            f"{key} {url}: {exc} (the broker must be up when the subscriber starts; later outages are retried)"
        ) from None
    gates = sorted({c.gate for c in cfg.cameras if gate is None or c.gate == gate} | ({gate} if gate else set()))
    return MqttHook(link, prefix, gates, cfg.hooks.max_accept_age_s, gate)


def _read_heartbeat(body: Mapping[str, Any]) -> Heartbeat | VerifierStatus:
    if body.get("gate_id") is None and ("gates" in body or "cameras" in body):
        return VerifierStatus.from_json(body, "heartbeat")
    return heartbeat_from_json(body)
