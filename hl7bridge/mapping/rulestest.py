"""Rules tests beside the rules: a `*.test.yaml` file of input messages and the outcome each must have.

```yaml
timezone: America/Chicago          # optional: zone for timestamps without offset (like --timezone)
cases:
  - name: A04 creates the contact
    input: ../fixtures/adt_a04.hl7   # a file relative to this one, or the message itself (block scalar)
    timezone: America/New_York      # optional, per case
    expect:
      ops:                          # exactly these operations, in order; fields are a subset
        - entity: contact           # contact | appointment
          action: upsert            # upsert | merge | change_id
          key: "123456"
          fields: {first_name: Jane, phone: "+12175550123", email: null}   # null: the field is cleared
          # also: prior_key, contact_key, contact_fields, only_if_changed, event_time (ISO 8601)
  - name: a discharge is filtered
    input: ...
    expect: {filtered: true}        # or a substring of the reason
  - name: no MRN is rejected
    input: ...
    expect: {rejected: {err: "101", location: PID-3}}   # also: kind (missing_required, ...), ack (AE/AR)
```
`run_rules_tests` is pure apart from reading the rules, the test file and its input files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from hl7bridge.errors import Hl7BridgeError
from hl7bridge.hl7.parse import parse_message
from hl7bridge.mapping.compile import Mapper, compile_rules
from hl7bridge.mapping.model import Problem, RulesError, load_rules, validate_yaml
from hl7bridge.records import CrmOp, FieldSet, Filtered

__all__ = ["CaseResult", "RulesTestFile", "run_rules_tests"]

Scalar = str | int | None
Outcome = list[CrmOp] | Filtered | Hl7BridgeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpectedOp(_Strict):
    entity: Literal["contact", "appointment"]
    action: Literal["upsert", "merge", "change_id"] = "upsert"
    key: str | int
    prior_key: str | int | None = None
    contact_key: str | int | None = None
    fields: dict[str, Scalar] = {}
    contact_fields: dict[str, Scalar] = {}
    only_if_changed: list[str] | None = None
    event_time: str | None = None


class ExpectedRejection(_Strict):
    err: str | int | None = None
    kind: str | None = None
    location: str | None = None
    ack: str | None = None


class Expect(_Strict):
    ops: list[ExpectedOp] | None = None
    filtered: bool | str | None = None
    rejected: ExpectedRejection | None = None

    @model_validator(mode="after")
    def _one(self) -> Expect:
        if sum(x is not None for x in (self.ops, self.filtered, self.rejected)) != 1:
            raise ValueError("expect exactly one of ops, filtered, rejected")
        if self.filtered is False:
            raise ValueError("filtered: false is not an expectation; expect ops or rejected")
        return self


class Case(_Strict):
    name: str
    input: str
    timezone: str | None = None
    expect: Expect


class RulesTestFile(_Strict):
    description: str = ""
    timezone: str | None = None
    cases: list[Case]


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    passed: bool
    #: What did not match (readable lines; they quote the test's own expectations).
    problems: tuple[str, ...]
    #: What the rules produced: operations, Filtered, or the error the message was rejected with.
    outcome: Outcome | None

    @property
    def detail(self) -> str:
        """One line for a report: the mismatches, or what the case produced when it passed."""
        if self.problems:
            return "; ".join(self.problems)
        return _describe(self.outcome) if self.outcome is not None else ""


def _same(expected: Scalar, actual: object) -> bool:
    if expected is None or actual is None:
        return expected is actual
    return str(expected) == str(actual)  # YAML may read 62704 as an int where the CRM holds "62704"


def _compare_fields(what: str, expected: Mapping[str, Scalar], actual: Mapping[str, FieldSet]) -> list[str]:
    problems = []
    for name, value in expected.items():
        if name not in actual:
            problems.append(f"{what}.{name}: expected {value!r}, not set")
        elif not _same(value, actual[name].value):
            problems.append(f"{what}.{name}: expected {value!r}, got {actual[name].value!r}")
    return problems


def _compare_op(i: int, exp: ExpectedOp, op: CrmOp) -> list[str]:
    at = f"ops[{i}]"
    problems = [
        f"{at}.{name}: expected {want!r}, got {got!r}"
        for name, want, got in (
            ("entity", exp.entity, op.entity),
            ("action", exp.action, op.action),
            ("key", exp.key, op.key),
        )
        if not _same(want, got)
    ]
    for name in ("prior_key", "contact_key"):
        want = getattr(exp, name)
        if want is not None and not _same(want, getattr(op, name)):
            problems.append(f"{at}.{name}: expected {want!r}, got {getattr(op, name)!r}")
    if exp.only_if_changed is not None and tuple(exp.only_if_changed) != op.only_if_changed:
        problems.append(f"{at}.only_if_changed: expected {exp.only_if_changed}, got {list(op.only_if_changed)}")
    if exp.event_time is not None and datetime.fromisoformat(exp.event_time) != op.event_time:
        problems.append(f"{at}.event_time: expected {exp.event_time}, got {op.event_time.isoformat()}")
    problems += _compare_fields(f"{at}.fields", exp.fields, op.fields)
    problems += _compare_fields(f"{at}.contact_fields", exp.contact_fields, op.contact_fields)
    return problems


def _describe(outcome: Outcome) -> str:
    if isinstance(outcome, Filtered):
        return f"filtered ({outcome.reason})"
    if isinstance(outcome, Hl7BridgeError):
        return f"rejected ({outcome.kind}, ERR-3 {outcome.err_code.value} at {outcome.location}: {outcome.reason})"
    return f"{len(outcome)} operation(s)"


def _check(expect: Expect, outcome: Outcome) -> list[str]:
    if expect.ops is not None:
        if not isinstance(outcome, list):
            return [f"expected {len(expect.ops)} operation(s), got {_describe(outcome)}"]
        problems = [] if len(outcome) == len(expect.ops) else [
            f"expected {len(expect.ops)} operation(s), got {len(outcome)}"
        ]
        for i, (exp, op) in enumerate(zip(expect.ops, outcome, strict=False)):
            problems += _compare_op(i, exp, op)
        return problems
    if expect.filtered is not None:
        if not isinstance(outcome, Filtered):
            return [f"expected filtered, got {_describe(outcome)}"]
        if isinstance(expect.filtered, str) and expect.filtered not in outcome.reason:
            return [f"expected a filter reason containing {expect.filtered!r}, got {outcome.reason!r}"]
        return []
    assert expect.rejected is not None
    if not isinstance(outcome, Hl7BridgeError):
        return [f"expected rejected, got {_describe(outcome)}"]
    want = expect.rejected
    got: dict[str, Any] = {
        "err": outcome.err_code.value, "kind": outcome.kind, "location": outcome.location,
        "ack": outcome.ack_code.value,
    }
    return [
        f"rejected.{name}: expected {getattr(want, name)!r}, got {got[name]!r}"
        for name in got
        if getattr(want, name) is not None and not _same(getattr(want, name), got[name])
    ]


def _input(case: Case, base: Path) -> bytes | str:
    text = case.input
    if "\n" in text.strip() or text.lstrip().startswith("MSH"):
        return text.strip()
    return (base / text).read_bytes()


def run_rules_tests(
    rules_path: Path | None, test_path: Path, *, default_timezone: str | None = None
) -> list[CaseResult]:
    """Run every case of `test_path` against the rules (None: the built-in defaults).

    Raises RulesError for an invalid rules or test file (with file, line and key path).
    """
    rules = load_rules(rules_path)
    try:
        text = test_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise RulesError([Problem(str(test_path), None, "", f"cannot read: {reason}")]) from None
    spec, _ = validate_yaml(RulesTestFile, text, str(test_path))
    mappers: dict[str | None, Mapper] = {}
    results = []
    for case in spec.cases:
        zone = case.timezone or spec.timezone or default_timezone
        if zone not in mappers:
            mappers[zone] = compile_rules(rules, default_timezone=zone)
        try:
            raw = _input(case, test_path.parent)
        except OSError as exc:
            results.append(CaseResult(case.name, False, (f"cannot read input: {exc.strerror}",), None))
            continue
        outcome: Outcome
        try:
            outcome = mappers[zone].map(parse_message(raw))
        except Hl7BridgeError as exc:
            outcome = exc
        problems = _check(case.expect, outcome)
        results.append(CaseResult(case.name, not problems, tuple(problems), outcome))
    return results
