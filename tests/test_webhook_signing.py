"""Signed webhooks: sign/verify, the secret file, build_hooks, and the reference receiver end to end."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kiosk.config import config_from_mapping
from kiosk.errors import ConfigError
from kiosk.messaging.transport import free_port, init_keys
from kiosk.services.subscriber import build_hooks, post_once, webhook_hook
from kiosk.services.webhook_signing import (
    BadSignature,
    load_secret,
    make_secret,
    sign,
    verify,
)
from tests.conftest import run_cli
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
SECRET = b"0123456789abcdef0123456789abcdef"
BODY = b'{"type":"accept","gate_id":"A1","event_id":"e1"}'
T = 1_700_000_000


# -- sign / verify -------------------------------------------------------------------------------------------------


def test_a_good_signature_verifies_and_is_what_the_docs_say():
    headers = sign(SECRET, BODY, T)
    assert headers == {
        "X-Kiosk-Timestamp": str(T),
        "X-Kiosk-Signature": "sha256=" + hmac.new(SECRET, f"{T}.".encode() + BODY, hashlib.sha256).hexdigest(),
    }
    verify(SECRET, BODY, headers, now=T)
    verify(SECRET, BODY, headers, now=T + 299)
    verify(SECRET, BODY, {k.lower(): v for k, v in headers.items()}, now=T - 299)  # header names: any case


@pytest.mark.parametrize(
    "case, reason",
    [
        ("wrong secret", "signature does not match"),
        ("tampered body", "signature does not match"),
        ("timestamp changed", "signature does not match"),
        ("stale", "stale timestamp"),
        ("future", "in the future"),
        ("no timestamp", "missing X-Kiosk-Timestamp"),
        ("no signature", "missing X-Kiosk-Signature"),
        ("timestamp not an integer", "malformed X-Kiosk-Timestamp"),
        ("other scheme", "malformed X-Kiosk-Signature"),
        ("short digest", "malformed X-Kiosk-Signature"),
    ],
)
def test_a_bad_request_is_refused_with_its_reason(case, reason):
    headers = sign(SECRET, BODY, T)
    body, now = BODY, T + 1.0
    if case == "wrong secret":
        headers = sign(b"another secret of enough bytes", BODY, T)
    elif case == "tampered body":
        body = BODY.replace(b"A1", b"A2")
    elif case == "timestamp changed":
        headers["X-Kiosk-Timestamp"] = str(T + 1)
    elif case == "stale":
        now = T + 301
    elif case == "future":
        now = T - 301
    elif case == "no timestamp":
        del headers["X-Kiosk-Timestamp"]
    elif case == "no signature":
        del headers["X-Kiosk-Signature"]
    elif case == "timestamp not an integer":
        headers["X-Kiosk-Timestamp"] = f"{T}.5"
    elif case == "other scheme":
        headers["X-Kiosk-Signature"] = headers["X-Kiosk-Signature"].replace("sha256=", "sha1=")
    elif case == "short digest":
        headers["X-Kiosk-Signature"] = headers["X-Kiosk-Signature"][:-2]
    with pytest.raises(BadSignature, match=reason):
        verify(SECRET, body, headers, now=now)


# -- the secret file -----------------------------------------------------------------------------------------------


def test_make_and_load_secret(tmp_path):
    path = tmp_path / "webhook.secret"
    with pytest.raises(ConfigError, match=rf"{path} not found; run `kiosk keys init {tmp_path}`"):
        load_secret(path)
    assert make_secret(path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = load_secret(path)
    assert len(secret) == 64 and path.read_bytes() == secret + b"\n"
    assert make_secret(path) is False and load_secret(path) == secret  # kept, not replaced
    path.write_text("  \n")
    with pytest.raises(ConfigError, match=rf"{path} is empty; delete it"):
        load_secret(path)
    path.write_text("short-secret\n")
    with pytest.raises(ConfigError, match=rf"{path} is too short \(12 bytes"):
        load_secret(path)
    with pytest.raises(ConfigError, match=rf"{tmp_path} cannot be read"):
        load_secret(tmp_path)  # a folder


def test_init_keys_makes_the_webhook_secret_once(tmp_path):
    made = init_keys(tmp_path / "keys")
    assert tmp_path / "keys" / "webhook.secret" in made
    assert len(load_secret(tmp_path / "keys" / "webhook.secret")) == 64
    assert init_keys(tmp_path / "keys") == []


# -- build_hooks ---------------------------------------------------------------------------------------------------


def _cfg(tmp_path: Path, **hooks: object):
    return config_from_mapping({"security": {"keys_dir": "keys"}, "hooks": hooks}, base_dir=tmp_path)


def test_build_hooks_needs_the_secret_for_a_webhook(tmp_path, caplog):
    with pytest.raises(ConfigError, match=rf"webhook secret {tmp_path / 'keys' / 'webhook.secret'} not found"):
        build_hooks(_cfg(tmp_path), jsonl=[], execs=[], webhooks=["http://127.0.0.1:9/gate"])
    (jsonl,) = build_hooks(_cfg(tmp_path), jsonl=[str(tmp_path / "e.jsonl")], execs=[], webhooks=[])  # no webhook
    jsonl.close()
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'elsewhere.secret'} not found"):
        build_hooks(
            _cfg(tmp_path, webhook_secret_file="elsewhere.secret"),
            jsonl=[],
            execs=[],
            webhooks=["http://127.0.0.1:9/gate"],
        )
    make_secret(tmp_path / "elsewhere.secret")
    (hook,) = build_hooks(
        _cfg(tmp_path, webhook_secret_file="elsewhere.secret"), jsonl=[], execs=[], webhooks=["http://127.0.0.1:9/gate"]
    )
    hook.close()
    assert "UNSIGNED" not in caplog.text

    with caplog.at_level(logging.WARNING, logger="kiosk.services.subscriber"):
        (hook,) = build_hooks(
            _cfg(tmp_path, sign_webhooks=False), jsonl=[], execs=[], webhooks=["http://127.0.0.1:9/gate"]
        )
    hook.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "UNSIGNED" in r.message]
    assert len(warnings) == 1 and "cannot tell these POSTs from forged ones" in warnings[0].message


def test_subscribe_without_the_secret_exits_2_with_one_line(tmp_path):
    config = tmp_path / "kiosk.yaml"
    config.write_text("security: {keys_dir: keys}\n")
    res = run_cli("kiosk", "-c", str(config), "subscribe", "--webhook", "http://127.0.0.1:9/gate", timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'keys' / 'webhook.secret'} not found" in res.stderr and "kiosk keys init" in res.stderr


def test_each_attempt_is_signed_afresh(tmp_path, monkeypatch):
    seen: list[tuple[dict, bytes]] = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(503 if len(seen) == 1 else 204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clock = iter(range(T, T + 10_000, 100))  # each call to time.time() is 100 s later
    monkeypatch.setattr(time, "time", lambda: float(next(clock)))
    try:
        webhook_hook(f"http://127.0.0.1:{server.server_address[1]}/", 2.0, 1, SECRET)({"event_id": "r1"})
    finally:
        server.shutdown()
        server.server_close()
    (h1, b1), (h2, b2) = seen
    assert int(h2["X-Kiosk-Timestamp"]) > int(h1["X-Kiosk-Timestamp"])
    for headers, body in seen:
        verify(SECRET, body, headers, now=int(headers["X-Kiosk-Timestamp"]))


# -- the reference receiver, as a real process ---------------------------------------------------------------------


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_reference_receiver_end_to_end(tmp_path):
    keys = tmp_path / "keys"
    init_keys(keys)
    secret = load_secret(keys / "webhook.secret")
    port, received = free_port(), tmp_path / "received.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "webhook_receiver.py"),
            "--secret-file",
            str(keys / "webhook.secret"),
            "--port",
            str(port),
            "--tolerance",
            "60",
            "--jsonl",
            str(received),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/gate"
    try:

        def listening() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_until(listening, 10, f"the reference receiver listening on port {port}", every=0.05)

        # Our own webhook hook as `kiosk subscribe` builds it, signed: accepted.
        event = {"type": "accept", "gate_id": "A1", "subject_id": "YAO", "event_id": "ev-1", "decided_at": time.time()}
        (hook,) = build_hooks(
            config_from_mapping({"security": {"keys_dir": str(keys)}}), jsonl=[], execs=[], webhooks=[url]
        )
        hook.submit(event)
        hook.close()
        assert hook.delivered == 1 and hook.failed == 0
        assert [json.loads(line) for line in received.read_text().splitlines()] == [event]
        # The same signed POST with each request kept as sent, to replay it below.
        sent: list[tuple[bytes, dict[str, str]]] = []

        def recording(url, body, headers, deadline_s):
            sent.append((body, headers))
            return post_once(url, body, headers, deadline_s)

        webhook_hook(url, 2.0, 0, secret, post=recording)({**event, "event_id": "ev-1r"})

        # A forged accept (wrong secret) and a stale one correctly signed: refused; a replay: not acted on again.
        forged = json.dumps({**event, "event_id": "ev-2"}).encode()
        assert _post(url, forged, sign(b"a guessed secret, not ours", forged, int(time.time())))[0] == 401
        stale = json.dumps({**event, "event_id": "ev-3"}).encode()
        code, reason = _post(url, stale, sign(secret, stale, int(time.time()) - 120))
        assert code == 401 and "tolerance" in reason
        ((first_body, first_headers),) = sent
        code, reason = _post(url, first_body, first_headers)
        assert code == 200 and "event_id ev-1r already handled; ignored" in reason  # not acted on twice
        unsigned = json.dumps({**event, "event_id": "ev-4"}).encode()
        assert _post(url, unsigned, {})[0] == 401
        # The hook reports the receiver's reason when refused (401 is not retried).
        with pytest.raises(RuntimeError, match="HTTP 401 signature does not match.*not retried"):
            webhook_hook(url, 2.0, 3, b"a guessed secret, not ours")({**event, "event_id": "ev-5"})
        # The same raw client with a good signature is accepted: the refusals above are the receiver's doing.
        fresh = json.dumps({**event, "event_id": "ev-6"}).encode()
        assert _post(url, fresh, sign(secret, fresh, int(time.time()))) == (204, "")
        assert [json.loads(line)["event_id"] for line in received.read_text().splitlines()] == ["ev-1", "ev-1r", "ev-6"]
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=5)
    assert "accept gate=A1 subject=YAO event_id=ev-1" in out
    assert err.count("refused from 127.0.0.1") == 4 and err.count("repeat from 127.0.0.1") == 1
