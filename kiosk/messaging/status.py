"""The verifier's status and heartbeat as typed values (what `kiosk status`, the console, the bench and the hooks
read), and their JSON exactly as the verifier has always sent it.

`VerifierStatus` is the reply to the control `status` command (the tools key's view; `StatusReply` adds what
the reply says of the asking key). Every heartbeat interval the verifier splits it (`heartbeat_parts`): its
own health (`VerifierHeartbeat`, topic `health.verifier`, for every allow-listed key: no cameras, no gates, no
claims, the unreadable subjects as a count only) and one part per gate (`GateHeartbeat`, topic
`health.gate.<gate>`: that gate's flight, cameras and event count).

`to_json()` gives the dict the verifier sends: the same keys, in the same order, the same value types, and the
optional keys only when they apply. `from_json()` is for readers, which may hear a peer of another version: a
field it lacks takes its default, one it adds is ignored, and a value of the wrong type takes the default and
is named in the value's `problems` (never an exception, so no reader falls over on one odd field); only
something that is not a JSON object at all is refused, with `StatusError`. Numbers are kept as they came (an
int stays an int), so what is read and written again is what was sent.

This process's own values are read strictly instead (`from_json(..., strict=True)`, and `own()` for the parts
its modules still make as dicts): there a missing or malformed field is a bug, and raises StatusError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from kiosk.messaging.messages import BadMessage

T = TypeVar("T")
MAX_PROBLEMS = 50
JsonObject = dict[str, Any]
# A key's gates in its summary: "*" (every gate) or the gates by name.
GateScope = Literal["*"] | tuple[str, ...]


class StatusError(BadMessage):
    """A status or heartbeat that is not a JSON object (nothing in it to read), or, read strictly, one that lacks
    a field or has one of the wrong type."""


class _Strict(list[str]):
    """The problems of a value read strictly: a missing field is one too."""


def _done(value: T, problems: list[str]) -> T:
    if isinstance(problems, _Strict) and problems:
        raise StatusError("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return value


def own(read: Callable[[object, str, list[str]], T], data: object, where: str) -> T:
    """A part of the status from the dict a module of this process made (FrameRefusals.status(), a latency
    window's quantiles(), ...), read strictly: a missing or malformed field is a bug here, not a peer's, so it
    raises StatusError instead of taking a default."""
    problems = _Strict()
    return _done(read(data, where, problems), problems)


class _Fields:
    """Reads the fields of one JSON object: each missing one takes its default, each malformed one too and is
    noted (as `where.key: why`) in `problems`, shared by the whole value being read."""

    def __init__(self, data: object, where: str, problems: list[str]) -> None:
        if not isinstance(data, Mapping):
            raise StatusError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data, self.where, self.problems = data, where, problems

    def _missing(self, key: str) -> None:
        if isinstance(self.problems, _Strict):  # a peer may lack it; this process's own value may not
            self._bad(key, "missing")

    def _bad(self, key: str, why: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:  # a value with thousands of odd fields is told by its first ones
            self.problems.append(f"{self.where}.{key}: {why}"[:200])

    def value(self, key: str, ok: Callable[[Any], bool], what: str, default: T, optional: bool = False) -> T:
        """The field `key` if `ok` says it fits; else `default` (and, but for an absent optional one, a note)."""
        if key not in self.data:
            if not optional:
                self._missing(key)
            return default
        value = self.data[key]
        if ok(value):
            return value  # type: ignore[no-any-return]  # checked by `ok`
        self._bad(key, f"expected {what}, got {type(value).__name__}")
        return default

    def text(self, key: str, default: str = "") -> str:
        return self.value(key, _is_str, "a string", default)

    def opt_text(self, key: str) -> str | None:
        return self.value(key, lambda v: v is None or isinstance(v, str), "a string or null", None, optional=True)

    def count(self, key: str, default: int = 0) -> int:
        return self.value(key, _is_int, "an integer", default)

    def number(self, key: str, default: float = 0.0) -> float:
        return self.value(key, _is_number, "a number", default)

    def opt_number(self, key: str) -> float | None:
        return self.value(key, lambda v: v is None or _is_number(v), "a number or null", None, optional=True)

    def opt_count(self, key: str) -> int | None:
        return self.value(key, lambda v: v is None or _is_int(v), "an integer or null", None, optional=True)

    def flag(self, key: str, default: bool = False) -> bool:
        return self.value(key, lambda v: isinstance(v, bool), "true or false", default)

    def texts(self, key: str) -> tuple[str, ...]:
        return tuple(self.value(key, lambda v: isinstance(v, list) and all(map(_is_str, v)), "a list of strings", []))

    def opt_texts(self, key: str) -> tuple[str, ...] | None:
        found = self.value(
            key, lambda v: isinstance(v, list) and all(map(_is_str, v)), "a list of strings", None, optional=True
        )
        return None if found is None else tuple(found)

    def counts(self, key: str) -> dict[str, int]:
        return self.table(key, _is_int, "integers")

    def table(self, key: str, ok: Callable[[Any], bool], what: str) -> dict[str, Any]:
        """A JSON object of plain values; an entry of the wrong type is left out (and noted)."""
        found = self.value(key, lambda v: isinstance(v, Mapping), "an object", None)
        if found is None:
            return {}
        out = {k: v for k, v in found.items() if ok(v)}
        if len(out) != len(found):
            self._bad(key, f"expected {what} as its values; {len(found) - len(out)} left out")
        return out

    def quantiles(self, key: str) -> Quantiles | None:
        if key not in self.data:
            self._missing(key)
        return Quantiles.read(self.data.get(key), f"{self.where}.{key}", self.problems)

    def part(self, key: str, read: Callable[[object, str, list[str]], T]) -> T | None:
        """A nested object, read by `read` (None if missing, null, or not an object)."""
        if key not in self.data:
            self._missing(key)
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self._bad(key, f"expected an object, got {type(value).__name__}")
            return None
        return read(value, f"{self.where}.{key}", self.problems)

    def parts(self, key: str, read: Callable[[object, str, list[str]], T]) -> dict[str, T]:
        """An object of nested objects (camera id -> its status, ...); an entry that is not an object is left
        out (and noted)."""
        found = self.value(key, lambda v: isinstance(v, Mapping), "an object", None)
        if found is None:
            return {}
        out = {}
        for name, value in found.items():
            if isinstance(value, Mapping):
                out[name] = read(value, f"{self.where}.{key}.{name}", self.problems)
            else:
                self._bad(f"{key}.{name}", f"expected an object, got {type(value).__name__}")
        return out


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Quantiles:
    """A latency window's p50 and p99 (ms) over its `n` samples. An empty window is None (JSON `{}`)."""

    p50: float
    p99: float
    n: float

    def to_json(self) -> JsonObject:
        return {"p50": self.p50, "p99": self.p99, "n": self.n}

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> Quantiles | None:
        if data is None or data == {}:
            return None
        if not (isinstance(data, Mapping) and all(_is_number(data.get(k)) for k in ("p50", "p99", "n"))):
            problems.append(f"{where}: expected {{}} or p50, p99 and n as numbers"[:200])
            return None
        return Quantiles(data["p50"], data["p99"], data["n"])


def quantiles_json(q: Quantiles | None) -> JsonObject:
    """A latency window as the status writes it: `{}` when it has no sample."""
    return {} if q is None else q.to_json()


@dataclass(frozen=True)
class SkewedCamera:
    """A camera whose capture's clock is out of the tolerance now (`clock_skew.cameras`)."""

    offset_s: float
    for_s: float
    refused: int

    def to_json(self) -> JsonObject:
        return {"offset_s": self.offset_s, "for_s": self.for_s, "refused": self.refused}

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> SkewedCamera:
        f = _Fields(data, where, problems)
        return SkewedCamera(f.number("offset_s"), f.number("for_s"), f.count("refused"))


@dataclass(frozen=True)
class ClockSkewStatus:
    """`clock_skew`: the bounds on a frame's capture time and each camera out of them now."""

    tolerance_s: float
    max_past_s: float
    cameras: dict[str, SkewedCamera]

    def to_json(self) -> JsonObject:
        return {
            "tolerance_s": self.tolerance_s,
            "max_past_s": self.max_past_s,
            "cameras": {cam: c.to_json() for cam, c in self.cameras.items()},
        }

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> ClockSkewStatus:
        f = _Fields(data, where, problems)
        return ClockSkewStatus(f.number("tolerance_s"), f.number("max_past_s"), f.parts("cameras", SkewedCamera.read))


@dataclass(frozen=True)
class KeyFilesStatus:
    """`key_files`: the key files the verifier watches, and what is wrong with each that is not in order."""

    ok: bool
    every_s: float
    watched: tuple[str, ...]
    problems: dict[str, str]  # key name -> the problem

    def to_json(self) -> JsonObject:
        return {"ok": self.ok, "every_s": self.every_s, "watched": list(self.watched), "problems": dict(self.problems)}

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> KeyFilesStatus:
        f = _Fields(data, where, problems)
        return KeyFilesStatus(
            f.flag("ok", True), f.number("every_s"), f.texts("watched"), f.table("problems", _is_str, "strings")
        )


@dataclass(frozen=True)
class AuditStatus:
    """`audit`: whether the audit log takes records."""

    ok: bool
    error: str
    failures: int
    pending: int

    def to_json(self) -> JsonObject:
        return {"ok": self.ok, "error": self.error, "failures": self.failures, "pending": self.pending}

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> AuditStatus:
        f = _Fields(data, where, problems)
        return AuditStatus(f.flag("ok", True), f.text("error"), f.count("failures"), f.count("pending"))


@dataclass(frozen=True)
class BoardingStoreStatus:
    """`boarding_store`: whether the boarding store takes the decisions, and how many wait for it."""

    ok: bool
    decisions_waiting: int

    def to_json(self) -> JsonObject:
        return {"ok": self.ok, "decisions_waiting": self.decisions_waiting}

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> BoardingStoreStatus:
        f = _Fields(data, where, problems)
        return BoardingStoreStatus(f.flag("ok", True), f.count("decisions_waiting"))


@dataclass(frozen=True)
class PreviewStatus:
    """`previews`: the gates consoles watch and what was sent to them."""

    watched: tuple[str, ...]
    frames_sent: int
    crops_sent: int
    dropped: int
    consoles: int
    refused: int

    def to_json(self) -> JsonObject:
        return {
            "watched": list(self.watched),
            "frames_sent": self.frames_sent,
            "crops_sent": self.crops_sent,
            "dropped": self.dropped,
            "consoles": self.consoles,
            "refused": self.refused,
        }

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> PreviewStatus:
        f = _Fields(data, where, problems)
        return PreviewStatus(
            f.texts("watched"),
            f.count("frames_sent"),
            f.count("crops_sent"),
            f.count("dropped"),
            f.count("consoles"),
            f.count("refused"),
        )


@dataclass(frozen=True)
class GalleryStatus:
    """`gallery`: the matrix the verifier decides from. The optional fields (None: the key is absent) say what
    is wrong: templates that do not open (their subjects by id in the status, as a count in the heartbeat), and
    a stale gallery (for how long, how long accepts still come from memory, what is refused, what to run)."""

    subjects: int
    templates: int
    stale: bool
    error: str
    revision: int | None
    unreadable_templates: int | None = None
    unreadable_subjects: tuple[str, ...] | None = None  # the first 20, sorted
    stale_for_s: float | None = None
    accepts_from_memory_s: float | None = None
    refusing: str | None = None
    action: str | None = None
    unreadable_subject_count: int | None = None  # the heartbeat's stand-in for unreadable_subjects

    def to_json(self) -> JsonObject:
        out: JsonObject = {
            "subjects": self.subjects,
            "templates": self.templates,
            "stale": self.stale,
            "error": self.error,
            "revision": self.revision,
        }
        if self.unreadable_templates is not None:
            out["unreadable_templates"] = self.unreadable_templates
        if self.unreadable_subjects is not None:
            out["unreadable_subjects"] = list(self.unreadable_subjects)
        for key in ("stale_for_s", "accepts_from_memory_s", "refusing", "action", "unreadable_subject_count"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> GalleryStatus:
        f = _Fields(data, where, problems)
        return GalleryStatus(
            subjects=f.count("subjects"),
            templates=f.count("templates"),
            stale=f.flag("stale"),
            error=f.text("error"),
            revision=f.opt_count("revision"),
            unreadable_templates=f.opt_count("unreadable_templates"),
            unreadable_subjects=f.opt_texts("unreadable_subjects"),
            stale_for_s=f.opt_number("stale_for_s"),
            accepts_from_memory_s=f.opt_number("accepts_from_memory_s"),
            refusing=f.opt_text("refusing"),
            action=f.opt_text("action"),
            unreadable_subject_count=f.opt_count("unreadable_subject_count"),
        )

    def for_heartbeat(self, unreadable_subjects: int | None = None) -> GalleryStatus:
        """As every allow-listed key may read it: the unreadable subjects as a count (`unreadable_subjects`:
        all of them; the status lists only the first 20), never their ids."""
        if self.unreadable_subjects is None:
            return self
        count = len(self.unreadable_subjects) if unreadable_subjects is None else unreadable_subjects
        return replace(self, unreadable_subjects=None, unreadable_subject_count=count)


def _is_wake(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and _is_int(value[0]) and _is_number(value[1])


@dataclass(frozen=True)
class CameraStatus:
    """One camera as the verifier sees it (`cameras.<camera>`)."""

    gate_id: str
    state: str  # up | down | ended (unknown: not said)
    last_error: str
    frames_in: int
    processed: int
    idle_skipped: int
    dropped: int  # stale: a newer frame of the camera came
    too_old: int
    refused: dict[str, int]
    eof: bool
    not_boarding: int
    tracks: int
    wakes: tuple[tuple[int, float], ...]  # (seq, ms): a face found at an empty gate
    last_frame_age_s: float | None

    def to_json(self) -> JsonObject:
        return {
            "gate_id": self.gate_id,
            "state": self.state,
            "last_error": self.last_error,
            "frames_in": self.frames_in,
            "processed": self.processed,
            "idle_skipped": self.idle_skipped,
            "dropped": self.dropped,
            "too_old": self.too_old,
            "refused": dict(self.refused),
            "eof": self.eof,
            "not_boarding": self.not_boarding,
            "tracks": self.tracks,
            "wakes": [list(w) for w in self.wakes],
            "last_frame_age_s": self.last_frame_age_s,
        }

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> CameraStatus:
        f = _Fields(data, where, problems)
        wakes: list[list[Any]] = f.value(
            "wakes", lambda v: isinstance(v, list) and all(map(_is_wake, v)), "a list of [seq, ms]", []
        )
        return CameraStatus(
            gate_id=f.text("gate_id"),
            state=f.text("state", "unknown"),
            last_error=f.text("last_error"),
            frames_in=f.count("frames_in"),
            processed=f.count("processed"),
            idle_skipped=f.count("idle_skipped"),
            dropped=f.count("dropped"),
            too_old=f.count("too_old"),
            refused=f.counts("refused"),
            eof=f.flag("eof"),
            not_boarding=f.count("not_boarding"),
            tracks=f.count("tracks"),
            wakes=tuple((seq, ms) for seq, ms in wakes),
            last_frame_age_s=f.opt_number("last_frame_age_s"),
        )


@dataclass(frozen=True)
class GateStatus:
    """One gate: the flight it boards (None: none) and whether it processes anyone (not, when it boards no flight
    and boarding.require_flight)."""

    flight_id: str | None
    processing: bool

    def to_json(self) -> JsonObject:
        return {"flight_id": self.flight_id, "processing": self.processing}

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> GateStatus:
        f = _Fields(data, where, problems)
        return GateStatus(f.opt_text("flight_id"), f.flag("processing"))


@dataclass(frozen=True, kw_only=True)
class VerifierHealth:
    """What the status and the verifier's own heartbeat share: everything but the cameras, gates and claims."""

    component: str
    status: str  # ok | degraded (a heartbeat's: stopping, the last one)
    cameras_down: tuple[str, ...]
    pid: int
    providers: tuple[str, ...]
    fps: float
    drops: int
    queue_depth: int
    bad_messages: int
    last_error: str
    frames_refused: dict[str, int]
    control_refused: dict[str, int]
    events_refused: dict[str, int]
    clock_skew: ClockSkewStatus | None
    key_files: KeyFilesStatus | None
    audit: AuditStatus | None
    boarding_store: BoardingStoreStatus | None
    frame_latency_ms: Quantiles | None
    stages_ms: dict[str, Quantiles | None]
    frames_processed: int
    faces_detected: int
    first_captured_at: float | None
    last_done_at: float | None
    decision_latency_ms: Quantiles | None
    deciding_frame_latency_ms: Quantiles | None
    gallery: GalleryStatus | None  # None: not said (a peer that does not send it)
    previews: PreviewStatus | None
    # What from_json found wrong (empty: nothing); not part of the JSON, nor of equality.
    problems: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def _head_json(self) -> JsonObject:
        """The fields up to the gallery, in the order the verifier writes them."""
        return {
            "component": self.component,
            "status": self.status,
            "cameras_down": list(self.cameras_down),
            "pid": self.pid,
            "providers": list(self.providers),
            "fps": self.fps,
            "drops": self.drops,
            "queue_depth": self.queue_depth,
            "bad_messages": self.bad_messages,
            "last_error": self.last_error,
            "frames_refused": dict(self.frames_refused),
            "control_refused": dict(self.control_refused),
            "events_refused": dict(self.events_refused),
            "clock_skew": _json_or_empty(self.clock_skew),
            "key_files": _json_or_empty(self.key_files),
            "audit": _json_or_empty(self.audit),
            "boarding_store": _json_or_empty(self.boarding_store),
            "frame_latency_ms": quantiles_json(self.frame_latency_ms),
            "stages_ms": {stage: quantiles_json(q) for stage, q in self.stages_ms.items()},
            "frames_processed": self.frames_processed,
            "faces_detected": self.faces_detected,
            "first_captured_at": self.first_captured_at,
            "last_done_at": self.last_done_at,
            "decision_latency_ms": quantiles_json(self.decision_latency_ms),
            "deciding_frame_latency_ms": quantiles_json(self.deciding_frame_latency_ms),
            "gallery": _json_or_empty(self.gallery),
        }

    @staticmethod
    def _read_health(f: _Fields) -> dict[str, Any]:
        """The shared fields, as keyword arguments."""
        stages: Mapping[str, Any] = f.value("stages_ms", lambda v: isinstance(v, Mapping), "an object", {})
        return {
            "component": f.text("component"),
            "status": f.text("status", "unknown"),
            "cameras_down": f.texts("cameras_down"),
            "pid": f.count("pid"),
            "providers": f.texts("providers"),
            "fps": f.number("fps"),
            "drops": f.count("drops"),
            "queue_depth": f.count("queue_depth"),
            "bad_messages": f.count("bad_messages"),
            "last_error": f.text("last_error"),
            "frames_refused": f.counts("frames_refused"),
            "control_refused": f.counts("control_refused"),
            "events_refused": f.counts("events_refused"),
            "clock_skew": f.part("clock_skew", ClockSkewStatus.read),
            "key_files": f.part("key_files", KeyFilesStatus.read),
            "audit": f.part("audit", AuditStatus.read),
            "boarding_store": f.part("boarding_store", BoardingStoreStatus.read),
            "frame_latency_ms": f.quantiles("frame_latency_ms"),
            "stages_ms": {str(k): Quantiles.read(v, f"{f.where}.stages_ms.{k}", f.problems) for k, v in stages.items()},
            "frames_processed": f.count("frames_processed"),
            "faces_detected": f.count("faces_detected"),
            "first_captured_at": f.opt_number("first_captured_at"),
            "last_done_at": f.opt_number("last_done_at"),
            "decision_latency_ms": f.quantiles("decision_latency_ms"),
            "deciding_frame_latency_ms": f.quantiles("deciding_frame_latency_ms"),
            "gallery": f.part("gallery", GalleryStatus.read),
            "previews": f.part("previews", PreviewStatus.read),
        }


def _json_or_empty(part: Any) -> JsonObject:
    return {} if part is None else dict(part.to_json())


@dataclass(frozen=True, kw_only=True)
class VerifierStatus(VerifierHealth):
    """`Verifier.status()`: the reply to the control `status` command (before the key's redaction)."""

    cameras: dict[str, CameraStatus]
    claims: dict[str, str | None]  # gate -> claimed subject (None: hidden from the asking key)
    gates: dict[str, GateStatus]

    def to_json(self) -> JsonObject:
        return {
            **self._head_json(),
            "cameras": {cid: c.to_json() for cid, c in self.cameras.items()},
            "claims": dict(self.claims),
            "previews": _json_or_empty(self.previews),
            "gates": {g: s.to_json() for g, s in self.gates.items()},
        }

    @staticmethod
    def from_json(data: object, where: str = "status", strict: bool = False) -> VerifierStatus:
        """Tolerant (see the module); `strict`: a missing or malformed field raises StatusError (this process's own
        value, or a test)."""
        problems: list[str] = _Strict() if strict else []
        f = _Fields(data, where, problems)
        status = VerifierStatus(
            **VerifierHealth._read_health(f),
            cameras=f.parts("cameras", CameraStatus.read),
            claims=f.table("claims", lambda v: v is None or isinstance(v, str), "strings or null"),
            gates=f.parts("gates", GateStatus.read),
        )
        return _done(replace(status, problems=tuple(problems)), problems)


@dataclass(frozen=True, kw_only=True)
class VerifierHeartbeat(VerifierHealth):
    """The verifier's own heartbeat (topic `health.verifier`): its health, stamped with its process."""

    boot_id: str | None
    booted_at: float | None
    sent_at: float | None

    def to_json(self) -> JsonObject:
        return {
            **self._head_json(),
            "previews": _json_or_empty(self.previews),
            "boot_id": self.boot_id,
            "booted_at": self.booted_at,
            "sent_at": self.sent_at,
        }

    @staticmethod
    def from_json(data: object, where: str = "health.verifier", strict: bool = False) -> VerifierHeartbeat:
        """Tolerant (see the module); `strict`: a missing or malformed field raises StatusError (this process's own
        value, or a test)."""
        problems: list[str] = _Strict() if strict else []
        f = _Fields(data, where, problems)
        beat = VerifierHeartbeat(
            **VerifierHealth._read_health(f),
            boot_id=f.opt_text("boot_id"),
            booted_at=f.opt_number("booted_at"),
            sent_at=f.opt_number("sent_at"),
        )
        return _done(replace(beat, problems=tuple(problems)), problems)


@dataclass(frozen=True, kw_only=True)
class GateHeartbeat:
    """One gate's part of the heartbeat (topic `health.gate.<gate>`), for the keys that hear that gate."""

    component: str
    gate_id: str
    status: str
    pid: int
    boot_id: str | None
    booted_at: float | None
    sent_at: float | None
    event_seq: dict[str, int]  # {gate: the last event_seq published}, or {} before the gate's first event
    gate: GateStatus | None  # None: not said (JSON {})
    cameras: dict[str, CameraStatus]
    # What from_json found wrong (empty: nothing); not part of the JSON, nor of equality.
    problems: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def to_json(self) -> JsonObject:
        return {
            "component": self.component,
            "gate_id": self.gate_id,
            "status": self.status,
            "pid": self.pid,
            "boot_id": self.boot_id,
            "booted_at": self.booted_at,
            "sent_at": self.sent_at,
            "event_seq": dict(self.event_seq),
            "gate": _json_or_empty(self.gate),
            "cameras": {cid: c.to_json() for cid, c in self.cameras.items()},
        }

    @staticmethod
    def from_json(data: object, where: str = "health.gate", strict: bool = False) -> GateHeartbeat:
        """Tolerant (see the module); `strict`: a missing or malformed field raises StatusError (this process's own
        value, or a test)."""
        problems: list[str] = _Strict() if strict else []
        f = _Fields(data, where, problems)
        gate = f.data.get("gate")
        beat = GateHeartbeat(
            component=f.text("component"),
            gate_id=f.text("gate_id"),
            status=f.text("status", "unknown"),
            pid=f.count("pid"),
            boot_id=f.opt_text("boot_id"),
            booted_at=f.opt_number("booted_at"),
            sent_at=f.opt_number("sent_at"),
            event_seq=f.counts("event_seq"),
            gate=None if gate == {} else f.part("gate", GateStatus.read),
            cameras=f.parts("cameras", CameraStatus.read),
        )
        return _done(replace(beat, problems=tuple(problems)), problems)


Heartbeat = VerifierHeartbeat | GateHeartbeat


def heartbeat_from_json(data: object, gate_id: str | None = None) -> Heartbeat:
    """A heartbeat as received: one gate's part (its topic's gate `gate_id`, or a body that names its gate) or
    the verifier's own health. StatusError if it is not a JSON object."""
    if gate_id is not None or (isinstance(data, Mapping) and data.get("gate_id") is not None):
        return GateHeartbeat.from_json(data, f"health.gate.{gate_id}" if gate_id else "health.gate")
    return VerifierHeartbeat.from_json(data)


@dataclass(frozen=True)
class HeartbeatParts:
    """What the verifier sends at each heartbeat: its own health, and each gate's part (by gate, sorted)."""

    verifier: VerifierHeartbeat
    gates: dict[str, GateHeartbeat]


def heartbeat_parts(
    status: VerifierStatus,
    *,
    boot_id: str,
    booted_at: float,
    sent_at: float,
    event_seq: Mapping[str, int],
    unreadable_subjects: int | None = None,
) -> HeartbeatParts:
    """Split `status` into the heartbeat's parts. The verifier's own goes to every allow-listed key: no cameras,
    no gates, no claims, and the subjects whose templates do not open only as a count (`unreadable_subjects`:
    how many in all, as the status lists only the first 20). Each gate's (its flight, its cameras, its event
    count) goes to the keys that hear that gate. Passenger ids go on neither."""
    health = {name: getattr(status, name) for name in VerifierHealth.__dataclass_fields__ if name != "problems"}
    gallery = status.gallery
    health["gallery"] = None if gallery is None else gallery.for_heartbeat(unreadable_subjects)
    verifier = VerifierHeartbeat(**health, boot_id=boot_id, booted_at=booted_at, sent_at=sent_at)
    gates = {
        gate: GateHeartbeat(
            component="gate",
            gate_id=gate,
            status=status.status,
            pid=status.pid,
            boot_id=boot_id,
            booted_at=booted_at,
            sent_at=sent_at,
            event_seq={gate: event_seq[gate]} if gate in event_seq else {},
            gate=status.gates.get(gate),
            cameras={cid: cam for cid, cam in status.cameras.items() if cam.gate_id == gate},
        )
        for gate in sorted(status.gates)
    }
    return HeartbeatParts(verifier, gates)


@dataclass(frozen=True)
class CallerSummary:
    """What the status reply tells the asking key about itself."""

    keys: tuple[str, ...]
    role: str
    claims: GateScope  # the gates it may claim at
    passenger_ids: GateScope  # the gates whose passenger ids it sees

    def to_json(self) -> JsonObject:
        return {
            "keys": list(self.keys),
            "role": self.role,
            "claims": _scope_json(self.claims),
            "passenger_ids": _scope_json(self.passenger_ids),
        }

    @staticmethod
    def read(data: object, where: str, problems: list[str]) -> CallerSummary:
        f = _Fields(data, where, problems)
        return CallerSummary(f.texts("keys"), f.text("role"), _scope(f, "claims"), _scope(f, "passenger_ids"))


def _scope(f: _Fields, key: str) -> GateScope:
    if f.data.get(key) == "*":
        return "*"
    return f.texts(key)


def _scope_json(scope: GateScope) -> str | list[str]:
    return "*" if scope == "*" else list(scope)


@dataclass(frozen=True)
class StatusReply:
    """The reply to the control `status` command: the status as the asking key may read it (`status`, redacted:
    kiosk.services.control_access), whether anything was hidden from it, and what it may do."""

    status: VerifierStatus
    passenger_ids_hidden: bool
    caller: CallerSummary | None

    def to_json(self) -> JsonObject:
        out: JsonObject = {"ok": True, **self.status.to_json(), "passenger_ids_hidden": self.passenger_ids_hidden}
        if self.caller is not None:
            out["caller"] = self.caller.to_json()
        return out

    @staticmethod
    def from_json(data: object) -> StatusReply:
        """A reply that says ok (a refusal, `{"ok": false, "error": ...}`, is the caller's to tell apart)."""
        status = VerifierStatus.from_json(data, "status reply")
        problems = list(status.problems)
        f = _Fields(data, "status reply", problems)
        caller = f.part("caller", CallerSummary.read)
        hidden = f.flag("passenger_ids_hidden")
        return StatusReply(replace(status, problems=tuple(problems)), hidden, caller)
