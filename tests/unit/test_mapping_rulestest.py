"""Rules tests beside the rules (*.test.yaml): the shipped defaults pass, failures say what differed."""

from __future__ import annotations

from pathlib import Path

import pytest

from hl7bridge.mapping import DEFAULT_RULES_PATH, RulesError, run_rules_tests
from hl7bridge.records import Filtered

DEFAULT_TESTS = DEFAULT_RULES_PATH.with_name("default_rules.test.yaml")
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_the_shipped_default_tests_pass() -> None:
    results = run_rules_tests(None, DEFAULT_TESTS)
    assert [r.problems for r in results if not r.passed] == []
    names = " ".join(r.name for r in results)
    for event in ("A04", "A08", "A28", "A40", "S12", "S14", "S15", "S17", "S26", "filtered"):
        assert event in names


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my.test.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_file_inputs_relative_to_the_test_file_and_failures(tmp_path: Path) -> None:
    (tmp_path / "msgs").mkdir()
    (tmp_path / "msgs" / "a28.hl7").write_bytes((FIXTURES / "adt_a28.hl7").read_bytes())  # ISO-8859-1 bytes
    path = write(tmp_path, """
timezone: America/Chicago
cases:
  - name: right
    input: msgs/a28.hl7
    expect:
      ops: [{entity: contact, key: 77001, fields: {last_name: Müller, postal_code: 60614}}]
  - name: wrong
    input: msgs/a28.hl7
    expect:
      ops: [{entity: contact, key: "77001", fields: {last_name: Miller, email: x@y.z}}]
  - name: wrong kind
    input: msgs/a28.hl7
    expect: {filtered: true}
  - name: missing file
    input: msgs/nope.hl7
    expect: {filtered: true}
""")
    right, wrong, kind, missing = run_rules_tests(None, path)
    assert right.passed, right.problems
    assert not wrong.passed
    assert wrong.problems == (
        "ops[0].fields.last_name: expected 'Miller', got 'Müller'",
        "ops[0].fields.email: expected 'x@y.z', not set",
    )
    assert not kind.passed and "expected filtered, got 1 operation(s)" in kind.problems[0]
    assert wrong.detail == "; ".join(wrong.problems)
    assert right.detail == "1 operation(s)"
    assert not missing.passed and "cannot read input" in missing.problems[0]


def test_filtered_and_rejected_expectations(tmp_path: Path) -> None:
    path = write(tmp_path, """
cases:
  - name: filtered
    input: "MSH|^~\\\\&|A|B|C|D|20260101||ADT^A03|1|P|2.5"
    expect: {filtered: A03}
  - name: rejected as expected
    input: |
      MSH|^~\\&|A|B|C|D|20260101||ADT^A04|1|P|2.5
      PID|1||X^^^^PI
    expect: {rejected: {err: 101, location: PID-3, kind: missing_required}}
  - name: rejected differently
    input: |
      MSH|^~\\&|A|B|C|D|20260101||ADT^A04|1|P|2.5
      PID|1||X^^^^PI
    expect: {rejected: {err: "103"}}
""")
    filtered, rejected, differently = run_rules_tests(None, path, default_timezone="UTC")
    assert filtered.passed and isinstance(filtered.outcome, Filtered)
    assert rejected.passed, rejected.problems
    assert differently.problems == ("rejected.err: expected '103', got '101'",)


def test_custom_rules_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        DEFAULT_RULES_PATH.read_text(encoding="utf-8").replace("args: {case: as_sent}", "args: {case: upper}"),
        encoding="utf-8",
    )
    path = write(tmp_path, """
cases:
  - name: upper-cased
    input: |
      MSH|^~\\&|A|B|C|D|20260101120000+0000||ADT^A08|1|P|2.5
      PID|1||7^^^^MR||Doe^Jane
    expect: {ops: [{entity: contact, key: "7", fields: {first_name: JANE, last_name: DOE}}]}
""")
    [result] = run_rules_tests(rules, path)
    assert result.passed, result.problems


def test_invalid_test_file_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "cases:\n  - name: x\n    input: y\n    expect: {ops: [], filtered: true}\n")
    with pytest.raises(RulesError) as info:
        run_rules_tests(None, path)
    assert str(info.value).startswith(f"{path}:4: cases[0].expect: ")
    path = write(tmp_path, "cases:\n  - name: x\n    inptu: y\n    expect: {filtered: true}\n")
    with pytest.raises(RulesError, match=r":3: cases\[0\]\.inptu: unknown key"):
        run_rules_tests(None, path)
