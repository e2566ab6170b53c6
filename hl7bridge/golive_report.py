"""The go-live report: what each step of `hl7bridge golive` expected and found, and its renderings.

The JSON form (`to_json`) is the baseline kept after go-live; the Markdown form (`to_markdown`) is what a
person reads. Both are built from the same frozen records, so they always agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["Check", "GoliveReport", "StepResult"]


@dataclass(frozen=True, slots=True)
class Check:
    what: str
    expected: Any
    found: Any
    ok: bool


@dataclass(frozen=True, slots=True)
class StepResult:
    number: int
    name: str
    checks: tuple[Check, ...]
    #: Send -> visible in the CRM, seconds (None when it never became visible).
    latency_seconds: float | None
    #: Volume step: p50, p95, max over every record.
    latency: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


@dataclass(frozen=True, slots=True)
class GoliveReport:
    run_id: str
    run_prefix: str  # every test MRN starts with this
    target: str
    started_at: datetime
    finished_at: datetime
    sync_window: float
    phone_conflict: str
    steps: tuple[StepResult, ...]
    cleaned_up: int | None = None  # contacts removed by --cleanup

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.steps)

    @property
    def failed_steps(self) -> list[int]:
        return [s.number for s in self.steps if not s.passed]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["started_at"], out["finished_at"] = self.started_at.isoformat(), self.finished_at.isoformat()
        out["passed"], out["failed_steps"] = self.passed, self.failed_steps
        for step, obj in zip(self.steps, out["steps"], strict=True):
            obj["passed"] = step.passed
        return out

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED (step " + ", ".join(map(str, self.failed_steps)) + ")"
        lines = ["# hl7bridge go-live report", "",
                 f"- Run `{self.run_id}`, test MRN prefix `{self.run_prefix}`, target `{self.target}`",
                 f"- Started {self.started_at.isoformat()}, finished {self.finished_at.isoformat()}",
                 f"- Sync window {self.sync_window:g} s; `phone` conflict rule `{self.phone_conflict}`"]
        if self.cleaned_up is not None:
            lines.append(f"- Cleanup: {self.cleaned_up} test contacts removed")
        lines += ["", f"**Result: {verdict}**", "", "| step | result | sync latency |", "|---|---|---|"]
        lines += [f"| {s.number}. {s.name} | {'pass' if s.passed else '**FAIL**'} | {_secs(s.latency_seconds)}"
                  f"{''.join(f', {k} {_secs(v)}' for k, v in s.latency.items())} |" for s in self.steps]
        for s in self.steps:
            lines += ["", f"## Step {s.number}: {s.name} — {'pass' if s.passed else 'FAIL'}", ""]
            lines += [f"- {n}" for n in s.notes] + ([""] if s.notes else [])
            lines += ["| check | expected | found | ok |", "|---|---|---|---|"]
            lines += [f"| {_md(c.what)} | {_md(c.expected)} | {_md(c.found)} | {'yes' if c.ok else '**NO**'} |"
                      for c in s.checks]
        return "\n".join(lines) + "\n"


def _secs(v: float | None) -> str:
    return "never" if v is None else f"{v:.3f} s"


def _md(v: Any) -> str:
    return ("—" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")
