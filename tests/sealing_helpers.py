"""The tests' template key: one fixed key, so a gallery filled in a test process opens in the kiosk processes
the test starts (their configs' keys_dir holds the same key, `write_test_key`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiosk.store.sealing import (
    KEY_FILE_NAME,
    KeyRing,
    TemplateCodec,
    TemplateKey,
    write_key_file,
)
from kiosk.store.sqlite_file import Gallery

TEST_KEY = TemplateKey(bytes.fromhex("7465737400000001"), bytes(range(32)))
CODEC = TemplateCodec(KeyRing(TEST_KEY), where="the tests' key")


def sealed_gallery(path: Path, **kwargs) -> Gallery:
    """A SQLite gallery opened with the tests' key."""
    return Gallery(path, codec=CODEC, **kwargs)


def write_test_key(keys_dir: Path) -> Path:
    """keys_dir/template.key holding the tests' key (0600), unless a key is there already."""
    path = Path(keys_dir) / KEY_FILE_NAME
    if not path.exists():
        write_key_file(path, TEST_KEY)
    return path


def clear_gallery(path: Path, templates: dict[str, np.ndarray], model_id: str, version: int = 4) -> Path:
    """A gallery file as a program before schema version 5 wrote it: `templates` (subject id -> (N, D)
    array) stored in the clear, no key ids, stamped `version`."""
    import sqlite3

    Gallery(path).close()  # the current tables, then the step back
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP INDEX templates_key")
    db.execute("ALTER TABLE templates DROP COLUMN key_id")
    for sid, rows in templates.items():
        db.execute("INSERT INTO subjects (id, name, created) VALUES (?, ?, 0)", (sid, sid.title()))
        for row in np.asarray(rows, np.float32).reshape(-1, np.asarray(rows).shape[-1]):
            db.execute(
                "INSERT INTO templates (subject_id, model_id, dim, embedding, created) VALUES (?, ?, ?, ?, 0)",
                (sid, model_id, row.shape[0], row.astype("<f4").tobytes()),
            )
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    db.close()
    return path
