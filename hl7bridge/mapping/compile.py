"""Rules -> a pure function from a parsed HL7 message to CRM operations.

`compile_rules` does every expensive or fallible step once (paths, transform arguments, code tables,
time zones); `Mapper.map` then only reads the message. It returns the operations (see records.CrmOp),
or `Filtered` when no entity is triggered by the event, or raises an `Hl7BridgeError` whose reason and
location are PHI-free: `MissingRequired` (no MRN, no SCH, ...), `BadFieldValue` (a value that cannot be
read as its type, an unknown code) or `MappingError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

import hl7

from hl7bridge.errors import ErrCode, Hl7BridgeError, MappingError, MissingRequired
from hl7bridge.hl7.access import Found, MessageView, Null, Path, compile_path
from hl7bridge.hl7.envelope import PatientIdPolicy, patient_key
from hl7bridge.hl7.timestamps import get_zone, system_timezone
from hl7bridge.mapping.model import EntityRules, KeyRule, Problem, Rules, RulesError
from hl7bridge.mapping.transforms import TRANSFORMS, CodeTableData, Context, Transform, read_dtm
from hl7bridge.records import Action, Conflict, CrmOp, Entity, FieldSet, Filtered

__all__ = ["Mapper", "compile_rules"]

_MSG_TYPE = compile_path("MSH-9.1")
_TRIGGER = compile_path("MSH-9.2")
_EVN_TRIGGER = compile_path("EVN-1")
_FACILITY = compile_path("MSH-4.1")
_ADT_TIME = compile_path("EVN-2.1 | MSH-7.1")
_MSG_TIME = compile_path("MSH-7.1")


@dataclass(frozen=True, slots=True)
class _FieldPlan:
    name: str
    path: Path
    transform: Transform
    args: Any
    conflict: Conflict


@dataclass(frozen=True, slots=True)
class _KeyPlan:
    path: Path
    patient_id: bool


@dataclass(frozen=True, slots=True)
class _EntityPlan:
    key: _KeyPlan
    prior_key: _KeyPlan | None
    fields: tuple[_FieldPlan, ...]
    overrides: Mapping[str, Mapping[str, FieldSet]]
    only_if_changed: tuple[str, ...]


def _key_plan(rule: KeyRule) -> _KeyPlan:
    return _KeyPlan(compile_path(rule.source), rule.patient_id)


def _entity_plan(ent: EntityRules) -> _EntityPlan:
    fields = []
    for name, rule in ent.fields.items():
        transform = TRANSFORMS[rule.transform]
        args = transform.args_model.model_validate(rule.args)
        fields.append(_FieldPlan(name, compile_path(rule.source), transform, args, rule.conflict))
    conflicts = {name: rule.conflict for name, rule in ent.fields.items()}
    overrides = {
        event: {f: FieldSet(v, conflicts.get(f, "ehr")) for f, v in values.items()}
        for event, values in ent.event_overrides.items()
    }
    prior = _key_plan(ent.prior_key) if ent.prior_key else None
    return _EntityPlan(_key_plan(ent.key), prior, tuple(fields), overrides, tuple(ent.sync_when_changed))


class Mapper:
    """The compiled rules. Stateless after construction; `map` is safe to call from many threads."""

    def __init__(self, rules: Rules, default_zone: tzinfo) -> None:
        self.rules = rules
        #: Which PID-3 repetition is the MRN: intake uses it for the patient key (lane and journal).
        self.patient_policy: PatientIdPolicy = rules.settings.patient_id.policy()
        self.default_zone = default_zone
        tz = rules.settings.timezones
        self._facility_zones = {f.casefold(): get_zone(z) for f, z in tz.facilities.items()}
        phone = rules.settings.phone
        self._phone = (phone.default_region.upper(), phone.default_country_code)
        self._tables = {
            name: CodeTableData({k.strip().casefold(): v for k, v in t.map.items()}, t.default)
            for name, t in rules.code_tables.items()
        }
        self._plans: dict[Entity, _EntityPlan] = {n: _entity_plan(e) for n, e in rules.entity_items()}
        self._routes: dict[str, list[tuple[Entity, Action]]] = {}
        for name, ent in rules.entity_items():
            for action in ("upsert", "merge", "change_id"):
                for event in getattr(ent.triggers, action):
                    self._routes.setdefault(event, []).append((name, action))

    # --- public helpers ------------------------------------------------------------------------------

    @property
    def triggers(self) -> frozenset[str]:
        """Every event (`ADT^A04`) some entity reacts to; anything else maps to Filtered."""
        return frozenset(self._routes)

    def zone_for(self, facility: str) -> tzinfo:
        """The time zone for timestamps without an offset from this sending facility (MSH-4.1)."""
        return self._facility_zones.get(facility.strip().casefold(), self.default_zone)

    def patient_key(self, msg: hl7.Message) -> str | None:
        """The MRN key of the message's (first) PID, or None."""
        return self._key(self._plans["contact"].key, MessageView.from_message(msg))

    # --- mapping -------------------------------------------------------------------------------------

    def map(self, msg: hl7.Message | MessageView) -> list[CrmOp] | Filtered:
        """Map a python-hl7 Message, or a MessageView (`hl7.lean.lean_view`, what the workers use)."""
        view = msg if isinstance(msg, MessageView) else MessageView.from_message(msg)
        event = self._event(view)
        routes = self._routes.get(event)
        if not routes:
            return Filtered(f"{event} is not a trigger in the mapping rules")
        try:
            if self._facility_zones:
                facility = _FACILITY.resolve(view)
                zone = self.zone_for(facility.text if isinstance(facility, Found) else "")
            else:  # no per-facility zones: every facility's is the default (no need to read MSH-4)
                zone = self.default_zone
            ctx = Context(view, zone, self._phone[0], self._phone[1], self._tables)
            event_time = self._event_time(view, event, zone)
            ops: list[CrmOp] = []
            for entity, action in routes:
                if entity == "appointment":
                    ops.append(self._appointment(ctx, event, event_time))
                elif action == "upsert":
                    key, fields = self._contact(ctx, view, event)
                    ops.append(CrmOp("contact", "upsert", key, event_time, fields))
                else:
                    ops.extend(self._merge(ctx, event, event_time, action))
            return ops
        except Hl7BridgeError:
            raise
        except Exception as exc:  # a bug must still reach the DLQ as a mapping failure, without PHI
            raise MappingError(
                f"internal error mapping {event}: {type(exc).__name__}", err_code=ErrCode.INTERNAL
            ) from exc

    def _event(self, view: MessageView) -> str:
        msg_type = _MSG_TYPE.resolve(view)
        if not isinstance(msg_type, Found):
            raise MissingRequired("message type missing", location="MSH-9")
        trigger = _TRIGGER.resolve(view)
        if not isinstance(trigger, Found):  # some v2.3 ADT feeds only put the event in EVN-1
            trigger = _EVN_TRIGGER.resolve(view)
        code = trigger.text.strip().upper() if isinstance(trigger, Found) else ""
        return f"{msg_type.text.strip().upper()}^{code}"

    def _event_time(self, view: MessageView, event: str, zone: tzinfo) -> datetime:
        hit = (_ADT_TIME if event.startswith("ADT^") else _MSG_TIME).resolve(view)
        if not isinstance(hit, Found):
            raise MissingRequired("message date/time missing", location="MSH-7")
        return read_dtm(hit.text, zone, hit.location)

    def _key(self, plan: _KeyPlan, view: MessageView) -> str | None:
        hit = plan.path.resolve(view)
        if not isinstance(hit, Found):
            return None
        if plan.patient_id:
            # The same function intake uses on the raw PID-3, so journal, lanes and CRM agree on the key.
            raw = plan.path.alternatives[0].raw(view) or ""
            seps = view.seps
            return patient_key(raw, seps.encoding_chars, seps.field, self.patient_policy)
        return hit.text.strip() or None

    def _require(self, plan: _KeyPlan, view: MessageView, what: str) -> str:
        key = self._key(plan, view)
        if key is not None:
            return key
        segment = plan.path.alternatives[0].segment
        if not any(name == segment for _, name in view.names()):
            raise MissingRequired(
                f"{segment} segment missing", err_code=ErrCode.SEGMENT_SEQUENCE, location=segment
            )
        loc = plan.path.location.split(".")[0]
        raise MissingRequired(f"no {what} in {loc}", location=loc)

    def _fields(self, plan: _EntityPlan, ctx: Context, view: MessageView, event: str) -> dict[str, FieldSet]:
        out: dict[str, FieldSet] = {}
        if view is not ctx.view:  # a segment group (A40 with several patients)
            ctx = Context(view, ctx.zone, ctx.phone_region, ctx.country_code, ctx.code_tables)
        for f in plan.fields:
            hit = f.path.resolve(view)
            if isinstance(hit, Null):  # HL7 "" : clear the CRM field
                out[f.name] = FieldSet(None, f.conflict)
                continue
            if hit is None and not f.transform.reads_absent:  # absent or empty: leave the field alone
                continue
            value = f.transform.fn(hit, f.args, ctx)
            if value is not None:
                out[f.name] = FieldSet(value, f.conflict)
        out.update(plan.overrides.get(event, {}))
        return out

    def _contact(self, ctx: Context, view: MessageView, event: str) -> tuple[str, dict[str, FieldSet]]:
        plan = self._plans["contact"]
        key = self._require(plan.key, view, "medical record number")
        return key, self._fields(plan, ctx, view, event)  # the MRN is the op's key, not a field

    def _merge(self, ctx: Context, event: str, event_time: datetime, action: Action) -> list[CrmOp]:
        """A40 (merge) / A47 (change identifier): one op per PID group; the prior MRN from its MRG-1."""
        plan = self._plans["contact"]
        assert plan.prior_key is not None  # enforced by load_rules
        ops = []
        for group in ctx.view.groups("PID") or [ctx.view]:
            key, fields = self._contact(ctx, group, event)
            prior = self._require(plan.prior_key, group, "prior medical record number")
            ops.append(CrmOp("contact", action, key, event_time, fields, prior_key=prior))
        return ops

    def _appointment(self, ctx: Context, event: str, event_time: datetime) -> CrmOp:
        plan = self._plans["appointment"]
        key = self._require(plan.key, ctx.view, "appointment ID")
        mrn, contact_fields = self._contact(ctx, ctx.view, event)
        fields = self._fields(plan, ctx, ctx.view, event)
        return CrmOp(
            "appointment", "upsert", key, event_time, fields,
            contact_key=mrn, contact_fields=contact_fields, only_if_changed=plan.only_if_changed,
        )


def compile_rules(rules: Rules, *, default_timezone: str | None = None) -> Mapper:
    """Compile validated rules. `default_timezone` (the `--timezone` flag) overrides the rules' default
    zone; without either, the host's zone is used. An unknown zone name raises RulesError."""
    name = default_timezone or rules.settings.timezones.default
    try:
        zone = get_zone(name) if name else system_timezone()
    except ValueError as exc:
        where = "--timezone" if default_timezone else rules.origin
        raise RulesError([Problem(where, None, "settings.timezones.default", str(exc))]) from None
    return Mapper(rules, zone)
