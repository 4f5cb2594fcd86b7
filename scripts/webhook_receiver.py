#!/usr/bin/env python3
"""Reference receiver for the kiosk's signed webhooks: what a gate checks before it trusts an `accept`.

    python3 scripts/webhook_receiver.py --secret-file var/keys/webhook.secret --port 8080

Standard library only; copy it. A POST is accepted (204) only when
- X-Kiosk-Signature is `sha256=` + HMAC-SHA256(secret, f"{X-Kiosk-Timestamp}." + raw body),
  compared in constant time (the secret: the file's bytes, whitespace stripped);
- X-Kiosk-Timestamp (unix seconds) is within --tolerance seconds of this machine's clock;
- its event_id was not accepted before: a repeat (our retry after a lost
  response, or a replay within the window) gets 200 "already handled" and is
  not acted on again, so the sender stops retrying and nothing opens twice.
Anything else gets 401 with a one-line reason. Each accepted event is printed
as one line (wire your relay there) and appended to --jsonl if given. Open a
door on `accept` only, and only for a fresh one for your own gate
(see scripts/gate_controller.py for the rest of the gate's state machine).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BODY = 64 * 1024


def check_signature(secret: bytes, body: bytes, headers, now: float, tolerance: float) -> str | None:
    """None when the request is authentic and fresh, else the reason it is not."""
    ts, sig = headers.get("X-Kiosk-Timestamp"), headers.get("X-Kiosk-Signature")
    if ts is None or sig is None:
        return "missing X-Kiosk-Timestamp or X-Kiosk-Signature header"
    ts = ts.strip()
    if not (ts.isascii() and ts.isdigit() and len(ts) <= 15):
        return "malformed X-Kiosk-Timestamp"
    expected = "sha256=" + hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), sig.strip().lower().encode()):
        return "signature does not match"
    if abs(now - int(ts)) > tolerance:
        return f"timestamp outside the {tolerance:g}s tolerance (stale, replayed or clocks apart)"
    return None


class Receiver(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], secret: bytes, tolerance: float, jsonl: Path | None) -> None:
        super().__init__(address, Handler)
        self.secret, self.tolerance, self.jsonl = secret, tolerance, jsonl
        self.seen: dict[str, float] = {}  # event_id -> when accepted
        self.lock = threading.Lock()

    def accept_once(self, event_id: str, now: float) -> bool:
        """Remember event_id; False if it was accepted within the window a signature stays valid."""
        with self.lock:
            # A request signed at t verifies until t + tolerance and arrives no earlier than
            # t - tolerance, so an id must be kept 2 x tolerance to refuse every replay.
            self.seen = {k: t for k, t in self.seen.items() if now - t <= 2 * self.tolerance}
            if event_id in self.seen:
                return False
            self.seen[event_id] = now
            return True


class Handler(BaseHTTPRequestHandler):
    server: Receiver
    timeout = 10  # seconds a client may take to send its request

    def _answer(self, code: int, reason: str = "") -> None:
        self.send_response(code)
        if reason:
            data = (reason + "\n").encode()
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.end_headers()

    def do_POST(self) -> None:  # http.server's name
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._answer(411, "Content-Length required")
        if not 0 < length <= MAX_BODY:
            return self._answer(413, f"body must be 1 to {MAX_BODY} bytes")
        body = self.rfile.read(length)  # the raw bytes: verify before parsing
        now = time.time()
        code, reason = 401, check_signature(self.server.secret, body, self.headers, now, self.server.tolerance)
        if reason is None:
            try:
                event = json.loads(body)
                event_id = event["event_id"]
            except (ValueError, TypeError, KeyError):
                code, reason = 400, "signed, but not an event with an event_id"
            else:
                if not self.server.accept_once(str(event_id), now):
                    code, reason = 200, f"event_id {event_id} already handled; ignored"
        if reason is not None:
            print(
                f"{'refused' if code != 200 else 'repeat'} from {self.client_address[0]}: {reason}",
                file=sys.stderr,
                flush=True,
            )
            return self._answer(code, reason)
        print(
            f"{event.get('type')} gate={event.get('gate_id')} subject={event.get('subject_id')} event_id={event_id}",
            flush=True,
        )
        if self.server.jsonl:
            with self.server.lock, open(self.server.jsonl, "a", encoding="utf-8") as out:
                out.write(json.dumps(event) + "\n")
        self._answer(204)

    def log_message(self, format: str, *args: object) -> None:  # http.server's signature; one line per event is enough
        pass


def main() -> int:
    p = argparse.ArgumentParser(description="Receive and verify the kiosk's signed webhooks.")
    p.add_argument("--secret-file", required=True, type=Path, help="the shared secret (keys_dir/webhook.secret)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--tolerance", type=float, default=300.0, help="seconds a timestamp may be off (default 300)")
    p.add_argument("--jsonl", type=Path, help="append each accepted event here, one JSON object a line")
    args = p.parse_args()
    try:
        secret = args.secret_file.read_bytes().strip()
    except OSError as exc:
        p.error(f"cannot read --secret-file {args.secret_file}: {exc.strerror or exc}")
    if len(secret) < 16:
        p.error(f"--secret-file {args.secret_file}: secret missing or shorter than 16 bytes")
    server = Receiver((args.host, args.port), secret, args.tolerance, args.jsonl)
    print(f"listening on http://{args.host}:{server.server_address[1]}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
