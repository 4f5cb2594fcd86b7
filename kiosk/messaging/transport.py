"""Every ZeroMQ socket of the system is built here: endpoints, CurveZMQ, high-water marks.

Frames travel PUSH (each capture) -> PULL (the verifier), not PUB/SUB:
PUSH gives back-pressure, so a replay (`realtime: false`) loses no frame,
and a live camera sends with NOBLOCK and drops (and counts) a frame when
the verifier's small queue is full. The verifier then keeps only the
newest frame of each camera among those waiting (latest frame wins).
Events and health go out on one XPUB socket in manual mode (a PUB to any
SUB that connects), so that each subscription is applied only for a key that
may hear what it reaches (kiosk.services.event_access); control is REQ/REP.

With `security.curve: true` (the default) every socket is CurveZMQ: the
binding side (the verifier) is the server, every connecting process a
client whose public key ZAP checks against an allow-list per socket:
`keys_dir/authorized_clients/` for frames and control (cameras, operator
tools), `keys_dir/authorized_subscribers/` (plus the former) for events, so
a gate controller's key can listen but cannot inject frames or claims, and
`keys_dir/authorized_consoles/` alone for the preview frames and crops. The
allow-list folders are read at each connection's handshake (`AllowList`):
a key removed from one is refused from the next connection on, without a
restart. What an allow-listed key may ask on the control socket (claims for
which gates, passenger ids in `status`) is decided by name
(kiosk.services.control_access); `ClientNames` tells a request's key's names
from `authorized_clients/` at each request, so a key deleted there is refused
even on a connection made before. Key files are read here only; the other
modules receive ready sockets.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from kiosk.config import KioskConfig
from kiosk.errors import ConfigError
from kiosk.messaging.messages import MAX_FRAME_BYTES
from kiosk.services.webhook_signing import SECRET_NAME, make_secret

log = logging.getLogger(__name__)

FRAME_HWM = 4  # frames a capture queues to send
# Frames the verifier takes off each capture's connection before it reads them. Deep enough that its I/O thread
# keeps reading (and decrypting) while a step runs: with 4, a 100 ms step left the pipe full, the connection
# stalled behind it, and the newest frame a step could read was a third of a second old (two cameras at 30
# fps, CurveZMQ). The cost is memory while the verifier is busy: at most this many frames per capture.
FRAME_RCVHWM = 16
# The kernel's socket buffers for frames, each way (the kernel doubles it). Left to itself loopback TCP grows them
# to megabytes, which hold several 724 KB frames that no high-water mark counts: frames then reach the verifier a
# third of a second late while it is busy, and the newest-frame-wins rule cannot see them.
FRAME_SOCKET_BUF = 1 << 20
# Largest message part each receiving socket takes; a peer that sends more is disconnected by ZeroMQ
# before the part is read into memory.
FRAME_PART_MAX = MAX_FRAME_BYTES + 64 * 1024
CONTROL_PART_MAX = 64 * 1024
LEASE_PART_MAX = 16 * 1024  # a console's preview lease (kiosk.services.preview)
EVENT_PART_MAX = 1024 * 1024
EVENT_SUB_MAX = 1024  # a subscription (topic prefix) sent to the events socket; a longer one disconnects its peer
HISTORY_REPLY_MAX = 16 * 1024 * 1024
PREVIEW_PART_MAX = 4 * 1024 * 1024  # one preview JPEG (or its JSON header)
AUTHORIZED = "authorized_clients"  # may send frames and control requests (and subscribe)
SUBSCRIBERS = "authorized_subscribers"  # may only subscribe to events and health (gate controllers)
CONSOLES = "authorized_consoles"  # may also watch preview frames and decision crops (operator consoles)
ROLES = ("all", "subscriber", "console")
ROLE_FOLDERS = {"all": (AUTHORIZED, SUBSCRIBERS), "subscriber": (SUBSCRIBERS,), "console": (SUBSCRIBERS, CONSOLES)}


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes | None


def init_keys(keys_dir: Path, *, client_name: str = "client", role: str = "all") -> list[Path]:
    """Create the server key pair, one client pair allow-listed for `role`, and the webhook secret
    (`webhook.secret`); keep existing ones.

    role "all": frames, control and events (cameras, operators' tools);
    "subscriber": events only (a gate controller cannot inject frames or claims);
    "console": events, and the preview frames and decision crops (biometric data) that only consoles see.
    """
    if role not in ROLES:
        raise ConfigError(f"keys: role must be one of {', '.join(ROLES)}, found {role!r}")
    try:
        keys_dir.mkdir(parents=True, exist_ok=True)
        (keys_dir / AUTHORIZED).mkdir(exist_ok=True)
        (keys_dir / SUBSCRIBERS).mkdir(exist_ok=True)
        (keys_dir / CONSOLES).mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"keys: cannot use {keys_dir} as the keys folder: {exc}") from None
    made = []
    for name in ("server", client_name):
        if not (keys_dir / f"{name}.key_secret").exists():
            pub, sec = zmq.auth.create_certificates(str(keys_dir), name)
            Path(sec).chmod(0o600)
            made += [Path(pub), Path(sec)]
    for folder in ROLE_FOLDERS[role]:
        allowed = keys_dir / folder / f"{client_name}.key"
        if not allowed.exists():
            shutil.copy(keys_dir / f"{client_name}.key", allowed)
            made.append(allowed)
    if make_secret(keys_dir / SECRET_NAME):  # the shared secret that signs webhooks
        made.append(keys_dir / SECRET_NAME)
    return made


def _load(path: Path) -> KeyPair:
    if not path.is_file():
        raise ConfigError(
            f"security.keys_dir: key file {path} not found; run `kiosk keys init {path.parent}` to make the keys"
        )
    try:
        pub, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"security.keys_dir: cannot load key {path}: {exc}; run `kiosk keys init DIR` to make the keys"
        ) from None
    return KeyPair(pub, sec)


def client_public_key(keys_dir: Path, name: str) -> str:
    """The z85 public key of the allow-listed client `name` (keys_dir/authorized_clients/NAME.key), as ZAP
    reports it for that client's messages."""
    path = keys_dir / AUTHORIZED / f"{name}.key"
    if not path.is_file():
        raise ConfigError(
            f"cameras[].key: no client key {name!r} in {keys_dir / AUTHORIZED}/ (make it with "
            f"`kiosk keys init {keys_dir} --client {name}`)"
        )
    return _load(path).public.decode("ascii")


class AllowList:
    """ZAP's check of a client's CurveZMQ key: is its public key in one of `folders` right now?

    The folders are read at each handshake (they hold a few keys, and handshakes happen once per
    connection), so a key added to or removed from an allow-list counts for the next connection without
    a restart, and no copy of the key files is made anywhere.
    """

    LOG_EVERY_S = 30.0  # a refused client retries its handshake every few hundred ms: log it now and then

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders
        self._logged: dict[bytes, float] = {}

    def callback(self, domain: str, client_key: bytes) -> bool:
        for folder in self.folders:
            try:
                if client_key in zmq.auth.load_certificates(str(folder)):
                    return True
            except (OSError, ValueError) as exc:  # a folder gone or a broken key file: not this key
                log.warning("allow-list %s unreadable: %s", folder, exc)
        now = time.monotonic()
        if now - self._logged.get(client_key, -self.LOG_EVERY_S) >= self.LOG_EVERY_S:
            if len(self._logged) > 1000:  # bounded whatever keys are tried
                self._logged.clear()
            self._logged[client_key] = now
            log.warning(
                "refused client key %s in ZAP domain %s: not in %s",
                client_key[:8].decode(errors="replace"),
                domain,
                " or ".join(str(f) for f in self.folders),
            )
        return False


class ClientNames:
    """The names (NAME of `folder`/NAME.key) under which a client's public key is allow-listed right now.

    What a key may do on the control socket is given by name (`cameras[].key`, `security.client_key`,
    `security.operators`); ZAP only tells a message's public key. The folder is listed at each lookup, so a key
    file deleted there counts at the next request, even on a connection made before; a file is parsed again
    only when it changed (its inode, size or mtime), so a lookup costs a listing and a stat per key.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._parsed: dict[str, tuple[tuple[int, int, int], str | None]] = {}

    def names_of(self, public_z85: str) -> list[str]:
        """The names holding `public_z85` now, sorted; [] when none does (revoked, or never allow-listed)."""
        names, seen = [], {}
        try:
            entries = [e for e in os.scandir(self.folder) if e.name.endswith(".key") and e.is_file()]
        except OSError as exc:
            log.warning("allow-list %s unreadable: %s", self.folder, exc)
            return []
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:
                continue
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._parsed.get(entry.name)
            if cached is None or cached[0] != stamp:
                try:
                    public = zmq.auth.load_certificate(entry.path)[0].decode("ascii")
                except (OSError, ValueError):  # a broken key file names nobody
                    public = None
                cached = self._parsed[entry.name] = (stamp, public)
            seen[entry.name] = cached
            if cached[1] == public_z85:
                names.append(entry.name[: -len(".key")])
        self._parsed = seen  # files gone are forgotten
        return sorted(names)


_MONITOR_IDS = itertools.count()


class Transport:
    """Builds the sockets of one process from the config."""

    def __init__(self, cfg: KioskConfig, *, role: str, client_key: str | None = None) -> None:
        self.cfg = cfg
        self.role = role
        self.ctx = zmq.Context()
        self.curve = cfg.security.curve
        self.keys_dir = cfg.security.keys_dir
        self._auth: ThreadAuthenticator | None = None
        self._server: KeyPair | None = None
        self._client: KeyPair | None = None
        self._client_key = client_key or cfg.security.client_key
        self._monitors: list[tuple[zmq.Socket[bytes], threading.Thread]] = []
        self._closing = threading.Event()
        if not self.curve:
            log.warning(
                "%s: CurveZMQ is OFF (security.curve: false): frames and decisions travel unencrypted "
                "and any process can connect",
                role,
            )
        if not cfg.pad.enabled:
            log.warning(
                "%s: liveness is OFF (pad.enabled: false): a printed photo or a phone screen showing an "
                "enrolled passenger is accepted like the passenger",
                role,
            )

    # -- keys ----------------------------------------------------------------
    def _server_keys(self) -> KeyPair:
        if self._server is None:
            self._server = _load(self.server_key_file)
        return self._server

    @property
    def server_key_file(self) -> Path:
        """The server's secret key file (what `_as_server` loads)."""
        return self.keys_dir / "server.key_secret"

    def server_public_key(self) -> bytes | None:
        """The server public key this process's server sockets use (None: none built yet, or CurveZMQ off)."""
        return self._server.public if self._server is not None else None

    def _client_keys(self) -> tuple[KeyPair, bytes]:
        if self._client is None:
            self._client = _load(self.keys_dir / f"{self._client_key}.key_secret")
        server = _load(self.keys_dir / "server.key")
        return self._client, server.public

    def _as_server(self, sock: zmq.Socket[bytes], domain: str) -> None:
        """CurveZMQ server; `domain` picks the allow-list: "ingest" (frames, control), "events" or "preview"."""
        if not self.curve:
            return
        if self._auth is None:
            for folder in (AUTHORIZED, SUBSCRIBERS):
                if not (self.keys_dir / folder).is_dir():
                    raise ConfigError(
                        f"security.keys_dir: {self.keys_dir / folder} is missing; run `kiosk keys init {self.keys_dir}`"
                    )
            self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("kiosk.zap"))
            self._auth.start()
            self._auth.configure_curve_callback("ingest", AllowList([self.keys_dir / AUTHORIZED]))
            # Events: gate controllers, and every fully authorised client too.
            self._auth.configure_curve_callback(
                "events", AllowList([self.keys_dir / SUBSCRIBERS, self.keys_dir / AUTHORIZED])
            )
            # Preview frames and decision crops (biometric data): operator consoles only. (A folder made before
            # consoles existed is added empty.)
            (self.keys_dir / CONSOLES).mkdir(exist_ok=True)
            self._auth.configure_curve_callback("preview", AllowList([self.keys_dir / CONSOLES]))
        sock.zap_domain = domain.encode()
        keys = self._server_keys()
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True

    def _as_client(self, sock: zmq.Socket[bytes], what: str) -> None:
        if not self.curve:
            return
        keys, server_public = self._client_keys()
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = server_public
        self._watch_handshake(sock, what)

    def _watch_handshake(self, sock: zmq.Socket[bytes], what: str) -> None:
        """Log when the server refuses this client's key: ZeroMQ itself just retries in silence."""
        failed = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        # A name of its own: pyzmq's default is named after the socket's file descriptor, which a socket opened
        # just after another closed can reuse while libzmq still holds the old name ("Address already in use",
        # seen with the suite run twice at once).
        monitor = sock.get_monitor_socket(
            failed | zmq.EVENT_HANDSHAKE_SUCCEEDED, addr=f"inproc://kiosk-monitor-{next(_MONITOR_IDS)}"
        )
        endpoint = getattr(self.cfg.transport, what)

        def watch() -> None:
            last = 0.0
            while not self._closing.is_set() and not sock.closed:
                try:
                    if not monitor.poll(200):
                        continue
                    event = recv_monitor_message(monitor)
                except zmq.ZMQError:
                    break
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:  # the watched socket was closed
                    break
                if event["event"] & failed and time.monotonic() - last > 30:
                    last = time.monotonic()
                    log.error(
                        "%s: %s refused this machine's key %r (CurveZMQ handshake failed); it must be in the "
                        "verifier's %s/",
                        self.role,
                        endpoint,
                        self._client_key,
                        AUTHORIZED,
                    )
                elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    log.debug("%s: CurveZMQ handshake with %s succeeded", self.role, endpoint)
            monitor.close(linger=0)

        thread = threading.Thread(target=watch, name=f"zmq-monitor {what}", daemon=True)
        thread.start()
        self._monitors = [(s, t) for s, t in self._monitors if t.is_alive()] + [(sock, thread)]

    def _socket(self, kind: int, **opts: Any) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        for name, value in opts.items():
            sock.setsockopt(getattr(zmq, name), value)
        return sock

    def _attach(self, sock: zmq.Socket[bytes], key: str, *, bind: bool) -> zmq.Socket[bytes]:
        """Bind or connect `sock` to `transport.<key>`; a bad or busy endpoint is a ConfigError."""
        endpoint = getattr(self.cfg.transport, key)
        try:
            sock.bind(endpoint) if bind else sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise ConfigError(
                f"transport.{key}: cannot {'bind' if bind else 'connect to'} {endpoint!r}: {exc}"
            ) from None
        return sock

    # -- sockets -------------------------------------------------------------
    def frame_receiver(self) -> zmq.Socket[bytes]:
        sock = self._socket(zmq.PULL, RCVHWM=FRAME_RCVHWM, MAXMSGSIZE=FRAME_PART_MAX, RCVBUF=FRAME_SOCKET_BUF)
        self._as_server(sock, "ingest")
        return self._attach(sock, "frames", bind=True)

    def frame_sender(self) -> zmq.Socket[bytes]:
        sock = self._socket(zmq.PUSH, SNDHWM=FRAME_HWM, IMMEDIATE=1, SNDBUF=FRAME_SOCKET_BUF)
        self._as_client(sock, "frames")
        return self._attach(sock, "frames", bind=False)

    def event_publisher(self, bind_tries: int = 1) -> zmq.Socket[bytes]:
        """XPUB in manual mode: a peer's subscription is applied only when the verifier applies it for that
        peer's key (kiosk.services.event_access); to a connecting SUB it is a PUB. Incoming messages are
        subscriptions only: a small part limit and queue. `bind_tries` (10 ms apart): a socket bound again at
        once after the old one closed may find the port still held for a moment."""
        for attempt in range(bind_tries):
            sock = self._socket(zmq.XPUB, SNDHWM=1000, RCVHWM=1000, MAXMSGSIZE=EVENT_SUB_MAX)
            sock.setsockopt(zmq.XPUB_MANUAL, 1)
            self._as_server(sock, "events")
            if attempt == bind_tries - 1:
                return self._attach(sock, "events", bind=True)
            try:
                sock.bind(self.cfg.transport.events)
                return sock
            except zmq.ZMQError:
                sock.close()
                time.sleep(0.01)
        raise AssertionError("unreachable")

    def event_names(self) -> tuple[ClientNames, ClientNames, ClientNames] | None:
        """Who subscribed on the events socket, by name in authorized_clients/, authorized_subscribers/ and
        authorized_consoles/ (see ClientNames); None with CurveZMQ off."""
        if not self.curve:
            return None
        return (
            ClientNames(self.keys_dir / AUTHORIZED),
            ClientNames(self.keys_dir / SUBSCRIBERS),
            ClientNames(self.keys_dir / CONSOLES),
        )

    def event_subscriber(self, topics: list[str]) -> zmq.Socket[bytes]:
        sock = self._socket(zmq.SUB, RCVHWM=10000, MAXMSGSIZE=EVENT_PART_MAX)
        self._as_client(sock, "events")
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        return self._attach(sock, "events", bind=False)

    def preview_publisher(self) -> zmq.Socket[bytes]:
        """ROUTER: each console connection says which gates it watches (a lease it renews), with its key known
        from ZAP on every message, and gets the frames of those gates addressed to it alone
        (kiosk.services.preview). Small send queue per connection: a slow viewer drops frames."""
        sock = self._socket(zmq.ROUTER, SNDHWM=8, RCVHWM=10, MAXMSGSIZE=LEASE_PART_MAX)  # little held per peer
        self._as_server(sock, "preview")
        return self._attach(sock, "preview", bind=True)

    def preview_subscriber(self, sndhwm: int = 4) -> zmq.Socket[bytes]:
        """DEALER: sends its watch lease (kiosk.services.preview.watch_request), receives [topic, header, JPEG].
        `sndhwm`: the leases it queues to send (0: no limit, what a test flooding the verifier asks for)."""
        sock = self._socket(zmq.DEALER, RCVHWM=16, SNDHWM=sndhwm, MAXMSGSIZE=PREVIEW_PART_MAX)
        self._as_client(sock, "preview")
        return self._attach(sock, "preview", bind=False)

    def control_server(self) -> zmq.Socket[bytes]:
        sock = self._socket(zmq.REP, MAXMSGSIZE=CONTROL_PART_MAX)
        self._as_server(sock, "ingest")
        return self._attach(sock, "control", bind=True)

    def control_names(self) -> ClientNames | None:
        """Who sent a control request, by name (see ClientNames); None with CurveZMQ off (no sender is known)."""
        return ClientNames(self.keys_dir / AUTHORIZED) if self.curve else None

    def history_server(self) -> zmq.Socket[bytes]:
        """Recent events on request, for subscribers: the events' allow-list (gates may ask)."""
        sock = self._socket(zmq.REP, MAXMSGSIZE=CONTROL_PART_MAX)
        self._as_server(sock, "events")
        return self._attach(sock, "history", bind=True)

    def history_client(self, timeout_ms: int = 3000) -> zmq.Socket[bytes]:
        sock = self._socket(zmq.REQ, RCVTIMEO=timeout_ms, SNDTIMEO=timeout_ms, MAXMSGSIZE=HISTORY_REPLY_MAX)
        self._as_client(sock, "history")
        return self._attach(sock, "history", bind=False)

    def control_client(self, timeout_ms: int = 3000) -> zmq.Socket[bytes]:
        sock = self._socket(zmq.REQ, RCVTIMEO=timeout_ms, SNDTIMEO=timeout_ms)
        self._as_client(sock, "control")
        return self._attach(sock, "control", bind=False)

    def close(self) -> None:
        # Stop the handshake monitors first: their sockets must not be destroyed under a blocked poll.
        self._closing.set()
        for _, thread in self._monitors:
            thread.join(2.0)
        self._monitors.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.destroy(linger=0)


