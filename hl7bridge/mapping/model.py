"""The mapping rules file: a pydantic model (`extra="forbid"` everywhere) and `load_rules`.

Everything that can be wrong with a rules file is found at load time, not when the first message
arrives: unknown keys, unknown transforms or transform arguments, destination fields the CRM record
model does not have, paths that do not compile, code tables that are missing or produce values the CRM
does not accept, unknown time zones. `RulesError` lists every problem with the file, the line and the
key path, e.g. `rules.yaml:42: entities.contact.fields.phone.transform: unknown transform 'fone'`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import phonenumbers
import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from hl7bridge.crm.model import APPOINTMENT_FIELDS, APPOINTMENT_STATUSES, CONTACT_FIELDS
from hl7bridge.hl7.access import PathError, compile_path
from hl7bridge.hl7.envelope import PatientIdPolicy
from hl7bridge.hl7.timestamps import get_zone
from hl7bridge.mapping.transforms import TRANSFORMS, DestType
from hl7bridge.records import Conflict

__all__ = [
    "DEFAULT_RULES_PATH",
    "CodeTable",
    "EntityRules",
    "FieldRule",
    "KeyRule",
    "Problem",
    "Rules",
    "RulesError",
    "Settings",
    "load_rules",
    "parse_rules",
    "validate_yaml",
]

DEFAULT_RULES_PATH = Path(__file__).with_name("default_rules.yaml")
Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldRule(_Strict):
    """One CRM field: where it comes from, how it is transformed, and who wins a conflict."""

    source: str  # path expression, see hl7bridge.hl7.access
    source_type: str = "ST"  # HL7 data type, for the data map
    type: DestType = "string"  # destination type
    transform: str = "text"
    args: dict[str, Any] = {}
    conflict: Conflict = "ehr"
    description: str = ""


class KeyRule(_Strict):
    """The entity's natural key (contact: MRN; appointment: appointment ID)."""

    field: str
    source: str
    source_type: str = "ST"
    #: Pick the repetition with settings.patient_id (PID-3, MRG-1) instead of reading the path as text.
    patient_id: bool = False
    description: str = ""


class Triggers(_Strict):
    """Events (`ADT^A04`) that upsert the entity, merge two contacts (A40) or change an MRN (A47)."""

    upsert: list[str] = []
    merge: list[str] = []
    change_id: list[str] = []


class EntityRules(_Strict):
    description: str = ""
    key: KeyRule
    #: merge / change_id only: the identifier that goes away (MRG-1).
    prior_key: KeyRule | None = None
    triggers: Triggers
    fields: dict[str, FieldRule] = {}
    #: Constant values by event, e.g. `SIU^S15: {status: cancelled}`; they win over the mapped value.
    event_overrides: dict[str, dict[str, str | int | None]] = {}
    #: Field-change trigger: write only when one of these fields would change (CrmOp.only_if_changed).
    sync_when_changed: list[str] = []


class CodeTable(_Strict):
    description: str = ""
    map: dict[str, str]
    #: Value for codes not in `map`; without one an unknown code rejects the message (ERR-3 103).
    default: str | None = None


class PatientIdSettings(_Strict):
    """Mirrors hl7.envelope.PatientIdPolicy, which intake uses for the patient key: one definition of
    "the MRN" for the journal, the worker lanes and the CRM."""

    type_codes: list[str] = ["MR"]
    assigning_authorities: list[str] = []
    single_untyped_fallback: bool = True
    include_authority: bool = False

    def policy(self) -> PatientIdPolicy:
        return PatientIdPolicy(
            tuple(self.type_codes), tuple(self.assigning_authorities),
            self.single_untyped_fallback, self.include_authority,
        )


class TimezoneSettings(_Strict):
    #: Zone for timestamps without an offset from facilities not listed; None = the host's zone.
    #: The `--timezone` flag overrides it.
    default: str | None = None
    #: By sending facility (MSH-4.1).
    facilities: dict[str, str] = {}


class PhoneSettings(_Strict):
    default_region: str = "US"
    default_country_code: str = "1"


class Settings(_Strict):
    patient_id: PatientIdSettings = PatientIdSettings()
    timezones: TimezoneSettings = TimezoneSettings()
    phone: PhoneSettings = PhoneSettings()


class Entities(_Strict):
    contact: EntityRules
    appointment: EntityRules | None = None


