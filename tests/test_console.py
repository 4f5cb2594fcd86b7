"""The operator console: its login, the verifier's previews (sent only while watched, at the console's rate),
and the whole page in a real headless Chromium against `kiosk run` on a video the test makes."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import cv2
import pytest
import zmq

from kiosk.config import load_config
from kiosk.console.auth import PasswordCheck, Sessions, hash_password
from kiosk.console.state import ConsoleState
from kiosk.console.throttle import DeviceCookies, Refusal, Throttle, Ticket, peer_budget
from kiosk.errors import ConfigError
from kiosk.messaging.transport import Transport, free_port, init_keys
from kiosk.services.preview import preview_topic, watch_request
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.pipeline_helpers import (
    kiosk,
    live_gate,
    make_video,
    people,
    stop,
    write_config,
)
from tests.waiting import wait_until

PASSWORD = "correct horse battery"


class _Clock:
    """A clock a test moves by hand: an expiry or a rate over time needs no real wait."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_password_file_plain_or_hashed(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text(PASSWORD + "\n")
    check = PasswordCheck.from_file(plain)
    assert check.matches(PASSWORD) and not check.matches(PASSWORD + "x") and not check.matches("")
    hashed = tmp_path / "hashed"
    hashed.write_text(hash_password(PASSWORD, n=2**10) + "\n")
    assert PasswordCheck.from_file(hashed).matches(PASSWORD)
    for text, why in (("", "is empty"), ("short", "shorter than 8"), ("scrypt$1$2$3$!!$!!", "scrypt\\$N\\$r")):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=why):
            PasswordCheck.from_file(bad)


def test_a_session_is_valid_until_its_ttl_and_never_made_up():
    clock = _Clock()
    sessions = Sessions(ttl_s=0.2, clock=clock)
    token = sessions.create()
    assert sessions.valid(token) and not sessions.valid("made-up") and not sessions.valid(None)
    clock.now += 0.25
    assert not sessions.valid(token)  # expired


def test_a_flooded_peer_backs_off_exponentially_and_the_pool_caps_everyone_without_a_device():
    clock = _Clock()
    throttle = Throttle(clock)
    for _ in range(5):
        assert isinstance(throttle.begin("10.0.0.9", None), Ticket)
    refused = throttle.begin("10.0.0.9", None)  # the sixth: refused unchecked, for 30 s
    assert isinstance(refused, Refusal) and refused.retry_after_s == 30 and "this address" in refused.reason
    assert throttle.refusal("10.0.0.8", None) is None  # another address: its own budget
    waits = []
    for _ in range(7):  # each further wrong password doubles the wait, up to 15 minutes
        clock.now += throttle.refusal("10.0.0.9", None).retry_after_s
        assert isinstance(throttle.begin("10.0.0.9", None), Ticket)
        waits.append(throttle.refusal("10.0.0.9", None).retry_after_s)
    assert waits == [60, 120, 240, 480, 900, 900, 900], waits
    assert throttle.peer_failures() == {"peer:10.0.0.9": 12}
    assert peer_budget("2001:db8::1") == peer_budget("2001:db8::ffff:2") != peer_budget("2001:db8:0:1::1")
    clock.now += 3600  # a quiet hour: forgotten
    slot = throttle.begin("10.0.0.9", None)
    throttle.succeeded(slot)  # the right password: no failure left behind
    assert throttle.peer_failures()["peer:10.0.0.9"] == 0 and throttle.pooled_failures() == 0
    for i in range(30):  # every address together, without a device cookie: 30 wrong passwords a minute
        assert isinstance(throttle.begin(f"10.1.{i // 200}.{i % 200}", None), Ticket), i
    pooled = throttle.begin("10.9.9.9", None)
    assert isinstance(pooled, Refusal) and "every address" in pooled.reason
    # ...and none of it touches a device: its own 5, then its own backoff; a right password clears it
    for _ in range(5):
        assert isinstance(throttle.begin("10.9.9.9", "operator"), Ticket)
    assert isinstance(throttle.begin("10.9.9.9", "operator"), Refusal)
    assert throttle.refusal("10.9.9.9", "another browser") is None
    clock.now += 30
    throttle.succeeded(throttle.begin("127.0.0.1", "operator"))
    assert throttle.device_failures()["device:operator"] == 0


def test_device_cookies_are_signed_expire_and_die_with_the_password(tmp_path):
    clock = _Clock()
    line = hash_password(PASSWORD, n=2**10)
    check = PasswordCheck(line)
    devices = DeviceCookies(check.device_key(), ttl_s=60, clock=clock)
    cookie = devices.mint()
    device = devices.device_of(cookie)
    assert device and devices.device_of(cookie) == device and devices.device_of(devices.mint()) != device
    body, _, mac = cookie.rpartition(".")
    ident, _, expires = body.partition(".")
    for forged in (None, "", "x", f"{body}.{mac[:-2]}AA", f"{ident}.{int(expires) + 999}.{mac}", cookie + "x"):
        assert devices.device_of(forged) is None, forged
    restarted = PasswordCheck(line)  # the same hash line read again: the same key
    assert DeviceCookies(restarted.device_key(), clock=clock).device_of(cookie) == device
    other = PasswordCheck(hash_password(PASSWORD, n=2**10))  # the password hashed anew (a new salt), or changed
    assert DeviceCookies(other.device_key(), clock=clock).device_of(cookie) is None
    clock.now += 61
    assert devices.device_of(cookie) is None  # expired


