"""Prometheus text-format metrics: counters, gauges and latency summaries, served over HTTP.

Small on purpose (no client library): the verifier updates plain numbers
under a lock, a daemon thread serves `/metrics`.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _fmt(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


class Metrics:
    """The verifier's metrics; `render()` gives the exposition text."""

    def __init__(self, window: int = 2000) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._samples: dict[str, dict[Labels, deque]] = defaultdict(lambda: defaultdict(lambda: deque(maxlen=window)))
        self._help: dict[str, tuple[str, str]] = {}

    def inc(self, name: str, value: float = 1.0, help: str = "", **labels: str) -> None:
        with self._lock:
            self._help.setdefault(name, ("counter", help))
            self._counters[name][_labels(labels)] += value

    def set(self, name: str, value: float, help: str = "", **labels: str) -> None:
        with self._lock:
            self._help.setdefault(name, ("gauge", help))
            self._gauges[name][_labels(labels)] = value

    def observe(self, name: str, value: float, help: str = "", **labels: str) -> None:
        with self._lock:
            self._help.setdefault(name, ("summary", help))
            self._samples[name][_labels(labels)].append(value)

    def quantiles(self, name: str, **labels: str) -> dict[str, float]:
        with self._lock:
            data = list(self._samples.get(name, {}).get(_labels(labels), ()))
        if not data:
            return {}
        p50, p99 = np.percentile(data, [50, 99])
        return {"p50": float(p50), "p99": float(p99), "n": float(len(data))}

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(_labels(labels), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help) in sorted(self._help.items()):
                lines.append(f"# HELP {name} {help or name}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    for labels, v in self._counters[name].items():
                        lines.append(f"{name}{_fmt(labels)} {v:g}")
                elif kind == "gauge":
                    for labels, v in self._gauges[name].items():
                        lines.append(f"{name}{_fmt(labels)} {v:g}")
                else:
                    for labels, samples in self._samples[name].items():
                        data = np.asarray(samples)
                        for q in (0.5, 0.9, 0.99):
                            ql = labels + (("quantile", str(q)),)
                            lines.append(f"{name}{_fmt(ql)} {float(np.quantile(data, q)):.6g}")
                        lines.append(f"{name}_sum{_fmt(labels)} {float(data.sum()):.6g}")
                        lines.append(f"{name}_count{_fmt(labels)} {len(data)}")
        return "\n".join(lines) + "\n"

    def serve(self, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer | None:
        """Serve /metrics on host:port in a daemon thread; None (and a warning) if the port is taken."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            log.warning("metrics: cannot listen on %s:%d (%s); metrics are off", host, port, exc)
            return None
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics", host, port)
        return server
