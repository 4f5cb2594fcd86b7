"""Who may do what on the verifier's control socket: claims for which gates, passenger ids in `status`.

The control socket's allow-list (`authorized_clients/`) says a key may talk
to the verifier at all. A claim binds a gate's next passenger to one subject,
so being allow-listed must not be enough to claim any gate: a camera host's
key renewing a claim at another gate every half second makes every passenger
there `claim_mismatch`. What a key may ask follows from what it serves, by its
name (`keys_dir/authorized_clients/NAME.key`):

- a capture key (a camera's `cameras[].key`, or `security.client_key` for a
  camera without one) may claim its own cameras' gates (a boarding-pass reader
  at the gate's capture PC keeps working); it sees no passenger id;
- an operator key, listed in `security.operators` with its gates (a
  boarding-pass reader's key, a supervisor's desk), may claim those gates and
  read their claimed passenger ids in `status`; `["*"]` is every gate;
- the tools key, `security.client_key` of the verifier's config (what `kiosk
  claim`, `kiosk status` and `kiosk run` on the verifier host use), is an
  operator of every gate unless `security.operators` lists it with fewer;
- any other allow-listed key may claim nothing and gets `status` with the
  passenger ids replaced by null (monitoring works, nothing personal leaks).

So a default single-host install (one `client` key from `kiosk keys init`,
used by the tools and by cameras without `key:`) works as before: that key is
the tools key. A site separates a camera host by giving its cameras their own
`key:`; that key then serves those gates only.

Why the scopes are in the config and not in scope files beside the
allow-lists: the gates a capture key serves are already config
(`cameras[].key`), an operator's gates are checked against the cameras on load
(a typo is a config error, exit 2, not a reader that silently claims nothing),
and one file says what each key may do. Revocation needs no restart all the
same: a request's key names are read from `authorized_clients/` at each
request (`ClientNames`), so a key file deleted there is refused at its next
request, even on a connection made before the deletion. Changing a live key's
gates is a config change and a restart; to cut a key at once, delete it.

With CurveZMQ off no sender is known and every request counts as the tools
key's: authentication was turned off explicitly.

A refusal is one reply, `{"ok": false, "error": ...}`, that names the gate
and the key (never a subject id), counted (`kiosk_control_refused_total
{reason}`, `control_refused` in the status) and logged once per key, gate and
reason, then at most every `LOG_EVERY_S` with the count since.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kiosk.config import CameraConfig, KioskConfig, OperatorKeyConfig
from kiosk.messaging.transport import ClientNames
from kiosk.services.keyed_log import KeyedLog
from kiosk.services.metrics import VerifierMetrics

log = logging.getLogger(__name__)

REFUSED_REASONS = ("claim_scope", "revoked")  # a gate the key does not serve; a key no longer allow-listed
Gates = frozenset[str] | None  # None: every gate


def union_of(scopes: Iterable[Gates]) -> Gates:
    out: set[str] = set()
    for gates in scopes:
        if gates is None:
            return None
        out |= gates
    return frozenset(out)


def gates_text(gates: Gates) -> str:
    return "every gate" if gates is None else ", ".join(sorted(gates)) if gates else "no gate"


@dataclass(frozen=True)
class Caller:
    """The sender of one control request: its key names now, what it may claim and whose ids it may read."""

    names: tuple[str, ...]
    claims: Gates
    sees: Gates
    role: str  # for replies and logs: "key 'cam-host-2' (capture key of cam-b2)"
    revoked: bool = False

    def may_claim(self, gate: str) -> bool:
        return self.claims is None or gate in self.claims

    def sees_ids(self, gate: str) -> bool:
        return self.sees is None or gate in self.sees

    def summary(self) -> dict[str, Any]:
        """What `kiosk status` tells a key about itself."""
        return {
            "keys": list(self.names),
            "role": self.role,
            "claims": "*" if self.claims is None else sorted(self.claims),
            "passenger_ids": "*" if self.sees is None else sorted(self.sees),
        }


class KeyScopes:
    """What each key name may do, from the config alone (no files, no sockets)."""

    def __init__(
        self, cameras: Iterable[CameraConfig], client_key: str, operators: Iterable[OperatorKeyConfig]
    ) -> None:
        self.client_key = client_key
        self.cameras: dict[str, list[CameraConfig]] = {}
        for cam in cameras:
            self.cameras.setdefault(cam.key or client_key, []).append(cam)
        self.operators: dict[str, Gates] = {client_key: None}  # the tools key, unless listed below
        for op in operators:
            self.operators[op.key] = None if op.gates == ["*"] else frozenset(op.gates)

    @classmethod
    def from_config(cls, cfg: KioskConfig) -> KeyScopes:
        return cls(cfg.cameras, cfg.security.client_key, cfg.security.operators)

    def caller(self, names: Iterable[str]) -> Caller:
        """The rights of a key allow-listed under `names` (several when one public key has several files)."""
        names = tuple(sorted(names))
        if not names:
            return Caller(
                (), frozenset(), frozenset(), "a key no longer in authorized_clients/ (revoked)", revoked=True
            )
        sees = union_of(self.operators.get(n, frozenset()) for n in names)
        claims = union_of([sees] + [frozenset(c.gate for c in self.cameras.get(n, [])) for n in names])
        return Caller(names, claims, sees, "; ".join(self._role(n) for n in names))

    def _role(self, name: str) -> str:
        roles = []
        if name == self.client_key and self.operators[name] is None:
            roles.append("the tools key (security.client_key)")
        elif name in self.operators:
            roles.append(f"operator key for {gates_text(self.operators[name])}")
        cams = self.cameras.get(name, [])
        if cams:
            roles.append("capture key of " + ", ".join(f"{c.id} (gate {c.gate})" for c in cams))
        return f"key {name!r} (" + (", ".join(roles) or "no camera and not in security.operators") + ")"

    def describe(self) -> str:
        """One line for the verifier's start: who may claim what."""
        ops = ", ".join(
            f"{name}: {gates_text(gates)}" for name, gates in sorted(self.operators.items(), key=lambda kv: kv[0])
        )
        caps = ", ".join(
            f"{name}: {gates_text(frozenset(c.gate for c in cams))}" for name, cams in sorted(self.cameras.items())
        )
        return f"claims by operator keys ({ops}) and capture keys for their own gates ({caps})"


