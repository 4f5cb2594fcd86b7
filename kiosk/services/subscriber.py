"""`kiosk subscribe`: deliver decisions to hooks, and fail closed when the verifier is gone.

Each hook has its own worker thread and bounded queue: a slow or hanging
hook delays no other hook; when its queue is full, new events for it are
dropped, counted and logged. Hooks:
- exec: a shell command, event JSON on stdin, main fields as KIOSK_*
  environment variables, killed after `hooks.exec_timeout_s`;
- webhook: HTTP POST of the event JSON, signed (HMAC-SHA256), retried with backoff;
- jsonl: one JSON object a line, flushed per event;
- python: `module:function`, called with the event as a dict;
- mqtt: decisions, gate state, availability and health on a broker, acknowledged before the position moves
  (kiosk.services.mqtt_hook).

Heartbeat watch: `heartbeat.misses` missed verifier heartbeats deliver a
`verifier_down` event to every hook (also at start if none arrives);
`verifier_up` follows when they return.
"""

from __future__ import annotations

import http.client
import importlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import zmq

from kiosk.boarding.retention import rotate_daily, today
from kiosk.cli_support import serve
from kiosk.config import KioskConfig, ListenerKeyConfig, OperatorKeyConfig, mqtt_url_problem
from kiosk.errors import ConfigError
from kiosk.messaging.channels import GATE_HEALTH, VERIFIER_HEALTH, EventChannel
from kiosk.messaging.messages import EVENT_TOPIC, BadMessage, Event, Heartbeat, event_from_dict
from kiosk.messaging.reasons import is_alert_reason
from kiosk.messaging.status import GateHeartbeat, heartbeat_from_json
from kiosk.messaging.status import Heartbeat as StatusHeartbeat
from kiosk.messaging.transport import Transport
from kiosk.services.hook_outcomes import DeliveryAborted, StaleEvent
from kiosk.services.metrics import SubscriberMetrics
from kiosk.services.metrics import serve as serve_metrics
from kiosk.services.mqtt_hook import mqtt_hook
from kiosk.services.webhook_signing import load_secret, secret_path, sign

log = logging.getLogger(__name__)

ENV_FIELDS = (
    "type",
    "gate_id",
    "camera_id",
    "subject_id",
    "display_name",
    "score",
    "reason",
    "event_id",
    "decided_at",
    "latency_ms",
)


STATE_EVENTS = ("verifier_down", "verifier_up", "events_missed")


