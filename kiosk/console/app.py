"""`kiosk console`: the operator console, a Starlette app served by uvicorn.

Pages (plain HTML/CSS/JS from kiosk/console/static, nothing fetched from elsewhere): `/` every gate at a
glance and the decision feed; `/gate/{gate}` one gate's live view (frames with face boxes, track states) and its
decisions with the face crop each was made on. JSON for other tools: `/api/status`, `/api/events`,
`/api/crops/{event_id}`; `/api/gates/{gate}/live` is the live view's server-sent event stream.

Before anything else, a request must name this console in its `Host` header (`console.allowed_hosts`, by default
the listen address): a page whose own name is re-pointed at the console's address (DNS rebinding) is answered 421
before its session, its Origin or any password is looked at. Then every path but the login page needs a
session: a page without one is redirected to `/login`, anything else answers 401. The session cookie is HttpOnly
and SameSite=Strict (Secure under TLS). Responses are never cached. Who may try a password, and how often, is
kiosk.console.throttle's; kiosk.console.server closes a request that is not sent whole in time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiosk.config import KioskConfig, is_loopback
from kiosk.console.auth import PasswordCheck, Sessions
from kiosk.console.server import SparseLog, timed_protocol
from kiosk.console.state import ConsoleState
from kiosk.console.throttle import DEVICE_COOKIE, DeviceCookies, Refusal, Throttle
from kiosk.errors import ConfigError
from kiosk.messaging.transport import init_keys
from kiosk.store.sealing import key_source

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "kiosk_session"
PUBLIC = {("GET", "/login"), ("POST", "/login")}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}  # every other method changes state: it must come from our own pages
# Referrer-Policy same-origin, not no-referrer: under no-referrer a browser sends `Origin: null` with the login
# form's own POST, and the Origin check could not tell it from a forgery.
HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    ),
]
STATIC_FILES = {"console.css": "text/css", "console.js": "text/javascript"}
FLIGHTS_EVERY_S = 2.0


class Guard:
    """ASGI middleware: the Host check first, then the Origin check and the session check in front of every path
    but the login page, and the headers every response carries."""

    def __init__(self, app: ASGIApp, sessions: Sessions, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.sessions = sessions
        self.allowed_hosts = allowed_hosts
        self._foreign = SparseLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = (_header(scope, b"host") or "").lower()
        if host not in self.allowed_hosts:  # first: nothing of a rebound page's request is looked at
            self._foreign.warning(
                "console: %s %s refused: Host %r is not in console.allowed_hosts",
                scope.get("method", "GET"),
                scope["path"],
                host[:100],
            )
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await Response(
                    "misdirected request: unknown Host\n",
                    status_code=421,
                    media_type="text/plain",
                    headers={"connection": "close"},
                )(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + HEADERS
            await send(message)

        if scope["method"] not in SAFE_METHODS and not same_origin(scope):
            log.warning(
                "console: %s %s refused: cross-site request (Origin %s)",
                scope["method"],
                scope["path"],
                _header(scope, b"origin") or "-",
            )
            await JSONResponse({"error": "cross-site request refused"}, status_code=403)(
                scope, receive, send_with_headers
            )
            return
        if (scope["method"], scope["path"]) not in PUBLIC and not self.sessions.valid(session_of(scope)):
            if scope["method"] == "GET" and not scope["path"].startswith(("/api/", "/static/")):
                response: Response = RedirectResponse("/login", status_code=303)
            else:
                response = JSONResponse({"error": "login required"}, status_code=401)
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def same_origin(scope: Scope) -> bool:
    """A state-changing request comes from the console's own pages: a browser's `Origin` (sent with every POST)
    names this host, and `Sec-Fetch-Site` (where sent) is same-origin; a request with neither (curl, a script)
    is no cross-site forgery. `Origin: null` (a sandboxed frame, a redirect) is refused."""
    origin = _header(scope, b"origin")
    site = _header(scope, b"sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    if origin is None:
        return True
    host = _header(scope, b"host")
    scheme = "https" if scope.get("scheme") == "https" else "http"
    return host is not None and origin.lower() == f"{scheme}://{host}".lower()


def session_of(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookie: SimpleCookie = SimpleCookie()
            try:
                cookie.load(value.decode("latin-1"))
            except Exception:  # noqa: BLE001 - a malformed cookie header is no session
                return None
            if COOKIE in cookie:
                return cookie[COOKIE].value
    return None


def build_app(
    state: ConsoleState,
    check: PasswordCheck,
    sessions: Sessions,
    *,
    secure: bool,
    preview_fps: float,
    allowed_hosts: frozenset[str],
    throttle: Throttle | None = None,
) -> ASGIApp:
    """The console's routes behind the Guard: the login handlers and the views, each a small class that holds
    what its handlers share."""
    login = LoginRoutes(check, sessions, throttle or Throttle(), secure=secure)
    views = ConsoleViews(state, preview_fps)
    routes = [
        Route("/login", login.get_login, methods=["GET"]),
        Route("/login", login.post_login, methods=["POST"]),
        Route("/logout", login.post_logout, methods=["POST"]),
        Route("/", overview, methods=["GET"]),
        Route("/gate/{gate}", views.gate_page, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/api/status", views.api_status, methods=["GET"]),
        Route("/api/events", views.api_events, methods=["GET"]),
        Route("/api/crops/{event_id}", views.api_crop, methods=["GET"]),
        Route("/api/gates/{gate}/live", views.api_live, methods=["GET"]),
    ]
    return Guard(Starlette(routes=routes), sessions, allowed_hosts)


class LoginRoutes:
    """The login page, the password check behind its throttle, and logout: the handlers that share the sessions,
    the throttle and the device cookies."""

    def __init__(self, check: PasswordCheck, sessions: Sessions, throttle: Throttle, *, secure: bool) -> None:
        self.page = (STATIC / "login.html").read_text()
        self.check = check
        self.sessions = sessions
        self.throttle = throttle
        self.devices = DeviceCookies(check.device_key())
        self.secure = secure

    def form(self, error: str = "", status: int = 200) -> Response:
        """The login page, with an error line when there is one."""
        note = f'<p class="error" id="login-error">{error}</p>' if error else ""
        return Response(self.page.replace("<!--error-->", note), status_code=status, media_type="text/html")

    async def get_login(self, request: Request) -> Response:
        return self.form()

    async def post_login(self, request: Request) -> Response:
        """One try of the password: refused unchecked while the throttle says wait, slowed when wrong."""
        # The TCP peer (uvicorn takes X-Forwarded-For only from console.trusted_proxies; none by default).
        client = request.client.host if request.client else "?"
        password = await _form_password(request)
        if password is None:
            return Response(status_code=400)
        device = self.devices.device_of(request.cookies.get(DEVICE_COOKIE))
        who = f"{client} (a browser that has logged in before)" if device else client
        slot = self.throttle.begin(client, device)  # taken before the check: concurrent tries cannot all get one
        if isinstance(slot, Refusal):
            wait = max(1, int(slot.retry_after_s + 0.999))
            log.warning("console: login from %s refused unchecked: %s; next check in %d s", who, slot.reason, wait)
            response = self.form(f"Too many wrong passwords; try again in {wait} s.", 429)
            response.headers["retry-after"] = str(wait)
            return response
        ok = await asyncio.get_running_loop().run_in_executor(None, self.check.matches, password)
        if not ok:
            log.warning("console: wrong password from %s", who)
            await asyncio.sleep(0.5)
            return self.form("Wrong password.", 401)
        self.throttle.succeeded(slot)
        log.info("console: login from %s", who)
        return self._logged_in()

    def _logged_in(self) -> Response:
        """To the overview, with a new session and this browser's device cookie."""
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE, self.sessions.create(), httponly=True, samesite="strict", secure=self.secure, path="/"
        )
        # This browser's own login budget from now on (kiosk.console.throttle); kept on logout.
        response.set_cookie(
            DEVICE_COOKIE,
            self.devices.mint(),
            max_age=int(self.devices.ttl_s),
            httponly=True,
            samesite="strict",
            secure=self.secure,
            path="/login",
        )
        return response

    async def post_logout(self, request: Request) -> Response:
        self.sessions.drop(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response


async def _form_password(request: Request) -> str | None:
    """The password the login form sent ("" for a malformed form: a wrong password); None when the client went
    away (or was cut off by the request deadline) before its body was in, which is no try at all."""
    try:
        form = await request.form(max_files=0, max_fields=4, max_part_size=4096)
        return str(form.get("password") or "")
    except ClientDisconnect:
        return None
    except Exception:  # noqa: BLE001 - a malformed form is a wrong password
        return ""


async def overview(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC_FILES:
        return JSONResponse({"error": "not found"}, status_code=404)
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name])


