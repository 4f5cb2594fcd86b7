"""The decision policy: quality frames of one track -> at most one accept, or a reject.

Plain objects, fed one observation at a time; no sockets, no models.

- accept: `accept_frames` quality frames among the track's last
  `reject_after_frames` whose best subject is the same, each with score >=
  `accept_threshold` and a margin >= `min_margin` over the second-best
  subject (1:N), or with score >= threshold against the claimed subject (1:1).
- reject `no_match` (1:N) or `claim_mismatch` (1:1): `reject_after_frames`
  quality frames without an accept.
- reject `wrong_flight` (a gate boarding a flight): `accept_frames` quality
  frames in which the face matched nobody on the flight but, by the same
  rule as an accept, someone enrolled who is not on it.
- reject `timeout`: a track with quality frames but no decision after
  `decision_timeout_s`, or one that leaves undecided after at least
  `accept_frames` quality frames.
- a subject accepted at a gate is not accepted again there for
  `repeat_accept_s` (a person lost and found again by the tracker is
  still one passenger).
- liveness (`pad.enabled`): each quality frame brings a liveness
  observation (kiosk.vision.liveness.TrackLiveness). A track any check
  accuses is rejected `presentation_attack` (whoever it matched). An
  accept needs the fused verdict live (the texture models' in the default
  install; kiosk.vision.liveness_checks); it waits for it up to
  `pad.max_wait_s` (frame clock) and is otherwise rejected
  `liveness_unverified` (fail closed: an agent checks by hand).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kiosk.boarding.matrix import Match
from kiosk.config import PadConfig, PolicyConfig
from kiosk.messaging.reasons import Reason
from kiosk.pipeline.tracking import Track
from kiosk.vision.liveness import PadObservation, TrackLiveness, check_classes
from kiosk.vision.quality import Quality

log = logging.getLogger(__name__)


@dataclass
class Claim:
    """A 1:1 claim: the next transaction at `gate_id` is checked against `subject_id` only."""

    subject_id: str
    gate_id: str
    expires_at: float


@dataclass
class Decision:
    type: str  # "accept" or "reject"
    reason: str | None
    subject_id: str | None
    display_name: str | None
    score: float | None
    frames: int
    captured_at: float
    seq: int | None = None
    candidate_id: str | None = None  # a reject's best-scoring subject (below the bar): for the boarding report
    flight_id: str | None = None  # the flight the gate was boarding
    boarded_at: float | None = None  # already_boarded: when and where the passenger boarded
    boarded_gate_id: str | None = None
    on_flights: list[str] | None = None  # wrong_flight: the flights the passenger is on
    liveness_score: float | None = None  # the weakest liveness check's score (None: liveness off or no evidence)
    liveness_frames: int = 0
    liveness_checks: dict[str, object] | None = None  # what each liveness check saw, and which decided
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Vote:
    subject_id: str | None
    name: str
    score: float
    ok: bool
    captured_at: float
    seq: int | None = None
    wrong_flight: bool = False  # matched someone enrolled who is not on the gate's flight


@dataclass
class TrackState:
    """What the policy keeps per track."""

    window: deque[Vote] = field(default_factory=deque)
    quality_frames: int = 0
    first_quality_at: float | None = None  # frame clock (media time of a replay, capture time of a camera)
    decided: bool = False
    claim: Claim | None = None
    live: TrackLiveness | None = None  # liveness evidence (pad.enabled)
    ready_votes: list[Vote] | None = None  # the votes of an accept waiting for liveness evidence
    ready_at: float | None = None  # frame clock when it started waiting
    ready_gate: str = ""


class DecisionPolicy:
    """Decides per track; holds the claims and the recent accepts per gate."""

    def __init__(
        self,
        cfg: PolicyConfig,
        pad: PadConfig | None = None,
        textured: bool = False,
        liveness: Callable[[Track], TrackLiveness] | None = None,
    ) -> None:
        self.cfg = cfg
        self.pad = pad if pad is not None and pad.enabled else None
        self.textured = textured  # models.pad names texture models: their verdict is needed
        # A track's liveness evidence (evaluate-pad replays recorded checks through this). The check classes are
        # resolved once here (a bad pad.checks fails now), not for every new track.
        classes = check_classes(self.pad, textured) if self.pad is not None else []

        def new_liveness(track: Track) -> TrackLiveness:
            if self.pad is None:
                raise RuntimeError("no liveness evidence is kept with pad.enabled false")
            return TrackLiveness(self.pad, textured, [cls(self.pad) for cls in classes])

        self.new_liveness = liveness or new_liveness
        self.claims: dict[str, Claim] = {}
        self._recent: dict[tuple[str, str], float] = {}

    def remember_accept(self, gate_id: str, subject_id: str, captured_at: float) -> None:
        """Seed the repeat-accept memory (e.g. from the audit log after a restart)."""
        if captured_at > self._recent.get((gate_id, subject_id), float("-inf")):
            self._recent[(gate_id, subject_id)] = captured_at

    def forget_accept(self, gate_id: str, subject_id: str) -> None:
        """An accept that was not published after all (e.g. the audit log could not hold it)."""
        self._recent.pop((gate_id, subject_id), None)

    def match_ok(self, match: Match) -> bool:
        """The 1:N accept rule for one frame: score over the threshold and a margin over the second best."""
        c = self.cfg
        return match.subject_id is not None and match.score >= c.accept_threshold and match.margin >= c.min_margin

    # -- quality ---------------------------------------------------------------
    def quality_ok(self, q: Quality) -> np.ndarray:
        """Which faces count as quality frames."""
        c = self.cfg
        ok: np.ndarray = (
            (q.width >= c.min_face_px)
            & (q.score >= c.min_det_score)
            & (q.sharpness >= c.min_sharpness)
            & (np.abs(q.yaw) <= c.max_yaw)
        )
        return ok

    # -- claims ----------------------------------------------------------------
    def add_claim(self, gate_id: str, subject_id: str, ttl_s: float, now: float) -> Claim:
        claim = Claim(subject_id, gate_id, now + ttl_s)
        self.claims[gate_id] = claim
        log.info(
            "claim: next transaction at gate %s is checked against %s only (for %.0fs)", gate_id, subject_id, ttl_s
        )
        return claim

    def claim_for(self, track: Track, gate_id: str, now: float) -> Claim | None:
        """The claim this track is checked against, bound at its first quality frame."""
        state = self.state(track)
        if state.claim is None and state.quality_frames == 0:
            claim = self.claims.get(gate_id)
            if claim is not None and claim.expires_at < now:
                del self.claims[gate_id]
                claim = None
            if claim is not None:
                del self.claims[gate_id]  # one transaction per claim
                state.claim = claim
        return state.claim

    # -- decisions -------------------------------------------------------------
    @staticmethod
    def state(track: Track) -> TrackState:
        state = track.state
        if not isinstance(state, TrackState):
            state = track.state = TrackState()
        return state

    def needs_frames(self, track: Track) -> bool:
        return not self.state(track).decided

    def observe(
        self,
        track: Track,
        gate_id: str,
        match: Match,
        captured_at: float,
        seq: int | None = None,
        clock: float | None = None,
        outsider: Match | None = None,
        live: PadObservation | None = None,
    ) -> Decision | None:
        """One quality frame of `track`, matched 1:N (or 1:1 under a claim, or against a flight's passengers).

        `captured_at` (wall clock) goes into the decision for its latency; `clock` (the frame clock,
        default `captured_at`) is what `decision_timeout_s` is measured on. `outsider`: at a gate boarding a
        flight, the face's match among everyone enrolled when it matched nobody on the flight and that match
        passes the accept rule for someone not on the flight.
        """
        state = self.state(track)
        if state.decided:
            return None
        state.quality_frames += 1
        now = captured_at if clock is None else clock
        if state.first_quality_at is None:
            state.first_quality_at = now
        if self.pad is not None:
            if state.live is None:
                state.live = self.new_liveness(track)
            state.live.add(live)
            judged = self._liveness(track, state, captured_at, seq, now)
            if judged is not None or state.ready_votes is not None:
                return judged
        self._vote(state, match, outsider, captured_at, seq)
        return self._count(track, state, gate_id, captured_at, seq, now)

    def _vote(
        self, state: TrackState, match: Match, outsider: Match | None, captured_at: float, seq: int | None
    ) -> None:
        """The frame's vote into the track's window (kept to the last `reject_after_frames`): its match, ok when it
        passes the accept rule (under a claim: the claimed subject at `accept_threshold`); or, when it does not
        and the face is a passenger of another flight, that outsider (`wrong_flight`)."""
        c = self.cfg
        if state.claim is not None:
            ok = match.subject_id == state.claim.subject_id and match.score >= c.accept_threshold
        else:
            ok = self.match_ok(match)
        if outsider is not None and not ok:
            state.window.append(
                Vote(outsider.subject_id, outsider.name, outsider.score, False, captured_at, seq, wrong_flight=True)
            )
        else:
            state.window.append(Vote(match.subject_id, match.name, match.score, ok, captured_at, seq))
        while len(state.window) > c.reject_after_frames:
            state.window.popleft()

    def _count(
        self, track: Track, state: TrackState, gate_id: str, captured_at: float, seq: int | None, now: float
    ) -> Decision | None:
        """The window's votes counted: `accept_frames` for one subject accept (or, with liveness on, wait for
        its evidence), as many for one passenger of another flight reject `wrong_flight`, and a full window
        with neither rejects."""
        c = self.cfg
        votes = Counter(v.subject_id for v in state.window if v.ok)
        if votes:
            subject, count = votes.most_common(1)[0]
            if count >= c.accept_frames:
                chosen = [v for v in state.window if v.ok and v.subject_id == subject]
                if self.pad is not None:  # the match is there; is the face live?
                    state.ready_votes, state.ready_at, state.ready_gate = chosen, now, gate_id
                    return self._liveness(track, state, captured_at, seq, now)
                return self._live(state, self._accept(track, gate_id, chosen, captured_at))
        wrong = Counter(v.subject_id for v in state.window if v.wrong_flight)
        if wrong:
            subject, count = wrong.most_common(1)[0]
            if count >= c.accept_frames:
                chosen = [v for v in state.window if v.wrong_flight and v.subject_id == subject]
                state.decided = True
                return self._live(
                    state,
                    Decision(
                        "reject",
                        Reason.WRONG_FLIGHT,
                        subject,
                        chosen[-1].name,
                        max(v.score for v in chosen),
                        len(chosen),
                        captured_at,
                        chosen[-1].seq,
                    ),
                )
        if state.quality_frames >= c.reject_after_frames:
            reason = Reason.CLAIM_MISMATCH if state.claim is not None else Reason.NO_MATCH
            return self._live(state, self._reject(track, reason, captured_at))
        return None

    def _liveness(
        self, track: Track, state: TrackState, captured_at: float, seq: int | None, now: float
    ) -> Decision | None:
        """With liveness on: reject an attack as soon as the evidence says so; let a waiting accept through
        once the evidence says live, or reject it when the wait is over."""
        pad = self.pad
        if pad is None or state.live is None:
            raise RuntimeError("liveness is judged only with pad.enabled and the track's evidence")
        verdict = state.live.verdict
        if verdict == "attack":
            return self._live(state, self._reject(track, Reason.PRESENTATION_ATTACK, captured_at, seq))
        if verdict == "live":
            if state.ready_votes is not None:
                return self._live(state, self._accept(track, state.ready_gate, state.ready_votes, captured_at, seq))
            return None
        if state.ready_votes is not None and state.ready_at is not None and now - state.ready_at >= pad.max_wait_s:
            return self._live(state, self._reject(track, Reason.LIVENESS_UNVERIFIED, captured_at, seq))
        return None

    @staticmethod
    def _live(state: TrackState, d: Decision | None) -> Decision | None:
        """Stamp the track's liveness evidence on its decision."""
        if d is not None and state.live is not None:
            d.liveness_score, d.liveness_frames = state.live.score, state.live.frames
            d.liveness_checks = state.live.report()
        return d

    def _accept(
        self, track: Track, gate_id: str, votes: list[Vote], captured_at: float, seq: int | None = None
    ) -> Decision | None:
        """`seq`: the deciding frame, when it is not the last vote's (an accept that waited for liveness)."""
        state = self.state(track)
        state.decided = True
        subject = votes[-1].subject_id
        if subject is None:
            raise ValueError("an accept's votes name a subject")
        last = self._recent.get((gate_id, subject))
        self._recent[(gate_id, subject)] = captured_at
        if last is not None and captured_at - last < self.cfg.repeat_accept_s:
            log.info(
                "track %d at gate %s: %s again within %.0fs of the last accept; not repeated",
                track.track_id,
                gate_id,
                subject,
                self.cfg.repeat_accept_s,
            )
            return None
        return Decision(
            "accept",
            None,
            subject,
            votes[-1].name,
            max(v.score for v in votes),
            len(votes),
            captured_at,
            votes[-1].seq if seq is None else seq,
        )

    def _reject(self, track: Track, reason: Reason, captured_at: float, seq: int | None = None) -> Decision:
        state = self.state(track)
        state.decided = True
        best = max(state.window, key=lambda v: v.score) if state.window else None
        subject = state.claim.subject_id if state.claim is not None else None
        last = state.window[-1] if state.window else None
        if seq is None and last is not None:
            seq = last.seq
        return Decision(
            "reject",
            reason,
            subject,
            None,
            best.score if best else None,
            state.quality_frames,
            captured_at,
            seq,
            candidate_id=best.subject_id if best else None,
        )

    def check_timeout(self, track: Track, clock: float) -> Decision | None:
        """Reject `timeout` once `clock` (the frame clock of the track's camera) passes the deadline."""
        state = self.state(track)
        if state.decided or state.first_quality_at is None:
            return None
        if (
            self.pad is not None
            and state.ready_votes is not None
            and state.ready_at is not None
            and clock - state.ready_at >= self.pad.max_wait_s
        ):
            return self._live(state, self._reject(track, Reason.LIVENESS_UNVERIFIED, state.window[-1].captured_at))
        if clock - state.first_quality_at >= self.cfg.decision_timeout_s:
            return self._live(state, self._reject(track, Reason.TIMEOUT, state.window[-1].captured_at))
        return None

    def track_ended(self, track: Track) -> Decision | None:
        """A track left the frame undecided: reject `timeout` if it was a transaction.

        A face seen in fewer than `accept_frames` quality frames (someone
        passing the edge of the view) is not a transaction: no event.
        """
        state = self.state(track)
        if state.decided or state.quality_frames < self.cfg.accept_frames:
            if state.claim is not None and not state.decided:
                self.claims.setdefault(state.claim.gate_id, state.claim)  # unused claim goes back
            return None
        reason = Reason.LIVENESS_UNVERIFIED if state.ready_votes is not None else Reason.TIMEOUT
        return self._live(state, self._reject(track, reason, state.window[-1].captured_at))