def test_the_failure_table_forgets_its_quietest_addresses_first_never_everyone(monkeypatch):
    import kiosk.console.throttle as throttle_module

    monkeypatch.setattr(throttle_module, "MAX_TRACKED", 3)
    monkeypatch.setattr(throttle_module, "MAX_POOL_FAILURES", 1000)
    throttle = Throttle()
    for other in ("10.0.0.1", "10.0.0.2"):
        throttle.begin(other, None)
    for _ in range(5):
        throttle.begin("10.6.6.6", None)
    throttle.begin("10.0.0.3", None)  # the table is full (3): 10.0.0.1, the least recently active, is forgotten...
    assert isinstance(throttle.begin("10.6.6.6", None), Refusal)  # ...never everyone
    assert list(throttle.peer_failures()) == ["peer:10.0.0.2", "peer:10.6.6.6", "peer:10.0.0.3"]


CAMS = {
    "cam-a1": {"gate_id": "A1", "state": "up", "processed": 100},
    "cam-b2": {"gate_id": "B2", "state": "up", "processed": 100},
}


@pytest.fixture
def console_clock(monkeypatch) -> _Clock:
    """The console state's clock, moved by hand (kiosk.console.state reads `time.time()`)."""
    import types

    import kiosk.console.state as state_module

    clock = _Clock()
    monkeypatch.setattr(state_module, "time", types.SimpleNamespace(time=clock))
    return clock


@pytest.fixture
def state(console_clock) -> ConsoleState:
    return ConsoleState({"A1": ["cam-a1"], "B2": ["cam-b2"]}, crops=3, heartbeat_timeout_s=0.2)


def _beat(state: ConsoleState, body: dict, cameras: dict, gates: dict | None = None) -> None:
    """The verifier's heartbeat as it sends it: its own part, then each gate's (cameras, flight)."""
    state.add_heartbeat(body)
    for gate in ("A1", "B2"):
        state.add_heartbeat(
            {
                "status": body["status"],
                "gate_id": gate,
                "gate": (gates or {}).get(gate, {}),
                "cameras": {c: cam for c, cam in cameras.items() if cam["gate_id"] == gate},
            },
            gate,
        )


def test_console_state_gives_each_gate_its_camera_state_and_rate_and_alerts_a_camera_down(state, console_clock):
    _beat(state, {"status": "ok"}, dict(CAMS), {"A1": {"flight_id": "LH123"}})
    console_clock.now += 0.5
    cams = {**CAMS, "cam-a1": {**CAMS["cam-a1"], "processed": 115}}
    _beat(
        state,
        {"status": "degraded"},
        {**cams, "cam-b2": {"gate_id": "B2", "state": "down", "last_error": "no frame for 6 s", "processed": 100}},
    )
    status = state.status()
    assert status["verifier"]["gallery"]["stale"] is None  # a heartbeat that says nothing of it
    assert [(g["gate_id"], g["camera_state"]) for g in status["gates"]] == [("A1", "up"), ("B2", "down")]
    assert 20 <= status["gates"][0]["fps"] <= 31 and status["gates"][1]["fps"] == 0  # 15 frames in 0.5 s
    assert [(a["type"], a["gate_id"], a["reason"]) for a in status["alerts"]] == [
        ("camera_down", "B2", "no frame for 6 s")
    ]


def test_console_state_shows_a_stale_gallery_with_what_to_run(state):
    gallery = {
        "subjects": 3,
        "stale": True,
        "error": "gallery file var/gallery.db is gone",
        "refusing": "nothing yet",
        "accepts_from_memory_s": 120.0,
        "action": "run `kiosk-enroll restore BACKUP`",
        "revision": 7,
    }
    _beat(state, {"status": "degraded", "gallery": gallery}, dict(CAMS))
    # the overview's alert line says what and what to run (the revision is not the operator's business)
    assert state.status()["verifier"]["gallery"] == {k: v for k, v in gallery.items() if k != "revision"}


def test_console_state_keeps_the_last_decision_the_alerts_and_the_last_crops_only(state):
    state.add_event({"type": "reject", "reason": "already_boarded", "gate_id": "A1", "event_id": "e1"})
    state.add_event({"type": "accept", "gate_id": "A1", "event_id": "e2", "subject_id": "PARKER"})
    assert state.status()["gates"][0]["last_decision"]["subject_id"] == "PARKER"
    assert [e["event_id"] for e in state.events("A1") if e["alert"]] == ["e1"]
    for i in range(5):
        state.add_crop({"event_id": f"c{i}", "gate_id": "A1"}, b"\xff\xd8jpeg")
    assert list(state.crops) == ["c2", "c3", "c4"] and state.crop("c0") is None  # the last `crops` only


