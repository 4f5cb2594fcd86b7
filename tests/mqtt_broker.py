"""A real Mosquitto broker for the tests (Debian's `mosquitto` package, which `.ci/run` installs), started as a
child process in a temporary folder on a free port, with a password file and no anonymous access, in plain MQTT or
in TLS (a CA and a broker certificate made for the test); and a paho client that records what arrives. Tests that
need it skip, with the reason, only where no binary is installed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from kiosk.messaging.transport import free_port
from tests.waiting import wait_until

USER = "kiosk"
PASSWORD = "broker-test-secret"


@dataclass(frozen=True)
class TlsFiles:
    """A test CA, the broker certificate it signed (for the address 127.0.0.1 only, no DNS name) and a client
    certificate it signed (for a broker that asks clients for one)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    ca_key: Path  # to sign more client certificates (client_certificate)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(
    subject: str,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    valid: tuple[timedelta, timedelta] = (timedelta(minutes=-5), timedelta(days=30)),
) -> x509.CertificateBuilder:
    """A certificate for `subject`'s `key`, issued by `issuer`, valid from now + valid[0] to now + valid[1] (by
    default from five minutes ago for 30 days: longer than the hook's warning of a certificate soon to expire)."""
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid[0])
        .not_valid_after(now + valid[1])
    )