class ConsoleViews:
    """The gate page and the JSON API: the handlers that read the console's state."""

    def __init__(self, state: ConsoleState, preview_fps: float) -> None:
        self.state = state
        self.preview_fps = preview_fps

    async def gate_page(self, request: Request) -> Response:
        if request.path_params["gate"] not in self.state.gates:
            return JSONResponse({"error": "no such gate"}, status_code=404)
        return FileResponse(STATIC / "gate.html", media_type="text/html")

    async def api_status(self, request: Request) -> Response:
        return JSONResponse(self.state.status())

    async def api_events(self, request: Request) -> Response:
        gate = request.query_params.get("gate")
        try:
            limit = max(1, min(200, int(request.query_params.get("limit", "50"))))
        except ValueError:
            return JSONResponse({"error": "limit must be a number"}, status_code=400)
        return JSONResponse({"events": self.state.events(gate, limit)})

    async def api_crop(self, request: Request) -> Response:
        jpeg = self.state.crop(request.path_params["event_id"])
        if jpeg is None:
            return JSONResponse({"error": "no crop kept for this decision"}, status_code=404)
        return Response(jpeg, media_type="image/jpeg")

    async def api_live(self, request: Request) -> Response:
        gate = request.path_params["gate"]
        if gate not in self.state.gates:
            return JSONResponse({"error": "no such gate"}, status_code=404)
        return StreamingResponse(self._frames(gate), media_type="text/event-stream")

    async def _frames(self, gate: str) -> AsyncIterator[str]:
        """The live view's server-sent events: each new preview frame of the gate, and a comment now and then
        while there is none; the gate is watched (previews asked of the verifier) only while a stream is open."""
        state = self.state
        state.watch(gate)
        seen, quiet_since = 0, time.monotonic()
        try:
            yield "retry: 2000\n\n"
            while True:
                found = state.preview(gate)
                if found is not None and found[0] != seen:
                    seen, header, jpeg = found
                    body = json.dumps({"header": header, "jpeg": base64.b64encode(jpeg).decode()})
                    yield f"event: frame\ndata: {body}\n\n"
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 10:
                    yield ": waiting for frames\n\n"  # keeps proxies from closing a quiet stream
                    quiet_since = time.monotonic()
                await asyncio.sleep(min(0.05, 0.5 / self.preview_fps))
        finally:
            state.unwatch(gate)


