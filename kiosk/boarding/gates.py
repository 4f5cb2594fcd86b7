"""Which flight each gate boards, and what a face at that gate is matched against. Plain objects.

A gate boarding a flight matches one-to-few against that flight's passengers only (far fewer chances of a
false match than one-to-all). A face that matches nobody on the flight is matched against the whole
gallery as well, to tell the agent when it is someone enrolled for another flight (`wrong_flight`). A gate
with no flight either matches against everyone (1:N, sites without flights) or, under
`boarding.require_flight`, processes nobody at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiosk.boarding.matrix import GalleryMatrix


@dataclass
class GateFlights:
    full: GalleryMatrix  # everyone enrolled (for 1:N gates and the wrong-flight check)
    assignments: dict[str, str] = field(default_factory=dict)  # gate -> flight it boards
    manifests: dict[str, frozenset[str]] = field(default_factory=dict)  # flight -> subject ids
    require_flight: bool = False
    _by_flight: dict[str, GalleryMatrix] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        full: GalleryMatrix,
        assignments: dict[str, str],
        manifests: dict[str, set[str]],
        require_flight: bool,
        gates: set[str] | None = None,
    ) -> GateFlights:
        """The view for these gates (all when None): only their flights get a search matrix."""
        mine = {g: f for g, f in assignments.items() if gates is None or g in gates}
        man = {f: frozenset(manifests.get(f, ())) for f in set(mine.values())}
        return cls(full, mine, man, require_flight, {f: full.subset(set(ids)) for f, ids in man.items()})

    @property
    def revision(self) -> int:
        return self.full.revision

    def flight_of(self, gate_id: str) -> str | None:
        return self.assignments.get(gate_id)

    def idle(self, gate_id: str) -> bool:
        """The gate boards no flight and must process nobody."""
        return self.require_flight and gate_id not in self.assignments

    def matrix_for(self, gate_id: str) -> GalleryMatrix:
        flight = self.assignments.get(gate_id)
        return self.full if flight is None else self._by_flight[flight]

    def on_flight(self, gate_id: str, subject_id: str | None) -> bool:
        flight = self.assignments.get(gate_id)
        return flight is not None and subject_id in self.manifests.get(flight, frozenset())
