"""The console's login: one password (or token) from a file, kept only as a scrypt hash, and server-side sessions.

The file holds either the password itself (hashed as it is read; the plain text is not kept) or a line made by
`kiosk console --hash-password` (`scrypt$N$r$p$SALT$HASH`), so the secret need not sit in clear on disk. A login
compares hashes in constant time. Sessions are random tokens held in memory (a restart logs everyone out),
expire after SESSION_TTL_S, and are bounded in number. Who may have a password checked, and how often, is
kiosk.console.throttle's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from kiosk.errors import ConfigError
from kiosk.files import read_regular_file

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD_CHARS = 8
SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 1000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(
    password: str, *, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> str:
    """The `scrypt$N$r$p$SALT$HASH` line for `password`."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=128 * 1024 * 1024, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


class PasswordCheck:
    """A stored scrypt hash and the check of a candidate password against it."""

    def __init__(self, line: str) -> None:
        parts = line.split("$")
        try:
            if len(parts) != 6 or parts[0] != "scrypt":
                raise ValueError("not scrypt$N$r$p$SALT$HASH")
            self.n, self.r, self.p = int(parts[1]), int(parts[2]), int(parts[3])
            self.salt, self.digest = (
                base64.b64decode(parts[4], validate=True),
                base64.b64decode(parts[5], validate=True),
            )
            if not (2 <= self.n <= 2**20 and 1 <= self.r <= 32 and 1 <= self.p <= 16 and self.salt and self.digest):
                raise ValueError("parameters out of range")
        except ValueError as exc:
            raise ConfigError(
                f"console.password_file: a hash line must be scrypt$N$r$p$SALT$HASH as "
                f"`kiosk console --hash-password` prints ({exc})"
            ) from None

    @classmethod
    def from_file(cls, path: Path) -> PasswordCheck:
        """From the password file: a hash line as is, a plain password hashed now."""
        text = read_regular_file(path, 4096, "password file", error=ConfigError).decode("utf-8", "replace").strip()
        if not text:
            raise ConfigError(f"console.password_file: {path} is empty")
        if text.startswith("scrypt$"):
            return cls(text)
        if len(text) < MIN_PASSWORD_CHARS:
            raise ConfigError(
                f"console.password_file: the password in {path} is shorter than {MIN_PASSWORD_CHARS} characters"
            )
        return cls(hash_password(text))

    def matches(self, password: str) -> bool:
        candidate = hashlib.scrypt(
            password.encode()[:1024],
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            maxmem=128 * 1024 * 1024,
            dklen=len(self.digest),
        )
        return hmac.compare_digest(candidate, self.digest)

    def device_key(self) -> bytes:
        """The key that signs device cookies: derived from the stored hash, so it lasts as long as the password
        (across restarts, for a hash line) and a new password revokes every cookie signed before."""
        return hmac.new(self.digest, b"kiosk console device cookie v1", hashlib.sha256).digest()


class Sessions:
    """Random session tokens in memory, each valid for SESSION_TTL_S; at most MAX_SESSIONS (oldest go first).
    `clock` gives the time expiries are reckoned in (a test passes its own, so an expiry needs no real wait)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._tokens: OrderedDict[str, float] = OrderedDict()  # token -> expiry
        self._lock = threading.Lock()

    def create(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = self._clock() + self.ttl_s
            while len(self._tokens) > MAX_SESSIONS:
                self._tokens.popitem(last=False)
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            expiry = self._tokens.get(token)
            if expiry is None:
                return False
            if expiry < self._clock():
                del self._tokens[token]
                return False
            return True

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._tokens.pop(token or "", None)
