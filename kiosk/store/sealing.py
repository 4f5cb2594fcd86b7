"""Templates sealed at rest: the AEAD codec the gallery stores every template through, and its keys.

A face template is biometric data. In the database, its backups and
`kiosk-enroll backup` files it is only ever a sealed blob:

    b"KT1" | key id (8 bytes) | nonce (12 bytes) | AES-256-GCM(float32 template)

with the subject id, model id and template id as associated data, so a blob
copied onto another row (an insider swapping identities in SQL) does not
open, instead of matching as someone else. The key id says which key sealed
it, so a rotation can hold the old key and the new one at once.

Keys live outside the store: a key file (one line, 0600, never
in the database, never logged), or an environment variable. `KeyProvider`
is what the codec asks of them, so a site can plug in its KMS or HSM.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kiosk.config import KioskConfig
from kiosk.errors import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"KT1"
KEY_ID_BYTES = 8
NONCE_BYTES = 12
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES
KEY_FILE_TAG = "kiosk-template-key-v1"
KEY_ENV = "KIOSK_TEMPLATE_KEY"  # the key file's one line, for a site that hands keys over in the environment
KEY_FILE_NAME = "template.key"  # in security.keys_dir unless security.template_key_file says otherwise
CHECK_PREFIX = "key_check:"  # meta key of a key's check value (+ its id in hex)
NEXT_PREFIX = "key_next:"  # meta key of a rotation's new key, wrapped under the old one (+ its id in hex)
CURRENT_KEY = "key_current"  # meta key: the id of the key new templates are sealed with, once a rotation began


class TemplateUnreadable(ValueError):
    """A sealed template that does not open: another key, another row's blob, or damaged bytes."""


class MissingKey(ConfigError):
    """No key file where the configuration says one is."""


class KeyExists(ConfigError):
    """A key file is where a new one was to be written."""


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
            raise ConfigError(
                f"{where}: not a template key (expected one line '{KEY_FILE_TAG} <key id> "
                f"<key>', as `kiosk keys init` writes it)"
            ) from None
        return cls(key_id, secret)


class KeyProvider(Protocol):
    """Where the codec gets its keys: the one that seals now, and any that opens an older blob; a rotation
    adds its new key to a running process's provider (`add`) and makes it the sealing one (`use`)."""

    def current(self) -> TemplateKey: ...

    def get(self, key_id: bytes) -> TemplateKey | None: ...

    def add(self, key: TemplateKey) -> None: ...

    def use(self, key_id: bytes) -> None: ...


class KeyRing:
    """Keys held in memory: the one that seals, and others that open older blobs. A key rotation adds its new
    key to a running process's ring (`add`) and makes it the sealing one (`use`)."""

    def __init__(self, current: TemplateKey, *older: TemplateKey) -> None:
        self._current = current
        self._by_id = {k.key_id: k for k in (current, *older)}

    def current(self) -> TemplateKey:
        return self._current

    def get(self, key_id: bytes) -> TemplateKey | None:
        return self._by_id.get(key_id)

    def add(self, key: TemplateKey) -> None:
        self._by_id.setdefault(key.key_id, key)

    def use(self, key_id: bytes) -> None:
        self._current = self._by_id[key_id]


def write_key_file(path: Path, key: TemplateKey | None = None) -> TemplateKey:
    """A new key (or `key`) in a new file, created 0600 (never over an existing one: that would shred the
    gallery). The file appears whole or not at all (written aside, then linked into place), so a process
    that finds it reads a complete key even while another is making it."""
    key = key or TemplateKey.new()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, aside = tempfile.mkstemp(prefix=".template-key-", dir=path.parent)  # 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(key.line())
                out.flush()
                os.fsync(out.fileno())
            os.link(aside, path)
        finally:
            os.unlink(aside)
    except FileExistsError:
        raise KeyExists(
            f"{path}: a template key is there already (a new one would leave every template "
            "sealed under the old one unreadable)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the template key: {exc.strerror or exc}") from None
    return key