def test_console_state_says_the_verifier_is_down_when_its_heartbeat_stops(state, console_clock):
    _beat(state, {"status": "ok"}, dict(CAMS))
    console_clock.now += 0.1
    state.check_verifier()  # within the timeout: still up
    assert state.status()["verifier"]["state"] == "up"
    console_clock.now += 0.15
    state.check_verifier()  # no heartbeat for longer than the timeout
    assert state.status()["verifier"]["state"] == "down"
    assert {(e["type"], e["gate_id"]) for e in state.events() if e["alert"]} >= {
        ("verifier_down", "A1"),
        ("verifier_down", "B2"),
    }


def test_console_state_subscribes_to_a_gate_once_however_many_watch_it(state):
    state.watch("A1")
    state.watch("A1")  # a second viewer of the same gate: no second subscription
    state.add_preview("A1", {"faces": []}, b"\xff\xd8")
    state.unwatch("A1")
    assert list(state.changes) == [("watch", "A1")] and state.preview("A1") is not None
    state.unwatch("A1")
    assert list(state.changes) == [("watch", "A1"), ("unwatch", "A1")] and state.preview("A1") is None


def test_a_malformed_preview_message_is_dropped_and_counted():
    """What the console takes from the preview socket is checked before it is kept or shown."""
    from kiosk.console.feed import FeedDecoder
    from kiosk.services.preview import crop_topic

    state = ConsoleState({"A1": ["cam-a1"]}, crops=3, heartbeat_timeout_s=3.0)
    feed = FeedDecoder(state)  # the feed's checks, without its sockets
    good = json.dumps({"v": 1, "gate_id": "A1", "faces": []}).encode()
    for parts in (
        [preview_topic("A1"), good],
        [preview_topic("A1"), b"{not json", b"\xff\xd8"],
        [preview_topic("A1"), good, b"GIF89a"],
        [preview_topic("A1"), b"[1, 2]", b"\xff\xd8"],
        [preview_topic("B9"), json.dumps({"v": 1, "gate_id": "B9", "faces": []}).encode(), b"\xff\xd8"],
        [preview_topic("A1"), json.dumps({"v": 1, "gate_id": "A1", "faces": [{}] * 101}).encode(), b"\xff\xd8"],
        [crop_topic("A1"), json.dumps({"v": 1, "gate_id": "A10", "event_id": "e"}).encode(), b"\xff\xd8"],
        [preview_topic("A1"), b"{" * 70_000, b"\xff\xd8"],
    ):
        feed.on_preview(parts)
    assert state.bad_messages == 8 and state.preview("A1") is None and not state.crops
    feed.on_preview([preview_topic("A1"), good, b"\xff\xd8jpeg"])
    assert state.bad_messages == 8 and state.preview("A1")[2] == b"\xff\xd8jpeg"


def test_hash_password_command_and_a_console_refused_off_loopback_without_tls(tmp_path):
    out = run_cli("kiosk", "console", "--hash-password", stdin=PASSWORD + "\n")
    assert out.returncode == 0 and PasswordCheck(out.stdout.strip()).matches(PASSWORD)
    (tmp_path / "pw").write_text(PASSWORD)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "none.avi"}],
        console={"listen": "0.0.0.0:8088", "password_file": "pw"},
    )
    result = run_cli("kiosk", "-c", str(config), "console", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a loopback address and the console has no TLS" in result.stderr
    config.write_text(config.read_text().replace("password_file: pw", "password_file: missing"))
    result = run_cli("kiosk", "-c", str(config), "console", timeout=60)
    assert result.returncode == 2 and "missing: no such file" in result.stderr
    for value, expected in (
        ("console.example.org", "console.allowed_hosts: expected a list"),
        (["http://console.example.org/"], "console.allowed_hosts[0]: expected HOST or HOST:PORT"),
    ):
        config = write_config(
            tmp_path,
            [{"id": "cam-a1", "gate": "A1", "source": "none.avi"}],
            console={"password_file": "pw", "allowed_hosts": value},
        )
        result = run_cli("kiosk", "-c", str(config), "console", timeout=60)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def _post_login(port: int, password: str, headers: dict | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/login",
            "password=" + urllib.parse.quote(password),
            {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
        )
        return conn.getresponse().status
    finally:
        conn.close()


def _console(tmp_path: Path, **console: object) -> tuple[subprocess.Popen, int]:
    (tmp_path / "pw").write_text(PASSWORD)
    port = free_port()
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "none.avi"}],
        console={"listen": f"127.0.0.1:{port}", "password_file": "pw", **console},
    )
    proc = kiosk(config, "console")
    _wait_for_login_page(proc, port, 30)
    return proc, port


