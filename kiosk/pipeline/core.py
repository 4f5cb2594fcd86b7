"""The verifier's core: frames in, decisions out, with no sockets, files or threads.

`offer()` queues what arrived per camera (a real-time camera keeps only its
newest frame; an end-of-source marker is never dropped with stale frames),
`step(now)` takes at most one frame per camera and runs the named stages on
all of them at once, `tick(now)` applies the clock (decision timeouts,
tracks ageing out when a camera stalls), `control()` takes claims. Each
returns the `Verdict`s it decided: plain decisions, which the gatekeeper
(`kiosk.pipeline.gatekeeper`) checks against the gallery, the boarding
store and the audit log before any gate hears of them; the service around
both (`kiosk.services.verifier`) owns the sockets, the audit log, the
gallery file and the heartbeat.

The core coordinates its parts, one job each:
- `kiosk.pipeline.intake`: the per-camera queues, which frames a step takes, the idle rule and its hints;
- `kiosk.pipeline.deciding`: the stages of a step, detect -> track -> select -> align -> quality -> ration
  -> embed -> identity check -> match (`kiosk.pipeline.matching`) -> decide, over all faces of all cameras
  as one table (`StepFaces`);
- `kiosk.pipeline.camera`: what they share (each camera's state, the site, the `Verdict`).

The core takes its own sections of the configuration (`policy`, the
`cameras`, `pad`), never the whole of it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from kiosk.boarding.gates import GateFlights
from kiosk.boarding.matrix import GalleryMatrix
from kiosk.config import CameraConfig, PadConfig, PolicyConfig
from kiosk.messaging.messages import Eof, Frame, IdleHint
from kiosk.pipeline.camera import CAMERA_SILENT_S, Arrival, CameraState, Site, Verdict, View
from kiosk.pipeline.core_metrics import CoreMetrics, Throughput
from kiosk.pipeline.deciding import RECHECK_EVERY, RECHECK_OVERDUE, SAME_PERSON, Decider
from kiosk.pipeline.intake import REPLAY_BACKLOG, FrameIntake, IdleRule, IdleWatch
from kiosk.pipeline.policy import DecisionPolicy
from kiosk.pipeline.tracking import Tracker
from kiosk.vision.engine import FaceModels
from kiosk.vision.faces import Faces

__all__ = [  # what the service and the tests import from here, wherever it now lives
    "CAMERA_SILENT_S",
    "RECHECK_EVERY",
    "RECHECK_OVERDUE",
    "REPLAY_BACKLOG",
    "SAME_PERSON",
    "Arrival",
    "CameraState",
    "CoreMetrics",
    "Eof",
    "Frame",
    "IdleRule",
    "Verdict",
    "VerifierCore",
    "View",
]

log = logging.getLogger(__name__)


class VerifierCore:
    """The verifier's rules, fed arrivals and a clock; see the module docstring.

    It takes its own sections of the config: `policy`, the `cameras`, and for liveness `pad` with whether
    `models.pad` names texture models (`textured`). `flights` is the gallery view; a bare matrix is a site
    without flights (every gate matches against everyone)."""

    def __init__(
        self,
        policy: PolicyConfig,
        cameras: Sequence[CameraConfig],
        engine: FaceModels,
        flights: GateFlights | GalleryMatrix,
        *,
        pad: PadConfig | None,
        textured: bool,
        metrics: CoreMetrics,
    ) -> None:
        self.engine = engine
        self.site = Site(flights if isinstance(flights, GateFlights) else GateFlights(flights))
        self.metrics = metrics
        self.policy = DecisionPolicy(policy, pad, textured=textured)
        self.claim_ttl_s = policy.claim_ttl_s
        self.cameras = {
            c.id: CameraState(c.id, c.gate, c.realtime, Tracker(c.id, max_age_s=policy.track_max_age_s))
            for c in cameras
        }
        self.throughput = Throughput(metrics)
        self.idle = IdleWatch(IdleRule(policy.idle_change, policy.idle_detect_every_s), self.site, metrics)
        self.decider = Decider(policy, self.policy, engine, self.cameras, self.site, self.idle, self.throughput)
        self.intake = FrameIntake(
            policy, self.policy, self.cameras, self.site, self.idle, self.throughput, self.decider.ended
        )
        self._set_gate_metrics()

    # -- what the service reads and sets ----------------------------------------
    @property
    def flights(self) -> GateFlights:
        """The gallery view: which flight each gate boards, and what it matches against."""
        return self.site.flights

    @property
    def matrix(self) -> GalleryMatrix:
        """Everyone enrolled (the 1:N search matrix)."""
        return self.site.flights.full

    @property
    def preview_gates(self) -> set[str]:
        """Gates a console watches: their last frame is kept (cam.view), their captures never told to idle."""
        return self.site.watched

    def watch(self, gates: set[str]) -> None:
        """The gates a console watches now: the cameras of a gate newly watched send every frame again."""
        self.wake(gates - self.site.watched)
        self.site.watched = set(gates)

    def take_hints(self) -> list[IdleHint]:
        """The idle hints for the captures since the last call (the service publishes them)."""
        hints, self.idle.hints[:] = list(self.idle.hints), []
        return hints

    @property
    def steps(self) -> int:
        return self.decider.steps

    @property
    def faces_total(self) -> int:
        return self.decider.faces_total

    @property
    def first_captured_at(self) -> float | None:
        return self.decider.first_captured_at

    @property
    def last_done_at(self) -> float | None:
        return self.decider.last_done_at

    @property
    def last_times(self) -> dict[str, float]:
        """Milliseconds per stage of the last step."""
        return self.decider.last_times

    @property
    def last_error(self) -> str:
        """What failed last: "liveness: ..." when a liveness model failed."""
        return self.decider.matcher.last_error

    @property
    def pad_errors(self) -> int:
        return self.decider.matcher.pad_errors

    def adopt(self, flights: GateFlights) -> None:
        """A new gallery view. A gate whose flight changed (opened, closed, another flight) starts afresh:
        its tracks end without a decision, so nobody half-decided for one flight is decided for the next."""
        old = self.site.flights
        self.site.flights = flights
        for cam in self.cameras.values():
            if old.flight_of(cam.gate_id) != flights.flight_of(cam.gate_id) and cam.tracker.tracks:
                for track in cam.tracker.end_all():
                    self.policy.state(track).decided = True
                log.info(
                    "gate %s: now %s; camera %s's tracks dropped",
                    cam.gate_id,
                    f"boarding {flights.flight_of(cam.gate_id)}" if flights.flight_of(cam.gate_id) else "not boarding",
                    cam.camera_id,
                )
        self._set_gate_metrics()

    def _set_gate_metrics(self) -> None:
        for gate in {c.gate_id for c in self.cameras.values()}:
            self.metrics.gate_boarding.labels(gate=gate).set(1.0 if self.site.flights.flight_of(gate) else 0.0)

    # -- input -----------------------------------------------------------------
    def offer(self, item: Arrival, now: float) -> None:
        """Queue an arrival (see `FrameIntake.offer`)."""
        self.intake.offer(item, now)

    def backlog_full(self) -> bool:
        """A replay camera has enough waiting: read no more until it is processed (the capture waits)."""
        return self.intake.backlog_full()

    def has_pending(self) -> bool:
        return self.intake.has_pending()

    def wake(self, gates: set[str]) -> None:
        """The cameras of `gates` (a console started watching) send every frame again."""
        self.idle.wake(self.cameras, gates)

    # -- work ------------------------------------------------------------------
    def step(self, now: float) -> list[Verdict]:
        """Take at most one frame per camera (end-of-source markers on the way are handled; a live camera's
        frame too old to act on is dropped and counted) and process them."""
        batch, verdicts = self.intake.take(now)
        if batch:
            verdicts += self.process(batch, now)
        return verdicts

    def process(self, frames: list[Frame], now: float) -> list[Verdict]:
        """One frame of each of several cameras through every stage."""
        return self.decider.process(frames, now)

    def tick(self, now: float) -> list[Verdict]:
        """What the clock decides: transactions past `decision_timeout_s`, and the tracks of a live camera that
        stalled (no frame) ageing out as its frame clock would."""
        verdicts: list[Verdict] = []
        for cam in self.cameras.values():
            # The frame clock now: a live camera's runs with the wall clock, a replay's only with its frames.
            clock = cam.last_clock + (now - cam.last_wall if cam.realtime and cam.last_wall else 0.0)
            for track in cam.tracker.tracks:
                decision = self.policy.check_timeout(track, clock)
                if decision is not None:
                    verdicts.append(self.decider.verdict(cam, track, decision, now))
            if cam.realtime and not cam.pending and cam.tracker.tracks and cam.last_wall:
                _, ended = cam.tracker.update(Faces.empty(), clock)
                verdicts += self.decider.ended(cam, ended, now)
        return verdicts

    def end_all(self, now: float) -> list[Verdict]:
        """Decide what is left of every track (the service is stopping)."""
        return [v for cam in self.cameras.values() for v in self.decider.ended(cam, cam.tracker.end_all(), now)]

    def control(self, request: Mapping[str, object], now: float) -> dict[str, object]:
        """A claim: the next transaction at a gate is a 1:1 check against one enrolled subject."""
        cmd = request.get("cmd")
        if cmd != "claim":
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        gate, subject = request.get("gate_id"), request.get("subject_id")
        ttl = request.get("ttl_s", self.claim_ttl_s)
        gates = {c.gate_id for c in self.cameras.values()}
        if not isinstance(gate, str) or gate not in gates:
            return {"ok": False, "error": f"unknown gate {gate!r} (gates: {sorted(gates)})"}
        if not isinstance(subject, str) or subject not in self.matrix.subject_ids:
            return {"ok": False, "error": f"subject {subject!r} is not enrolled"}
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl <= 86400:
            return {"ok": False, "error": "ttl_s must be a number of seconds from 0 to 86400"}
        claim = self.policy.add_claim(gate, subject, float(ttl), now)
        return {"ok": True, "gate_id": gate, "subject_id": subject, "expires_at": claim.expires_at}

    def fps(self, now: float, window_s: float = 5.0) -> float:
        return self.throughput.fps(now, window_s)
