"""The match stage of a step: each face being decided against the gallery (1:1 under a claim, else one
batched 1:N search per gallery a gate matches against), and its liveness observation."""

from __future__ import annotations

import logging

import numpy as np

from kiosk.boarding.matrix import GalleryMatrix, Match
from kiosk.messaging.messages import Frame
from kiosk.pipeline.camera import Site
from kiosk.pipeline.policy import Claim, DecisionPolicy
from kiosk.pipeline.step_faces import StepFaces
from kiosk.vision.engine import FaceModels
from kiosk.vision.liveness import PadObservation

log = logging.getLogger("kiosk.pipeline.core")  # the core's log lines keep the name they had


class Matcher:
    """Who each face is, and whether it is alive. A liveness model that fails is counted (`pad_errors`) and
    named in `last_error`; the faces it was to observe have no evidence from that frame."""

    def __init__(self, policy: DecisionPolicy, engine: FaceModels, site: Site) -> None:
        self.policy = policy
        self.engine = engine
        self.site = site
        self.pad_errors = 0
        self.last_error = ""  # "liveness: ..." when a liveness model failed

    @property
    def pad_on(self) -> bool:
        """Liveness is checked: a texture model is loaded and the policy asks for it."""
        return self.engine.pad is not None and self.policy.pad is not None

    def match(
        self, rows: StepFaces, gates: list[str], claims: list[Claim | None]
    ) -> tuple[list[Match], list[Match | None]]:
        """Each face's match: under a claim (bound at a track's first quality frame) 1:1; else in one search per
        gallery (a boarding gate's flight, or everyone). Also, for the faces at boarding gates that matched
        nobody on their flight, their match among everyone when that is someone not on the flight (at the
        wrong gate?)."""
        flights = self.site.flights
        emb = rows.embedded()
        found: dict[int, Match] = {}
        by_gallery: dict[int, tuple[GalleryMatrix, list[int]]] = {}
        for i, (claim, gate) in enumerate(zip(claims, gates, strict=True)):
            if claim is None:
                gallery = flights.matrix_for(gate)
                by_gallery.setdefault(id(gallery), (gallery, []))[1].append(i)
        for gallery, picked in by_gallery.values():
            found.update(zip(picked, gallery.search(emb[picked]), strict=True))
        for i, claim in enumerate(claims):
            if claim is not None:
                found[i] = flights.full.search(emb[i : i + 1], only=claim.subject_id)[0]
        matches = [found[i] for i in range(len(rows))]
        outsiders: list[Match | None] = [None] * len(rows)
        strays = [
            i
            for i, (claim, gate, match) in enumerate(zip(claims, gates, matches, strict=True))
            if claim is None and flights.flight_of(gate) and not self.policy.match_ok(match)
        ]
        if strays:
            for i, anyone in zip(strays, flights.full.search(emb[strays]), strict=True):
                if self.policy.match_ok(anyone) and not flights.on_flight(gates[i], anyone.subject_id):
                    outsiders[i] = anyone
        return matches, outsiders

    def liveness(self, frames: list[Frame], rows: StepFaces) -> list[PadObservation | None]:
        """The liveness observation of each face, None with liveness off or where a model failed: the track
        then has no evidence from this frame, waits and fails closed."""
        pad = self.engine.pad
        out: list[PadObservation | None] = [None] * len(rows)
        if pad is None or self.policy.pad is None:
            return out
        for i in rows.frames_present:
            pos = np.flatnonzero(rows.frame == i)
            try:
                observed = pad.observe(frames[int(i)].image, rows.faces.boxes[pos])
            except Exception as exc:  # noqa: BLE001 - a broken model must never let an accept through
                self.pad_errors += 1
                self.last_error = f"liveness: {exc}"
                if self.pad_errors == 1 or self.pad_errors % 100 == 0:
                    log.error(
                        "liveness model failed (%d so far): %s; accepts wait and fail closed", self.pad_errors, exc
                    )
                continue
            for p, obs in zip(pos, observed, strict=True):
                out[int(p)] = obs
        return out