def _wait_for_login_page(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Until the console started by `proc` serves its login page (fails at once if `proc` exits)."""

    def serving() -> bool:
        assert proc.poll() is None, "the console exited while starting"
        try:
            return _get(port, "/login").status == 200
        except OSError:
            return False

    wait_until(serving, timeout, f"the console's login page on port {port}", every=0.2)


def test_forged_forwarded_headers_and_100_concurrent_wrong_passwords_get_five_checks(tmp_path):
    """A real console: 100 wrong passwords at once from one address, each claiming another X-Forwarded-For:
    at most 5 are checked (401), the rest refused unchecked (429), and so is the right password then. A
    cross-site POST (another Origin) is refused before anything is checked."""
    from concurrent.futures import ThreadPoolExecutor

    console, port = _console(tmp_path)
    try:
        assert _post_login(port, PASSWORD, {"Origin": "http://evil.example"}) == 403
        assert _post_login(port, PASSWORD, {"Origin": "null"}) == 403
        assert _post_login(port, PASSWORD, {"Sec-Fetch-Site": "cross-site"}) == 403
        assert (
            _post_login(port, PASSWORD, {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}) == 303
        )  # our own page
        with ThreadPoolExecutor(100) as pool:
            codes = list(
                pool.map(lambda i: _post_login(port, f"guess {i}", {"X-Forwarded-For": f"10.0.{i}.1"}), range(100))
            )
        assert codes.count(401) <= 5 and codes.count(401) + codes.count(429) == 100, codes
        assert _post_login(port, PASSWORD, {"X-Forwarded-For": "10.9.9.9"}) == 429
    finally:
        _, err = stop(console)
    assert "Traceback" not in err and err.count("wrong password from 127.0.0.1") == codes.count(401)
    assert "10.0." not in err  # the forged addresses were never believed


def test_behind_a_trusted_proxy_each_client_is_counted_and_all_of_them_together_too(tmp_path):
    """With console.trusted_proxies naming the proxy (here loopback), X-Forwarded-For is the client: one
    client's wrong passwords do not lock out another, and 100 clients without a device cookie together get at
    most 30 checks; the operator's browser, which logged in before, still gets in from wherever it is now."""
    from concurrent.futures import ThreadPoolExecutor

    console, port = _console(tmp_path, trusted_proxies=["127.0.0.1"])
    try:
        assert [_post_login(port, "wrong", {"X-Forwarded-For": "10.0.0.1"}) for _ in range(6)][-1] == 429
        status, cookies = _login(port, PASSWORD, {"X-Forwarded-For": "10.0.0.2"})  # another client
        assert status == 303
        with ThreadPoolExecutor(100) as pool:
            codes = list(
                pool.map(lambda i: _post_login(port, f"guess {i}", {"X-Forwarded-For": f"10.1.{i}.1"}), range(100))
            )
        assert codes.count(401) <= 30 - 5 and codes.count(401) + codes.count(429) == 100, codes
        assert _post_login(port, PASSWORD, {"X-Forwarded-For": "10.0.0.3"}) == 429  # no cookie: the spent pool
        assert _post_login(port, PASSWORD, {"X-Forwarded-For": "10.0.0.3", "Cookie": cookies["kiosk_device"]}) == 303
    finally:
        _, err = stop(console)
    assert "Traceback" not in err and "wrong password from 10.0.0.1" in err


def _login(port: int, password: str, headers: dict | None = None) -> tuple[int, dict[str, str]]:
    """POST /login: the status and the cookies it set (name -> `name=value`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/login",
            "password=" + urllib.parse.quote(password),
            {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
        )
        answer = conn.getresponse()
        answer.read()
        cookies = [c.split(";")[0] for c in answer.msg.get_all("Set-Cookie") or []]
        return answer.status, {c.split("=", 1)[0]: c for c in cookies}
    finally:
        conn.close()


def test_a_request_for_another_host_is_refused_before_any_password_check(tmp_path):
    """DNS rebinding: a page on evil.example, re-pointed at 127.0.0.1, posts the login form with `Host` and
    `Origin` both evil.example (so the Origin check alone sees a same-origin request). Refused (421) before the
    password is looked at, right or wrong, and none of it counts toward the throttle: the operator, after more
    such tries than the throttle allows, logs in at once."""
    console, port = _console(tmp_path)
    try:
        evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        codes = [_post_login(port, f"guess {i}", evil) for i in range(8)] + [_post_login(port, PASSWORD, evil)]
        assert codes == [421] * 9, codes  # not 401, not 303: the password was never checked
        assert _get(port, "/login", host="evil.example").status == 421
        assert _post_login(port, PASSWORD, {"Host": "127.0.0.1"}) == 303  # the listen address, without the port
        assert _post_login(port, PASSWORD, {"Host": f"LocalHost:{port}"}) == 303  # loopback names, any case
        assert _post_login(port, PASSWORD) == 303  # nothing was counted against 127.0.0.1
    finally:
        _, err = stop(console)
    assert "Traceback" not in err and "wrong password" not in err
    assert "evil.example" in err and "console.allowed_hosts" in err


def test_a_wrong_password_flood_cannot_lock_out_the_operator(tmp_path):
    """On the loopback bind every local user is 127.0.0.1. The operator logged in once from this browser (and
    out again); then 100 wrong passwords at once from 127.0.0.1 spend that address's budget and the shared one.
    The operator's browser still logs in with the right password (its device cookie is its own budget, which
    nobody else can spend), and a typo of the operator's is checked (401), not refused unchecked. A cookie-less
    or forged-cookie try from the flooded address is what stays refused unchecked."""
    from concurrent.futures import ThreadPoolExecutor

    console, port = _console(tmp_path)
    try:
        status, cookies = _login(port, PASSWORD)
        assert status == 303 and "kiosk_session" in cookies
        device = cookies.get("kiosk_device", "")
        logout = _get(port, "/logout", cookie=cookies["kiosk_session"], body={})
        assert logout.status == 303 and _get(port, "/api/status", cookie=cookies["kiosk_session"]).status == 401
        with ThreadPoolExecutor(100) as pool:
            codes = list(pool.map(lambda i: _post_login(port, f"guess {i}"), range(100)))
        assert codes.count(401) <= 5 and codes.count(401) + codes.count(429) == 100, codes
        assert _post_login(port, PASSWORD) == 429  # the flooded address without a device cookie: refused unchecked
        forged = device[:-4] + "AAAA" if device else "kiosk_device=forged.0.AAAA"
        assert _post_login(port, PASSWORD, {"Cookie": forged}) == 429
        assert _post_login(port, "operator typo", {"Cookie": device}) == 401  # checked: the operator's own budget
        status, cookies = _login(port, PASSWORD, {"Cookie": device})
        assert status == 303, "the operator was locked out by someone else's flood"
        assert _get(port, "/api/status", cookie=cookies["kiosk_session"]).status == 200
    finally:
        _, err = stop(console)
    assert "Traceback" not in err and PASSWORD not in err


def test_a_half_sent_request_is_closed_within_seconds(tmp_path):
    """Four connections that never finish their request: one sends nothing, one stops inside its headers, one
    sends its headers and half its body, one dribbles its headers a byte every 0.2 s (so a per-read timeout
    alone would never fire). The server closes each within 10 s of its first byte, and meanwhile the operator
    logs in as usual."""
    import selectors
    import socket

    console, port = _console(tmp_path)
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    head = f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    sends = {
        "silent": b"",
        "headers": head.encode()[:60],
        "body": (head + "Content-Length: 64\r\n\r\npassword=cor").encode(),
        "dribble": head.encode(),
    }
    closed: dict[str, float] = {}
    try:
        socks = {}
        for name, data in sends.items():
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(data if name != "dribble" else data[:1])
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, name)
            socks[name] = sock
        assert _post_login(port, PASSWORD) == 303  # the server is not held up by them
        sent, last_drip = 1, time.monotonic()
        while len(closed) < len(socks) and time.monotonic() - started < 12:
            for key, _ in selector.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:  # the server closed it (anything it said first, e.g. a 408, is read before)
                    closed[key.data] = time.monotonic() - started
                    selector.unregister(key.fileobj)
            if "dribble" not in closed and time.monotonic() - last_drip >= 0.2 and sent < len(sends["dribble"]):
                try:
                    socks["dribble"].send(sends["dribble"][sent : sent + 1])
                    sent += 1
                except OSError:
                    pass
                last_drip = time.monotonic()
    finally:
        selector.close()
        for sock in socks.values():
            sock.close()
        _, err = stop(console)
    assert set(closed) == set(sends) and max(closed.values()) < 10, closed
    assert "Traceback" not in err


def test_the_console_over_tls_on_another_address(tmp_path):
    """Off loopback with a certificate: it serves HTTPS, and the session cookie is Secure."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(tmp_path / "tls.key"),
            "-out",
            str(tmp_path / "tls.crt"),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (tmp_path / "pw").write_text(PASSWORD)
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    port = free_port()
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "none.avi"}],
        console={"listen": f"0.0.0.0:{port}", "password_file": "pw", "tls_cert": "junk.crt", "tls_key": "tls.key"},
    )
    refused = run_cli("kiosk", "-c", str(config), "console", timeout=60)
    assert refused.returncode == 2 and "not a usable PEM certificate and key" in refused.stderr
    assert "Traceback" not in refused.stderr
    config.write_text(config.read_text().replace("junk.crt", "tls.crt"))
    console = kiosk(config, "console")
    context = ssl.create_default_context(cafile=str(tmp_path / "tls.crt"))
    context.check_hostname = False
    try:

        def logged_in() -> http.client.HTTPResponse | None:
            assert console.poll() is None, "the console exited while starting"
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
                conn.request(
                    "POST",
                    "/login",
                    "password=" + urllib.parse.quote(PASSWORD),
                    {"Content-Type": "application/x-www-form-urlencoded"},
                )
                return conn.getresponse()
            except OSError:
                return None

        answer = wait_until(logged_in, 30, f"the console's HTTPS login on port {port}", every=0.3)
        cookie = answer.getheader("Set-Cookie") or ""
        assert answer.status == 303 and "Secure" in cookie and "HttpOnly" in cookie
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        conn.request("GET", "/api/status", headers={"Cookie": cookie.split(";")[0]})
        status = json.loads(conn.getresponse().read())
        assert [(g["gate_id"], g["verifier_state"]) for g in status["gates"]] == [("A1", "unknown")]
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # no plain HTTP on the TLS port
        try:
            plain.request("GET", "/login")
            code = plain.getresponse().status
        except (OSError, http.client.HTTPException):
            code = None
        assert code != 200
    finally:
        _, err = stop(console)
    assert "Traceback" not in err


