"""The shipped Prometheus rules are valid and their promtool unit tests pass.

alerts_test.yml holds one or more `promtool test rules` cases for every alert, including the silence
alert firing on a weekday in business hours and staying quiet at night and at the weekend. promtool
comes from the distribution's `prometheus` package (`make tools` installs it); without it these tests skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from hl7bridge.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not on PATH: install the distribution's `prometheus` package (`make tools`) "
    "to validate deploy/prometheus/alerts.yml",
)


def _promtool(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=timeout, check=False
    )


@needs_promtool
def test_alert_rules_are_valid() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.slow
def test_alert_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_severity_summary_description_and_a_unit_test() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text(encoding="utf-8"))
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "HL7BridgeSilence",
        "HL7BridgeNoNewPatients",
        "HL7BridgeDeadLetters",
        "HL7BridgeDLQGrowing",
        "HL7BridgeNackRate",
        "HL7BridgeBacklogAge",
        "HL7BridgeSinkDown",
        "HL7BridgeListenerDown",
        "HL7BridgeReconcileDrift",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert alert["annotations"]["summary"].strip(), alert["alert"]
        assert len(alert["annotations"]["description"]) > 80, alert["alert"]

    # Each alert is seen firing in at least one test case (not merely "not firing").
    fired = {
        case["alertname"]
        for group in tests["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    missing = {a["alert"] for a in alerts} - fired
    assert not missing, f"alerts without a firing promtool test: {sorted(missing)}"


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "hl7bridge.json").read_text(encoding="utf-8"))
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no "check query"; a recording rule per panel query makes it parse each one.
    exprs = [e.replace("$instance", ".*") for e in _dashboard_exprs()]
    queries = [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]
    rules = {"groups": [{"name": "dashboard", "rules": queries}]}
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_only_use_metrics_the_bridge_exports() -> None:
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", Metrics(CollectorRegistry()).render().decode(), re.M))
    names: set[str] = set()
    for name, kind in exported:
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    rules_text = (PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8")
    used = set(re.findall(r"\bhl7bridge_[a-z_]+", rules_text + "\n".join(_dashboard_exprs())))
    assert used, "no hl7bridge metrics referenced?"
    assert used <= names, f"unknown metrics referenced: {sorted(used - names)}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioning = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )
    uid = provisioning["datasources"][0]["uid"]
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "hl7bridge.json").read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
