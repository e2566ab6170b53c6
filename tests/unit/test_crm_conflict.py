"""The CRM sink's decisions without a database: conflict rules, value checks, the stale guard, and the
operations over an in-memory CrmTx."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hl7bridge.crm.conflict import (
    FieldMeta,
    MergeAudit,
    Origin,
    Row,
    apply_op,
    is_stale,
    iso,
    meta_from_json,
    meta_to_json,
    normalise,
    plan_edit,
    plan_fields,
    should_write,
)
from hl7bridge.errors import PermanentSinkError
from hl7bridge.records import CrmOp, FieldSet

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@dataclass
class MemTx:
    """CrmTx over dicts: enough to run the decisions exactly as the SQL backends do."""

    contacts: dict[str, Row] = field(default_factory=dict)  # by contact_id
    appts: dict[str, Row] = field(default_factory=dict)
    merges: list[MergeAudit] = field(default_factory=list)
    writes: int = 0

    def lock_contact(self, mrn: str) -> Row | None:
        return next((r for r in self.contacts.values() if r.key == mrn), None)

    def insert_contact(self, row: Row, now: datetime) -> bool:
        if self.lock_contact(row.key):
            return False
        self.contacts[row.row_id] = row
        self.writes += 1
        return True

    def update_contact(self, row: Row, updated_at: datetime | None) -> None:
        self.contacts[row.row_id] = row
        self.writes += 1

    def delete_contact(self, contact_id: str) -> None:
        del self.contacts[contact_id]

    def lock_appointment(self, appointment_id: str) -> Row | None:
        return self.appts.get(appointment_id)

    def insert_appointment(self, row: Row, now: datetime) -> bool:
        if row.row_id in self.appts:
            return False
        self.appts[row.row_id] = row
        self.writes += 1
        return True

    def update_appointment(self, row: Row, updated_at: datetime | None) -> None:
        self.appts[row.row_id] = row
        self.writes += 1

    def move_appointments(self, from_contact_id: str, from_mrn: str, to_contact_id: str, to_mrn: str,
                          now: datetime) -> int:
        moved = [a for a in self.appts.values() if a.contact_id == from_contact_id or a.mrn == from_mrn]
        for a in moved:
            self.appts[a.row_id] = Row(a.row_id, a.key, a.values, a.meta, a.last_event_at, to_mrn,
                                       to_contact_id)
        return len(moved)

    def record_merge(self, audit: MergeAudit) -> None:
        self.merges.append(audit)

    def value(self, mrn: str, name: str) -> object:
        row = self.lock_contact(mrn)
        assert row is not None
        return row.values.get(name)


def upsert(mrn: str, t: datetime, rule: str = "ehr", **fields: object) -> CrmOp:
    return CrmOp("contact", "upsert", mrn, t, {k: FieldSet(v, rule) for k, v in fields.items()})  # type: ignore[arg-type]


def run(tx: MemTx, *ops: CrmOp) -> list[str]:
    return [apply_op(tx, op, now=NOW).outcome for op in ops]


# --- should_write: the rule table -------------------------------------------------------------------------

EHR_OLD = FieldMeta(at(0), Origin.EHR)
CRM_LATER = FieldMeta(at(30), Origin.CRM)


@pytest.mark.parametrize(("rule", "current", "last", "event", "expected"), [
    ("ehr", "a", EHR_OLD, at(10), True),
    ("ehr", "a", CRM_LATER, at(10), True),  # EHR always wins over a CRM edit...
    ("ehr", "a", FieldMeta(at(30), Origin.EHR), at(10), False),  # ...but never over a newer EHR value
    ("crm", None, None, at(10), True),
    ("crm", "", EHR_OLD, at(10), True),
    ("crm", "a", EHR_OLD, at(10), False),
    ("newest", "a", CRM_LATER, at(10), False),
    ("newest", "a", CRM_LATER, at(30), True),  # same instant: the message counts as newest
    ("newest", "a", CRM_LATER, at(31), True),
    ("newest", "a", None, at(10), True),
])
def test_should_write(rule: str, current: str | None, last: FieldMeta | None, event: datetime,
                      expected: bool) -> None:
    assert should_write(rule, current, "b", last, event) is expected  # type: ignore[arg-type]


def test_same_value_is_never_a_write() -> None:
    assert not should_write("ehr", "a", "a", None, at(0))


def test_stale_guard_is_strictly_older() -> None:
    assert is_stale(at(10), at(5))
    assert not is_stale(at(10), at(10))
    assert not is_stale(None, at(0))
    assert is_stale(datetime(2024, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=-5))),
                    datetime(2024, 3, 1, 14, 30, tzinfo=UTC))


# --- values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("entity", "name", "value", "expected"), [
    ("contact", "phone", "", None),
    ("contact", "birth_date", "1980-02-29", "1980-02-29"),
    ("appointment", "duration_minutes", "45", 45),
    ("appointment", "start", "2024-03-09T23:30:00Z", "2024-03-09T23:30:00+00:00"),
    ("appointment", "status", "no_show", "no_show"),
])
def test_normalise_accepts(entity: str, name: str, value: object, expected: object) -> None:
    assert normalise(entity, name, value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("entity", "name", "value"), [
    ("contact", "mrn", "X"),
    ("contact", "favourite_colour", "blue"),
    ("contact", "birth_date", "19800229"),
    ("contact", "birth_date", "1981-02-29"),
    ("appointment", "start", "2024-03-09T23:30:00"),
    ("appointment", "duration_minutes", -5),
    ("appointment", "duration_minutes", True),
    ("appointment", "status", "maybe"),
])
def test_normalise_rejects_without_quoting_the_value(entity: str, name: str, value: object) -> None:
    with pytest.raises(PermanentSinkError) as err:
        normalise(entity, name, value)  # type: ignore[arg-type]
    assert str(value) not in str(err.value) or str(value) == name


def test_field_meta_round_trips_as_utc_instants() -> None:
    meta = {"phone": FieldMeta(datetime(2024, 3, 1, 7, 0, tzinfo=timezone(timedelta(hours=-5))), Origin.CRM)}
    as_json = meta_to_json(meta)
    assert as_json == {"phone": {"at": "2024-03-01T12:00:00.000000+00:00", "by": "crm"}}
    assert meta_from_json(as_json) == meta
    assert iso(at(0)) < iso(at(0.001))  # fixed width: text order is time order


def test_plan_fields_and_edit_record_origin() -> None:
    plan = plan_fields("contact", {"phone": "1"}, {}, {"phone": FieldSet("2"), "city": FieldSet(None)}, at(1))
    assert plan.changed == ("phone",)
    assert plan.meta["phone"] == FieldMeta(at(1), Origin.EHR)
    row = Row("C-1", "M1", plan.values, plan.meta, at(1))
    edited, changed = plan_edit("contact", row, {"phone": "3", "city": None}, at(2))
    assert changed == ("phone",)
    assert edited.meta["phone"] == FieldMeta(at(2), Origin.CRM)
    assert edited.last_event_at == at(1)  # a CRM edit is not an EHR event


# --- operations over MemTx ---------------------------------------------------------------------------------


def test_upsert_outcomes_and_stale() -> None:
    tx = MemTx()
    assert run(tx, upsert("M1", at(0), phone="1"), upsert("M1", at(0), phone="1"),
               upsert("M1", at(5), phone="2"), upsert("M1", at(3), phone="3")) == [
        "created", "unchanged", "updated", "stale"]
    assert tx.value("M1", "phone") == "2"


def test_a_newer_confirmation_moves_the_guard_without_a_change() -> None:
    tx = MemTx()
    run(tx, upsert("M1", at(0), phone="1"))
    writes = tx.writes
    assert run(tx, upsert("M1", at(10), phone="1")) == ["unchanged"]
    assert tx.writes == writes + 1  # last_event_at advanced
    assert run(tx, upsert("M1", at(5), phone="0")) == ["stale"]


def test_merge_and_reapply() -> None:
    tx = MemTx()
    run(tx, upsert("KEEP", at(0), first_name="Ann"), upsert("GONE", at(0), email="x@example.org"),
        CrmOp("appointment", "upsert", "A1", at(0), contact_key="GONE"))
    op = CrmOp("contact", "merge", "KEEP", at(1), prior_key="GONE")
    first = apply_op(tx, op, now=NOW, message_key="k")
    assert (first.outcome, first.changed_fields) == ("merged", ("email",))
    assert [r.key for r in tx.contacts.values()] == ["KEEP"]
    assert tx.appts["A1"].mrn == "KEEP"
    assert [(m.surviving_mrn, m.merged_mrn, m.appointments_moved, m.message_key) for m in tx.merges] == [
        ("KEEP", "GONE", 1, "k")]
    assert run(tx, op) == ["unchanged"]
    assert len(tx.merges) == 1


def test_merge_without_prior_key_is_permanent() -> None:
    with pytest.raises(PermanentSinkError):
        apply_op(MemTx(), CrmOp("contact", "merge", "KEEP", at(0)), now=NOW)


def test_merge_carrying_fields_upserts_the_survivor() -> None:
    tx = MemTx()
    op = CrmOp("contact", "merge", "KEEP", at(1), {"first_name": FieldSet("Ann")}, prior_key="GONE")
    assert run(tx, op) == ["created"]
    assert tx.value("KEEP", "first_name") == "Ann"


# --- property: the stale guard, in any arrival order -------------------------------------------------------

_op = st.tuples(st.integers(0, 10_000), st.fixed_dictionaries(
    {}, optional={"phone": st.sampled_from(["1", "2", None]), "city": st.sampled_from(["X", "Y", None])}))


@given(st.lists(_op, max_size=12, unique_by=lambda o: o[0]))
def test_any_arrival_order_matches_the_model(ops: list[tuple[int, dict[str, str | None]]]) -> None:
    """Each op is accepted iff it is not older than every op accepted before it; accepted ops set all their
    fields (rule ehr); re-applying any op afterwards changes nothing."""
    tx = MemTx()
    model: dict[str, str | None] = {}
    newest: int | None = None
    for minute, fields in ops:
        outcome = run(tx, upsert("M1", at(minute), **fields))[0]
        if newest is not None and minute < newest:
            assert outcome == "stale"
            continue
        newest = minute
        model.update(fields)
    for name, value in model.items():
        assert tx.value("M1", name) == value
    writes = tx.writes
    for minute, fields in ops:
        assert run(tx, upsert("M1", at(minute), **fields))[0] in ("stale", "unchanged")
    assert tx.writes == writes
