"""Hooks are bounded whatever the other side does: no redirects, a total deadline per webhook attempt,
a command's stderr kept to a few KB, and no command outliving the subscriber."""

from __future__ import annotations

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kiosk.services.subscriber import STDERR_KEPT, Hook, exec_hook, webhook_hook
from tests.waiting import wait_until


def _server(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/gate"


def test_a_redirect_is_a_failure_and_is_not_followed():
    hits: list[str] = []

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server, url = _server(Redirect)
    try:
        with pytest.raises(RuntimeError, match="HTTP 302.*not retried"):
            webhook_hook(url, 2.0, 3, None)({"event_id": "e"})
        assert hits == ["/gate"]  # once, and /elsewhere never
    finally:
        server.shutdown()


def test_a_receiver_trickling_its_answer_cannot_hold_a_worker_past_the_deadline():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def trickle() -> None:  # reads the request, then answers one byte every 0.3 s
        conn, _ = listener.accept()
        conn.recv(65536)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
            if stop.wait(0.3):
                break
            try:
                conn.send(bytes([byte]))
            except OSError:
                break
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="no complete answer within 1s"):
            webhook_hook(f"http://127.0.0.1:{listener.getsockname()[1]}/gate", 1.0, 0, None)({"event_id": "e"})
        assert time.monotonic() - t0 < 2.5  # not 38 bytes x 0.3 s
    finally:
        stop.set()
        listener.close()


def test_exec_keeps_only_the_tail_of_stderr():
    deliver = exec_hook("head -c 20000000 /dev/zero | tr '\\0' x >&2; echo THE-END >&2; exit 3", 20.0)
    with pytest.raises(RuntimeError) as err:
        deliver({"type": "accept"})
    message = str(err.value)
    assert "command exited 3" in message and message.endswith("THE-END") and len(message) < 1000
    assert STDERR_KEPT <= 8192


def test_no_command_outlives_the_subscriber(tmp_path):
    pidfile = tmp_path / "pid"
    hook = Hook("exec", exec_hook(f"echo $$ > {pidfile}; exec sleep 30", 60.0), 10)
    hook.submit({"type": "accept"})
    hook.submit({"type": "reject"})  # queued behind it: must not start once the subscriber stops
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 5, "the hook command's pid"))
    pidfile.unlink()
    hook.close(timeout=5)
    wait_until(lambda: not _alive(pid), 5, f"the hook command (pid {pid}) to be gone")
    assert not pidfile.exists()  # the queued event started nothing


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_state_events_go_first_the_oldest_is_dropped_and_stale_accepts_never_reach_a_gate():
    release, delivering = threading.Event(), threading.Event()
    got: list[str] = []

    def deliver(event: dict) -> None:
        delivering.set()
        release.wait(5)
        got.append(event["event_id"])

    hook = Hook("gate", deliver, queue_size=3, max_accept_age_s=5.0)
    now = time.time()
    hook.submit({"type": "reject", "event_id": "r0", "captured_at": now})  # in delivery, held
    assert delivering.wait(5), "the first event never reached delivery"
    for i in range(1, 4):
        hook.submit({"type": "reject", "event_id": f"r{i}", "captured_at": now})
    hook.submit({"type": "accept", "event_id": "a-new", "captured_at": now})  # full: r1 (the oldest) goes
    hook.submit({"type": "verifier_down", "event_id": "down"})  # full again: r2 goes, and "down" jumps the queue
    hook.submit({"type": "verifier_up", "event_id": "up"})  # r3 goes; "up" stays behind "down"
    hook.submit({"type": "accept", "event_id": "a-old", "captured_at": now - 60})  # a-new goes
    release.set()
    hook.close()
    assert got == ["r0", "down", "up"] and hook.dropped == 4 and hook.stale == 1  # a-old: never delivered