def make_ca(folder: Path, name: str = "kiosk-test-ca") -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA: its certificate file, key and certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(name, _name(name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def _signed(
    folder: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    san: list | None,
    valid: tuple[timedelta, timedelta] | None = None,
) -> tuple[Path, Path]:
    """A certificate for `name` signed by the CA (with these subject alternative names), and its key (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(name, ca_cert.subject, key, *([valid] if valid else []))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return cert_path, _write_key(key_path, key)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    """`key` in `path`, PEM, unencrypted, its owner's only."""
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def encrypted_key(path: Path, passphrase: bytes) -> bytes:
    """The PEM key in `path`, encrypted under `passphrase` (a key file some sites keep)."""
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(passphrase)
    )


def make_tls(folder: Path) -> TlsFiles:
    """A CA, a broker certificate for 127.0.0.1 signed by it (a client that trusts the CA and connects to
    127.0.0.1 verifies it; one that connects as `localhost` must not: the name is not in the certificate) and a
    client certificate signed by it."""
    ca_path, ca_key, ca_cert = make_ca(folder)
    cert, key = _signed(folder, "kiosk-test-broker", ca_key, ca_cert, [x509.IPAddress(IPv4Address("127.0.0.1"))])
    client_cert, client_key = _signed(folder, "kiosk-test-client", ca_key, ca_cert, None)
    return TlsFiles(ca_path, cert, key, client_cert, client_key, _write_key(folder / "ca.key", ca_key))


def client_certificate(tls: TlsFiles, folder: Path, name: str, valid: tuple[timedelta, timedelta]) -> tuple[Path, Path]:
    """Another client certificate of the test CA, valid from now + valid[0] to now + valid[1], and its key."""
    ca_key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    return _signed(folder, name, ca_key, x509.load_pem_x509_certificate(tls.ca.read_bytes()), None, valid)


@dataclass
class Broker:
    """A running `mosquitto` on 127.0.0.1:`port`; `kill()` and `start()` again on the same port keep its
    persistence file (retained messages and persistent sessions survive, as far as it was saved)."""

    binary: str
    folder: Path
    port: int
    tls: TlsFiles | None = None  # TLS only on its port, with this certificate
    client_certs: bool = False  # with tls: every client must show a certificate the test CA signed
    acl: str | None = None  # Mosquitto's acl_file: what each user may read and write (None: all of it)
    users: dict[str, str] = field(default_factory=dict)  # more users than USER: name -> password
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{USER}@127.0.0.1:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.folder / "client-password"

    def init(self) -> None:
        passwd = shutil.which("mosquitto_passwd") or str(Path(self.binary).parent.parent / "bin" / "mosquitto_passwd")
        subprocess.run(
            [passwd, "-c", "-b", str(self.folder / "passwd"), USER, PASSWORD],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for user, password in self.users.items():
            subprocess.run(
                [passwd, "-b", str(self.folder / "passwd"), user, password], check=True, capture_output=True, timeout=30
            )
        self.password_file.write_text(PASSWORD + "\n")
        self.password_file.chmod(0o600)
        self._write_config()
        self.start()

    def renew_tls(self, tls: TlsFiles) -> None:
        """Restart with other TLS files (a renewal: a new CA, and the broker and client certificates it signed)."""
        self.kill(signal.SIGTERM)
        self.tls = tls
        self._write_config()
        self.start()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            *(self._tls_lines() if self.tls else []),
            "allow_anonymous false",
            f"password_file {self.folder}/passwd",
            *([f"acl_file {self.folder}/acl"] if self.acl is not None else []),
            "persistence true",
            f"persistence_location {self.folder}/",
            # Saved after every change, so a SIGKILL loses (almost) nothing the broker had taken.
            "autosave_interval 1",
            "autosave_on_changes true",
            "log_dest stderr",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # mosquitto would switch to user `mosquitto`, who cannot reach this folder
        if self.acl is not None:
            (self.folder / "acl").write_text(self.acl)
        (self.folder / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def _tls_lines(self) -> list[str]:
        assert self.tls is not None
        return [
            f"cafile {self.tls.ca}",
            f"certfile {self.tls.cert}",
            f"keyfile {self.tls.key}",
            f"require_certificate {'true' if self.client_certs else 'false'}",
        ]

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.folder / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "log", "ab"),
            start_new_session=True,
        )
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:  # it ended: it will not listen
                raise RuntimeError(f"mosquitto did not start: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                return False
            return True

        try:
            wait_until(listening, 20, f"mosquitto listening on port {self.port}", every=0.05)
        except AssertionError:
            raise RuntimeError(f"mosquitto did not start: {self.log()}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        path = self.folder / "log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def serve(tls: bool, client_certs: bool = False, acl: str | None = None, users: dict[str, str] | None = None):
    """A fresh broker (a generator for a fixture or a `with contextlib.contextmanager`), killed at the end."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None)
    if binary is None:
        pytest.skip("mosquitto not installed (Debian: apt-get install mosquitto; .ci/run does)")
    folder = Path(tempfile.mkdtemp(prefix="kiosk-mqtt-"))
    server = Broker(binary, folder, free_port(), make_tls(folder) if tls else None, client_certs, acl, users or {})
    try:
        server.init()
        yield server
    finally:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def broker():
    """A fresh broker for one test (its own folder and port), killed at the end."""
    yield from serve(tls=False)


@pytest.fixture
def tls_broker():
    """A fresh broker that speaks TLS only (`broker.tls`: its CA, certificate and key), killed at the end."""
    yield from serve(tls=True)


@pytest.fixture
def mtls_broker():
    """A TLS-only broker that also wants each client's certificate (`broker.tls.client_cert`, `client_key`)."""
    yield from serve(tls=True, client_certs=True)


@dataclass
class Heard:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> dict:
        return json.loads(self.payload)


@dataclass
class Listener:
    """A paho client subscribed to `<prefix>/#` at QoS 1 that records every message. `session`: a persistent
    session (clean_session false, fixed id): what the broker queues for it while it is away arrives later."""

    broker: Broker
    prefix: str = "kiosk"
    session: str | None = None
    user: str = USER
    password: str = PASSWORD
    heard: list[Heard] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cv = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.session or "", clean_session=self.session is None
        )
        self.client.username_pw_set(self.user, self.password)
        if self.broker.tls:
            self.client.tls_set(
                ca_certs=str(self.broker.tls.ca),
                certfile=str(self.broker.tls.client_cert),
                keyfile=str(self.broker.tls.client_key),
            )
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{self.prefix}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.broker.port)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, msg) -> None:
        with self._cv:
            self.heard.append(Heard(msg.topic, msg.payload, bool(msg.retain), time.time()))
            self._cv.notify_all()

    def on(self, topic: str) -> list[Heard]:
        with self._cv:
            return [h for h in self.heard if h.topic == f"{self.prefix}/{topic}"]

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.2))
        return True

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
