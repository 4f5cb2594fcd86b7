"""What the core counts: the metrics it needs (`CoreMetrics`, a protocol the service's Prometheus metrics
fit) and the frames it has processed (`Throughput`: each camera's count, the frames-per-second window)."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from kiosk.messaging.messages import Frame
from kiosk.pipeline.camera import CameraState


class _Count(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Counter(_Count, Protocol):
    def labels(self, **labels: str) -> _Count: ...


class _Level(Protocol):
    def set(self, value: float) -> None: ...


class _Gauge(Protocol):
    def labels(self, **labels: str) -> _Level: ...


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class CoreMetrics(Protocol):
    """What the core counts (kiosk.services.metrics.VerifierMetrics is the real one). Read-only members, so
    that any counter with these methods will do."""

    @property
    def frames_in(self) -> _Counter: ...
    @property
    def frames_stale(self) -> _Counter: ...
    @property
    def frames_too_old(self) -> _Counter: ...
    @property
    def frames_not_boarding(self) -> _Counter: ...
    @property
    def frames_idle(self) -> _Counter: ...
    @property
    def frames_processed(self) -> _Counter: ...
    @property
    def faces(self) -> _Counter: ...
    @property
    def embeddings_deferred(self) -> _Count: ...
    @property
    def gate_boarding(self) -> _Gauge: ...
    @property
    def wake_latency(self) -> _Histogram: ...

    def observe_frame(self, ms: float) -> None: ...
    def observe_deciding_frame(self, ms: float) -> None: ...
    def observe_stage(self, stage: str, ms: float) -> None: ...


class Throughput:
    """The frames processed, whether detected or judged idle: counted per camera and in the metrics, their
    camera's clocks moved on, and the wall times kept for `fps`."""

    def __init__(self, metrics: CoreMetrics) -> None:
        self.metrics = metrics
        self._window: deque[float] = deque(maxlen=20000)

    def processed(self, cam: CameraState, frame: Frame, now: float) -> None:
        cam.processed += 1
        cam.last_clock, cam.last_wall = frame.header.clock, now
        self._window.append(now)
        self.metrics.frames_processed.labels(camera=cam.camera_id).inc()

    def fps(self, now: float, window_s: float = 5.0) -> float:
        return sum(1 for t in self._window if now - t <= window_s) / window_s
