"""The CLI contract an operator and the acceptance checks drive: -c before or after the sub-command,
$KIOSK_CONFIG for every command, duplicate YAML keys refused, and tools that say what to check."""

from __future__ import annotations

import os
import time

import pytest

from enrollment.cli import build_parser as enroll_parser
from kiosk.cli import build_parser as kiosk_parser
from kiosk.cli import main as kiosk_main
from kiosk.messaging.transport import free_port
from tests.conftest import run_cli
from tests.pipeline_helpers import write_config

# Every sub-command with its required arguments, as DESIGN.md and the README write them.
KIOSK = [
    ["run", "--exit-on-eof"],
    ["capture", "--camera", "cam-a1"],
    ["verify"],
    ["subscribe", "--gate", "A1"],
    ["bench", "--video", "gate.avi", "--json"],
    ["claim", "--gate", "A1", "--subject", "P1"],
    ["status", "--json"],
    ["demo"],
    ["keys", "init", "var/keys"],
]
ENROLL = [
    ["add", "--id", "P1", "a.jpg"],
    ["import", "flight.csv"],
    ["list", "--json"],
    ["remove", "P1"],
    ["compare", "a.jpg", "b.jpg", "--json"],
    ["evaluate", "pairs.csv", "--json"],
]


@pytest.mark.parametrize("parser,argv", [(kiosk_parser, a) for a in KIOSK] + [(enroll_parser, a) for a in ENROLL])
def test_config_before_and_after_the_subcommand(parser, argv):
    before = parser().parse_args(["-c", "site.yaml", *argv])
    after = parser().parse_args([*argv, "-c", "site.yaml"])
    after_long = parser().parse_args([*argv, "--config=site.yaml", "-v"])
    assert before.config == after.config == after_long.config == "site.yaml"
    assert after_long.verbose == 1 and after.verbose == 0 and after.quiet == 0
    bare = parser().parse_args(argv)
    assert bare.config is None and bare.verbose == 0


def test_kiosk_config_environment_is_read_by_every_command(tmp_path):
    no_cameras = write_config(tmp_path, gallery_only=True)
    env = {"KIOSK_CONFIG": str(no_cameras)}
    res = run_cli("kiosk", "run", env=env)
    assert res.returncode == 2 and f"{no_cameras}: cameras: expected at least one camera" in res.stderr
    res = run_cli("kiosk", "capture", "--camera", "cam-a1", env=env)
    assert res.returncode == 2 and str(no_cameras) in res.stderr
    res = run_cli("kiosk", "verify", env=env)
    assert res.returncode == 2 and str(no_cameras) in res.stderr
    res = run_cli("kiosk", "run")  # neither -c nor $KIOSK_CONFIG: says how to give one
    assert res.returncode == 2 and "-c CONFIG or $KIOSK_CONFIG" in res.stderr
    res = run_cli("kiosk-enroll", "list", env=env)  # the environment's gallery, which does not exist yet
    assert res.returncode == 2 and str(tmp_path / "gallery.db") in res.stderr


def test_status_and_claim_without_a_verifier_say_what_to_check(tmp_path):
    port = free_port()
    config = write_config(tmp_path, gallery_only=True, transport={"control": f"tcp://127.0.0.1:{port}"})
    for argv in (["status", "-c", str(config)], ["claim", "-c", str(config), "--gate", "A1", "--subject", "P"]):
        res = run_cli("kiosk", *argv)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert f"no verifier is listening on tcp://127.0.0.1:{port}" in res.stderr
        assert "is `kiosk run` or `kiosk verify` running with this config?" in res.stderr
        # Said at once, not after the 3 s request timeout: timed in this process, so that a busy machine's slow
        # start of a new Python process is not counted.
        t0 = time.monotonic()
        assert kiosk_main(["-q", *argv]) == 1
        assert time.monotonic() - t0 < 2.9
    # the gallery is why no verifier can start: status says what to run
    gallery = tmp_path / "gallery.db"
    res = run_cli("kiosk", "status", "-c", str(config))
    assert f"The gallery {gallery} does not exist" in res.stderr and f"kiosk-enroll -c {config} restore" in res.stderr
    gallery.write_bytes(os.urandom(100))
    res = run_cli("kiosk", "status", "-c", str(config))
    assert res.returncode == 1 and f"The gallery {gallery} is corrupt" in res.stderr and "restore" in res.stderr


def test_a_key_written_twice_is_refused(tmp_path):
    config = tmp_path / "kiosk.yaml"
    config.write_text("policy:\n  accept_threshold: 0.5\n  min_margin: 0.1\n  accept_threshold: 0.2\n")
    res = run_cli("kiosk-enroll", "list", "-c", str(config))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (
        f"{config}: not valid YAML (line 4, column 3): key 'accept_threshold' is written twice "
        "(first on line 2)" in res.stderr
    )
    config.write_text("gallery: {path: a.db}\ngallery: {path: b.db}\n")
    res = run_cli("kiosk", "status", "-c", str(config))
    assert res.returncode == 2 and "key 'gallery' is written twice (first on line 1)" in res.stderr
