"""The PostgreSQL store's foundation against a real server (tests/pg_server.py): the password never in the
config, one-line errors naming the server, and the schema created once by several processes at the same time."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kiosk.errors import ConfigError, RuntimeFailure, UsageError
from kiosk.store import postgres
from tests.pg_server import PASSWORD, pg_server  # noqa: F401 - the fixture

MIGRATE = """
import sys
from pathlib import Path
from kiosk.store import postgres
conn = postgres.connect(postgres.target(sys.argv[1], Path(sys.argv[2])))
print(postgres.migrate(conn))
"""


def test_the_password_comes_from_a_file_or_the_environment_never_the_config(pg_server, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="carries a password"):
        postgres.target(f"postgresql://kiosk:{PASSWORD}@127.0.0.1:{pg_server.port}/kiosk")
    with pytest.raises(ConfigError, match="scheme 'mysql'"):
        postgres.target("mysql://kiosk@127.0.0.1/kiosk")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        postgres.target(pg_server.url, tmp_path / "empty")
    conn = postgres.connect(postgres.target(pg_server.url, pg_server.password_file))
    assert conn.execute("SELECT current_user").fetchone()[0] == "kiosk"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv(postgres.PASSWORD_ENV, PASSWORD)
    assert postgres.connect(postgres.target(pg_server.url)).execute("SELECT 1").fetchone()[0] == 1
    # A wrong password, a closed port: one line naming the server, never the password.
    monkeypatch.setenv(postgres.PASSWORD_ENV, "not-the-password")
    with pytest.raises(RuntimeFailure) as info:
        postgres.connect(postgres.target(pg_server.url))
    assert f"database 127.0.0.1:{pg_server.port}/kiosk unreachable" in str(info.value)
    assert "password authentication failed" in str(info.value) and "not-the-password" not in str(info.value)
    from kiosk.messaging.transport import free_port

    with pytest.raises(RuntimeFailure, match="unreachable"):
        postgres.connect(postgres.target(f"postgresql://kiosk@127.0.0.1:{free_port()}/kiosk", pg_server.password_file),
                         timeout_s=2)


def test_several_processes_starting_together_create_the_schema_once(pg_server):
    conn = postgres.connect(postgres.target(pg_server.url, pg_server.password_file))
    conn.execute("DROP SCHEMA public CASCADE")
    conn.execute("CREATE SCHEMA public")
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, pg_server.url, str(pg_server.password_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    found = sorted(int(out) for out, _ in results)
    assert found == [0, 3, 3, 3]  # one created it; the others, serialised by the lock, found it done
    rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    assert rows == {"schema_version": "3", "revision": "0"}
    tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"subjects", "templates", "flights", "manifest", "gates", "boardings", "flight_decisions",
            "boarding_log"} <= tables
    # The boarded mark's guarantee is the database's: a second mark for one flight and passenger is refused.
    conn.execute("INSERT INTO flights VALUES ('LH123', 0, 0, NULL)")
    conn.execute("INSERT INTO boardings VALUES ('LH123', 'P1', 'A1', NULL, 1, NULL, 'e1')")
    import psycopg

    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO boardings VALUES ('LH123', 'P1', 'A2', NULL, 2, NULL, 'e2')")
    # A database from a newer program is refused, not downgraded.
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(UsageError, match="newer than this program"):
        postgres.migrate(conn)
