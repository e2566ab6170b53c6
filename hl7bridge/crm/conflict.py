"""What the CRM sink decides, shared by the SQLite and PostgreSQL backends.

Everything here is pure decision logic: conflict rules, the stale guard, find-or-create, merge (A40) and
identifier change (A47) are decided over `CrmTx`, a small row-access protocol that each backend implements
in SQL inside one open transaction. Keeping the decisions out of the SQL means both backends behave the
same and the rules are unit-tested without a database.

Times are compared as instants (aware datetimes); stored as fixed-width ISO 8601 UTC strings by `iso()`.
Which fields exist and how a value is validated live in `values.py`.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

# EDITABLE, Value and normalise stay part of this module's API (re-exported; they live in values.py).
from hl7bridge.crm.values import EDITABLE, Value, normalise
from hl7bridge.errors import ErrCode, PermanentSinkError, TransientSinkError
from hl7bridge.records import Conflict, CrmOp, Entity, FieldSet, OpResult

__all__ = [
    "EDITABLE",
    "CrmTx",
    "FieldMeta",
    "FieldPlan",
    "MergeAudit",
    "Origin",
    "Outcome",
    "Row",
    "Value",
    "apply_op",
    "is_stale",
    "iso",
    "meta_from_json",
    "meta_json_text",
    "meta_to_json",
    "new_contact_id",
    "normalise",
    "plan_edit",
    "plan_fields",
    "should_write",
    "upsert_contact",
    "utc",
]

class Origin(StrEnum):
    """Who changed a field last (stored per field in `field_meta`)."""

    #: The EHR feed, through `Sink.apply`.
    EHR = "ehr"
    #: A CRM user, through `Sink.edit`.
    CRM = "crm"


class Outcome(StrEnum):
    """OpResult.outcome values."""

    CREATED = "created"
    UPDATED = "updated"
    #: Nothing to change (a re-apply, or every field already holds the value).
    UNCHANGED = "unchanged"
    #: The op is older than the last message applied to the entity; nothing overwritten.
    STALE = "stale"
    #: A field-change trigger (`only_if_changed`) found none of its fields would change.
    SKIPPED = "skipped"
    MERGED = "merged"
    ALREADY_APPLIED = "already_applied"


def utc(dt: datetime, what: str = "time") -> datetime:
    """An aware datetime in UTC; a naive one is a mapping bug, not something to guess about."""
    if dt.tzinfo is UTC:
        return dt
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise PermanentSinkError(f"crm: {what} must be timezone-aware")
    return dt.astimezone(UTC)


def iso(dt: datetime) -> str:
    """Fixed-width ISO 8601 in UTC with offset, so stored strings also sort as instants."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise PermanentSinkError("crm: time must be timezone-aware")
    return _iso(dt)


@functools.lru_cache(maxsize=4096)
def _iso(dt: datetime) -> str:
    # Cached: every field of a row carries the time of its last change, mostly one message's event time,
    # and each apply re-serialises them all. Aware datetimes hash and compare as instants, so two zones'
    # spellings of one instant share the (UTC) entry correctly.
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


@functools.lru_cache(maxsize=4096)
def _parse_utc(text: str) -> datetime:
    return utc(datetime.fromisoformat(text))


@dataclass(frozen=True, slots=True)
class FieldMeta:
    """When a field last changed, and who changed it."""

    at: datetime
    by: Origin


def meta_to_json(meta: Mapping[str, FieldMeta]) -> dict[str, dict[str, str]]:
    return {f: {"at": iso(m.at), "by": m.by.value} for f, m in sorted(meta.items())}


def meta_json_text(meta: Mapping[str, FieldMeta]) -> str:
    """`json.dumps(meta_to_json(meta))`, character for character, from cached pieces: every apply writes
    a row's whole metadata back, and most of its entries (often one event's time for every field) repeat."""
    return "{" + ", ".join([_json_item(f, m) for f, m in sorted(meta.items())]) + "}"


@functools.lru_cache(maxsize=8192)
def _json_item(name: str, meta: FieldMeta) -> str:
    # FieldMetas equal as instants share an entry, and iso() spells them alike (UTC), so that is exact.
    return f'{json.dumps(name)}: {json.dumps({"at": iso(meta.at), "by": meta.by.value})}'


def meta_from_json(obj: Mapping[str, Any] | None) -> dict[str, FieldMeta]:
    return {f: _field_meta(m["at"], m["by"]) for f, m in (obj or {}).items()}


