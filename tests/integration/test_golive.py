"""`hl7bridge golive` against a real `hl7bridge serve` process: it passes against a healthy bridge (whatever
the phone field's conflict rule), and fails naming step 3 against a bridge whose rules do not handle
cancellations."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from hl7bridge.cli import app
from hl7bridge.crm import open_sink
from hl7bridge.mapping import DEFAULT_RULES_PATH
from tests.bridge import BridgeProcess

pytestmark = pytest.mark.slow


def _rules(tmp_path: Path, name: str, edit: Any) -> Path:
    """A copy of the built-in rules with one decision changed."""
    data = yaml.safe_load(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _no_cancellation(data: dict[str, Any]) -> None:
    del data["entities"]["appointment"]["event_overrides"]["SIU^S15"]


def _phone_owned_by_crm(data: dict[str, Any]) -> None:
    data["entities"]["contact"]["fields"]["phone"]["conflict"] = "crm"


@pytest.fixture
def bridge_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[BridgeProcess] = []

    def start(*extra: str) -> BridgeProcess:
        data_dir = tmp_path / f"data{len(started)}"
        data_dir.mkdir()
        bridge = BridgeProcess(data_dir, *extra)
        started.append(bridge)
        return bridge.start(timeout=60)

    try:
        yield start
    finally:
        for bridge in started:
            bridge.terminate()


def _golive(bridge: BridgeProcess, report: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hl7bridge.cli", "golive", "--target", f"127.0.0.1:{bridge.port}",
           "--data-dir", str(bridge.data_dir), "--report", str(report), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("phone_rule", ["default", "crm"])
def test_golive_passes_against_a_healthy_bridge(bridge_factory: Any, tmp_path: Path, phone_rule: str) -> None:
    rules = [] if phone_rule == "default" else ["--rules", str(_rules(tmp_path, "crm", _phone_owned_by_crm))]
    bridge = bridge_factory(*rules)
    report = tmp_path / "baseline"
    done = _golive(bridge, report, *rules, "--cleanup", "--sync-window", "20")
    assert done.returncode == 0, done.stdout + done.stderr + bridge.log.read_text()[-3000:]

    baseline = json.loads((tmp_path / "baseline.json").read_text(encoding="utf-8"))
    assert baseline["passed"] is True and baseline["failed_steps"] == []
    assert [s["number"] for s in baseline["steps"]] == [1, 2, 3, 4, 5]
    assert all(s["passed"] and s["latency_seconds"] is not None for s in baseline["steps"])
    assert baseline["phone_conflict"] == ("crm" if phone_rule == "crm" else "newest")
    volume = baseline["steps"][4]
    assert {c["what"]: c["found"] for c in volume["checks"]}["contacts with every mapped field correct"] == 50
    assert "**Result: PASSED**" in (tmp_path / "baseline.md").read_text(encoding="utf-8")

    # --cleanup removed exactly this run's test records.
    assert baseline["cleaned_up"] == 51
    sink = open_sink(bridge.data_dir / "crm.sqlite3")
    try:
        assert [c for c in sink.contacts() if c.mrn.startswith(baseline["run_prefix"])] == []
        assert [a for a in sink.appointments() if (a.mrn or "").startswith(baseline["run_prefix"])] == []
    finally:
        sink.close()


def test_golive_fails_naming_step_3_when_the_rules_ignore_cancellations(bridge_factory: Any,
                                                                        tmp_path: Path) -> None:
    rules = _rules(tmp_path, "no-cancel", _no_cancellation)
    bridge = bridge_factory("--rules", str(rules))
    done = _golive(bridge, tmp_path / "broken", "--rules", str(rules), "--sync-window", "4", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "step 3" in done.stderr.splitlines()[0]

    result = json.loads(done.stdout)
    assert result["passed"] is False and result["failed_steps"] == [3]
    step3 = result["steps"][2]
    status = next(c for c in step3["checks"] if c["what"] == "appointment.status")
    assert (status["expected"], status["found"], status["ok"]) == ("cancelled", "scheduled", False)
    markdown = (tmp_path / "broken.md").read_text(encoding="utf-8")
    assert "FAILED (step 3)" in markdown
    assert "## Step 3: cancel the appointment (SIU^S15) — FAIL" in markdown


def test_golive_argument_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    bad_target = runner.invoke(app, ["golive", "--target", "nowhere", "--data-dir", str(tmp_path)])
    assert bad_target.exit_code == 2 and "HOST:PORT" in bad_target.output
    no_crm = runner.invoke(app, ["golive", "--target", "127.0.0.1:1", "--data-dir", str(tmp_path / "none")])
    assert no_crm.exit_code == 2 and "no CRM database" in no_crm.output
    assert not (tmp_path / "none").exists()