def _parker_video(tmp_path: Path, engine, photos) -> None:
    """Parker walks up, then Yao (not enrolled), over and over; Parker enrolled from a crop of his photo."""
    crops = people(engine, photos)
    make_video(
        tmp_path / "gate.avi",
        [
            Walk(crops["parker"], start=0, frames=40, w0=80, w1=170),
            Walk(crops["yao"], start=60, frames=40, w0=80, w1=170),
        ],
        seconds=4.0,
    )
    cv2.imwrite(
        str(tmp_path / "parker.jpg"), cv2.resize(crops["parker"], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    )


@pytest.mark.slow
def test_the_verifier_sends_previews_only_while_watched_and_at_the_configured_rate(tmp_path, engine, photos):
    _parker_video(tmp_path, engine, photos)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "gate.avi", "realtime": True, "loop": True}],
        console={"preview_fps": 4},
    )
    with live_gate(config) as gate:
        events = gate.events
        assert events.wait_for(
            lambda ev: (
                len([h for h in ev.health if h.get("component") == "verifier" and h["frames_processed"] > 40]) > 0
            ),
            30,
        )
        events.poll(2.0)
        before = [h for h in events.health if h.get("component") == "verifier"][-1]
        assert before["frames_processed"] > 40
        assert before["previews"] == {
            "watched": [],
            "frames_sent": 0,
            "crops_sent": 0,
            "dropped": 0,
            "consoles": 0,
            "refused": 0,
        }
        init_keys(tmp_path / "keys", client_name="console", role="console")
        init_keys(tmp_path / "keys", client_name="gate-a1", role="subscriber")
        # A gate controller's key hears the decisions but is not let in to the frames.
        outsider = Transport(load_config(config), role="test", client_key="gate-a1")
        peeker = outsider.preview_subscriber()
        peeker.send(watch_request(["A1"], ["A1"]), zmq.NOBLOCK)
        transport = Transport(load_config(config), role="test", client_key="console")
        sock = transport.preview_subscriber()
        got = []
        try:
            got += _receive(sock, ["A1"], until=bool, seconds=20)  # the lease reaches the verifier
            got += _receive(sock, ["A1"], until=lambda _: False, seconds=5.0)
            rate = (len(got) - 1) / 5.0
            assert 3.0 <= rate <= 4.6, rate  # 4 a second asked; the video itself runs at 30
            topic, header, jpeg = got[-1][1]
            header = json.loads(header)
            assert topic == preview_topic("A1") and header["gate_id"] == "A1" and header["width"] == 640
            image = cv2.imdecode(__import__("numpy").frombuffer(jpeg, "uint8"), cv2.IMREAD_COLOR)
            assert image.shape == (header["height"], header["width"], 3)
            with_faces = [json.loads(p[1]) for _, p in got if json.loads(p[1])["faces"]]
            assert with_faces and all(
                len(f["box"]) == 4 and f["state"] in ("collecting", "accepted", "rejected")
                for h in with_faces
                for f in h["faces"]
            )
            assert not peeker.poll(0)  # nothing reached the subscriber key all along
        finally:
            sock.close()
            transport.close()
            peeker.close()
            outsider.close()
        # the lease runs out (nobody renews it): nobody watches, nothing is sent
        closed_at = time.time()
        last = lambda: [h for h in events.health if h.get("component") == "verifier"][-1]  # noqa: E731
        previews = lambda: last()["previews"]  # noqa: E731
        assert events.wait_for(lambda ev: last()["sent_at"] > closed_at and previews()["watched"] == [], 10)
        sent = previews()["frames_sent"]
        assert sent >= len(got)
        events.poll(2.0)
        assert previews()["frames_sent"] == sent and previews()["watched"] == []