def _field_meta(at: Any, by: Any) -> FieldMeta:
    try:
        return _cached_field_meta(at, by)
    except TypeError:  # not hashable (a corrupt row): decode it uncached, failing as it would
        return FieldMeta(_parse_utc(at), Origin(by))


@functools.lru_cache(maxsize=4096)
def _cached_field_meta(at: str, by: str) -> FieldMeta:
    # FieldMeta is immutable, so rows can share one; a row's fields mostly carry one message's time.
    return FieldMeta(_parse_utc(at), Origin(by))


def new_contact_id() -> str:
    return "C-" + uuid.uuid4().hex[:12]


@dataclass(frozen=True, slots=True)
class Row:
    """One CRM row as the decisions see it. Contacts: key = MRN, row_id = contact_id. Appointments:
    key = row_id = appointment_id, with the patient link in `mrn` / `contact_id`."""

    row_id: str
    key: str
    values: Mapping[str, Value]
    meta: Mapping[str, FieldMeta]
    #: Event time of the last message applied to this entity (the stale guard); None if none yet.
    last_event_at: datetime | None
    mrn: str | None = None
    contact_id: str | None = None


@dataclass(frozen=True, slots=True)
class MergeAudit:
    kind: str  # "merge" (A40) or "change_id" (A47)
    at: datetime
    surviving_mrn: str
    merged_mrn: str
    surviving_contact_id: str
    merged_contact_id: str
    appointments_moved: int
    message_key: str | None


class CrmTx(Protocol):
    """Row access inside one open transaction. `lock_*` reads a row and locks it until commit (SELECT ...
    FOR UPDATE); `insert_*` returns False when a concurrent writer inserted the same key first; `update_*`
    writes by row_id (including the contact's MRN) and sets updated_at only when it is given."""

    def lock_contact(self, mrn: str) -> Row | None: ...
    def insert_contact(self, row: Row, now: datetime) -> bool: ...
    def update_contact(self, row: Row, updated_at: datetime | None) -> None: ...
    def delete_contact(self, contact_id: str) -> None: ...
    def lock_appointment(self, appointment_id: str) -> Row | None: ...
    def insert_appointment(self, row: Row, now: datetime) -> bool: ...
    def update_appointment(self, row: Row, updated_at: datetime | None) -> None: ...
    def move_appointments(self, from_contact_id: str, from_mrn: str, to_contact_id: str, to_mrn: str,
                          now: datetime) -> int: ...
    def record_merge(self, audit: MergeAudit) -> None: ...


# --- per-field decisions -----------------------------------------------------------------------------


def is_stale(last_event_at: datetime | None, event_time: datetime) -> bool:
    """The entity-level stale guard: an op older than the last message applied to the entity."""
    return last_event_at is not None and event_time < last_event_at


def should_write(rule: Conflict, current: Value, new: Value, last: FieldMeta | None,
                 event_time: datetime) -> bool:
    """Whether an EHR value at `event_time` replaces `current` (whose last change is `last`)."""
    if new == current:
        return False
    # A field the EHR itself set from a newer message is never regressed, whatever the rule: this is the
    # per-field stale guard (it matters for fields set by an SIU's PID or a merge, whose times differ).
    if last is not None and last.by is Origin.EHR and last.at > event_time:
        return False
    if rule == "ehr":
        return True
    if rule == "crm":
        return current is None or current == ""
    if rule == "newest":
        return last is None or event_time >= last.at
    raise PermanentSinkError(f"crm: unknown conflict rule {rule!r}")


@dataclass(frozen=True, slots=True)
class FieldPlan:
    values: dict[str, Value]
    meta: dict[str, FieldMeta]
    changed: tuple[str, ...]


def plan_fields(entity: Entity, values: Mapping[str, Value], meta: Mapping[str, FieldMeta],
                fields: Mapping[str, FieldSet], event_time: datetime) -> FieldPlan:
    """Apply an op's fields to a row's values under each field's conflict rule."""
    new_values, new_meta, changed = dict(values), dict(meta), []
    for name, fs in fields.items():
        value = normalise(entity, name, fs.value)
        if should_write(fs.conflict, values.get(name), value, meta.get(name), event_time):
            new_values[name] = value
            new_meta[name] = FieldMeta(event_time, Origin.EHR)
            changed.append(name)
    return FieldPlan(new_values, new_meta, tuple(changed))