def read_key_file(path: Path) -> TemplateKey:
    """The key in `path`; a ConfigError naming the file when it is missing, readable by others, or not a key."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MissingKey(
            f"{path}: no template key there (make one with `kiosk keys init {path.parent}`, or "
            "copy the site's key there)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the template key: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path}: the template key is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}"
        )
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the template key: {exc}") from None
    return TemplateKey.parse(text, str(path))


def key_from_env(environ: dict[str, str] | None = None) -> TemplateKey | None:
    text = (os.environ if environ is None else environ).get(KEY_ENV)
    return None if text is None else TemplateKey.parse(text, f"${KEY_ENV}")


@dataclass(frozen=True)
class KeySource:
    """Where a process's template key comes from: `security.template_key_file`, else $KIOSK_TEMPLATE_KEY,
    else <security.keys_dir>/template.key (`default`: the one place that is ours to fill for a new gallery)."""

    where: str  # for messages: the file, or the variable's name
    path: Path | None
    default: bool

    def load(self) -> TemplateCodec:
        """The codec of this key; a ConfigError naming the file (MissingKey where there is none)."""
        key = read_key_file(self.path) if self.path is not None else key_from_env()
        if key is None:
            raise MissingKey(f"${KEY_ENV} is empty")
        return TemplateCodec(KeyRing(key), where=self.where)

    def make(self) -> TemplateCodec:
        """A new key at the default place (only where none is: `write_key_file` never overwrites)."""
        if self.path is None or not self.default:
            raise RuntimeError("KeySource.make: only a key at the default place is made")
        try:
            key = write_key_file(self.path)
        except KeyExists:  # another process made it a moment ago (two first enrollments at once): use that one
            return self.load()
        log.info(
            "made the template key %s (key %s): the gallery's templates open with it only; keep a copy "
            "apart from the gallery's backups",
            self.path,
            key.key_id.hex(),
        )
        return TemplateCodec(KeyRing(key), where=self.where)


def key_source(cfg: KioskConfig) -> KeySource:
    if cfg.security.template_key_file is not None:
        path = cfg.security.template_key_file
        return KeySource(str(path), path, False)
    if os.environ.get(KEY_ENV) is not None:
        return KeySource(f"${KEY_ENV}", None, False)
    path = cfg.security.keys_dir / KEY_FILE_NAME
    return KeySource(str(path), path, True)


class TemplateCodec:
    """Seals and opens templates; the one place a template crosses between clear and sealed."""

    def __init__(self, keys: KeyProvider, *, where: str = "the template key") -> None:
        self.keys = keys
        self.where = where  # where the keys came from, for messages
        self._ciphers: dict[bytes, tuple[bytes, AESGCM]] = {}

    def _cipher(self, key: TemplateKey) -> AESGCM:
        held = self._ciphers.get(key.key_id)
        if held is None or held[0] != key.secret:
            held = self._ciphers[key.key_id] = (key.secret, AESGCM(key.secret))
        return held[1]

    def current_id(self) -> str:
        """The sealing key's id, in hex (as templates.key_id holds it)."""
        return self.keys.current().key_id.hex()

    def check_value(self) -> tuple[str, str]:
        """(meta key, value) that proves the current key: a sealed constant, opened at start by `check`."""
        key = self.keys.current()
        blob = self.seal("kiosk-key-check", "", key.key_id.hex(), np.zeros(4, np.float32))
        return CHECK_PREFIX + key.key_id.hex(), base64.b64encode(blob).decode()

    def wrap(self, key: TemplateKey) -> str:
        """`key` sealed under the current key (a rotation's new key, for the processes that hold the old one:
        kept in the gallery only while the rotation runs)."""
        wrapper = self.keys.current()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._cipher(wrapper).encrypt(nonce, key.secret, self._wrap_context(wrapper.key_id, key.key_id))
        return base64.b64encode(wrapper.key_id + nonce + sealed).decode()

    def unwrap(self, key_id_hex: str, value: str) -> TemplateKey | None:
        """The key `key_id_hex` from its wrap, where this codec holds the key that wrapped it (else None)."""
        try:
            key_id, blob = bytes.fromhex(key_id_hex), base64.b64decode(value)
        except ValueError:
            return None
        wrapper = self.keys.get(blob[:KEY_ID_BYTES])
        if wrapper is None or len(key_id) != KEY_ID_BYTES:
            return None
        nonce = blob[KEY_ID_BYTES : KEY_ID_BYTES + NONCE_BYTES]
        try:
            secret = self._cipher(wrapper).decrypt(
                nonce, blob[KEY_ID_BYTES + NONCE_BYTES :], self._wrap_context(wrapper.key_id, key_id)
            )
        except InvalidTag:
            return None
        return TemplateKey(key_id, secret)

    @staticmethod
    def _wrap_context(wrapper_id: bytes, key_id: bytes) -> bytes:
        return b"kiosk-key-wrap\x00" + wrapper_id + key_id

    def check(self, key_id_hex: str, value: str | None) -> str:
        """'' when this codec holds the key `key_id_hex` and it opens that key's check value (None: no value
        recorded, the id alone is compared); else what is wrong, for a message."""
        try:
            key = self.keys.get(bytes.fromhex(key_id_hex))
        except ValueError:
            key = None
        if key is None:
            return f"sealed under key {key_id_hex}, which {self.where} does not hold"
        if value is None:
            return ""
        try:
            self.open("kiosk-key-check", "", key_id_hex, base64.b64decode(value))
        except (TemplateUnreadable, ValueError):
            return f"{self.where} holds a key with the id {key_id_hex} but not that key (a damaged or forged key)"
        return ""

    @staticmethod
    def _context(subject_id: str, model_id: str, template_id: int | str) -> bytes:
        return "\x00".join((subject_id, model_id, str(template_id))).encode("utf-8")

    def _seal(self, data: bytes, context: bytes) -> bytes:
        key = self.keys.current()
        nonce = os.urandom(NONCE_BYTES)
        return MAGIC + key.key_id + nonce + self._cipher(key).encrypt(nonce, data, context)

    def _open(self, blob: bytes, context: bytes, what: str, kind: str, elsewhere: str) -> bytes:
        """The clear bytes of `blob`; TemplateUnreadable saying which of `what` is wrong."""
        blob = bytes(blob)
        key_id = self.key_id(blob)
        if key_id is None or len(blob) < HEADER_BYTES + 16:
            raise TemplateUnreadable(f"{what}: not a sealed {kind}")
        key = self.keys.get(key_id)
        if key is None:
            raise TemplateUnreadable(f"{what}: sealed under key {key_id.hex()}, which this process does not hold")
        try:
            return self._cipher(key).decrypt(
                blob[len(MAGIC) + KEY_ID_BYTES : HEADER_BYTES], blob[HEADER_BYTES:], context
            )
        except InvalidTag:
            raise TemplateUnreadable(f"{what}: does not open ({elsewhere}, or damaged)") from None

    def seal(self, subject_id: str, model_id: str, template_id: int | str, template: np.ndarray) -> bytes:
        clear = np.ascontiguousarray(template, dtype="<f4").tobytes()
        return self._seal(clear, self._context(subject_id, model_id, template_id))

    def open(self, subject_id: str, model_id: str, template_id: int | str, blob: bytes) -> np.ndarray:
        clear = self._open(
            blob,
            self._context(subject_id, model_id, template_id),
            f"template {template_id} of {subject_id}",
            "template",
            "another row's blob",
        )
        return np.frombuffer(clear, dtype="<f4").astype(np.float32)

    def seal_bytes(self, context: str, data: bytes) -> bytes:
        """Other biometric bytes (a console's decision crop) sealed like a template, bound to `context`."""
        return self._seal(data, b"bytes\x00" + context.encode())

    def open_bytes(self, context: str, blob: bytes) -> bytes:
        return self._open(blob, b"bytes\x00" + context.encode(), context.replace("\x00", " "), "file", "another file's")

    def key_id(self, blob: bytes) -> bytes | None:
        """Which key sealed `blob` (None: not a sealed template)."""
        blob = bytes(blob)
        return blob[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES] if blob[: len(MAGIC)] == MAGIC else None
