"""The README's data map is the default rules' export, not a hand-kept copy that can drift."""

from __future__ import annotations

from pathlib import Path

from hl7bridge.mapping import export_rows, load_rules, to_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_readme_data_map_is_the_default_rules_export() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert to_markdown(export_rows(load_rules(None))).strip() in readme


def test_readme_quick_start_is_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.startswith("make ")]
    assert commands == ["make run", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()