class Hook:
    """A worker thread with a bounded queue around one `deliver(event)` function.

    State events (`verifier_down`, ...) go to the front of the queue: a gate must hear that the verifier is
    gone before it works through older decisions. When the queue is full the oldest event is dropped, not
    the newest. An accept older than `max_accept_age_s` (since its capture) is never delivered: whoever it
    was about has long walked on (counted as "stale"; a deliver that retries raises `StaleEvent` when an accept
    ages past it while waiting). A deliver that raises `DeliveryAborted` (the subscriber stops before the receiver
    acknowledged) leaves that event and the rest of the queue not done: the saved position stays before them."""

    def __init__(
        self, name: str, deliver: Callable[[dict[str, Any]], None], queue_size: int, max_accept_age_s: float = 5.0
    ) -> None:
        self.name = name
        self._deliver = deliver
        self._size = queue_size
        self._max_age = max_accept_age_s
        self._queue: deque[dict[str, Any] | None] = deque()
        self._ready = threading.Condition()
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.stale = 0
        self._metrics: SubscriberMetrics | None = None
        self.on_done: Callable[[dict[str, Any]], None] | None = None  # called once per event it is done with
        self._thread = threading.Thread(target=self._work, name=f"hook {name}", daemon=True)
        self._thread.start()

    def attach(self, metrics: SubscriberMetrics) -> None:
        """Count this hook's deliveries in `metrics` from now on (and, for an MQTT hook with a client certificate,
        export when that expires)."""
        self._metrics = metrics
        metrics.queue_depth.labels(hook=self.name).set_function(lambda: len(self._queue))
        expiry = getattr(self._deliver, "certificate_expiry", None)
        if expiry is not None and expiry() is not None:

            def seconds() -> float:  # NaN, never 0, while a renewed file's dates cannot be read: no false alert
                when = expiry()
                return math.nan if when is None else float(when)

            metrics.mqtt_certificate_expiry.labels(hook=self.name).set_function(seconds)

    def observe(self, heartbeat: StatusHeartbeat) -> None:
        """Hand a verifier heartbeat to a deliver that follows the verifier's health (MQTT); on the caller's thread,
        so it must not block."""
        observe = getattr(self._deliver, "observe", None)
        if observe is not None:
            try:
                observe(heartbeat)
            except Exception as exc:  # noqa: BLE001 - a hook's failure must not stop the subscriber
                log.warning("hook %s cannot take the heartbeat: %s", self.name, exc)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.deliveries.labels(hook=self.name, outcome=outcome).inc()

    def _done(self, event: dict[str, Any]) -> None:
        if self.on_done is not None:
            self.on_done(event)

    def submit(self, event: dict[str, Any]) -> None:
        with self._ready:
            if len(self._queue) >= self._size:
                # The oldest decision goes (the least useful to a gate); a state event stays.
                oldest = next(
                    (e for e in self._queue if e is not None and e.get("type") not in STATE_EVENTS), self._queue[0]
                )
                self._queue.remove(oldest)
                self.dropped += 1
                self._count("dropped")
                if oldest is not None:
                    self._done(oldest)
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning("hook %s is behind: %d events dropped so far (oldest first)", self.name, self.dropped)
            if event.get("type") in STATE_EVENTS:  # ahead of the decisions, behind earlier state events
                at = next(
                    (i for i, e in enumerate(self._queue) if e is None or e.get("type") not in STATE_EVENTS),
                    len(self._queue),
                )
                self._queue.insert(at, event)
            else:
                self._queue.append(event)
            self._ready.notify()

    def _too_old(self, event: dict[str, Any]) -> bool:
        captured = event.get("captured_at")
        return (
            event.get("type") == "accept"
            and isinstance(captured, (int, float))
            and time.time() - captured > self._max_age
        )

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                event = self._queue.popleft()
            if event is None:
                return
            if self._too_old(event):
                self.stale += 1
                self._count("stale")
                log.warning(
                    "hook %s: accept %s of %s not delivered: captured %.1f s ago (hooks.max_accept_age_s %g)",
                    self.name,
                    event.get("event_id"),
                    event.get("subject_id"),
                    time.time() - float(event["captured_at"]),
                    self._max_age,
                )
                self._done(event)
                continue
            t0 = time.perf_counter()
            try:
                self._deliver(event)
                self.delivered += 1
                self._count("delivered")
            except DeliveryAborted:
                log.info(
                    "hook %s stopping: event %s and %d queued not delivered; fetched again at the next start",
                    self.name,
                    event.get("event_id"),
                    len(self._queue),
                )
                return
            except StaleEvent:
                self.stale += 1
                self._count("stale")
                log.warning(
                    "hook %s: accept %s not delivered: older than hooks.max_accept_age_s (%g s) before the "
                    "receiver took it",
                    self.name,
                    event.get("event_id"),
                    self._max_age,
                )
            except Exception as exc:  # noqa: BLE001 - a hook's failure must not stop the others
                self.failed += 1
                self._count("failed")
                log.warning("hook %s failed on event %s: %s", self.name, event.get("event_id"), exc)
            if self._metrics is not None:
                self._metrics.delivery_seconds.labels(hook=self.name).observe(time.perf_counter() - t0)
            self._done(event)

    def close(self, timeout: float = 5.0) -> None:
        stop_running = getattr(self._deliver, "close", None)
        if stop_running is not None:
            stop_running()  # e.g. the exec hook's commands still running
        with self._ready:
            self._queue.append(None)
            self._ready.notify()
        self._thread.join(timeout)


STDERR_KEPT = 4096  # bytes of a command's stderr kept for the log line; the rest is read and dropped


