"""The deployment files (deploy/): alert rules and their promtool tests, the Grafana dashboard, the systemd
units. Fast checks here; tests/test_prometheus.py runs the rules and the dashboard's queries on a real
Prometheus scraping a running verifier."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kiosk.services.metrics import SubscriberMetrics, VerifierMetrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "kiosk-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "kiosk-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "kiosk-dashboard.json"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
ALERTS = (
    "KioskVerifierDown",
    "KioskCameraDown",
    "KioskAuditNotOk",
    "KioskGalleryStale",
    "KioskUnreadableTemplates",
    "KioskDecisionLatencyHigh",
    "KioskLivenessUnverifiedHigh",
    "KioskNoDecisionsOnOpenGate",
    "KioskMqttCertificateExpiring",
)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as written) of every panel target."""
    dash = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dash["panels"] for target in panel.get("targets", [])]


def subscriber_samples() -> list:
    """What a subscriber serves, with an MQTT hook that shows its broker a client certificate."""
    metrics = SubscriberMetrics(["mqtt a"])
    metrics.mqtt_certificate_expiry.labels(hook="mqtt a").set(2e9)  # as Hook.attach does for such a hook
    return [sample for family in metrics.registry.collect() for sample in family.samples]


def exported_names() -> set[str]:
    """Every sample name a verifier or a subscriber serves (counters with _total, histograms with
    _bucket/_sum/_count)."""
    metrics = VerifierMetrics({"cam-a1": "A1", "cam-b1": "B1"})
    metrics.watch_cameras(lambda camera: True, ["cam-a1", "cam-b1"])  # as the verifier does
    metrics.provider_info.labels(provider="CPUExecutionProvider").set(1)
    metrics.key_file_ok.labels(key="template").set(1)
    metrics.control_refused.labels(reason="claim_scope")
    names = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    return names | {sample.name for sample in subscriber_samples()}


def named_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(kiosk_[a-z0-9_]+)\b", expr))


def test_the_dashboard_and_the_rules_use_only_metrics_a_verifier_or_a_subscriber_exports():
    exported = exported_names()
    used = {name for _, expr in dashboard_queries() for name in named_metrics(expr)}
    used |= {name for rule in alert_rules() for name in named_metrics(rule["expr"])}
    assert len(used) > 20
    assert sorted(used - exported) == []
    # and the rule tests feed the rules the series a verifier or a subscriber really has (name and labels)
    metrics = VerifierMetrics({"cam-a1": "A1"})
    metrics.watch_cameras(lambda camera: True, ["cam-a1"])
    samples = [sample for family in metrics.registry.collect() for sample in family.samples] + subscriber_samples()
    labels = {sample.name: set(sample.labels) for sample in samples}
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for series in case["input_series"]:
            name, _, body = series["series"].partition("{")
            given = set(re.findall(r"(\w+)=", body)) - {"job", "instance"}
            if name != "up":
                assert name in labels and given == labels[name], series["series"]


def test_every_panel_query_selects_by_the_dashboard_variables():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance", "gate", "camera"} <= variables
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            selectors = re.findall(r"\b(?:kiosk_[a-z0-9_]+|up)\{([^}]*)\}", target["expr"])
            assert selectors, (panel["title"], target["expr"])
            assert all('job=~"$job"' in s and 'instance=~"$instance"' in s for s in selectors), target["expr"]
    # what the issue asks to see
    text = json.dumps([p["title"] for p in dash["panels"]]).lower()
    for topic in (
        "outcome and reason",
        "decision latency",
        "frame latency",
        "stale share",
        "idle share",
        "liveness",
        "gallery",
        "audit",
        "boarding progress",
    ):
        assert topic in text, topic


def test_every_alert_has_a_for_a_severity_and_says_what_to_check():
    rules = alert_rules()
    assert [r["alert"] for r in rules] == list(ALERTS)
    page = (REPO / "docs" / "dashboards.md").read_text()
    section = page.split("\n## Alerts", 1)[1].split("\n## ", 1)[0]
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and ("`kiosk status" in notes["description"] or "`journalctl" in notes["description"])
        assert notes["runbook"] == "docs/dashboards.md#alerts", rule["alert"]
        assert f"`{rule['alert']}`" in section, rule["alert"]  # the docs say what it means and what to do


def test_every_alert_has_rule_tests_that_fire_it_and_keep_it_silent():
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [c for case in cases for c in case["alert_rule_test"]]
    for alert in ALERTS:
        mine = [c for c in checks if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no test where it stays silent"


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not found (Debian package prometheus; .ci/run installs it)"
)
def test_the_rules_pass_promtool_check_and_their_unit_tests():
    res = subprocess.run([str(DEPLOY / "check"), "rules"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in res.stdout


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(path.read_text())
    return parser


def test_the_units_run_kiosk_as_its_own_user_with_only_var_writable():
    assert [u.name for u in UNITS] == ["kiosk-console.service", "kiosk.service"]
    for path in UNITS:
        service = unit(path)["Service"]
        assert service["User"] == "kiosk" and service["Group"] == "kiosk", path.name
        expected = {
            "ProtectSystem": "strict",
            "PrivateTmp": "yes",
            "NoNewPrivileges": "yes",
            "CapabilityBoundingSet": "",
            "ReadWritePaths": "/opt/kiosk/var",
            "ProtectHome": "yes",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "SystemCallFilter": "@system-service",
            "Restart": "on-failure",
            "KillSignal": "SIGTERM",
            "RestartPreventExitStatus": "2",
        }
        assert {k: service.get(k) for k in expected} == expected, path.name
        assert int(service["TimeoutStopSec"]) > 0
        command = service["ExecStart"].split()
        assert command[:3] == ["/opt/kiosk/.venv/bin/kiosk", "-c", "/etc/kiosk/kiosk.yaml"], path.name
        assert command[3:] == (["run"] if path.name == "kiosk.service" else ["console"])


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not found (Debian package systemd)"
)
def test_the_units_pass_systemd_analyze_verify_and_a_broken_one_does_not(tmp_path):
    res = subprocess.run([str(DEPLOY / "check"), "units"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("systemd-analyze verify OK") == len(UNITS)
    # verify itself exits 0 on a misspelt value (it only warns): the check must still fail
    broken = tmp_path / "kiosk.service"
    broken.write_text(UNITS[1].read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
    res = subprocess.run([str(DEPLOY / "check"), "units", str(broken)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "strikt" in res.stderr, res.stdout + res.stderr
