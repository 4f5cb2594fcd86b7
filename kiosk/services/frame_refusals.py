"""The verifier's account of refused frames, and of clock skew between it and the capture hosts.

The frame channel (kiosk.messaging.channels) refuses, before decoding
anything, a message from a key that does not own its camera, and a frame
whose `seq` or `captured_at` is out of bounds. `FrameRefusals` counts them
per camera and reason (`kiosk_frames_refused_total{camera,reason}`, `kiosk
status`), and follows each camera's clock-skew episode: a frame refused for
coming from the future beyond the tolerance (or from the far past) starts
one, logged once with the offset seen; it ends, with one more line, once
that camera has sent no such frame for `CLEAR_AFTER_S`. While it lasts the
status says so (`clock_skew`, `kiosk_clock_skew_exceeded{camera}` 1): the
camera's frames are refused, so its gate decides nothing (fail closed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kiosk.messaging.channels import REFUSALS, Refusal
from kiosk.messaging.messages import CLOCK_SKEW_TOLERANCE_S, MAX_FRAME_PAST_S
from kiosk.services.metrics import VerifierMetrics

log = logging.getLogger(__name__)

CLOCK_REASONS = ("future", "past")
# A skew episode ends this long after the camera's last frame refused for its clock: long enough that a
# camera whose frames straddle the bound does not log an episode a second, short enough to say "fixed" soon.
CLEAR_AFTER_S = 10.0


@dataclass
class SkewEpisode:
    """One camera's capture clock out of bounds: since when (monotonic), the last offset seen
    (captured_at minus this host's clock, s) and the frames refused for it."""

    since: float
    last_at: float
    offset_s: float
    refused: int = 1


class FrameRefusals:
    """Counts refused frames per camera and reason, and follows clock-skew episodes (see module docstring)."""

    def __init__(self, metrics: VerifierMetrics, cameras: Iterable[str]) -> None:
        self.metrics = metrics
        self.counts: dict[str, dict[str, int]] = {cam: dict.fromkeys(REFUSALS, 0) for cam in cameras}
        self.skewed: dict[str, SkewEpisode] = {}

    def refused(self, refusal: Refusal, mono: float) -> bool:
        """Count one refusal; True when it starts a clock-skew episode (the status changes)."""
        counts = self.counts.get(refusal.camera_id)
        if counts is None or refusal.reason not in counts:  # the channel names configured cameras only
            return False
        counts[refusal.reason] += 1
        self.metrics.frames_refused.labels(camera=refusal.camera_id, reason=refusal.reason).inc()
        if refusal.reason not in CLOCK_REASONS or refusal.offset_s is None:
            return False
        episode = self.skewed.get(refusal.camera_id)
        if episode is not None:
            episode.last_at, episode.offset_s = mono, refusal.offset_s
            episode.refused += 1
            return False
        self.skewed[refusal.camera_id] = SkewEpisode(mono, mono, refusal.offset_s)
        self.metrics.clock_skew.labels(camera=refusal.camera_id).set(1)
        log.error(
            "camera %s: its capture's clock is %s (captured_at %+.3g s from this host's clock; tolerance "
            "%g s ahead, %g s behind): its frames are refused until the clocks agree; check NTP on its "
            "capture host",
            refusal.camera_id,
            _how_far(refusal.offset_s),
            refusal.offset_s,
            CLOCK_SKEW_TOLERANCE_S,
            MAX_FRAME_PAST_S,
        )
        return True

    def tick(self, mono: float) -> bool:
        """End the episodes with no clock refusal for CLEAR_AFTER_S; True when one ended."""
        ended = [cam for cam, ep in self.skewed.items() if mono - ep.last_at >= CLEAR_AFTER_S]
        for cam in ended:
            episode = self.skewed.pop(cam)
            self.metrics.clock_skew.labels(camera=cam).set(0)
            log.info(
                "camera %s: no frame out of the clock tolerance for %.0f s; the skew episode is over (%d "
                "frame(s) refused over %.0f s)",
                cam,
                CLEAR_AFTER_S,
                episode.refused,
                episode.last_at - episode.since,
            )
        return bool(ended)

    def status(self, mono: float) -> dict[str, Any]:
        """`clock_skew` of the verifier's status: the bounds and each camera out of them now."""
        return {
            "tolerance_s": CLOCK_SKEW_TOLERANCE_S,
            "max_past_s": MAX_FRAME_PAST_S,
            "cameras": {
                cam: {"offset_s": round(ep.offset_s, 3), "for_s": round(mono - ep.since, 1), "refused": ep.refused}
                for cam, ep in sorted(self.skewed.items())
            },
        }


def _how_far(offset_s: float) -> str:
    return f"{offset_s:.3g} s ahead" if offset_s > 0 else f"{-offset_s:.3g} s behind"
