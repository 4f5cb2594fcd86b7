"""A real Prometheus (Debian `prometheus`) scrapes a running verifier with the alert rules of
deploy/prometheus loaded: every query of the Grafana dashboard, every template variable and every alert
expression is evaluated through its HTTP API and returns data; the audit-not-ok, camera-down and
verifier-down alerts fire when those faults are made, and stop when the audit log is writable again."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from kiosk.messaging.transport import free_port
from kiosk.tools.scenes import Walk
from tests.conftest import run_cli
from tests.pipeline_helpers import Events, kiosk, make_video, people, stop, write_config
from tests.test_deploy import DASHBOARD, RULES, alert_rules, dashboard_queries, named_metrics, subscriber_samples
from tests.waiting import wait_until

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None, reason="the prometheus binary is not found (Debian package prometheus; .ci/run installs it)"
    ),
]

# The alerts this test makes happen, with `for:` shortened from minutes to seconds in its copy of the rules.
MADE = ("KioskAuditNotOk", "KioskCameraDown", "KioskVerifierDown")
# Grafana's variables as this test fills them: every verifier, gate and camera; windows for 1 s scrapes.
VARIABLES = {
    "$__rate_interval": "20s",
    "$__range": "1m",
    "$job": "kiosk",
    "$instance": ".*",
    "$gate": ".*",
    "$camera": ".*",
}


class Prometheus:
    """A Prometheus server in `folder`, scraping the verifier's metrics every second, with `rules` loaded."""

    def __init__(self, folder: Path, metrics_port: int, rules: Path) -> None:
        self.port = free_port()
        config = folder / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [
                        {"job_name": "kiosk", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
                    ],
                }
            )
        )
        self.log = (folder / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            cwd=folder,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_for(self.ready, 30, "prometheus ready")

    def ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> object:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def active(self, alertname: str) -> list[dict]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == alertname]

    @staticmethod
    def wait_for(predicate, timeout: float, what: str) -> None:
        wait_until(predicate, timeout, what, every=0.25)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def fill(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, expr
    return expr


def has_data(result: list[dict]) -> bool:
    """At least one series, and at least one of them a number (a quantile of no observations is NaN)."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_a_real_prometheus_evaluates_every_dashboard_query_and_alert_and_the_alerts_fire_on_faults(
    tmp_path, engine, photos
):
    crops = people(engine, photos)
    make_video(tmp_path / "yao.avi", [Walk(crops["yao"], start=0, frames=36, w0=80, w1=170)], seconds=2.4)
    metrics_port = free_port()
    config = write_config(
        tmp_path,
        [{"id": "cam-a1", "gate": "A1", "source": "yao.avi", "realtime": True, "loop": True}],
        policy={"repeat_accept_s": 0.0},
        metrics={"port": metrics_port},
    )
    assert (
        run_cli("kiosk-enroll", "-q", "-c", str(config), "add", "--id", "YAO", str(photos["yaoming.jpg"])).returncode
        == 0
    )
    rules = yaml.safe_load(RULES.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] in MADE:
            rule["for"] = "2s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))

    verifier = kiosk(config, "verify")
    verifier_err: str | None = None
    capture = None
    events = Events(config, ("event.", "health.verifier"))
    prom = Prometheus(tmp_path, metrics_port, tmp_path / "rules.yml")
    try:
        assert events.wait_for(lambda ev: ev.health, 30)
        capture = kiosk(config, "capture", "--camera", "cam-a1")
        assert events.wait_for(lambda ev: sum(e.type == "accept" for e in ev.events) >= 2, 40)

        # The rules loaded, every one, and each evaluates without error.
        loaded = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}  # type: ignore[index]
        assert sorted(loaded) == sorted(r["alert"] for r in alert_rules())

        # Every panel query returns data once Prometheus holds enough scrapes for its rate() windows and the
        # camera is up; every alert is silent on this healthy gate.
        panels = [(title, fill(expr)) for title, expr in dashboard_queries()]
        assert len(panels) > 25

        def healthy_and_complete() -> bool:
            scrapes = prom.query('count_over_time(up{job="kiosk"}[30s])')
            return (
                bool(scrapes)
                and float(scrapes[0]["value"][1]) >= 20
                and all(has_data(prom.query(expr)) for _, expr in panels)
                and not prom.api("alerts")["alerts"]
            )  # type: ignore[index]

        with contextlib.suppress(AssertionError):  # waited for; then checked below, each check naming what is amiss
            wait_until(healthy_and_complete, 60, "every panel with data and no alert", every=0.5)
        empty = [(title, expr) for title, expr in panels if not has_data(prom.query(expr))]
        assert empty == [], empty
        assert prom.api("alerts")["alerts"] == []  # type: ignore[index]
        loaded = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}  # type: ignore[index]
        assert {name: (r["health"], r.get("lastError", "")) for name, r in loaded.items()} == {
            name: ("ok", "") for name in loaded
        }

        # The template variables list the verifier, its gate and its camera.
        dash = json.loads(DASHBOARD.read_text())
        for variable in dash["templating"]["list"]:
            if variable["type"] != "query":
                continue
            selector, label = variable["query"]["query"].removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
            values = prom.api(f"label/{label}/values", **{"match[]": fill(selector)})
            assert values, variable["name"]
        assert "A1" in prom.api("label/gate/values", **{"match[]": "kiosk_gate_boarding"})  # type: ignore[operator]

        # Every alert expression evaluates, on series that exist (an alert on a fault has no result now); a
        # subscriber's series are not scraped here (tests/test_mqtt.py checks the value it exports).
        by_subscriber = {sample.name for sample in subscriber_samples()}
        for rule in alert_rules():
            prom.query(rule["expr"])
            for name in named_metrics(rule["expr"]) | ({"up"} if "up{" in rule["expr"] else set()):
                if name not in by_subscriber:
                    assert prom.query(f'count({name}{{job="kiosk"}})'), (rule["alert"], name)

        # The audit log replaced by a folder: KioskAuditNotOk fires; writable again: it stops.
        audit_path = tmp_path / "events.jsonl"
        audit_path.rename(tmp_path / "moved.jsonl")
        audit_path.mkdir()
        prom.wait_for(
            lambda: any(a["state"] == "firing" for a in prom.active("KioskAuditNotOk")), 30, "KioskAuditNotOk firing"
        )
        assert prom.query('kiosk_audit_ok{job="kiosk"}')[0]["value"][1] == "0"
        assert prom.active("KioskCameraDown") == []
        audit_path.rmdir()
        prom.wait_for(lambda: not prom.active("KioskAuditNotOk"), 30, "KioskAuditNotOk resolved")

        # The capture killed: KioskCameraDown fires for its camera.
        stop(capture)
        capture = None
        prom.wait_for(
            lambda: any(a["state"] == "firing" for a in prom.active("KioskCameraDown")), 30, "KioskCameraDown firing"
        )
        firing = prom.active("KioskCameraDown")
        assert [(a["labels"]["camera"], a["labels"]["severity"]) for a in firing] == [("cam-a1", "critical")]
        assert "kiosk status" in firing[0]["annotations"]["description"]

        # The verifier killed: KioskVerifierDown fires.
        _, verifier_err = stop(verifier)
        prom.wait_for(
            lambda: any(a["state"] == "firing" for a in prom.active("KioskVerifierDown")),
            30,
            "KioskVerifierDown firing",
        )
    finally:
        prom.close()
        events.close()
        if capture is not None:
            stop(capture)
        if verifier_err is None:
            _, verifier_err = stop(verifier)
    assert "Traceback" not in verifier_err
