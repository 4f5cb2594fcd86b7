"""Templates sealed at rest: the AEAD codec the gallery stores every template through, and its keys.

A face template is biometric data. In the database, its backups and
`kiosk-enroll backup` files it is only ever a sealed blob:

    b"KT1" | key id (8 bytes) | nonce (12 bytes) | AES-256-GCM(float32 template)

with the subject id, model id and template id as associated data, so a blob
copied onto another row (an insider swapping identities in SQL) does not
open, instead of matching as someone else. The key id says which key sealed
it, so a rotation can hold the old key and the new one at once.

Keys live outside the store: a key file (`KeyFile`: one line, 0600, never
in the database, never logged), or an environment variable. `KeyProvider`
is what the codec asks of them, so a site can plug in its KMS or HSM.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kiosk.errors import ConfigError

MAGIC = b"KT1"
KEY_ID_BYTES = 8
NONCE_BYTES = 12
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES
KEY_FILE_TAG = "kiosk-template-key-v1"
KEY_ENV = "KIOSK_TEMPLATE_KEY"  # the key file's one line, for a site that hands keys over in the environment


class TemplateUnreadable(ValueError):
    """A sealed template that does not open: another key, another row's blob, or damaged bytes."""


@dataclass(frozen=True)
class TemplateKey:
    key_id: bytes  # KEY_ID_BYTES, random, stored beside the key (says which key sealed a blob)
    secret: bytes  # 32 bytes, AES-256

    def __repr__(self) -> str:  # never the secret, in a log or a traceback
        return f"TemplateKey(key_id={self.key_id.hex()})"

    def line(self) -> str:
        """The key file's one line."""
        return f"{KEY_FILE_TAG} {self.key_id.hex()} {base64.b64encode(self.secret).decode()}\n"

    @classmethod
    def new(cls) -> TemplateKey:
        return cls(os.urandom(KEY_ID_BYTES), AESGCM.generate_key(bit_length=256))

    @classmethod
    def parse(cls, text: str, where: str) -> TemplateKey:
        parts = text.split()
        try:
            if len(parts) != 3 or parts[0] != KEY_FILE_TAG:
                raise ValueError
            key_id, secret = bytes.fromhex(parts[1]), base64.b64decode(parts[2], validate=True)
            if len(key_id) != KEY_ID_BYTES or len(secret) != 32:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{where}: not a template key (expected one line '{KEY_FILE_TAG} <key id> "
                              f"<key>', as `kiosk keys init` writes it)") from None
        return cls(key_id, secret)


class KeyProvider(Protocol):
    """Where the codec gets its keys: the one that seals now, and any that opens an older blob."""

    def current(self) -> TemplateKey: ...

    def get(self, key_id: bytes) -> TemplateKey | None: ...


class StaticKeys:
    """Keys held in memory: the current one first, older ones (a rotation in progress) after it."""

    def __init__(self, current: TemplateKey, *older: TemplateKey) -> None:
        self._current = current
        self._by_id = {k.key_id: k for k in (current, *older)}

    def current(self) -> TemplateKey:
        return self._current

    def get(self, key_id: bytes) -> TemplateKey | None:
        return self._by_id.get(key_id)


def write_key_file(path: Path) -> TemplateKey:
    """A new key in a new file, created 0600 (never over an existing one: that would shred the gallery)."""
    key = TemplateKey.new()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path}: a template key is there already (a new one would leave every template "
                          "sealed under the old one unreadable)") from None
    with os.fdopen(fd, "w") as out:
        out.write(key.line())
    return key


def read_key_file(path: Path) -> TemplateKey:
    """The key in `path`; a ConfigError naming the file when it is missing, readable by others, or not a key."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no template key there (make one with `kiosk keys init`)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the template key: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a file")
    if st.st_mode & 0o077:
        raise ConfigError(f"{path}: the template key is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"chmod 600 {path}")
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the template key: {exc}") from None
    return TemplateKey.parse(text, str(path))


def key_from_env(environ: dict[str, str] | None = None) -> TemplateKey | None:
    text = (os.environ if environ is None else environ).get(KEY_ENV)
    return None if text is None else TemplateKey.parse(text, f"${KEY_ENV}")


class TemplateCodec:
    """Seals and opens templates; the one place a template crosses between clear and sealed."""

    def __init__(self, keys: KeyProvider) -> None:
        self.keys = keys

    @staticmethod
    def _context(subject_id: str, model_id: str, template_id: int | str) -> bytes:
        return "\x00".join((subject_id, model_id, str(template_id))).encode("utf-8")

    def seal(self, subject_id: str, model_id: str, template_id: int | str, template: np.ndarray) -> bytes:
        key = self.keys.current()
        nonce = os.urandom(NONCE_BYTES)
        clear = np.ascontiguousarray(template, dtype="<f4").tobytes()
        sealed = AESGCM(key.secret).encrypt(nonce, clear, self._context(subject_id, model_id, template_id))
        return MAGIC + key.key_id + nonce + sealed

    def key_id(self, blob: bytes) -> bytes | None:
        """Which key sealed `blob` (None: not a sealed template)."""
        blob = bytes(blob)
        return blob[len(MAGIC):len(MAGIC) + KEY_ID_BYTES] if blob[:len(MAGIC)] == MAGIC else None

    def open(self, subject_id: str, model_id: str, template_id: int | str, blob: bytes) -> np.ndarray:
        blob = bytes(blob)
        key_id = self.key_id(blob)
        if key_id is None or len(blob) < HEADER_BYTES + 16:
            raise TemplateUnreadable(f"template {template_id} of {subject_id}: not a sealed template")
        key = self.keys.get(key_id)
        if key is None:
            raise TemplateUnreadable(f"template {template_id} of {subject_id}: sealed under key {key_id.hex()}, "
                                     "which this process does not hold")
        nonce = blob[len(MAGIC) + KEY_ID_BYTES:HEADER_BYTES]
        try:
            clear = AESGCM(key.secret).decrypt(nonce, blob[HEADER_BYTES:],
                                               self._context(subject_id, model_id, template_id))
        except InvalidTag:
            raise TemplateUnreadable(f"template {template_id} of {subject_id}: does not open (another row's "
                                     "blob, or damaged)") from None
        return np.frombuffer(clear, dtype="<f4").astype(np.float32)