_CHOSEN: set[int] = set()  # ports this process has handed out (never twice)


def _ephemeral_low() -> int:
    """The bottom of the kernel's ephemeral port range (Linux; 32768 where unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on loopback right now (for demos, benchmarks and tests), chosen below the ephemeral
    range: a port from that range (what binding port 0 gives) can be taken by any process's outgoing
    connection between this choice and the bind that uses it (a run failing with 'Address already in use')."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(15000, low) if low > 16000 else rng.randrange(1024, 65536)
        if port in _CHOSEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _CHOSEN.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_endpoints() -> dict[str, str]:
    """`transport:` endpoints on free loopback ports, for a self-contained run."""
    return {key: f"tcp://127.0.0.1:{free_port()}" for key in ("frames", "events", "control", "history", "preview")}


def nothing_listens(endpoint: str, timeout_s: float = 0.5) -> bool:
    """True when a tcp:// endpoint refuses connections outright (no verifier running there), so a tool can
    say so at once instead of waiting for a reply that cannot come. Other transports: False (unknown)."""
    if not endpoint.startswith("tcp://"):
        return False
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    host = host.strip("[]")
    if host == "*":
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return False
    except ConnectionRefusedError:
        return True
    except (OSError, ValueError):
        return False  # unreachable or slow: let the request itself time out and say more


def ask_verifier(
    cfg: KioskConfig, request: dict[str, Any], *, role: str, timeout_ms: int = 3000
) -> dict[str, Any] | None:
    """One control request with a transport of its own; None when the verifier does not answer."""
    transport = Transport(cfg, role=role)
    try:
        return control_request(transport, request, timeout_ms)
    finally:
        transport.close()


def control_request(transport: Transport, request: dict[str, Any], timeout_ms: int = 3000) -> dict[str, Any] | None:
    """One request on a fresh REQ socket; None when the verifier does not answer in time."""
    sock = transport.control_client(timeout_ms)
    try:
        sock.send_json({"v": 1, **request})
        return cast("dict[str, Any]", sock.recv_json())  # the verifier answers with a JSON object
    except zmq.Again:
        return None
    finally:
        sock.close(linger=0)