def _receive(sock, gates: list[str], *, until, seconds: float) -> list:
    """Frames from a preview connection for `seconds` (or until `until(frames so far)`), renewing its lease as a
    console does."""
    from kiosk.services.preview import LEASE_RENEW_S

    got: list = []
    end, renewed = time.monotonic() + seconds, float("-inf")
    while time.monotonic() < end and not until(got):
        if time.monotonic() - renewed >= LEASE_RENEW_S:
            try:
                sock.send(watch_request(gates, []), zmq.NOBLOCK)
            except zmq.Again:  # not connected yet: the next renewal
                pass
            renewed = time.monotonic()
        if sock.poll(100):
            got.append((time.monotonic(), sock.recv_multipart()))
    return got


@pytest.mark.slow
def test_a_preview_flood_from_one_console_key_leaves_another_console_its_frames(tmp_path, engine, photos):
    """One console key floods the preview socket over 20 connections, as fast as they take it (made-up gates,
    malformed JSON, whole lists of gates, and leases of gate A1); a second console, with its own key, still
    gets A1's frames at the configured rate meanwhile; the verifier keeps no more than 16 leases for the
    flooding key, none of its junk, and its memory stays put."""
    _parker_video(tmp_path, engine, photos)
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "gate.avi", "realtime": True, "loop": True}],
        console={"preview_fps": 4},
    )
    init_keys(tmp_path / "keys", client_name="flooder", role="console")
    init_keys(tmp_path / "keys", client_name="console", role="console")
    with live_gate(config) as gate:
        events = gate.events
        previews = lambda: [h for h in events.health if h.get("component") == "verifier"][-1]["previews"]  # noqa
        assert events.wait_for(lambda ev: any(h.get("component") == "verifier" for h in ev.health), 30)
        pid = [h for h in events.health if h.get("component") == "verifier"][-1]["pid"]
        rss = lambda: int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0])  # noqa: E731 (kB)
        good = Transport(load_config(config), role="test", client_key="console")
        viewer = good.preview_subscriber()
        assert _receive(viewer, ["A1"], until=lambda got: len(got) >= 8, seconds=40)  # the gate at work, watched
        events.poll(1.0)
        before = rss()
        flood = Transport(load_config(config), role="test", client_key="flooder")
        bad = [flood.preview_subscriber(sndhwm=0) for _ in range(20)]  # it queues all it wants on its side
        try:
            junk = [
                watch_request(["X1", "A1-not"], []),
                b"{not json",
                watch_request([f"G{i}" for i in range(999)], []),
                json.dumps({"v": 1, "cmd": "watch", "previews": "A1"}).encode(),
                watch_request(["A1"], ["A1"]),
            ]
            sent = [0]
            flooding = threading.Event()
            flooding.set()

            def flood_loop() -> None:  # as fast as its connections take it, for as long as the test reads
                n = 0
                while flooding.is_set():
                    try:
                        bad[n % 20].send(junk[n % 5], zmq.NOBLOCK)
                        sent[0] += 1
                    except zmq.Again:  # the flooder's own pacing (its queues are full), not a wait for anything
                        time.sleep(0.001)
                    n += 1

            flooder = threading.Thread(target=flood_loop, daemon=True)
            flooder.start()
            try:
                assert events.wait_for(lambda ev: previews()["refused"] >= 100, 15), "the flood never reached it"
                got = _receive(viewer, ["A1"], until=lambda _: False, seconds=4.0)
                events.poll(0.5)
                during = previews()
            finally:
                flooding.clear()
                flooder.join(5)
            assert len(got) >= 8, (len(got), during)  # 4 a second asked, while the flood goes on
            assert during["refused"] >= 1000 and during["watched"] == ["A1"], during
            assert during["consoles"] <= 16 + 1, during  # the flooding key's leases are capped
            assert rss() - before < 30_000, (before, rss())  # kB: nothing of the junk is kept
        finally:
            viewer.close()
            for b in bad:
                b.close()
            flood.close()
            good.close()
        closed_at = time.time()
        assert events.wait_for(
            lambda ev: ev.health[-1]["sent_at"] > closed_at and previews()["watched"] == [], 10
        )  # the leases run out
    assert "refused" in gate.verifier_err and "Traceback" not in gate.verifier_err