class ExecHook:
    """Run a shell command per event: event JSON on stdin, KIOSK_* variables; killed (with everything it
    started) after `timeout_s`, and when the subscriber stops. Only the last few KB of its stderr are kept,
    whatever it writes."""

    def __init__(self, command: str, timeout_s: float) -> None:
        self.command = command
        self.timeout_s = timeout_s
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, event: dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError(f"subscriber stopping; not started: {self.command}")
        env = dict(os.environ)
        for key in ENV_FIELDS:
            value = event.get(key)
            env[f"KIOSK_{key.upper()}"] = "" if value is None else str(value)
        proc = subprocess.Popen(  # noqa: S602 - the hook is the operator's own command line (hooks), run by a shell
            self.command,
            shell=True,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        with self._lock:
            self._running.add(proc)
        tail = bytearray()
        reader = threading.Thread(target=self._drain, args=(proc, tail), daemon=True)
        reader.start()
        try:
            try:
                if proc.stdin is not None:  # (always: stdin=PIPE)
                    proc.stdin.write((json.dumps(event) + "\n").encode())
                    proc.stdin.close()
            except BrokenPipeError:
                pass  # the command did not read its stdin: its exit status says how it went
            try:
                code = proc.wait(self.timeout_s)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                raise RuntimeError(
                    f"command timed out after {self.timeout_s:g}s and was killed: {self.command}"
                ) from None
        finally:
            reader.join(1.0)
            with self._lock:
                self._running.discard(proc)
        if code != 0:
            said = bytes(tail).decode("utf-8", "replace").strip()[-300:]
            raise RuntimeError(f"command exited {code}: {self.command}: {said}")

    @staticmethod
    def _drain(proc: subprocess.Popen, tail: bytearray) -> None:
        if proc.stderr is None:  # (never: stderr=PIPE)
            return
        while chunk := proc.stderr.read(65536):
            tail.extend(chunk)
            del tail[:-STDERR_KEPT]

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the shell and everything it started
        except ProcessLookupError:
            pass
        proc.wait()

    def close(self) -> None:
        """The subscriber stops: no command of ours outlives it, and none starts any more."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for proc in running:
            self._kill(proc)


def exec_hook(command: str, timeout_s: float) -> ExecHook:
    return ExecHook(command, timeout_s)


def post_once(url: str, body: bytes, headers: dict[str, str], deadline_s: float) -> tuple[int, str]:
    """One POST with a total deadline: the connection is cut when it passes, however slowly the receiver
    trickles its answer (a per-read timeout would let one byte a second hold the worker for ever).
    Redirects are not followed. Returns (status, the first line of the answer)."""
    parts = urllib.parse.urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname or "", parts.port, timeout=deadline_s)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(deadline_s, cut)
    timer.start()
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        said = resp.read(300).decode("utf-8", "replace").strip().splitlines()
        return resp.status, said[0] if said else ""
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set():
            raise TimeoutError(f"no complete answer within {deadline_s:g}s") from None
        raise ConnectionError(str(exc) or exc.__class__.__name__) from None
    finally:
        timer.cancel()
        conn.close()


Post = Callable[[str, bytes, dict[str, str], float], tuple[int, str]]
"""(url, body, headers, deadline_s) -> (HTTP status, the first line of the answer): one POST attempt."""


def webhook_hook(
    url: str, timeout_s: float, retries: int, secret: bytes | None, *, post: Post = post_once
) -> Callable[[dict[str, Any]], None]:
    """POST each event as JSON; with `secret`, each attempt is signed afresh (see kiosk.services.webhook_signing).

    Each attempt has a total deadline of `timeout_s`; a 2xx answer is delivery, a 3xx or 4xx is a failure
    that is not retried (a redirect is never followed: it could send an accept anywhere), 429, 5xx and
    network errors are retried `retries` times with backoff. `post` makes one attempt (a test may wrap it to
    see each request as sent)."""

    def deliver(event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        delay = 0.5
        for attempt in range(retries + 1):
            headers = {"Content-Type": "application/json"}
            if secret is not None:
                headers.update(sign(secret, body, int(time.time())))
            try:
                status, said = post(url, body, headers, timeout_s)
                if 200 <= status < 300:
                    return
                error = f"HTTP {status}" + (f" {said}" if said else "")
                if 300 <= status < 500 and status != 429:
                    raise RuntimeError(f"{url}: {error} (not retried)")
            except (TimeoutError, ConnectionError) as exc:
                error = str(exc)
            if attempt < retries:
                log.info("webhook %s: %s; retry %d in %.1fs", url, error, attempt + 1, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise RuntimeError(f"{url}: {error} after {retries + 1} attempts")

    return deliver


def jsonl_hook(path: Path, keep_days: int = 30) -> Callable[[dict[str, Any]], None]:
    """One JSON object a line, flushed per event; rotated daily and kept `keep_days` (retention.audit_days):
    the lines hold passenger ids and names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rotate_daily(path, keep_days)
    day, handle = today(), open(path, "a", encoding="utf-8")  # open while the hook lives

    def deliver(event: dict[str, Any]) -> None:
        nonlocal day, handle
        if today() != day:
            handle.close()
            rotate_daily(path, keep_days)
            day, handle = today(), open(path, "a", encoding="utf-8")
        handle.write(json.dumps(event) + "\n")
        handle.flush()

    return deliver


def python_hook(spec: str) -> Callable[[dict[str, Any]], None]:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"hooks.python: expected module:function, found {spec!r}")
    try:
        module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the operator's hook spec
        raise ConfigError(f"hooks.python: cannot load {spec!r}: {exc}") from None
    if not callable(func):
        raise ConfigError(f"hooks.python: {spec!r} is not callable")
    return func