def plan_edit(entity: Entity, row: Row, values: Mapping[str, Value],
              at: datetime) -> tuple[Row, tuple[str, ...]]:
    """A CRM user's change: set as given, recorded with origin `crm` so the conflict rules see it."""
    new_values, new_meta, changed = dict(row.values), dict(row.meta), []
    for name, raw in values.items():
        value = normalise(entity, name, raw)
        if value != row.values.get(name):
            new_values[name] = value
            new_meta[name] = FieldMeta(utc(at, "edit time"), Origin.CRM)
            changed.append(name)
    return replace(row, values=new_values, meta=new_meta), tuple(changed)


# --- operations --------------------------------------------------------------------------------------


def _later(a: datetime | None, b: datetime) -> datetime:
    return b if a is None else max(a, b)


def _result(op: CrmOp, outcome: Outcome, changed: Sequence[str] = ()) -> OpResult:
    return OpResult(op.entity, op.key, outcome.value, tuple(changed))


def apply_op(tx: CrmTx, op: CrmOp, *, now: datetime, message_key: str | None = None) -> OpResult:
    """Apply one operation through `tx`. The caller owns the transaction and the idempotency record."""
    event_time = utc(op.event_time, "event_time")
    if not op.key:
        raise PermanentSinkError(f"crm: {op.entity} operation without a key",
                                 err_code=ErrCode.REQUIRED_FIELD_MISSING)
    if op.entity == "contact" and op.action == "upsert":
        outcome, changed, _ = upsert_contact(tx, op.key, op.fields, event_time, now,
                                             own=True, only_if_changed=op.only_if_changed)
        return _result(op, outcome, changed)
    if op.entity == "contact" and op.action in ("merge", "change_id"):
        return _merge(tx, op, event_time, now, message_key)
    if op.entity == "appointment" and op.action == "upsert":
        return _upsert_appointment(tx, op, event_time, now)
    raise PermanentSinkError(f"crm: unsupported operation {op.action} on {op.entity}")


def upsert_contact(
    tx: CrmTx, mrn: str, fields: Mapping[str, FieldSet], event_time: datetime, now: datetime,
    *, own: bool, only_if_changed: tuple[str, ...] = (),
) -> tuple[Outcome, tuple[str, ...], Row]:
    """Find-or-create the contact for `mrn` and apply `fields`.

    `own` is True for the contact's own messages (ADT): they move the stale guard. Contact fields carried
    by an appointment (the SIU's PID) do not, so a minimal contact created by a scheduling message never
    blocks the registration that follows it; the per-field guard still protects newer values.
    """
    for _ in range(2):
        row = tx.lock_contact(mrn)
        if row is None:
            plan = plan_fields("contact", {}, {}, fields, event_time)
            new = Row(new_contact_id(), mrn, plan.values, plan.meta, event_time if own else None)
            if tx.insert_contact(new, now):
                return Outcome.CREATED, plan.changed, new
            continue  # a concurrent writer created this MRN first: decide again against its row
        if is_stale(row.last_event_at, event_time):
            return Outcome.STALE, (), row
        plan = plan_fields("contact", row.values, row.meta, fields, event_time)
        if only_if_changed and not set(only_if_changed) & set(plan.changed):
            return Outcome.SKIPPED, (), row
        last = _later(row.last_event_at, event_time) if own else row.last_event_at
        # replace(row, values=..., meta=..., last_event_at=...), spelled out: replace() is slow per call.
        new = Row(row.row_id, row.key, plan.values, plan.meta, last, row.mrn, row.contact_id)
        if plan.changed or last != row.last_event_at:
            tx.update_contact(new, now if plan.changed else None)
        return (Outcome.UPDATED if plan.changed else Outcome.UNCHANGED), plan.changed, new
    raise TransientSinkError("crm: contact insert raced and the row is not visible yet")


def _upsert_appointment(tx: CrmTx, op: CrmOp, event_time: datetime, now: datetime) -> OpResult:
    mrn = op.contact_key or None
    if mrn is not None:
        tx.lock_contact(mrn)  # contacts before appointments, the order merges use: fewer deadlocks
    for _ in range(2):
        row = tx.lock_appointment(op.key)
        if row is None:
            contact_id = _link(tx, op, mrn, event_time, now)
            plan = plan_fields("appointment", {}, {}, op.fields, event_time)
            new = Row(op.key, op.key, plan.values, plan.meta, event_time, mrn, contact_id)
            if tx.insert_appointment(new, now):
                return _result(op, Outcome.CREATED, plan.changed)
            continue
        if is_stale(row.last_event_at, event_time):
            return _result(op, Outcome.STALE)
        plan = plan_fields("appointment", row.values, row.meta, op.fields, event_time)
        changed = list(plan.changed)
        if mrn is not None and mrn != row.mrn:
            changed.append("mrn")
        if op.only_if_changed and not set(op.only_if_changed) & set(changed):
            return _result(op, Outcome.SKIPPED)
        contact_id = row.contact_id
        if mrn is not None:
            contact_id = _link(tx, op, mrn, event_time, now)
            if contact_id != row.contact_id:
                changed.append("contact_id")
        last = _later(row.last_event_at, event_time)
        new = replace(row, values=plan.values, meta=plan.meta, last_event_at=last,
                      mrn=mrn if mrn is not None else row.mrn, contact_id=contact_id)
        if changed or last != row.last_event_at:
            tx.update_appointment(new, now if changed else None)
        return _result(op, Outcome.UPDATED if changed else Outcome.UNCHANGED, changed)
    raise TransientSinkError("crm: appointment insert raced and the row is not visible yet")