# -- the page in a real browser ------------------------------------------------------------------------------


def _browser() -> tuple[str, str] | None:
    chromium = next(
        (p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")) if p),
        None,
    )
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _get(
    port: int, path: str, *, cookie: str | None = None, body: dict | None = None, host: str | None = None
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Cookie": cookie} if cookie else {}
    if host is not None:
        headers["Host"] = host
    if body is None:
        conn.request("GET", path, headers=headers)
    else:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request("POST", path, urllib.parse.urlencode(body), headers)
    response = conn.getresponse()
    response.body = response.read(200_000)  # type: ignore[attr-defined]
    conn.close()
    return response


@pytest.mark.slow
def test_the_console_in_a_real_browser(tmp_path, engine, photos):
    found = _browser()
    if found is None:
        pytest.skip(
            "no headless Chromium and chromedriver (Debian: apt-get install chromium chromium-driver; "
            ".ci/run installs them)"
        )
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _parker_video(tmp_path, engine, photos)
    (tmp_path / "console-password").write_text(PASSWORD + "\n")
    port = free_port()
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "gate.avi", "realtime": True, "loop": True}],
        policy={"repeat_accept_s": 0.0},
        console={"enabled": True, "listen": f"127.0.0.1:{port}", "password_file": "console-password"},
    )
    assert (
        run_cli(
            "kiosk-enroll",
            "-q",
            "-c",
            str(config),
            "add",
            "--id",
            "PARKER",
            "--name",
            "Tony Parker",
            str(tmp_path / "parker.jpg"),
        ).returncode
        == 0
    )
    run = kiosk(config, "run")
    driver = None
    try:
        _wait_for_login_page(run, port, 60)
        # Without a session: a redirect to the login page, or 401; never a frame.
        page = _get(port, "/gate/A1")
        assert page.status == 303 and page.getheader("Location") == "/login"
        for path in ("/api/status", "/api/gates/A1/live", "/api/events", "/api/crops/x", "/static/console.js"):
            answer = _get(port, path)
            assert answer.status == 401 and b"jpeg" not in answer.body, path
        assert _get(port, "/api/status", cookie="kiosk_session=forged").status == 401
        wrong = _get(port, "/login", body={"password": "not the password"})
        assert wrong.status == 401 and wrong.getheader("Set-Cookie") is None
        right = _get(port, "/login", body={"password": PASSWORD})
        cookie = right.getheader("Set-Cookie") or ""
        assert right.status == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie
        status = json.loads(_get(port, "/api/status", cookie=cookie.split(";")[0]).body)
        assert [g["gate_id"] for g in status["gates"]] == ["A1"]
        keys = tmp_path / "keys"  # the console's key (made by kiosk run) may listen, never send frames or claims
        assert (keys / "authorized_subscribers/console.key").is_file()
        assert (keys / "authorized_consoles/console.key").is_file()
        assert not (keys / "authorized_clients/console.key").exists()

        options = Options()
        options.binary_location = found[0]
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,800",
        ):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(found[1]), options=options)
        # The page redraws its lists and boxes every second or frame: an element found a moment ago may be gone,
        # so the checks read the page in one script each (and a stale element is just looked up again).
        wait = WebDriverWait(driver, 45, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])

        def texts(css: str) -> list[str]:
            return driver.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", css
            )

        base = f"http://127.0.0.1:{port}"
        driver.get(base + "/")
        assert driver.current_url == base + "/login"
        driver.find_element(By.ID, "password").send_keys("wrong password")
        driver.find_element(By.ID, "login-button").click()
        assert "Wrong password" in wait.until(lambda d: d.find_element(By.ID, "login-error")).text
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login-button").click()
        wait.until(lambda d: d.current_url == base + "/")
        card = '.gate-card[data-gate="A1"]'
        wait.until(lambda d: "camera up" in "".join(texts(card)))
        assert driver.execute_script("return document.querySelector(arguments[0]).href", card) == base + "/gate/A1"
        driver.get(base + "/gate/A1")
        driver.execute_script("window.kioskMarker = 'same page'")  # gone if the page reloads

        def frame() -> str:
            return driver.execute_script("return document.getElementById('frame').getAttribute('src') || ''")

        first = wait.until(lambda d: frame().startswith("data:image/jpeg") and frame())
        wait.until(lambda d: frame() not in ("", first))  # it moves
        assert wait.until(lambda d: texts("#boxes .face-box"))
        accept = wait.until(lambda d: [t for t in texts("#feed li.type-accept") if "PARKER" in t])
        assert "ACCEPT PARKER" in accept[0] and "score" in accept[0]
        assert driver.execute_script("return window.kioskMarker") == "same page"  # shown without a reload
        crop_width = (
            "const li = [...document.querySelectorAll('#feed li.type-accept')]"
            ".find(l => l.textContent.includes('PARKER')); const img = li && li.querySelector('img');"
            "return img ? img.naturalWidth : 0"
        )
        assert wait.until(lambda d: d.execute_script(crop_width)) >= 100  # the decision's face crop, loaded
        # A moment with Parker in view and his box marked accepted, for the screenshot.
        wait.until(lambda d: [t for t in texts("#boxes .face-box.accepted") if "PARKER" in t])
        shot = Path(os.environ.get("KIOSK_SCREENSHOT_DIR", tmp_path)) / "console-live.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        for name in ("gallery.db", "gallery.db-wal", "gallery.db-shm"):  # deleted under the running gate
            (tmp_path / name).unlink(missing_ok=True)
        driver.get(base + "/")
        alert = wait.until(lambda d: texts("#alerts #gallery-stale"))[0]
        assert "gallery stale" in alert and "is gone" in alert and "kiosk-enroll" in alert and "restore" in alert
        # A page from elsewhere posts a form to the console (cross-site request forgery): refused, still logged in
        driver.get(
            "data:text/html,<form id=f method=post action='" + base + "/logout'></form>"
            "<script>document.getElementById('f').submit()</script>"
        )
        wait.until(lambda d: "cross-site request refused" in d.page_source)
        driver.get(base + "/")
        wait.until(lambda d: texts("#alerts #gallery-stale"))
        assert driver.current_url == base + "/"
    finally:
        if driver is not None:
            driver.quit()
        _, err = stop(run, timeout=20)
    assert "Traceback" not in err and PASSWORD not in err