def own_gates(cfg: KioskConfig) -> frozenset[str] | None:
    """The gates this host's key (`security.client_key`) may hear by the config, when it is a listener or
    operator key for some gates only (kiosk.services.event_access): the verifier refuses `event.` from such a
    key, so it subscribes to each of its gates. None (subscribe to `event.`, as always): every gate, or a key
    the config gives no gate (the verifier's log then says why it hears nothing)."""
    key = cfg.security.client_key  # on a gate host, its own key; not the verifier's tools key
    entries: list[ListenerKeyConfig | OperatorKeyConfig] = [*cfg.security.listeners, *cfg.security.operators]
    scoped = [e.gates for e in entries if e.key == key]
    if not scoped or any(gates == ["*"] for gates in scoped):
        return None
    return frozenset(g for gates in scoped for g in gates) or None


class Subscriber:
    """Receives events (optionally of one gate) and the verifier's heartbeat; feeds the hooks, each event once.

    At-least-once towards the gate: every event carries its verifier's boot id and a number per gate; the
    subscriber keeps, per gate, the last one it handed on (in `hooks.state_dir/NAME.json`, so a restarted
    subscriber knows too). A gap in the numbers, a heartbeat that counts further than what arrived, a new
    boot id or a start with a saved position makes it fetch the missed events from the verifier's history
    socket; anything already handed on (same event id) is skipped. A verifier restart, however quick, is
    passed on as `verifier_down` then `verifier_up`; events that could not be fetched any more as
    `events_missed`.
    """

    def __init__(
        self,
        cfg: KioskConfig,
        hooks: list[Hook],
        gate: str | None = None,
        metrics_port: int = 0,
        name: str | None = None,
    ) -> None:
        if not hooks:
            raise ConfigError("kiosk subscribe: no hooks (give --jsonl, --exec, --webhook, --mqtt or hooks.python)")
        self.cfg = cfg
        self.hooks = hooks
        self.gate = gate
        self.name = name or (f"gate-{gate}" if gate else "all-gates")
        self.metrics = SubscriberMetrics([h.name for h in hooks])
        for hook in hooks:
            hook.attach(self.metrics)
            hook.on_done = self._hook_done
        self._metrics_server = serve_metrics(self.metrics.registry, metrics_port) if metrics_port else None
        self.transport = Transport(cfg, role="subscriber")
        self.gates = own_gates(cfg) if gate is None else frozenset([gate])  # None: every gate
        # Each gate's decisions and its part of the heartbeat (the event count the gaps are seen against), and
        # the verifier's own heartbeat.
        prefixes = [""] if self.gates is None else sorted(self.gates)
        topics = [EVENT_TOPIC + g for g in prefixes] + [GATE_HEALTH + g for g in prefixes] + [VERIFIER_HEALTH]
        self.sock = self.transport.event_subscriber(topics)
        self.inbox = EventChannel(self.sock, self._bad_message)
        self._stop = threading.Event()
        self.verifier_up: bool | None = None  # None: not heard from yet
        self._last_beat = time.monotonic()
        self.bad = 0
        self.state_path = cfg.hooks.state_dir / f"{self.name}.json"
        # Per gate (boot_id, event_seq): `cursors` is the last event handed to the hooks (gaps are seen
        # against it); `saved`, kept on disk, the last one every hook is done with, so a subscriber killed with
        # events still in its queues fetches them again after a restart (at least once).
        self.cursors: dict[str, tuple[str, int]] = self._load_cursors()
        self.saved = dict(self.cursors)
        self._in_hooks: dict[str, deque[list[Any]]] = {}  # gate -> [event_id, boot, seq, hooks not done yet]
        self._saving = threading.Lock()
        self.boot_id: str | None = None  # the verifier's, from its heartbeat or its events
        self._old_boots: deque[str] = deque(maxlen=16)  # boots replaced since: their late messages are no news
        self.started_at = time.time()  # of a verifier boot after this, every event is ours (none missed joining)
        self._handed: deque[str] = deque(maxlen=10_000)  # recent event ids, to skip one fetched twice
        self._catch_up_due = bool(self.cursors)

    # -- position ------------------------------------------------------------
    def _load_cursors(self) -> dict[str, tuple[str, int]]:
        try:
            data = json.loads(self.state_path.read_text())
            return {str(g): (str(c[0]), int(c[1])) for g, c in data["cursors"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("subscriber state %s unreadable (%s); starting from the next event", self.state_path, exc)
            return {}

    def _save_cursors(self) -> None:
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"cursors": {g: list(c) for g, c in self.saved.items()}}))
            os.replace(tmp, self.state_path)
        except OSError as exc:
            log.warning("cannot save the subscriber position to %s: %s", self.state_path, exc)

    # -- delivery ------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def _dispatch(self, event: dict[str, Any]) -> None:
        self.metrics.events.labels(type=str(event.get("type"))).inc()
        if is_alert_reason(event.get("reason")):  # someone for an agent to see to (kiosk.messaging.reasons)
            log.warning(
                "ALERT gate %s: %s (event %s)", event.get("gate_id"), event.get("reason"), event.get("event_id")
            )
        for hook in self.hooks:
            hook.submit(event)

    def _state_event(self, kind: str, reason: str) -> None:
        event = Event(type=kind, gate_id=self.gate or "*", reason=reason, frames=0)
        log.log(logging.INFO if kind == "verifier_up" else logging.WARNING, "%s: %s", kind, reason)
        self._dispatch(asdict(event))

    def _hand_on(self, event: Event) -> None:
        """Deliver a decision once, and move its gate's position."""
        if self.gates is not None and event.gate_id not in self.gates:  # topic filters are prefixes: A1 matches A10
            return
        if event.event_id in self._handed:
            return
        self._handed.append(event.event_id)
        if event.boot_id is not None and event.event_seq is not None:
            self.cursors[event.gate_id] = (event.boot_id, event.event_seq)
            with self._saving:  # before the hooks can be done with it
                self._in_hooks.setdefault(event.gate_id, deque()).append(
                    [event.event_id, event.boot_id, event.event_seq, len(self.hooks)]
                )
        self._dispatch(asdict(event))

    def _hook_done(self, event: dict[str, Any]) -> None:
        """A hook is done with `event` (delivered, failed, dropped or too old): once all are, in order, the
        saved position moves past it. Called from the hooks' threads."""
        waiting = self._in_hooks.get(str(event.get("gate_id")))
        if waiting is None or event.get("event_seq") is None:
            return
        with self._saving:
            for entry in waiting:
                if entry[0] == event.get("event_id"):
                    entry[3] -= 1
                    break
            moved = False
            while waiting and waiting[0][3] <= 0:
                _, boot, seq, _ = waiting.popleft()
                self.saved[str(event.get("gate_id"))] = (boot, seq)
                moved = True
            if moved:
                self._save_cursors()

    def _on_event(self, event: Event) -> None:
        if self.gates is not None and event.gate_id not in self.gates:
            return
        self._news_of(event.boot_id)
        cur = self.cursors.get(event.gate_id)
        if event.boot_id is not None and event.event_seq is not None and cur is not None:
            if event.boot_id == cur[0] and event.event_seq <= cur[1]:
                return  # already handed on
            continues = (event.boot_id == cur[0] and event.event_seq == cur[1] + 1) or (
                event.boot_id != cur[0] and event.event_seq == 1 and event.boot_id == self.boot_id
            )
            if not continues:
                self._catch_up(f"gap before event {event.event_seq} of gate {event.gate_id}")
        self._hand_on(event)

    def _on_heartbeat(self, beat: StatusHeartbeat) -> None:
        self._last_beat = time.monotonic()
        for hook in self.hooks:
            hook.observe(beat)
        if beat.status == "stopping":  # its last heartbeat: tell the gates now, not 3 s later
            if self.verifier_up is not False:
                self.verifier_up = False
                self.metrics.verifier_up.set(0)
                self._state_event("verifier_down", "the verifier is stopping")
            return
        boot = beat.boot_id
        self._news_of(boot, heartbeat=True)
        booted = beat.booted_at
        if isinstance(beat, GateHeartbeat) and boot is not None:
            for gate, n in beat.event_seq.items():
                cur = self.cursors.get(gate)
                if (
                    cur is None
                    and booted is not None
                    and booted >= self.started_at
                    and (self.gates is None or gate in self.gates)
                ):
                    # A verifier that started after this subscriber decided before it was heard (a slow
                    # join: `kiosk run` starts both at once): those events are this subscriber's too.
                    self.cursors[gate] = cur = (boot, 0)
                if (self.gates is None or gate in self.gates) and cur is not None and cur[0] == boot and n > cur[1]:
                    self._catch_up_due = True  # published, but not arrived here

    def _news_of(self, boot: str | None, heartbeat: bool = False) -> None:
        """A heartbeat or a live event of verifier boot `boot` arrived: the gates hear of a restart (`verifier_down`
        then `verifier_up`), or of a verifier back after silence (`verifier_up`), before anything that process
        decided. A new process's first accept can overtake its first heartbeat (the subscription reconnects after
        a restart and a PUB socket drops what it sends before), so an event says "up" as a heartbeat does."""
        restarted = boot is not None and self.boot_id is not None and boot != self.boot_id
        if restarted and boot in self._old_boots:
            return  # a late message of a process already replaced: no news
        if restarted:
            self._old_boots.append(str(self.boot_id))
            self._catch_up_due = True
            if self.verifier_up:  # restarted inside the heartbeat window: the gate must hear it all the same
                self._state_event("verifier_down", "the verifier restarted (new boot id)")
        if boot is not None:
            self.boot_id = boot
        if restarted or self.verifier_up is not True:
            told = self.verifier_up is not None  # the first news of all is no change
            self.verifier_up = True
            self.metrics.verifier_up.set(1)
            if told:
                self._state_event(
                    "verifier_up",
                    "the verifier is back after a restart"
                    if restarted
                    else "verifier heartbeat is back"
                    if heartbeat
                    else "an event from the verifier arrived",
                )

    def _catch_up(self, why: str) -> None:
        """Fetch and hand on what was missed since each gate's position."""
        self._catch_up_due = False
        cursors = {g: c for g, c in self.cursors.items() if self.gates is None or g in self.gates}
        if not cursors:
            return
        sock = self.transport.history_client()
        try:
            sock.send_json(
                {"v": 1, "cmd": "events", "cursors": {g: list(c) for g, c in cursors.items()}, "gate_id": self.gate}
            )
            reply = sock.recv_json()
        except zmq.ZMQError as exc:
            log.warning("cannot fetch missed events (%s): %s; will try again", why, exc)
            self._catch_up_due = True
            return
        finally:
            sock.close(linger=0)
        if not isinstance(reply, dict) or not reply.get("ok") or not isinstance(reply.get("events"), list):
            log.warning("the verifier refused the history request: %s", str(reply)[:200])
            return
        for data in reply["events"]:
            try:
                self._hand_on(event_from_dict(data))
            except (BadMessage, ValueError, TypeError) as exc:
                self._bad_message(f"history: {exc}")
        log.info("fetched %d missed event(s) (%s)", len(reply["events"]), why)
        self.metrics.fetched.inc(len(reply["events"]))
        if not reply.get("complete", True):
            self._state_event(
                "events_missed",
                "some events could not be fetched any more (verifier history window passed); check the audit log",
            )

    def _bad_message(self, why: str) -> None:
        self.bad += 1
        self.metrics.bad_messages.inc()
        log.warning("dropped a malformed message: %s", why)

    def _watch(self) -> None:
        window = self.cfg.heartbeat.interval_s * self.cfg.heartbeat.misses
        silent = time.monotonic() - self._last_beat
        if silent > window and self.verifier_up is not False:
            self.verifier_up = False
            self.metrics.verifier_up.set(0)
            self._state_event("verifier_down", f"no verifier heartbeat for {silent:.1f}s")

    def run(self) -> int:
        log.info(
            "subscriber %s: %s on %s with %d hook(s): %s",
            self.name,
            f"gate {self.gate}"
            if self.gate
            else "all gates"
            if self.gates is None
            else "gates " + ", ".join(sorted(self.gates)),
            self.cfg.transport.events,
            len(self.hooks),
            ", ".join(h.name for h in self.hooks),
        )
        while not self._stop.is_set():
            message = self.inbox.recv(100)
            if isinstance(message, Heartbeat):  # decode_json made sure it is a JSON object: this never raises
                self._on_heartbeat(heartbeat_from_json(message.body, message.gate_id))
            elif isinstance(message, Event):
                self._on_event(message)
            if self._catch_up_due and self.verifier_up:
                self._catch_up("after a start, a restart or a heartbeat ahead of the events")
            self._watch()
        return 0

    def close(self) -> None:
        for hook in self.hooks:
            hook.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.sock.close()
        self.transport.close()


