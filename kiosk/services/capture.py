"""`kiosk capture`: one camera's frames onto the frame socket.

Sources: a device index, an RTSP/HTTP URL or a video file (all through
`cv2.VideoCapture`), or a folder of images. A camera that cannot be opened
or stops delivering is reopened with exponential backoff and reported on
the health topic; the process does not exit on a camera fault. A file
source ends with an `eof.<camera>` message (or starts over with `loop`).

Real time: a live source, or a file with `realtime: true`, sends without
blocking; when the verifier's queue is full the frame is dropped and
counted, so the verifier always gets a recent frame. With `realtime:
false` a file is sent as fast as the verifier takes it, and nothing is
dropped.

Idle: a live camera's capture also listens for the verifier's idle hints
(topic `idle.<camera>` on the event socket). While the verifier says the
scene is empty as of a frame this capture sent, frames that do not differ
from that one (the verifier's own change measure, kiosk.vision.scene_change)
are held back, not sent: one still goes every `policy.idle_detect_every_s`
as a safety net, and the first frame that differs goes at once. A hint
lapses unless renewed, so a capture that hears nothing sends every frame.

Decoding: a video file or stream in Motion JPEG is read as the camera's own
JPEG packets (the FFmpeg backend's raw mode). Each is decoded to a quarter-
size grey image for the change measure (0.2 ms where a full decode takes
1 ms); the full decode happens only for a frame that is sent as `bgr8`, and
with `encoding: jpeg` the packet goes out as it came, never decoded in full
here. Other codecs, and camera devices, are decoded as always.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import zmq

from kiosk.cli_support import serve
from kiosk.config import CameraConfig, KioskConfig
from kiosk.errors import ConfigError
from kiosk.messaging.channels import DECODE_ERRORS
from kiosk.messaging.messages import (
    EOF_TOPIC,
    HEALTH_TOPIC,
    IDLE_TOPIC,
    FrameHeader,
    IdleHint,
    decode_idle,
    encode_frame,
    encode_json,
)
from kiosk.messaging.transport import Transport
from kiosk.vision.images import image_size
from kiosk.vision.scene_change import thumbnail, unchanged

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
BACKOFF_MAX_S = 30.0
HEALTH_EVERY_S = 1.0


class Captured:
    """One frame as the source gave it: decoded pixels, or a Motion JPEG camera's own JPEG packet, decoded only
    as far as what is done with it needs (`thumb()` for the change measure, `image()` for a bgr8 send)."""

    __slots__ = ("jpeg", "width", "height", "_image")

    def __init__(self, image: np.ndarray | None = None, jpeg: np.ndarray | None = None) -> None:
        self.jpeg = jpeg  # the packet's bytes as a uint8 array, or None
        self._image = image
        if image is not None:
            self.height, self.width = image.shape[:2]
        else:  # the size from the JPEG's header; 0x0 for a broken one, which decodes to nothing
            self.width, self.height = (image_size(jpeg.data) if jpeg is not None else None) or (0, 0)

    def image(self) -> np.ndarray | None:
        """The BGR pixels (None: a packet that does not decode)."""
        if self._image is None and self.jpeg is not None and self.width:
            image = cv2.imdecode(self.jpeg, cv2.IMREAD_COLOR)
            if image is not None and image.shape[:2] == (self.height, self.width):
                self._image = image
        return self._image

    def thumb(self) -> np.ndarray | None:
        """The change measure's thumbnail; from a packet, via a quarter-size grey decode (None: it does not
        decode). Always made the same way for one source, so two thumbnails of one camera compare fairly."""
        if self.jpeg is None:
            return thumbnail(self._image) if self._image is not None else None
        if not self.width:
            return None
        grey = cv2.imdecode(self.jpeg, cv2.IMREAD_REDUCED_GRAYSCALE_4)
        return None if grey is None else thumbnail(grey)


class FrameSource:
    """What capture reads from; `read()` returns None at the end or on a fault."""

    live: bool = True
    fps: float = 30.0
    description: str = ""

    def open(self) -> bool:
        raise NotImplementedError

    def read(self) -> Captured | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VideoSource(FrameSource):
    """Device index, URL or video file through cv2.VideoCapture."""

    def __init__(self, source: int | str, live: bool, fps: float | None) -> None:
        self.source = source
        self.live = live
        self.description = f"device {source}" if isinstance(source, int) else str(source)
        self._fps_override = fps
        self._cap: cv2.VideoCapture | None = None
        self.packets = False  # reading Motion JPEG packets, not decoded frames
        self._packets_seen = False

    def open(self) -> bool:
        self.close()
        cap = cv2.VideoCapture(self.source)
        if not cap.isOpened():
            cap.release()
            return False
        self._cap = cap
        native = cap.get(cv2.CAP_PROP_FPS)
        self.fps = self._fps_override or (native if 1.0 <= native <= 240.0 else 30.0)
        # A Motion JPEG file or stream: take the packets and decode only what is needed (a device would need
        # CAP_PROP_CONVERT_RGB off instead, untried without one, so devices decode as before).
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little")
        self._packets_seen = False
        self.packets = (
            not isinstance(self.source, int)
            and fourcc in (b"MJPG", b"mjpg")
            and cap.get(cv2.CAP_PROP_BACKEND) == cv2.CAP_FFMPEG
            and cap.set(cv2.CAP_PROP_FORMAT, -1)
        )
        return True

    def read(self) -> Captured | None:
        if self._cap is None:
            return None
        ok, frame = self._cap.read()
        if not ok or frame is None:
            return None
        if self.packets and frame.ndim == 2 and frame.shape[0] == 1 and frame.dtype == np.uint8:
            got = Captured(jpeg=frame.reshape(-1))
            if got.width or self._packets_seen:
                self._packets_seen = True
                return got  # (a broken packet later on is counted and skipped by the capture)
            # The first packet is no JPEG (a Motion JPEG variant): decode frames as for any other codec.
            log.warning("%s: its Motion JPEG packets are not plain JPEG; decoding frames instead", self.description)
            self.packets = False
            self._cap.set(cv2.CAP_PROP_FORMAT, 0)
            return self.read()
        return Captured(image=frame) if frame.ndim == 3 else None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class ImageFolderSource(FrameSource):
    """A folder of images, in name order, as frames at `fps` (default 10)."""

    live = False

    def __init__(self, folder: Path, fps: float | None) -> None:
        self.folder = folder
        self.fps = fps or 10.0
        self.description = str(folder)
        self._files: list[Path] = []
        self._next = 0

    def open(self) -> bool:
        if not self.folder.is_dir():
            return False
        self._files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self._next = 0
        return bool(self._files)

    def read(self) -> Captured | None:
        while self._next < len(self._files):
            path = self._files[self._next]
            self._next += 1
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is not None:
                return Captured(image=img)
            log.warning("%s: not a readable image, skipped", path)
        return None


def open_source(cam: CameraConfig, cfg: KioskConfig) -> FrameSource:
    src = cam.source
    if isinstance(src, int):
        return VideoSource(src, live=True, fps=cam.fps)
    if re.match(r"^[a-z][a-z0-9+.-]*://", src, re.I):
        return VideoSource(src, live=True, fps=cam.fps)
    path = cfg.resolve(Path(src))
    if path.is_dir():
        return ImageFolderSource(path, cam.fps)
    return VideoSource(str(path), live=False, fps=cam.fps)


@dataclass
class CaptureStats:
    sent: int = 0
    dropped: int = 0
    faults: int = 0
    held: int = 0  # not sent: the verifier said the scene is empty and the frame had not changed


@dataclass
class _Playback:
    """Where one run of a capture stands: frames read, where the source was last (re)opened, the retry delay."""

    seq: int = 0  # frames read so far: the next frame's seq
    seq_at_open: int = 0  # seq when the source was last opened
    t0: float = 0.0  # monotonic time of that open: a file sent in real time is paced from there
    pts_offset: float = 0.0  # media time of that open: a looped or reopened file continues its clock
    opened: bool = False
    backoff: float = 0.5  # seconds to wait before the next try to open


class IdleHold:
    """Which of a live camera's frames to hold back while the verifier says its scene is empty.

    Keeps the thumbnails of the last frames sent; a hint names one of them (seq and clock must both match, so
    a hint meant for an earlier run of this capture matches nothing). A frame is held while the hint is
    fresh (renewed within LAPSE_INTERVALS safety-net intervals), less than `every_s` after the last frame
    sent, and unchanged from the hinted one; a changed frame ends the hold until the verifier hints again.
    """

    KEEP = 64  # thumbnails of frames sent (two seconds at 30 fps: a hint arrives well within that)
    LAPSE_INTERVALS = 3.0
    MAX_READS = 8  # hints read per frame (a flood cannot hold the loop)

    def __init__(self, sock: zmq.Socket[bytes] | None, camera_id: str) -> None:
        self.sock = sock
        self.camera_id = camera_id
        self.bad = 0
        self._sent: deque = deque(maxlen=self.KEEP)  # (seq, clock, thumbnail)
        self._ref: np.ndarray | None = None
        self._hint: IdleHint | None = None
        self._hint_at = 0.0
        self._last_sent_clock = -1e18

    def _listen(self, sock: zmq.Socket[bytes], now: float) -> None:
        for _ in range(self.MAX_READS):
            try:
                parts = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                hint = decode_idle(parts)
            except DECODE_ERRORS:
                self.bad += 1
                continue
            if hint.camera_id != self.camera_id:  # the subscription is a prefix: "cam1" also hears "cam10"
                continue
            if not hint.idle:
                self._ref, self._hint = None, None
                continue
            for seq, clock, thumb in self._sent:
                if seq == hint.seq and clock == hint.clock:
                    self._ref, self._hint, self._hint_at = thumb, hint, now
                    break

    def hold(self, seq: int, clock: float, thumb: np.ndarray, now: float) -> bool:
        """Hold the frame with this thumbnail (scene_change.thumbnail) back (True), or send it (False;
        remembered as sent)."""
        if self.sock is None:
            return False
        self._listen(self.sock, now)
        hint = self._hint
        if hint is not None and self._ref is not None:
            if now - self._hint_at > self.LAPSE_INTERVALS * hint.every_s + 0.5:
                self._ref, self._hint = None, None
            elif clock - self._last_sent_clock < hint.every_s:
                if unchanged(thumb, self._ref, hint.change):
                    return True
                self._ref, self._hint = None, None  # something moved: every frame again until told
        self._sent.append((seq, clock, thumb))
        self._last_sent_clock = clock
        return False


class Capture:
    """The capture loop of one camera; `run()` returns when the source ends or `stop()` is called."""

    def __init__(self, cfg: KioskConfig, camera_id: str) -> None:
        cams = {c.id: c for c in cfg.cameras}
        if camera_id not in cams:
            raise ConfigError(
                f"--camera {camera_id}: no such camera in {cfg.source or 'the config'} "
                f"(cameras: {', '.join(cams) or 'none'})"
            )
        self.cfg = cfg
        self.cam = cams[camera_id]
        self.source = open_source(self.cam, cfg)
        self.transport = Transport(cfg, role=f"capture {camera_id}", client_key=self.cam.key)
        self.sock = self.transport.frame_sender()
        # Idle hints only for a camera that sends in real time (a replay sends every frame, as it always did).
        self.idle = IdleHold(
            self.transport.event_subscriber([IDLE_TOPIC + camera_id])
            if self.cam.realtime or self.source.live
            else None,
            camera_id,
        )
        self.stats = CaptureStats()
        self._stop = threading.Event()
        self._started_at = time.time()  # tells the verifier's counters that a restarted capture counts anew
        self._status = "starting"
        self._last_error = ""
        self._last_health = 0.0
        self._window: list[float] = []
        self._decode_ms: deque = deque(maxlen=2000)

    def stop(self) -> None:
        self._stop.set()

    def _send(self, parts: list, *, block: bool) -> bool:
        """Send a message; without `block` a full queue drops it (False)."""
        if not block:
            try:
                self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                return False
        while not self._stop.is_set():
            if self.sock.poll(200, zmq.POLLOUT):
                self.sock.send_multipart(parts, copy=False)
                return True
        return False

    def _health(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_health < HEALTH_EVERY_S:
            return
        self._last_health = now
        self._window = [t for t in self._window if now - t <= 5.0]
        fps = len(self._window) / 5.0
        body = {
            "component": f"capture.{self.cam.id}",
            "camera_id": self.cam.id,
            "gate_id": self.cam.gate,
            "started_at": self._started_at,
            "status": self._status,
            "fps": round(fps, 2),
            "sent": self.stats.sent,
            "drops": self.stats.dropped,
            "held": self.stats.held,
            "faults": self.stats.faults,
            "last_error": self._last_error,
            "source": self.source.description,
        }
        if self._decode_ms:
            p50, p99 = np.percentile(np.asarray(self._decode_ms), [50, 99])
            body["decode_ms"] = {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}
        self._send(encode_json(f"{HEALTH_TOPIC}capture.{self.cam.id}", body), block=False)

    def _fault(self, message: str) -> None:
        self.stats.faults += 1
        self._status = "reconnecting"
        self._last_error = message
        log.warning("camera %s: %s", self.cam.id, message)
        self._health(force=True)

    def _broken(self, header: FrameHeader) -> None:
        """One packet that does not decode: counted and skipped, the stream goes on."""
        self.stats.faults += 1
        self._last_error = f"frame {header.seq} of {self.source.description} does not decode; skipped"
        log.debug("camera %s: %s", self.cam.id, self._last_error)

    def run(self) -> int:
        """Read, hold or send, and pace frames until the source ends or `stop()` is called; then say `eof`."""
        realtime = self.cam.realtime or self.source.live
        log.info(
            "capture %s (gate %s): %s, %s",
            self.cam.id,
            self.cam.gate,
            self.source.description,
            "real time" if realtime else "replay, no drops",
        )
        play = _Playback()
        while not self._stop.is_set():
            if not play.opened and not self._open(play):
                continue
            t_read = time.perf_counter()
            frame = self.source.read()
            if frame is None:
                if self._source_ended(play):
                    break
                continue
            play.backoff = 0.5  # a frame came: the camera is healthy again
            if not self._deliver(frame, play, realtime, t_read):
                continue
            self._health()
            if not self.source.live and realtime:
                self._pace(play)
        self.source.close()
        if not self._stop.is_set():
            self._finish(play.seq)
        return 0

    def _open(self, play: _Playback) -> bool:
        """(Re)open the source; a failure is reported and waited out (the loop tries again)."""
        source = self.source
        if not source.open():
            self._fault(f"cannot open {source.description}; retrying in {play.backoff:.1f}s")
            self._back_off(play)
            return False
        play.opened = True
        # A looped or reopened file continues the media clock (plus a gap).
        play.pts_offset += (play.seq - play.seq_at_open) / source.fps + (1.0 if play.seq else 0.0)
        play.t0, play.seq_at_open = time.monotonic(), play.seq
        self._status = "ok"
        log.info("camera %s opened (%.1f fps)", self.cam.id, source.fps)
        self._health(force=True)
        return True

    def _back_off(self, play: _Playback) -> None:
        """Wait before the next try, twice as long each time (up to BACKOFF_MAX_S), so a dead camera is not
        hammered."""
        self._stop.wait(play.backoff)
        play.backoff = min(play.backoff * 2, BACKOFF_MAX_S)

    def _source_ended(self, play: _Playback) -> bool:
        """The source gave no frame: the end of a file (True: stop), a loop to start over, or a camera fault to
        back off from and reopen."""
        source, cam = self.source, self.cam
        if not source.live and (not cam.loop or play.seq > play.seq_at_open):
            if cam.loop:
                play.opened = False
                return False
            return True
        # A camera that stopped delivering, or a looped file with no readable frame: back off.
        play.opened = False
        source.close()
        self._fault(f"{source.description} delivers no frames; reopening in {play.backoff:.1f}s")
        self._back_off(play)
        return False

    def _deliver(self, frame: Captured, play: _Playback, realtime: bool, t_read: float) -> bool:
        """Number one frame, then hold it back (idle) or send it; False for a frame that does not decode
        (counted and skipped)."""
        cam = self.cam
        captured_at = time.time()
        pts = None if self.source.live else (play.seq - play.seq_at_open) / self.source.fps + play.pts_offset
        header = FrameHeader(cam.id, cam.gate, play.seq, captured_at, frame.width, frame.height, cam.encoding, pts)
        play.seq += 1
        self._window.append(captured_at)  # fps: what the camera delivers, sent or not
        thumb = None
        if realtime and self.idle.sock is not None or frame.jpeg is not None and cam.encoding == "jpeg":
            thumb = frame.thumb()  # for a packet sent as it came, also the check that it decodes
            if thumb is None:
                self._broken(header)
                return False
        if thumb is not None and self.idle.hold(header.seq, header.clock, thumb, time.monotonic()):
            self.stats.held += 1
            self._decode_ms.append((time.perf_counter() - t_read) * 1000)
            return True
        return self._send_frame(header, frame, realtime, t_read)

    def _send_frame(self, header: FrameHeader, frame: Captured, realtime: bool, t_read: float) -> bool:
        """Encode and send one frame: a Motion JPEG packet as it came, else the decoded pixels. In real time a
        full queue drops it (counted), so the verifier always gets a recent frame."""
        if frame.jpeg is not None and self.cam.encoding == "jpeg":
            parts = encode_frame(header, packet=frame.jpeg)
        else:
            image = frame.image()
            if image is None:
                self._broken(header)
                return False
            parts = encode_frame(header, image)
        self._decode_ms.append((time.perf_counter() - t_read) * 1000)
        if self._send(parts, block=not realtime):
            self.stats.sent += 1
        else:
            self.stats.dropped += 1
        return True

    def _pace(self, play: _Playback) -> None:
        """Pace a file sent in real time at its own frame rate."""
        due = play.t0 + (play.seq - play.seq_at_open) / self.source.fps
        delay = due - time.monotonic()
        if delay > 0:
            self._stop.wait(delay)

    def _finish(self, frames: int) -> None:
        """The source ended: a last health report, then `eof.<camera>` with the counts, so a replay's reader
        knows it has everything."""
        cam = self.cam
        self._status = "eof"
        self._health(force=True)
        body = {
            "camera_id": cam.id,
            "gate_id": cam.gate,
            "frames": frames,
            "sent": self.stats.sent,
            "dropped": self.stats.dropped,
        }
        self._send(encode_json(EOF_TOPIC + cam.id, body), block=True)
        log.info(
            "camera %s: end of %s after %d frames (%d sent, %d dropped)",
            cam.id,
            self.source.description,
            frames,
            self.stats.sent,
            self.stats.dropped,
        )

    def close(self) -> None:
        self.sock.close(linger=2000 if not self._stop.is_set() else 0)
        self.transport.close()


def run_capture(cfg: KioskConfig, camera_id: str) -> int:
    return serve(Capture(cfg, camera_id))