class Rules(_Strict):
    version: Literal[1] = 1
    description: str = ""
    settings: Settings = Settings()
    code_tables: dict[str, CodeTable] = {}
    entities: Entities
    _origin: str = PrivateAttr(default="<rules>")

    @property
    def origin(self) -> str:
        """The file the rules came from (for messages)."""
        return self._origin

    def entity_items(self) -> Iterator[tuple[Literal["contact", "appointment"], EntityRules]]:
        yield "contact", self.entities.contact
        if self.entities.appointment is not None:
            yield "appointment", self.entities.appointment


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class RulesError(ValueError):
    """The rules file is invalid. `problems` lists each one; str() is one line per problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --- semantic checks -----------------------------------------------------------------------------------

_TRIGGER = re.compile(r"^[A-Z]{3}\^[A-Z0-9]{3}$")
_CRM_TYPES: dict[str, DestType] = {"birth_date": "date", "start": "datetime", "duration_minutes": "integer"}
_VALUE_SETS = {("contact", "sex"): ("F", "M", "O", "U"), ("appointment", "status"): APPOINTMENT_STATUSES}
_KEY_FIELDS = {"contact": "mrn", "appointment": "appointment_id"}


def _check_value(entity: str, name: str, value: object) -> str | None:
    allowed = _VALUE_SETS.get((entity, name))
    if allowed and value is not None and value not in allowed:
        return f"{value!r} is not a valid {name} (one of: {', '.join(allowed)})"
    expected = _CRM_TYPES.get(name, "string")
    if value is not None and (expected == "integer") != isinstance(value, int):
        return f"{name} takes a{'n integer' if expected == 'integer' else ' string'}"
    return None


def _check_key(rule: KeyRule, loc: Loc, out: list[tuple[Loc, str]]) -> None:
    try:
        path = compile_path(rule.source)
    except PathError as exc:
        out.append(((*loc, "source"), str(exc)))
        return
    if rule.patient_id and (len(path.alternatives) != 1 or not path.whole_field):
        out.append(((*loc, "source"), "with patient_id the source is one whole CX field, e.g. PID-3"))


def _check_entity(rules: Rules, name: str, ent: EntityRules, out: list[tuple[Loc, str]]) -> None:
    base: Loc = ("entities", name)
    allowed = [f for f in (CONTACT_FIELDS if name == "contact" else APPOINTMENT_FIELDS) if f != "mrn"]
    if ent.key.field != _KEY_FIELDS[name]:
        out.append(((*base, "key", "field"), f"the {name} key is {_KEY_FIELDS[name]}"))
    _check_key(ent.key, (*base, "key"), out)
    if ent.prior_key is not None:
        _check_key(ent.prior_key, (*base, "prior_key"), out)
    if name != "contact" and (ent.triggers.merge or ent.triggers.change_id or ent.prior_key):
        out.append(((*base, "triggers"), "only contacts merge or change identifiers"))
    elif (ent.triggers.merge or ent.triggers.change_id) and ent.prior_key is None:
        out.append(((*base, "prior_key"), "merge and change_id triggers need a prior_key (e.g. MRG-1)"))
    seen: set[str] = set()
    for action in ("upsert", "merge", "change_id"):
        for i, event in enumerate(getattr(ent.triggers, action)):
            if not _TRIGGER.match(event):
                out.append(((*base, "triggers", action, i), f"bad event {event!r} (expected e.g. ADT^A04)"))
            elif event in seen:
                out.append(((*base, "triggers", action, i), f"{event} is listed twice"))
            seen.add(event)
    for fname, rule in ent.fields.items():
        floc: Loc = (*base, "fields", fname)
        if fname not in allowed:
            out.append((floc, f"unknown {name} field {fname!r} (known: {', '.join(allowed)})"))
            continue
        try:
            compile_path(rule.source)
        except PathError as exc:
            out.append(((*floc, "source"), str(exc)))
        expected = _CRM_TYPES.get(fname, "string")
        if rule.type != expected:
            out.append(((*floc, "type"), f"{name}.{fname} is a {expected}"))
        transform = TRANSFORMS.get(rule.transform)
        if transform is None:
            known = ", ".join(TRANSFORMS)
            out.append(((*floc, "transform"), f"unknown transform {rule.transform!r} (known: {known})"))
            continue
        if transform.output != rule.type:
            what = f"{rule.transform} produces a {transform.output}, not a {rule.type}"
            out.append(((*floc, "transform"), what))
        try:
            args = transform.args_model.model_validate(rule.args)
        except ValidationError as exc:
            out.extend(((*floc, "args", *e["loc"]), e["msg"]) for e in exc.errors())
            continue
        table_name = getattr(args, "table", None)
        if rule.transform == "code" and table_name is not None:
            table = rules.code_tables.get(table_name)
            if table is None:
                out.append(((*floc, "args", "table"), f"no code table {table_name!r} under code_tables"))
                continue
            for code, value in [*table.map.items(), ("default", table.default)]:
                problem = _check_value(name, fname, value)
                if problem:
                    where = ("map", code) if code != "default" else ("default",)
                    tloc: Loc = ("code_tables", table_name, *where)
                    out.append((tloc, f"used by {name}.{fname}: {problem}"))
    for event, values in ent.event_overrides.items():
        if event not in seen:
            out.append(((*base, "event_overrides", event), f"{event} is not one of this entity's triggers"))
        for fname, value in values.items():
            if fname not in ent.fields:
                out.append(((*base, "event_overrides", event, fname), f"{fname!r} is not a mapped field"))
            elif problem := _check_value(name, fname, value):
                out.append(((*base, "event_overrides", event, fname), problem))
    for i, fname in enumerate(ent.sync_when_changed):
        if fname not in ent.fields:
            out.append(((*base, "sync_when_changed", i), f"{fname!r} is not a mapped field"))


def _semantic(rules: Rules) -> list[tuple[Loc, str]]:
    out: list[tuple[Loc, str]] = []
    tz = rules.settings.timezones
    zones: list[tuple[Loc, str | None]] = [(("settings", "timezones", "default"), tz.default)]
    zones += [(("settings", "timezones", "facilities", f), z) for f, z in tz.facilities.items()]
    for loc, zone in zones:
        if zone is not None:
            try:
                get_zone(zone)
            except ValueError as exc:
                out.append((loc, str(exc)))
    phone = rules.settings.phone
    if phone.default_region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        out.append((("settings", "phone", "default_region"), f"unknown region {phone.default_region!r}"))
    if not re.fullmatch(r"\d{1,3}", phone.default_country_code):
        out.append((("settings", "phone", "default_country_code"), "expected 1 to 3 digits"))
    for tname, table in rules.code_tables.items():
        folded: set[str] = set()
        for code in table.map:
            if code.strip().casefold() in folded or not code.strip():
                out.append((("code_tables", tname, "map", code), "empty or duplicate code (case is ignored)"))
            folded.add(code.strip().casefold())
    for name, ent in rules.entity_items():
        _check_entity(rules, name, ent, out)
    return out


# --- loading, with line numbers ------------------------------------------------------------------------


def _line(root: yaml.Node | None, loc: Loc) -> int | None:
    """The line of the deepest node along `loc` (keys point at their key's line)."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if getattr(kv[0], "value", None) == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _duplicates(node: yaml.Node | None, trail: Loc = ()) -> Iterator[tuple[int, Loc, str]]:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            k = str(getattr(key, "value", ""))
            if k in seen:
                yield key.start_mark.line + 1, (*trail, k), "duplicate key"
            seen.add(k)
            yield from _duplicates(value, (*trail, k))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicates(item, (*trail, i))


def _dotted(loc: Loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required key missing"}


def validate_yaml(model: type[M], text: str, name: str) -> tuple[M, yaml.Node | None]:
    """Parse YAML text into `model`; RulesError lists every problem with `name`, line and key path."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise RulesError([Problem(name, line, "", f"not valid YAML: {exc.problem or exc}")]) from None
    if not isinstance(data, dict):
        raise RulesError([Problem(name, 1, "", "expected a mapping at the top level")])
    problems = [Problem(name, line, _dotted(loc), msg) for line, loc, msg in _duplicates(root)]
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            message = _MESSAGES.get(err["type"], err["msg"])
            problems.append(Problem(name, _line(root, loc), _dotted(loc), message))
        raise RulesError(problems) from None
    if problems:
        raise RulesError(problems)
    return value, root


def parse_rules(text: str, name: str = "<rules>") -> Rules:
    """Validate rules from YAML text; `name` is used in error messages."""
    rules, root = validate_yaml(Rules, text, name)
    problems = [Problem(name, _line(root, loc), _dotted(loc), msg) for loc, msg in _semantic(rules)]
    problems.sort(key=lambda p: p.line or 0)
    if problems:
        raise RulesError(problems)
    rules._origin = name
    return rules


def load_rules(path: Path | None = None) -> Rules:
    """Load and validate a rules file; None loads the built-in default rules."""
    source = DEFAULT_RULES_PATH if path is None else Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise RulesError([Problem(str(source), None, "", f"cannot read: {reason}")]) from None
    return parse_rules(text, str(source))