def build_hooks(
    cfg: KioskConfig,
    *,
    jsonl: list[str],
    execs: list[str],
    webhooks: list[str],
    python: list[str] | None = None,
    mqtt: list[str] | None = None,
    gate: str | None = None,
    name: str | None = None,
) -> list[Hook]:
    """The hooks of one subscriber. An MQTT broker is connected to here, before anything runs: one that refuses
    or cannot be reached stops the subscriber (exit 2)."""
    h = cfg.hooks
    mqtt = mqtt or []
    for url in mqtt:
        problem = mqtt_url_problem(url)
        if problem:
            raise ConfigError(f"--mqtt {url}: {problem}")
    for url in webhooks:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--webhook {url}: expected an http:// or https:// URL")
    secret = None
    if webhooks and h.sign_webhooks:  # before any hook starts: a missing secret stops the subscriber (exit 2)
        secret = load_secret(secret_path(cfg))
    elif webhooks:
        log.warning(
            "webhooks are sent UNSIGNED (hooks.sign_webhooks: false): a receiver cannot tell these POSTs "
            "from forged ones, and an accept opens a door"
        )
    delivers = [(f"jsonl {p}", jsonl_hook(Path(p), cfg.retention.audit_days)) for p in jsonl]
    delivers += [(f"exec {c}", exec_hook(c, h.exec_timeout_s)) for c in execs]
    delivers += [
        (f"webhook {url}", webhook_hook(url, h.webhook_timeout_s, h.webhook_retries, secret)) for url in webhooks
    ]
    delivers += [(f"python {spec}", python_hook(spec)) for spec in (python if python is not None else h.python)]
    who = name or (f"gate-{gate}" if gate else "all-gates")
    delivers += [(f"mqtt {url}", mqtt_hook(cfg, url, gate, who)) for url in mqtt]  # last: connected at once
    return [Hook(name, deliver, h.queue_size, h.max_accept_age_s) for name, deliver in delivers]


def run_subscriber(
    cfg: KioskConfig, gate: str | None, hooks: list[Hook], metrics_port: int = 0, name: str | None = None
) -> int:
    return serve(Subscriber(cfg, hooks, gate, metrics_port, name))
