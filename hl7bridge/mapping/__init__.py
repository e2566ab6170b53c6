"""The mapping engine: declarative rules (YAML) -> a pure function from an HL7 message to CRM operations.

    rules = load_rules(path)                       # None: the built-in default rules; RulesError names file:line
    mapper = compile_rules(rules, default_timezone="America/Chicago")
    ops_or_filtered = mapper.map(message)          # list[CrmOp] | Filtered, or raises Hl7BridgeError

No I/O beyond reading rules and test files; no asyncio, databases, HTTP or metrics.
"""

from __future__ import annotations

from hl7bridge.mapping.compile import Mapper, compile_rules
from hl7bridge.mapping.export import COLUMNS, export_rows, to_csv, to_markdown
from hl7bridge.mapping.model import DEFAULT_RULES_PATH, Problem, Rules, RulesError, load_rules, parse_rules
from hl7bridge.mapping.rulestest import CaseResult, run_rules_tests

__all__ = [
    "COLUMNS",
    "DEFAULT_RULES_PATH",
    "CaseResult",
    "Mapper",
    "Problem",
    "Rules",
    "RulesError",
    "compile_rules",
    "export_rows",
    "load_rules",
    "parse_rules",
    "run_rules_tests",
    "to_csv",
    "to_markdown",
]
