"""Typed configuration, loaded from one YAML file and validated on load.

Every section is a dataclass; `load_config` turns the YAML mapping into
them and fails with a `ConfigError` that names the file, the key path, what
was expected and what was found. Relative paths are resolved against the
config file's folder when it is loaded: every `Path` field of a loaded
config is absolute. `config/kiosk.yaml` documents every key and its default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlsplit

import yaml

from kiosk.errors import ConfigError

ENV_CONFIG = "KIOSK_CONFIG"


@dataclass
class GalleryConfig:
    """Where the enrolled templates and boarding state live: a SQLite file (WAL mode; the embedded default),
    or, with `url`, a PostgreSQL database shared by many verifier hosts. The database password is never in
    the config: `password_file`, else $KIOSK_PG_PASSWORD (else libpq's PGPASSWORD or ~/.pgpass)."""

    path: Path = Path("var/gallery.db")
    url: str | None = None  # postgresql://USER@HOST:PORT/DATABASE (no password)
    password_file: Path | None = None
    # What a verifier holds in memory: "all" (everyone enrolled) or "gate_flights" (the passengers of the
    # flights its gates board: a host of a 100k-subject airport gallery loads its gates' flights only).
    load: Literal["all", "gate_flights"] = "all"
    # How long a verifier whose gallery went stale (the file deleted, replaced or corrupt; the database
    # unreachable; a reload failing) goes on accepting from the templates in memory before every accept is
    # refused (`gallery_unavailable`). A boarding gate whose SQLite file is gone refuses at once: a boarded
    # mark written into a deleted file is no mark.
    stale_grace_s: float = 300.0


DEFAULT_PAD_MODELS = "default"  # the models.pad entry that names the shipped texture models


@dataclass
class PadModelConfig:
    """One learned presentation-attack-detection model (MiniFASNet family). scale: how far the face box is
    enlarged around its centre before the crop (null: from the file name, `2.7_80x80_...` or MiniFASNetV2 2.7,
    MiniFASNetV1SE 4.0); colour: the channel order the model was trained on."""

    path: Path
    scale: float | None = None
    colour: Literal["bgr", "rgb"] = "bgr"


@dataclass
class ModelsConfig:
    """Which ONNX models run, and on which ONNX Runtime providers."""

    pack: str = "default"
    providers: str | list[str] = "auto"
    det_size: int = 640
    det_threshold: float = 0.5
    nms_threshold: float = 0.4
    close_up_pass: bool = True
    intra_op_threads: int = 0
    cache_dir: Path = Path("var/model-cache")
    # Texture (liveness) models: "default" is the MiniFASNet pair shipped in the package.
    pad: list[Path | PadModelConfig] = field(default_factory=lambda: [Path(DEFAULT_PAD_MODELS)])


@dataclass
class CameraConfig:
    """One camera: its id, the gate it watches and where frames come from."""

    id: str
    gate: str
    source: int | str = 0
    realtime: bool = True
    loop: bool = False
    fps: float | None = None
    encoding: Literal["bgr8", "jpeg"] = "bgr8"
    key: str | None = None  # the client key its capture uses (default: security.client_key)


@dataclass
class TransportConfig:
    """ZeroMQ endpoints."""

    frames: str = "tcp://127.0.0.1:5550"
    events: str = "tcp://127.0.0.1:5551"
    control: str = "tcp://127.0.0.1:5552"
    history: str = "tcp://127.0.0.1:5553"
    preview: str = "tcp://127.0.0.1:5554"  # the console's preview frames and decision crops (only while watched)


@dataclass
class OperatorKeyConfig:
    """A key that may claim gates and read their claimed passenger ids in `kiosk status` (a boarding-pass
    reader's, an operator desk's): `key` names it (keys_dir/authorized_clients/NAME.key), `gates` are the gates
    it serves, ["*"] for every gate. See kiosk.services.control_access."""

    key: str
    gates: list[str]


@dataclass
class ListenerKeyConfig:
    """A key that hears the events of some gates and can claim nothing (a gate controller's, a dashboard's):
    `key` names it (keys_dir/authorized_subscribers/NAME.key, or authorized_clients/), `gates` are the gates
    whose decisions, history and camera health it hears, ["*"] for every gate. See
    kiosk.services.event_access."""

    key: str
    gates: list[str]


@dataclass
class SecurityConfig:
    """CurveZMQ on every socket unless turned off explicitly; which keys may claim which gates."""

    curve: bool = True
    keys_dir: Path = Path("var/keys")
    client_key: str = "client"  # also the tools key: an operator of every gate unless `operators` says less
    template_key_file: Path | None = None  # default: $KIOSK_TEMPLATE_KEY, else <keys_dir>/template.key
    operators: list[OperatorKeyConfig] = field(default_factory=list)
    listeners: list[ListenerKeyConfig] = field(default_factory=list)  # keys that hear their gates' events only


@dataclass
class HooksConfig:
    """How `kiosk subscribe` runs its hooks."""

    python: list[str] = field(default_factory=list)
    exec_timeout_s: float = 10.0
    webhook_timeout_s: float = 5.0
    webhook_retries: int = 3
    queue_size: int = 1000
    max_accept_age_s: float = 5.0
    state_dir: Path = Path("var/subscribers")
    sign_webhooks: bool = True
    webhook_secret_file: Path | None = None  # default: <security.keys_dir>/webhook.secret
    # MQTT (a subscriber's `mqtt: URL` or `kiosk subscribe --mqtt URL`; see kiosk.services.mqtt_hook): topics
    # under this prefix; the password of the URL's user from this file (0600, one line); for mqtts://, the CA
    # bundle that signs the broker's certificate (null: the system's), and this host's own certificate and key
    # (0600) for a broker that asks for one (both or neither).
    mqtt_prefix: str = "kiosk"
    mqtt_password_file: Path | None = None
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None


@dataclass
class HeartbeatConfig:
    """Verifier heartbeats and how many missed ones mean `verifier_down`."""

    interval_s: float = 1.0
    misses: int = 3


@dataclass
class SubscriberConfig:
    """A subscriber `kiosk run` starts: hooks for one gate (or all)."""

    name: str
    gate: str | None = None
    exec: str | None = None
    webhook: str | None = None
    jsonl: Path | None = None
    mqtt: str | None = None  # mqtt://[USER@]HOST[:PORT] or mqtts://...; password: hooks.mqtt_password_file
    metrics_port: int = 0  # its Prometheus metrics on 127.0.0.1:PORT; 0: off


@dataclass
class PolicyConfig:
    """Decision policy of the verifier, and the 1:1 / 1:N match threshold."""

    accept_threshold: float = 0.40
    min_margin: float = 0.06
    accept_frames: int = 3
    reject_after_frames: int = 8
    min_face_px: int = 48
    min_det_score: float = 0.6
    min_sharpness: float = 15.0
    max_yaw: float = 0.6
    decision_timeout_s: float = 10.0
    repeat_accept_s: float = 10.0
    track_max_age_s: float = 1.0
    claim_ttl_s: float = 60.0
    max_embeddings_per_frame: int = 4
    # Cameras with a person being decided whose frames go into one step (0: all); the others take their newest
    # frame in a later step. 1 suits a CPU, where a step's cost grows with its faces; 0 a GPU that batches.
    deciding_cameras_per_step: int = 1
    max_frame_age_ms: float = 500.0
    # An empty, unchanged scene is not run through the detector: a camera with no open track whose frame
    # differs from the last detected one by less than idle_change (grey levels, in any cell of a 32x24
    # thumbnail) is skipped, except once every idle_detect_every_s (a safety net). 0 detects every frame.
    idle_change: float = 12.0
    idle_detect_every_s: float = 1.0


@dataclass
class EnrollmentConfig:
    """What a reference photo must satisfy to become a template."""

    min_face_px: int = 80
    min_sharpness: float = 50.0
    max_yaw: float = 0.45
    min_det_score: float = 0.6
    duplicate_check: bool = True


@dataclass
class AuditConfig:
    """Every published event is appended here, one JSON object a line."""

    path: Path = Path("var/events.jsonl")


@dataclass
class PadConfig:
    """Presentation attack detection (liveness), on by default. `checks` names the cues (kiosk.vision.
    liveness_checks.CHECKS, or a site's own `module:Class`); the texture check runs where `models.pad` names models
    (by default the shipped pair). A track any check accuses is rejected `presentation_attack`. Live needs both
    kinds of evidence: the texture models' mean probability of "real" at `threshold` or more, and the face moving as
    a living one (a blink, the lips or brows: the motion check; or, when it moves, as a head and not as a flat piece:
    the planar check); no accusation, and at least `min_frames` frames
    observed. A texture mean below `attack_below` accuses. An accept waits up to `max_wait_s` for live and is
    otherwise rejected `liveness_unverified` (fail closed)."""

    enabled: bool = True
    checks: list[str] = field(default_factory=lambda: ["texture", "depth", "motion", "planar", "screen"])
    threshold: float = 0.95
    attack_below: float = 0.1
    min_frames: int = 8
    max_wait_s: float = 3.0


@dataclass
class BoardingConfig:
    """Boarding by flight. require_flight: a gate with no open flight processes nobody and decides nothing;
    false (sites without flights): such a gate matches against the whole gallery (1:N)."""

    require_flight: bool = False


@dataclass
class RetentionConfig:
    """How long personal data is kept: audit log days, and hours after a flight's departure until its
    passengers' templates are purged (unless they are on a later flight)."""

    audit_days: int = 30
    purge_after_departure_h: float = 12.0


@dataclass
class MetricsConfig:
    """Prometheus text endpoint; port 0 turns it off."""

    port: int = 9108


@dataclass
class ConsoleConfig:
    """The operator console (`kiosk console`, or with `kiosk run` when enabled): a web page of every gate,
    behind a login. Loopback by default; another address needs TLS (tls_cert and tls_key) or, behind a
    TLS-terminating proxy, insecure_http: true. password_file: one line, the password or a hash from
    `kiosk console --hash-password`. crops: the decision face crops kept in memory (never on disk unless
    crops_dir names a folder). key: the console's CurveZMQ client key (role console: events and previews, never
    frames or claims)."""

    enabled: bool = False
    listen: str = "127.0.0.1:8088"
    password_file: Path | None = None
    preview_fps: float = 5.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_http: bool = False
    crops: int = 50
    crops_dir: Path | None = None
    key: str = "console"
    # Addresses (or networks) of reverse proxies whose X-Forwarded-For names the real client; none by default,
    # so a forged header changes nothing and the login throttle counts the TCP peer.
    trusted_proxies: list[str] = field(default_factory=list)
    # The `Host` header values (HOST or HOST:PORT) the console answers; any other is refused before anything
    # else (a DNS-rebinding page names its own host). null: the listen address (see `allowed_host_names`).
    allowed_hosts: list[str] | None = None
    # Seconds a client has to send a whole request (headers and body) once the server waits for one.
    request_timeout_s: float = 5.0

    def host_port(self) -> tuple[str, int]:
        """`listen` split, brackets off an IPv6 host; ValueError if it is not HOST:PORT."""
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(self.listen)
        return host.strip("[]"), int(port)

    def allowed_host_names(self) -> frozenset[str]:
        """The `Host` values answered, lower case: `allowed_hosts` as written, else the listen address with and
        without its port; on a loopback address also localhost, 127.0.0.1 and [::1]; on a wildcard address
        (0.0.0.0, ::) those and this machine's host names, since it listens on all of them."""
        if self.allowed_hosts is not None:
            return frozenset(h.lower() for h in self.allowed_hosts)
        host, port = self.host_port()
        names = {host}
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if host == "localhost" or (address is not None and (address.is_loopback or address.is_unspecified)):
            names |= {"localhost", "127.0.0.1", "::1"}
        if address is not None and address.is_unspecified:
            names |= {socket.gethostname(), socket.getfqdn()}
        bracketed = {f"[{n}]" if ":" in n else n for n in names if n}
        return frozenset(form.lower() for n in bracketed for form in (n, f"{n}:{port}"))


@dataclass
class KioskConfig:
    """The whole configuration; `source` is the file it came from, if any."""

    gallery: GalleryConfig = field(default_factory=GalleryConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    cameras: list[CameraConfig] = field(default_factory=list)
    transport: TransportConfig = field(default_factory=TransportConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    enrollment: EnrollmentConfig = field(default_factory=EnrollmentConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    pad: PadConfig = field(default_factory=PadConfig)
    boarding: BoardingConfig = field(default_factory=BoardingConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    subscribers: list[SubscriberConfig] = field(default_factory=list)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    source: Path | None = field(default=None, metadata={"internal": True})
    base_dir: Path = field(default=Path("."), metadata={"internal": True})

    def resolve(self, path: Path) -> Path:
        """A path made absolute against the config's folder. The path fields of a loaded config already are
        (`config_from_mapping` resolves them once); on those this returns the path as it is."""
        return _absolute(path, self.base_dir)


def _absolute(path: Path, base_dir: Path) -> Path:
    """`path` with ~ expanded, made absolute against `base_dir` and normalised."""
    path = Path(os.path.expanduser(str(path)))
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))


def _resolve_paths(section: Any, base_dir: Path) -> None:
    """Every `Path` value of `section` and of the sections and lists under it made absolute, in place; the
    `models.pad` entry `default` (the shipped texture models) is a name, not a path, and stays as written."""
    for f in dataclasses.fields(section):
        if f.metadata.get("internal"):
            continue
        value = getattr(section, f.name)
        if isinstance(section, ModelsConfig) and f.name == "pad":
            section.pad = [v if _names_shipped_pad(v) else _resolved(v, base_dir) for v in value]
        else:
            setattr(section, f.name, _resolved(value, base_dir))


def _names_shipped_pad(entry: Path | PadModelConfig) -> bool:
    return isinstance(entry, Path) and str(entry) == DEFAULT_PAD_MODELS


def _resolved(value: Any, base_dir: Path) -> Any:
    if isinstance(value, Path):
        return _absolute(value, base_dir)
    if isinstance(value, list):
        return [_resolved(v, base_dir) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        _resolve_paths(value, base_dir)
    return value


def models_section(cfg: KioskConfig) -> dict[str, Any]:
    """`cfg.models` as a config mapping with absolute paths, for a config written elsewhere (demo, bench)
    that must run the same models."""
    data = dataclasses.asdict(cfg.models)
    data["cache_dir"] = str(cfg.models.cache_dir)
    data["pad"] = [
        {"path": str(m.path), "scale": m.scale, "colour": m.colour} if isinstance(m, PadModelConfig) else str(m)
        for m in cfg.models.pad
    ]
    if cfg.models.pack != "default":
        data["pack"] = str(cfg.resolve(Path(cfg.models.pack)))
    return data


# Numeric bounds checked after types: (section, key) -> (low, high), inclusive.
_BOUNDS: dict[tuple[str, str], tuple[float, float]] = {
    ("gallery", "stale_grace_s"): (0.0, 86400.0),
    ("models", "det_size"): (64, 4096),
    ("models", "det_threshold"): (0.01, 1.0),
    ("models", "nms_threshold"): (0.01, 1.0),
    ("models", "intra_op_threads"): (0, 256),
    ("policy", "accept_threshold"): (-1.0, 1.0),
    ("policy", "min_margin"): (0.0, 2.0),
    ("policy", "accept_frames"): (1, 1000),
    ("policy", "reject_after_frames"): (1, 10000),
    ("policy", "min_face_px"): (0, 10000),
    ("policy", "idle_change"): (0.0, 255.0),
    ("policy", "idle_detect_every_s"): (0.05, 60.0),
    ("policy", "min_det_score"): (0.0, 1.0),
    ("policy", "min_sharpness"): (0.0, 1e9),
    ("policy", "max_yaw"): (0.0, 10.0),
    ("policy", "decision_timeout_s"): (0.1, 3600.0),
    ("policy", "repeat_accept_s"): (0.0, 86400.0),
    ("policy", "track_max_age_s"): (0.05, 60.0),
    ("policy", "claim_ttl_s"): (1.0, 86400.0),
    ("policy", "max_embeddings_per_frame"): (0, 1000),
    ("policy", "deciding_cameras_per_step"): (0, 1000),
    ("policy", "max_frame_age_ms"): (50.0, 60000.0),
    ("enrollment", "min_face_px"): (0, 10000),
    ("enrollment", "min_sharpness"): (0.0, 1e9),
    ("enrollment", "max_yaw"): (0.0, 10.0),
    ("enrollment", "min_det_score"): (0.0, 1.0),
    ("metrics", "port"): (0, 65535),
    ("hooks", "exec_timeout_s"): (0.1, 3600.0),
    ("hooks", "webhook_timeout_s"): (0.1, 600.0),
    ("hooks", "webhook_retries"): (0, 100),
    ("hooks", "queue_size"): (1, 1_000_000),
    ("hooks", "max_accept_age_s"): (0.5, 3600.0),
    ("heartbeat", "interval_s"): (0.05, 60.0),
    ("heartbeat", "misses"): (1, 1000),
    ("pad", "threshold"): (0.0, 1.0),
    ("pad", "attack_below"): (0.0, 1.0),
    ("pad", "min_frames"): (1, 100),
    ("pad", "max_wait_s"): (0.1, 60.0),
    ("retention", "audit_days"): (1, 3650),
    ("retention", "purge_after_departure_h"): (0.0, 8760.0),
    ("console", "preview_fps"): (0.2, 30.0),
    ("console", "crops"): (1, 10000),
    ("console", "request_timeout_s"): (0.5, 300.0),
}

_PROVIDER_NAMES = ("auto", "tensorrt", "cuda", "cpu")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a key pair's name: a file name, never a path
# A `Host` header value: a DNS name or IPv4 address, or an IPv6 address in brackets; an optional port.
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)(:[0-9]{1,5})?")


class _Invalid(Exception):
    def __init__(self, keypath: str, expected: str, found: Any, *, message: str | None = None) -> None:
        super().__init__(keypath)
        self.keypath = keypath
        self.expected = expected
        self.found = found
        self.message = message  # the whole explanation, where "expected ..., found ..." does not fit


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        Path: "a path",
        type(None): "null",
    }.get(tp, str(tp))


def _convert(value: Any, tp: Any, keypath: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, keypath)
            except _Invalid:
                continue
        raise _Invalid(keypath, _type_name(tp), value)
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(keypath, _type_name(tp), value)
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{keypath}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, keypath)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Invalid(keypath, _type_name(tp), value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(keypath, "true or false", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Invalid(keypath, "an integer", value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Invalid(keypath, "a number", value)
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise _Invalid(keypath, "a non-empty string", value)
    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
        raise _Invalid(keypath, "a path", value)
    raise TypeError(f"unsupported config type {tp!r} at {keypath}")


def _build(cls: type, data: Any, keypath: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _Invalid(keypath or "(top level)", "a mapping", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{keypath}.{unknown[0]}" if keypath else str(unknown[0])
        raise _Invalid(where, "one of the keys " + ", ".join(fields), f"unknown key {unknown[0]!r}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{keypath}.{name}" if keypath else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(sub, f"{_type_name(hints[name])} (required)", "no value")
    return cls(**kwargs)


def pg_url_problem(url: str) -> str | None:
    """What is wrong with a PostgreSQL gallery URL, None if nothing: the one check behind `gallery.url` and
    `kiosk-enroll migrate --to`. A password in it is refused: config files get copied and logged."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        return f"expected postgresql://USER@HOST:PORT/DATABASE, found scheme {parts.scheme!r}"
    if not parts.hostname:
        return "expected postgresql://USER@HOST:PORT/DATABASE, found no host"
    if parts.password is not None:
        return (
            "the URL carries a password; put it in a file named by password_file or in $KIOSK_PG_PASSWORD, "
            "never in the config"
        )
    return None


MQTT_SCHEMES = {"mqtt": 1883, "mqtts": 8883}  # scheme -> default port


def is_loopback(host: str) -> bool:
    """This machine's own address (localhost, 127.0.0.0/8, ::1): what is sent to it crosses no network."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mqtt_url_problem(url: str) -> str | None:
    """What is wrong with a broker URL, None if nothing: the one check behind `subscribers[].mqtt` and
    `kiosk subscribe --mqtt`. A password in it is refused: config files and process lists get copied and logged."""
    expected = "expected mqtt://[USER@]HOST[:PORT] or mqtts://[USER@]HOST[:PORT]"
    parts = urlsplit(url)
    if parts.scheme not in MQTT_SCHEMES:
        return f"{expected}, found scheme {parts.scheme!r} in {url!r}"
    if not parts.hostname:
        return f"{expected}, found no host in {url!r}"
    try:
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        return f"{expected}, found a bad port in {url!r}"
    if parts.password is not None:
        return "the URL carries a password; put it in the file named by hooks.mqtt_password_file, never in the URL"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"{expected} (no path or query), found {url!r}"
    return None


def mqtt_prefix_problem(prefix: str) -> str | None:
    """Topics are `<prefix>/gates/<gate>/...`: the prefix must be a plain topic, no wildcard, no empty level."""
    if any(c in prefix for c in "+#\0") or prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
        return (
            "expected a topic prefix such as kiosk or site/terminal-2 (no +, #, leading or trailing /), "
            f"found {prefix!r}"
        )
    return None


def _check_operators(cfg: KioskConfig) -> None:
    """`security.operators` and `security.listeners`: each key named once per list, as a file name; its gates
    "*" alone or gates of `cameras` (checked when the config has cameras: a verifier's; a typo would be a reader
    that claims nothing, or a gate controller that hears nothing)."""
    gates = sorted({c.gate for c in cfg.cameras})
    keys: tuple[tuple[str, Sequence[OperatorKeyConfig | ListenerKeyConfig]], ...] = (
        ("operators", cfg.security.operators),
        ("listeners", cfg.security.listeners),
    )
    for section, entries in keys:
        seen: set[str] = set()
        for i, op in enumerate(entries):
            where = f"security.{section}[{i}]"
            if not _KEY_NAME.fullmatch(op.key):
                raise _Invalid(
                    f"{where}.key",
                    "a key name as in keys_dir/authorized_clients/NAME.key (letters, digits, '.', '_', '-')",
                    op.key,
                )
            if op.key in seen:
                raise _Invalid(f"{where}.key", "a key listed once", op.key)
            seen.add(op.key)
            if "*" in op.gates and op.gates != ["*"]:
                raise _Invalid(
                    f"{where}.gates",
                    "",
                    op.gates,
                    message='expected ["*"] alone (every gate) or a list '
                    f'of gates, found "*" among other gates {op.gates}',
                )
            for j, gate in enumerate(op.gates):
                if gate != "*" and gates and gate not in gates:
                    raise _Invalid(f"{where}.gates[{j}]", f'a gate of cameras[] ({", ".join(gates)}) or "*"', gate)
            if section == "listeners" and op.gates != ["*"]:
                _check_hearable(where, op.key, op.gates, gates)


def _check_hearable(where: str, key: str, mine: list[str], gates: list[str]) -> None:
    """A listener must be able to hear each of its gates alone: a ZeroMQ subscription to `event.A1` also
    matches `event.A10`, so gate A1 cannot be heard by a key that may not hear A10 (kiosk.services.event_access
    refuses such a subscription)."""
    for j, gate in enumerate(mine):
        wider = sorted(g for g in gates if g != gate and g.startswith(gate) and g not in mine)
        if wider:
            raise _Invalid(
                f"{where}.gates[{j}]",
                "",
                gate,
                message=(
                    f"key {key!r} may hear gate {gate!r} but not {', '.join(wider)}: a subscription to event.{gate} "
                    f"also matches event.{wider[0]}, so the verifier refuses it; give the key {', '.join(wider)} too, "
                    f"or name gates so that none begins with another (A01 ... A10)"
                ),
            )


def _check(cfg: KioskConfig) -> None:
    """The rules a field's type cannot say (ranges, names, fields that go together). Checked in this order, so a
    config with several problems always reports the same first one."""
    _check_gallery_url(cfg.gallery)
    _check_bounds(cfg)
    _check_providers(cfg.models.providers)
    _check_cameras(cfg.cameras)
    _check_operators(cfg)
    _check_python_hooks(cfg.hooks.python)
    _check_subscribers(cfg.subscribers)
    problem = mqtt_prefix_problem(cfg.hooks.mqtt_prefix)
    if problem:
        raise _Invalid("hooks.mqtt_prefix", "", "", message=problem)
    _check_pad_models(cfg.models.pad)
    _check_console(cfg.console)
    _check_thresholds(cfg)


def _check_gallery_url(gallery: GalleryConfig) -> None:
    """`gallery.url`: a PostgreSQL URL the store can use (or none: the SQLite file)."""
    problem = pg_url_problem(gallery.url) if gallery.url is not None else None
    if problem:
        raise _Invalid("gallery.url", "", "", message=problem)


def _check_bounds(cfg: KioskConfig) -> None:
    """The numbers with a fixed range (_BOUNDS)."""
    for (section, key), (low, high) in _BOUNDS.items():
        value = getattr(getattr(cfg, section), key)
        if not low <= value <= high:
            raise _Invalid(f"{section}.{key}", f"a value from {low:g} to {high:g}", value)


def _check_providers(providers: str | list[str]) -> None:
    """`models.providers`: "auto" alone, or a list of known providers."""
    names = [providers] if isinstance(providers, str) else providers
    if not names:
        raise _Invalid("models.providers", "'auto' or a list of providers", providers)
    for i, name in enumerate(names):
        if name.lower() not in _PROVIDER_NAMES:
            where = "models.providers" if isinstance(providers, str) else f"models.providers[{i}]"
            raise _Invalid(where, "one of " + ", ".join(_PROVIDER_NAMES), name)
    if isinstance(providers, list) and "auto" in [n.lower() for n in names]:
        raise _Invalid("models.providers", "'auto' alone or a list of explicit providers", providers)


def _check_cameras(cameras: list[CameraConfig]) -> None:
    """`cameras`: a sane frame rate, and each id once (events, keys and `--camera` name a camera by it)."""
    seen: set[str] = set()
    for i, cam in enumerate(cameras):
        if cam.fps is not None and not 0 < cam.fps <= 1000:
            raise _Invalid(f"cameras[{i}].fps", "a frame rate above 0 and at most 1000 (or null)", cam.fps)
        if cam.id in seen:
            raise _Invalid(f"cameras[{i}].id", "a camera id used once", cam.id)
        seen.add(cam.id)


def _check_python_hooks(hooks: list[str]) -> None:
    """`hooks.python`: each names `module:function`."""
    for i, hook in enumerate(hooks):
        module, _, func = hook.partition(":")
        if not module or not func:
            raise _Invalid(f"hooks.python[{i}]", "module:function", hook)


def _check_subscribers(subscribers: list[SubscriberConfig]) -> None:
    """`subscribers`: a port, at least one output each, and at most one MQTT subscriber per broker."""
    for i, sub in enumerate(subscribers):
        if not 0 <= sub.metrics_port <= 65535:
            raise _Invalid(f"subscribers[{i}].metrics_port", "a port from 0 to 65535", sub.metrics_port)
        if not (sub.exec or sub.webhook or sub.jsonl or sub.mqtt):
            raise _Invalid(f"subscribers[{i}]", "at least one of exec, webhook, jsonl, mqtt", "none")
        if sub.mqtt is not None:
            problem = mqtt_url_problem(sub.mqtt)
            if problem:
                raise _Invalid(f"subscribers[{i}].mqtt", "", "", message=problem)
            # One publisher per broker: `<prefix>/available` is one retained topic, and each would overwrite it.
            if any(other.mqtt == sub.mqtt for other in subscribers[:i]):
                raise _Invalid(
                    f"subscribers[{i}].mqtt",
                    "",
                    "",
                    message=f"expected one MQTT subscriber per broker "
                    f"(leave out `gate` to cover all gates), found {sub.mqtt} named by an earlier one too",
                )


def _check_pad_models(pad: list[Path | PadModelConfig]) -> None:
    """`models.pad`: a crop scale the MiniFASNet models can use."""
    for i, m in enumerate(pad):
        if isinstance(m, PadModelConfig) and m.scale is not None and not 1.0 <= m.scale <= 8.0:
            raise _Invalid(f"models.pad[{i}].scale", "a number from 1 to 8 (or null)", m.scale)


def _check_console(console: ConsoleConfig) -> None:
    """`console`: proxies, allowed hosts and the listen address parse, and TLS has both its files (or none)."""
    for i, proxy in enumerate(console.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise _Invalid(
                f"console.trusted_proxies[{i}]", "an IP address or network (e.g. 10.0.0.5, 10.0.0.0/24)", proxy
            ) from None
    if console.allowed_hosts is not None:
        _check_allowed_hosts(console.allowed_hosts)
    try:
        console.host_port()
    except ValueError:
        raise _Invalid("console.listen", "HOST:PORT (e.g. 127.0.0.1:8088)", console.listen) from None
    if (console.tls_cert is None) != (console.tls_key is None):
        raise _Invalid(
            "console.tls_key" if console.tls_key is None else "console.tls_cert",
            "",
            "",
            message="tls_cert and tls_key go together: give both (or neither)",
        )


def _check_allowed_hosts(allowed_hosts: list[str]) -> None:
    """`console.allowed_hosts`: at least one, each as a browser writes it in `Host` (an empty list would refuse
    every request)."""
    if not allowed_hosts:
        raise _Invalid(
            "console.allowed_hosts",
            "at least one HOST or HOST:PORT (or null: the listen address)",
            allowed_hosts,
        )
    for i, name in enumerate(allowed_hosts):
        if not _HOST_HEADER.fullmatch(name):
            raise _Invalid(
                f"console.allowed_hosts[{i}]",
                "HOST or HOST:PORT as a browser sends it in `Host` "
                "(e.g. console.example.org, 10.0.0.5:8443, [fd00::5]:8443)",
                name,
            )


def _check_thresholds(cfg: KioskConfig) -> None:
    """Thresholds that bound each other: an attack verdict below the pass mark, and a reject not before an
    accept could have been reached."""
    if cfg.pad.attack_below > cfg.pad.threshold:
        raise _Invalid("pad.attack_below", f"at most pad.threshold ({cfg.pad.threshold:g})", cfg.pad.attack_below)
    if cfg.policy.reject_after_frames < cfg.policy.accept_frames:
        raise _Invalid(
            "policy.reject_after_frames",
            f"at least policy.accept_frames ({cfg.policy.accept_frames})",
            cfg.policy.reject_after_frames,
        )


def config_from_mapping(data: Any, *, source: Path | None = None, base_dir: Path | None = None) -> KioskConfig:
    """Validate a mapping (already parsed YAML) into a `KioskConfig`."""
    where = str(source) if source else "(built-in defaults)"
    try:
        cfg: KioskConfig = _build(KioskConfig, data, "")
        _check(cfg)
    except _Invalid as exc:
        found = (
            exc.found
            if isinstance(exc.found, str) and exc.found.startswith(("unknown key", "no value"))
            else _describe(exc.found)
        )
        raise ConfigError(
            f"{where}: {exc.keypath}: {exc.message or f'expected {exc.expected}, found {found}'}"
        ) from None
    cfg.source = source
    cfg.base_dir = (base_dir or (source.parent if source else Path.cwd())).resolve()
    _resolve_paths(cfg, cfg.base_dir)  # once, here: every user reads an absolute path from its field
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key written twice in one mapping (PyYAML keeps the last one silently,
    so a second `accept_threshold:` further down would quietly win)."""


def _mapping_once(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden key by key
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice (first on line {first})", key_node.start_mark
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_once)


def load_config(path: str | os.PathLike[str] | None) -> KioskConfig:
    """Load and validate CONFIG; with no path, $KIOSK_CONFIG or the built-in defaults.

    With the built-in defaults, relative paths resolve against the current
    directory.
    """
    if path is None:
        env = os.environ.get(ENV_CONFIG)
        if not env:
            return config_from_mapping({})
        path = env
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{p}: not valid YAML{at}: {problem}") from None
    return config_from_mapping(data, source=p)
