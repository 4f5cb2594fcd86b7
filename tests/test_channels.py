"""Typed channels over real ZeroMQ sockets: each message comes out as its type, a malformed one never does."""

from __future__ import annotations

import json
import time

import numpy as np
import zmq

from kiosk.messaging.channels import EventChannel, FrameChannel, sources_done
from kiosk.messaging.messages import (
    CaptureHealth,
    Eof,
    Event,
    Frame,
    FrameHeader,
    Heartbeat,
    encode_frame,
    encode_json,
)
from tests.waiting import wait_until


def _pair(ctx: zmq.Context, kind_out: int, kind_in: int) -> tuple[zmq.Socket, zmq.Socket]:
    """A sender and a receiver on one endpoint, bound the way the system binds them (PULL and PUB bind)."""
    out, inn = ctx.socket(kind_out), ctx.socket(kind_in)
    binder, connector = (out, inn) if kind_out == zmq.PUB else (inn, out)
    binder.bind("inproc://ch")
    connector.connect("inproc://ch")
    if kind_in == zmq.SUB:
        inn.setsockopt(zmq.SUBSCRIBE, b"")

        def heard_a_probe() -> bool:  # the subscription has reached the publisher once a probe comes through
            out.send_multipart([b"probe"])
            return bool(inn.poll(20))

        wait_until(heard_a_probe, 5, "the subscription to reach the publisher")
        while inn.poll(20):  # the probes are the test's, not the channel's
            inn.recv_multipart()
    return out, inn


def test_frame_channel_types_and_refusals():
    ctx = zmq.Context()
    push, pull = _pair(ctx, zmq.PUSH, zmq.PULL)
    bad: list[str] = []
    channel = FrameChannel(pull, ["cam-a1"], bad.append)
    try:
        image = np.zeros((48, 64, 3), np.uint8)
        push.send_multipart(encode_frame(FrameHeader("cam-a1", "A1", 1, time.time(), 64, 48), image))
        push.send_multipart(encode_frame(FrameHeader("cam-zz", "A1", 2, time.time(), 64, 48), image))  # unknown
        push.send_multipart(encode_json("health.capture.cam-a1", {"camera_id": "cam-a1", "status": "ok"}))
        push.send_multipart(encode_json("health.capture.cam-a1", {"camera_id": "cam-b2"}))  # topic lies
        push.send_multipart(encode_json("eof.cam-a1", {"camera_id": "cam-a1"}))
        push.send_multipart([b"frame.cam-a1", b"{not json", b""])
        push.send(b"garbage")
        got: list = []

        def all_read() -> bool:
            while (message := channel.recv()) is not None:
                got.append(message)
            return len(got) >= 3 and len(bad) >= 4

        wait_until(all_read, 5, "the three valid and four malformed messages to be read")
        assert [type(m) for m in got] == [Frame, CaptureHealth, Eof]
        assert got[0].header.seq == 1 and got[0].image.shape == (48, 64, 3)
        assert got[1] == CaptureHealth("cam-a1", {"v": 1, "camera_id": "cam-a1", "status": "ok"})
        assert got[2] == Eof("cam-a1")
        assert len(bad) == 4 and "unknown camera 'cam-zz'" in bad[0]
        # A flood of malformed messages: one recv() reads a bounded number and returns.
        for _ in range(50):
            push.send(b"garbage")
        # inproc queues a message on the receiving side by the time send() returns (libzmq's in-memory pipe), so
        # once the first is readable all 50 are.
        wait_until(lambda: pull.poll(0), 5, "the flood to reach the receiving socket")
        assert channel.recv(max_reads=16) is None and len(bad) == 4 + 16
    finally:
        ctx.destroy(linger=0)


def test_event_channel_types_and_eof_rule():
    ctx = zmq.Context()
    pub, sub = _pair(ctx, zmq.PUB, zmq.SUB)
    bad: list[str] = []
    channel = EventChannel(sub, bad.append)
    try:
        pub.send_multipart([b"event.A1", Event(type="accept", gate_id="A1", subject_id="P1").to_json()])
        pub.send_multipart([b"event.A1", json.dumps({"v": 1, "type": "open_sesame", "gate_id": "A1"}).encode()])
        pub.send_multipart(encode_json("health.verifier", {"status": "ok"}))
        pub.send_multipart(encode_json("health.capture.cam-a1", {"camera_id": "cam-a1"}))
        got = [channel.recv(500) for _ in range(3)]
        assert [type(m) for m in got] == [Event, Heartbeat, CaptureHealth] and got[0].subject_id == "P1"
        assert channel.recv(50) is None and len(bad) == 1 and "open_sesame" in bad[0]
    finally:
        ctx.destroy(linger=0)
    status = {"ok": True, "queue_depth": 0, "cameras": {"a": {"eof": True}, "b": {"eof": False}}}
    assert sources_done(status, ["a"]) and not sources_done(status, ["a", "b"])
    assert not sources_done({**status, "queue_depth": 1}, ["a"]) and not sources_done(None, ["a"])
