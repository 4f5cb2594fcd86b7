"""A real PostgreSQL server for the tests, started in a temporary folder (Debian's `postgresql` package, which
`.ci/run` installs). PostgreSQL refuses to run as root: as root, the server runs as `nobody`. Tests that need
it skip, with the reason, only where no server binary is installed."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiosk.messaging.transport import free_port

PASSWORD = "kiosk-test-secret"


def server_bin() -> Path | None:
    """The folder of initdb, pg_ctl and createdb: Debian's /usr/lib/postgresql/<version>/bin (newest), else
    the folder on PATH that holds all three."""
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    candidates = [Path(v).parent for v in reversed(versions)]
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "createdb")):
            return folder
    return None


@dataclass
class PgServer:
    bin: Path
    folder: Path
    port: int
    user: str | None  # the unprivileged user the server runs as (None: this process's own)

    @property
    def url(self) -> str:
        return f"postgresql://kiosk@127.0.0.1:{self.port}/kiosk"

    @property
    def password_file(self) -> Path:
        return self.folder / "password"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
            cwd=self.folder,
        )

    def init(self) -> None:
        pwfile = self.folder / "initpw"
        pwfile.write_text(PASSWORD + "\n")
        self.password_file.write_text(PASSWORD + "\n")
        if self.user:
            os.chown(self.folder, pwd.getpwnam(self.user).pw_uid, -1)
            os.chown(pwfile, pwd.getpwnam(self.user).pw_uid, -1)
        self._run(
            "initdb",
            "-D",
            "data",
            "-U",
            "kiosk",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        self.start()
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        subprocess.run(
            [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "kiosk", "kiosk"],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            "data",
            "-l",
            "server.log",
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", "data", "-m", mode, "-w", "stop", check=False)

    def new_database(self) -> str:
        """A fresh, empty database on this server (each test its own); its URL."""
        import psycopg

        self.databases = getattr(self, "databases", 0) + 1
        name = f"kiosk_{os.getpid()}_{self.databases}"
        with psycopg.connect(self.url, password=PASSWORD, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://kiosk@127.0.0.1:{self.port}/{name}"

    def log(self) -> str:
        path = self.folder / "data" / "server.log"
        path = path if path.exists() else self.folder / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="session")
def pg_server():
    """A running server (database and user `kiosk`, password in `password_file`), stopped at the end."""
    binary = server_bin()
    if binary is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql; .ci/run does)")
    user = "nobody" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="kiosk-pg-"))  # not under pytest's root-only tmp: `nobody` must reach it
    server = PgServer(binary, folder, free_port(), user)
    try:
        server.init()
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.stderr or exc.stdout}")
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class GallerySite:
    """Where a test's gallery lives, on either backend: the `gallery:` config section (plain data, so a
    child process can open it too) and an opener."""

    backend: str
    section: dict

    def open(self, *, create: bool = True):
        from kiosk.config import config_from_mapping
        from kiosk.store.gallery import open_gallery
        from tests.sealing_helpers import CODEC

        return open_gallery(config_from_mapping({"gallery": self.section}), create=create, codec=CODEC)


@pytest.fixture(params=["sqlite", "postgresql"])
def gallery_site(request, tmp_path) -> GallerySite:
    """The same behavioural test on both backends: a SQLite file, and a fresh database on the real server."""
    if request.param == "sqlite":
        return GallerySite("sqlite", {"path": str(tmp_path / "g.db")})
    server = request.getfixturevalue("pg_server")
    return GallerySite("postgresql", {"url": server.new_database(), "password_file": str(server.password_file)})