def _listen(cfg: KioskConfig) -> tuple[str, int, bool]:
    """Host, port and whether TLS is on; a non-loopback address without TLS is refused unless overridden."""
    host, port = cfg.console.host_port()  # (checked when the config was loaded)
    tls = cfg.console.tls_cert is not None
    if not is_loopback(host) and not tls and not cfg.console.insecure_http:
        raise ConfigError(
            f"console.listen: {cfg.console.listen} is not a loopback address and the console has no TLS: "
            "frames are biometric data and the password would cross the network in clear. Set "
            "console.tls_cert and console.tls_key, or (behind a TLS-terminating proxy) "
            "console.insecure_http: true"
        )
    for name in ("tls_cert", "tls_key"):
        path = getattr(cfg.console, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"console.{name}: {path}: no such file")
    if cfg.console.tls_cert is not None and cfg.console.tls_key is not None:
        cert, key = cfg.console.tls_cert, cfg.console.tls_key
        try:  # a certificate and key that do not load: one line now, not a traceback from the server later
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"console.tls_cert/tls_key: {cert} and {key} are not a usable PEM certificate and key: {exc}"
            ) from None
    return host, port, tls


def _bind(host: str, port: int, listen: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"console.listen: cannot listen on {listen}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _follow_flights(cfg: KioskConfig, state: ConsoleState, stop: threading.Event) -> None:
    """Boarded and remaining counts of the flights the gates board, from the store, if this host can reach it
    (else the overview shows the gallery size only)."""
    from kiosk.store.flights import open_store

    store = gallery = None
    warned = False
    while not stop.wait(FLIGHTS_EVERY_S):
        flights = state.boarding_flights()
        if not flights:
            continue
        try:
            if store is None:
                gallery, store = open_store(cfg)
            counts = {}
            for flight_id in flights:
                flight = store.flight(flight_id)
                if flight is not None:
                    counts[flight_id] = {"passengers": flight.passengers, "boarded": flight.boarded}
            with state.lock:
                state.flights = counts
            warned = False
        except Exception as exc:  # noqa: BLE001 - the counts are a nicety; the console goes on without them
            if not warned:
                log.warning("console: boarding counts unavailable (%s); showing gates without them", exc)
                warned = True
            if gallery is not None:
                gallery.close()
            gallery = store = None
    if gallery is not None:
        gallery.close()


def run_console(cfg: KioskConfig) -> int:
    """Serve the console until SIGINT/SIGTERM."""
    import uvicorn

    from kiosk.console.feed import ConsoleFeed

    if cfg.console.password_file is None:
        raise ConfigError(
            "console.password_file: the console needs a password file (one line: the password, or "
            "a hash from `kiosk console --hash-password`)"
        )
    check = PasswordCheck.from_file(cfg.console.password_file)
    host, port, tls = _listen(cfg)
    state = _console_state(cfg)
    _make_console_key(cfg)
    feed = ConsoleFeed(cfg, state)
    sock = _bind(host, port, cfg.console.listen)
    stop = threading.Event()
    allowed_hosts = cfg.console.allowed_host_names()
    app = build_app(
        state, check, Sessions(), secure=tls, preview_fps=cfg.console.preview_fps, allowed_hosts=allowed_hosts
    )
    server = uvicorn.Server(_server_config(cfg, app, tls))
    feed.start()
    threading.Thread(target=_follow_flights, args=(cfg, state, stop), name="console-flights", daemon=True).start()
    log.info(
        "console on %s://%s (%d gate(s)); log in with the password in %s",
        "https" if tls else "http",
        cfg.console.listen,
        len(state.gates),
        cfg.console.password_file,
    )
    log.info("console answers Host %s (console.allowed_hosts)", ", ".join(sorted(allowed_hosts)))
    started = time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it stopped on: end with 0 here
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        feed.stop()
        sock.close()
    log.info("console stopped after %.0f s", time.monotonic() - started)
    return 0


def _console_state(cfg: KioskConfig) -> ConsoleState:
    """What the console shows, gate by gate (each gate's cameras); crops kept on disk are sealed with the
    store's key, so a console that cannot read it does not start."""
    gates: dict[str, list[str]] = {}
    for cam in cfg.cameras:
        gates.setdefault(cam.gate, []).append(cam.id)
    hb = cfg.heartbeat
    codec = key_source(cfg).load() if cfg.console.crops_dir else None  # crops on disk: sealed, or no start
    return ConsoleState(
        gates,
        crops=cfg.console.crops,
        heartbeat_timeout_s=hb.interval_s * hb.misses,
        crops_dir=cfg.console.crops_dir,
        codec=codec,
    )


def _make_console_key(cfg: KioskConfig) -> None:
    """On the verifier's host (its server key is there), make the console's own CurveZMQ key the first time."""
    keys = cfg.security.keys_dir
    if (
        cfg.security.curve
        and (keys / "server.key_secret").is_file()
        and not (keys / f"{cfg.console.key}.key_secret").exists()
    ):
        init_keys(keys, client_name=cfg.console.key, role="console")
        log.info(
            "made the console's CurveZMQ key %s (role console: events and previews, no frames or claims)",
            keys / f"{cfg.console.key}.key_secret",
        )


def _server_config(cfg: KioskConfig, app: ASGIApp, tls: bool) -> uvicorn.Config:
    """uvicorn's settings: quiet, TLS when configured, forwarded headers believed only from trusted proxies."""
    import uvicorn

    proxies = cfg.console.trusted_proxies  # X-Forwarded-For/-Proto believed only from these
    # http: uvicorn's h11 protocol with a deadline for each request (kiosk.console.server); no WebSocket (the
    # console has none, and an upgraded connection would leave that deadline's reach).
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
        http=timed_protocol(cfg.console.request_timeout_s),
        ws="none",
        proxy_headers=bool(proxies),
        forwarded_allow_ips=",".join(proxies) if proxies else "",
        ssl_certfile=str(cfg.console.tls_cert) if tls and cfg.console.tls_cert else None,
        ssl_keyfile=str(cfg.console.tls_key) if tls and cfg.console.tls_key else None,
    )