def _link(tx: CrmTx, op: CrmOp, mrn: str | None, event_time: datetime, now: datetime) -> str | None:
    if mrn is None:
        return None
    # The SIU's PID creates a minimal contact and fills gaps, but never overwrites or clears what the ADT
    # feed (which owns demographics) set: scheduling systems often carry a stale copy of the patient.
    fill_only = {k: FieldSet(v.value, "crm") for k, v in op.contact_fields.items() if v.value not in (None, "")}
    _, _, contact = upsert_contact(tx, mrn, fill_only, event_time, now, own=False)
    return contact.row_id


def _merge(tx: CrmTx, op: CrmOp, event_time: datetime, now: datetime, message_key: str | None) -> OpResult:
    """A40 merge (MRG-1 merged into PID-3) and A47 identifier change (old MRN becomes the new one).

    Both end with one contact under `op.key` holding every appointment; a re-apply finds no prior
    contact and changes nothing.
    """
    kind = "merge" if op.action == "merge" else "change_id"
    done = Outcome.MERGED if kind == "merge" else Outcome.UPDATED
    survivor_mrn, prior_mrn = op.key, op.prior_key
    if not prior_mrn:
        raise PermanentSinkError(f"crm: {kind} without the prior identifier",
                                 err_code=ErrCode.REQUIRED_FIELD_MISSING, location="MRG-1")
    # Lock both rows in one global order so two merges touching the same pair cannot deadlock.
    locked = {m: tx.lock_contact(m) for m in sorted({survivor_mrn, prior_mrn})}
    survivor, prior = locked[survivor_mrn], locked[prior_mrn]
    changed: list[str] = []
    if prior is None or prior_mrn == survivor_mrn:
        outcome = Outcome.UNCHANGED  # already merged (or nothing to merge): idempotent re-apply
    elif survivor is None:
        # Only the prior exists: it simply takes the surviving MRN, appointments follow.
        last = _later(prior.last_event_at, event_time)
        tx.update_contact(replace(prior, key=survivor_mrn, last_event_at=last), now)
        moved = tx.move_appointments(prior.row_id, prior_mrn, prior.row_id, survivor_mrn, now)
        tx.record_merge(MergeAudit(kind, now, survivor_mrn, prior_mrn, prior.row_id, prior.row_id, moved,
                                   message_key))
        outcome, changed = done, ["mrn"]
    else:
        moved = tx.move_appointments(prior.row_id, prior_mrn, survivor.row_id, survivor_mrn, now)
        values, meta = dict(survivor.values), dict(survivor.meta)
        for name in EDITABLE["contact"]:
            if values.get(name) in (None, "") and prior.values.get(name) not in (None, ""):
                values[name] = prior.values[name]
                if name in prior.meta:
                    meta[name] = prior.meta[name]
                changed.append(name)
        tx.delete_contact(prior.row_id)
        last = _later(survivor.last_event_at, event_time)
        tx.update_contact(replace(survivor, values=values, meta=meta, last_event_at=last), now)
        tx.record_merge(MergeAudit(kind, now, survivor_mrn, prior_mrn, survivor.row_id, prior.row_id, moved,
                                   message_key))
        outcome = done
        if kind == "change_id":
            changed.insert(0, "mrn")
    if op.fields:
        # PID of the surviving patient, carried by the merge message: an ordinary upsert after the merge.
        up, up_changed, _ = upsert_contact(tx, survivor_mrn, op.fields, event_time, now, own=True)
        changed += [f for f in up_changed if f not in changed]
        if outcome is Outcome.UNCHANGED and up is not Outcome.STALE:
            outcome = up
    return _result(op, outcome, changed)
