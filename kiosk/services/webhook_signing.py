"""Signed webhooks: an HMAC-SHA256 signature a gate checks before it trusts an `accept`.

The sender signs `b"<timestamp>." + body` with a secret shared with the
receiver (the bytes of the secret file, surrounding whitespace stripped)
and sends two headers:

    X-Kiosk-Timestamp: 1718000000
    X-Kiosk-Signature: sha256=<hex HMAC-SHA256>

The receiver recomputes the HMAC over the raw body, compares in constant
time and refuses a timestamp further than `tolerance_s` from its own clock
(a captured request cannot be replayed later); within that window it should
act on each `event_id` once (a repeat is a retry or a replay). `scripts/webhook_receiver.py`
is the reference receiver.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from kiosk.config import KioskConfig
from kiosk.errors import ConfigError

TIMESTAMP_HEADER = "X-Kiosk-Timestamp"
SIGNATURE_HEADER = "X-Kiosk-Signature"
SECRET_NAME = "webhook.secret"  # noqa: S105 - a file name; in security.keys_dir, made by `kiosk keys init`
MIN_SECRET_BYTES = 16


def secret_path(cfg: KioskConfig) -> Path:
    """Where the webhook secret is: hooks.webhook_secret_file, else <security.keys_dir>/webhook.secret."""
    return cfg.hooks.webhook_secret_file or cfg.security.keys_dir / SECRET_NAME


class BadSignature(ValueError):
    """A webhook request whose signature or timestamp does not hold; the message says why."""


def _digest(secret: bytes, body: bytes, timestamp: int) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers that sign `body` at `timestamp` (integer unix seconds)."""
    return {TIMESTAMP_HEADER: str(int(timestamp)), SIGNATURE_HEADER: "sha256=" + _digest(secret, body, timestamp)}


def verify(secret: bytes, body: bytes, headers: Mapping[str, str], *, now: float, tolerance_s: float = 300) -> None:
    """Raise `BadSignature` unless `headers` sign `body` with `secret` at a time within `tolerance_s` of `now`.

    Header names are matched case-insensitively; `body` must be the raw bytes received.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    ts_text = lower.get(TIMESTAMP_HEADER.lower())
    sig_text = lower.get(SIGNATURE_HEADER.lower())
    if ts_text is None:
        raise BadSignature(f"missing {TIMESTAMP_HEADER} header")
    if sig_text is None:
        raise BadSignature(f"missing {SIGNATURE_HEADER} header")
    ts_text, sig_text = ts_text.strip(), sig_text.strip()
    if not (ts_text.isascii() and ts_text.isdigit() and len(ts_text) <= 15):
        raise BadSignature(f"malformed {TIMESTAMP_HEADER}: expected integer unix seconds, found {ts_text[:40]!r}")
    scheme, _, digest = sig_text.partition("=")
    if scheme != "sha256" or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest.lower()):
        raise BadSignature(f"malformed {SIGNATURE_HEADER}: expected sha256=<64 hex digits>, found {sig_text[:80]!r}")
    timestamp = int(ts_text)
    if not hmac.compare_digest(_digest(secret, body, timestamp), digest.lower()):
        raise BadSignature("signature does not match (wrong secret, or the body or timestamp was altered)")
    age = now - timestamp
    if age > tolerance_s:
        raise BadSignature(f"stale timestamp: {age:.0f}s old, tolerance {tolerance_s:g}s")
    if -age > tolerance_s:
        raise BadSignature(f"timestamp {-age:.0f}s in the future, tolerance {tolerance_s:g}s (check the clocks)")


def load_secret(path: Path) -> bytes:
    """The secret in `path` (whitespace stripped); `ConfigError` naming the file when it is unusable."""
    hint = (
        f"run `kiosk keys init {path.parent}` to make one"
        if path.name == SECRET_NAME
        else f"run `kiosk keys init DIR` to make DIR/{SECRET_NAME} and point hooks.webhook_secret_file at it"
    )
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(f"webhook secret {path} not found; {hint}") from None
    except OSError as exc:
        raise ConfigError(f"webhook secret {path} cannot be read: {exc.strerror or exc}") from None
    if not secret:
        raise ConfigError(f"webhook secret {path} is empty; delete it and {hint}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"webhook secret {path} is too short ({len(secret)} bytes, at least {MIN_SECRET_BYTES}); "
            f"delete it and {hint}"
        )
    return secret


def make_secret(path: Path) -> bool:
    """Create `path` with a random secret (64 hex characters, mode 0600) unless it exists; True if made."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot create webhook secret {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    except OSError as exc:  # e.g. a full disk: leave no empty secret behind
        path.unlink(missing_ok=True)
        raise ConfigError(f"cannot write webhook secret {path}: {exc.strerror or exc}") from None
    return True