class ControlAccess:
    """The verifier's check of each control request against its sender's key (see the module docstring)."""

    LOG_EVERY_S = 30.0  # a refused sender may retry every half second: log it now and then
    MAX_LOGGED = 1000  # bounded whatever keys and gates are tried

    def __init__(self, scopes: KeyScopes, names: ClientNames | None, metrics: VerifierMetrics) -> None:
        self.scopes = scopes
        self.names = names
        self.metrics = metrics
        self.counts = dict.fromkeys(REFUSED_REASONS, 0)
        for reason in REFUSED_REASONS:  # every series from zero
            metrics.control_refused.labels(reason=reason)
        self._log = KeyedLog(log, "control", self.LOG_EVERY_S, self.MAX_LOGGED)

    def caller(self, sender: str | None) -> Caller:
        """The sender (ZAP's User-Id: its z85 public key), named from authorized_clients/ now."""
        if self.names is None:  # CurveZMQ off: no sender is known
            return self.scopes.caller([self.scopes.client_key])
        return self.scopes.caller(self.names.names_of(sender) if sender else [])

    def refusal(self, caller: Caller, cmd: str, gate: Any = None) -> dict[str, Any] | None:
        """The reply refusing this request, or None when the caller may make it (counted and logged)."""
        if caller.revoked:
            return self._refuse(
                caller,
                "revoked",
                str(cmd)[:40],
                f"{cmd!s:.40} refused: this connection's key is no "
                "longer in the verifier's authorized_clients/ (revoked)",
            )
        if cmd == "claim" and not caller.may_claim(gate if isinstance(gate, str) else ""):
            where = f"{str(gate)[:40]!r}"
            return self._refuse(
                caller,
                "claim_scope",
                where,
                f"claim for gate {where} refused for {caller.role}: it may claim "
                f"{gates_text(caller.claims)}; a claim needs the key of the gate's camera or an "
                f"operator key for the gate (security.operators)",
            )
        return None

    def _refuse(self, caller: Caller, reason: str, what: str, error: str) -> dict[str, Any]:
        self.counts[reason] += 1
        self.metrics.control_refused.labels(reason=reason).inc()
        self._log.warning((caller.names, reason, what), error)
        return {"ok": False, "error": error}

    def redact(self, status: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """`status` as `caller` may read it: claimed subject ids of gates it does not serve as an operator are
        null, and the gallery's unreadable subjects are left out unless it serves every gate."""
        out = dict(status)
        claims = status.get("claims") or {}
        out["claims"] = {g: sid if caller.sees_ids(g) else None for g, sid in claims.items()}
        hidden = any(not caller.sees_ids(g) for g in claims)
        gallery = status.get("gallery")
        if caller.sees is not None and isinstance(gallery, dict) and "unreadable_subjects" in gallery:
            out["gallery"] = {k: v for k, v in gallery.items() if k != "unreadable_subjects"}
            hidden = True
        out["passenger_ids_hidden"] = hidden
        out["caller"] = caller.summary()
        return out
