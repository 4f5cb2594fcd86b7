"""The template codec and its key files (kiosk.store.sealing): what a stolen copy of the store holds, and what a
blob moved onto another row, another key or damaged bytes gives."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kiosk.errors import ConfigError
from kiosk.store.sealing import (
    KEY_ENV,
    KeyRing,
    TemplateCodec,
    TemplateKey,
    TemplateUnreadable,
    key_from_env,
    read_key_file,
    write_key_file,
)


def template(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
    return v / np.linalg.norm(v)


def test_a_sealed_template_opens_only_on_its_own_row_and_holds_none_of_its_bytes(tmp_path):
    codec = TemplateCodec(KeyRing(write_key_file(tmp_path / "template.key")))
    yao, ann = template(1), template(2)
    blob = codec.seal("YAO", "model-a", 7, yao)
    assert np.array_equal(codec.open("YAO", "model-a", 7, blob), yao)
    clear = yao.astype("<f4").tobytes()
    assert not any(clear[i : i + 64] in blob for i in range(0, len(clear) - 63, 4))  # no window of it in the clear
    assert codec.seal("YAO", "model-a", 7, yao) != blob  # a fresh nonce each time
    # The blob copied onto another subject's row, another model's or another template's: it does not open.
    for row in (("ANN", "model-a", 7), ("YAO", "model-b", 7), ("YAO", "model-a", 8)):
        with pytest.raises(TemplateUnreadable, match="does not open"):
            codec.open(*row, blob)
    damaged = bytearray(codec.seal("ANN", "model-a", 1, ann))
    damaged[-20] ^= 1
    with pytest.raises(TemplateUnreadable, match="does not open"):
        codec.open("ANN", "model-a", 1, bytes(damaged))
    with pytest.raises(TemplateUnreadable, match="not a sealed template"):
        codec.open("ANN", "model-a", 1, ann.tobytes())  # a clear template (an unsealed gallery)


def test_a_blob_sealed_under_another_key_says_which_and_a_rotation_holds_both(tmp_path):
    old, new = TemplateKey.new(), TemplateKey.new()
    blob = TemplateCodec(KeyRing(old)).seal("YAO", "m", 1, template(1))
    with pytest.raises(TemplateUnreadable, match=old.key_id.hex()):
        TemplateCodec(KeyRing(new)).open("YAO", "m", 1, blob)
    rotating = TemplateCodec(KeyRing(new, old))  # new seals, old still opens
    assert np.array_equal(rotating.open("YAO", "m", 1, blob), template(1))
    assert rotating.key_id(rotating.seal("YAO", "m", 1, template(1))) == new.key_id
    assert old.secret.hex() not in repr(old) and old.key_id.hex() in repr(old)  # never the secret in a log


def test_key_files_made_private_never_overwritten_and_refused_when_loose_missing_or_foreign(tmp_path):
    path = tmp_path / "keys" / "template.key"
    key = write_key_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600 and read_key_file(path) == key
    with pytest.raises(ConfigError, match="already"):
        write_key_file(path)
    assert read_key_file(path) == key  # untouched
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0640\).*chmod 600"):
        read_key_file(path)
    with pytest.raises(ConfigError, match="no template key there.*kiosk keys init"):
        read_key_file(tmp_path / "nowhere.key")
    foreign = tmp_path / "foreign.key"
    foreign.write_text("-----BEGIN PRIVATE KEY-----\n")
    foreign.chmod(0o600)
    with pytest.raises(ConfigError, match=str(foreign) + ": not a template key"):
        read_key_file(foreign)
    assert key_from_env({KEY_ENV: key.line()}) == key and key_from_env({}) is None
    with pytest.raises(ConfigError, match=r"\$KIOSK_TEMPLATE_KEY: not a template key"):
        key_from_env({KEY_ENV: "x"})
