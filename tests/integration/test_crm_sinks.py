"""The CRM sinks' behaviour, identical on SQLite and PostgreSQL: patient link, conflict rules, stale guard,
idempotency, merges, identifier changes, concurrency."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hl7bridge.crm import Sink, open_sink
from hl7bridge.crm.postgres import PostgresSink
from hl7bridge.crm.sqlite import SqliteSink
from hl7bridge.errors import PermanentSinkError
from hl7bridge.records import ApplyRequest, CrmOp, FieldSet, OpResult

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def contact(mrn: str, t: datetime, rule: str = "ehr", only: tuple[str, ...] = (), **fields: Any) -> CrmOp:
    return CrmOp("contact", "upsert", mrn, t, {k: FieldSet(v, rule) for k, v in fields.items()},  # type: ignore[arg-type]
                 only_if_changed=only)


def appt(aid: str, t: datetime, mrn: str | None = None, contact_fields: dict[str, Any] | None = None,
         only: tuple[str, ...] = (), **fields: Any) -> CrmOp:
    return CrmOp("appointment", "upsert", aid, t, {k: FieldSet(v) for k, v in fields.items()},
                 contact_key=mrn, contact_fields={k: FieldSet(v) for k, v in (contact_fields or {}).items()},
                 only_if_changed=only)


def merge(survivor: str, prior: str, t: datetime, action: str = "merge") -> CrmOp:
    return CrmOp("contact", action, survivor, t, prior_key=prior)  # type: ignore[arg-type]


def outcomes(results: list[OpResult]) -> list[str]:
    return [r.outcome for r in results]


@dataclass
class Crm:
    sink: Sink
    kind: str
    target: str

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            with closing(sqlite3.connect(self.target)) as conn:
                return conn.execute(sql).fetchall()
        with psycopg.connect(self.target) as conn:
            return conn.execute(sql).fetchall()  # type: ignore[arg-type]

    def one(self, mrn: str) -> Any:
        found = self.sink.contacts(mrn)
        assert len(found) == 1, f"expected exactly one contact, found {len(found)}"
        return found[0]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def crm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Crm]:
    target = str(tmp_path) if request.param == "sqlite" else request.getfixturevalue("pg_url")
    sink = open_sink(target)
    try:
        yield Crm(sink, request.param, str(tmp_path / "crm.sqlite3") if request.param == "sqlite" else target)
    finally:
        sink.close()


# --- opening and schema ------------------------------------------------------------------------------


def test_open_sink_picks_the_backend(tmp_path: Path) -> None:
    in_dir = open_sink(tmp_path)
    in_dir.close()
    assert isinstance(in_dir, SqliteSink)
    assert (tmp_path / "crm.sqlite3").exists()
    as_file = open_sink(tmp_path / "sub" / "other.db")
    as_file.close()
    assert (tmp_path / "sub" / "other.db").exists()


@pytest.mark.postgres
def test_open_sink_postgres_url(pg_url: str) -> None:
    sink = open_sink(pg_url)
    try:
        assert isinstance(sink, PostgresSink)
        sink.ping()
    finally:
        sink.close()


def test_migrate_is_idempotent_and_data_survives_reopen(crm: Crm) -> None:
    crm.sink.apply([contact("M1", at(0), first_name="Ann")])
    crm.sink.migrate()
    crm.sink.migrate()
    again = open_sink(crm.target if crm.kind == "postgres" else Path(crm.target))
    try:
        assert [c.first_name for c in again.contacts("M1")] == ["Ann"]
    finally:
        again.close()
    assert crm.rows("SELECT version FROM crm_schema_version") == [(1,)]


# --- contacts: create, update, unchanged, idempotency ----------------------------------------------------


def test_create_then_update_then_unchanged(crm: Crm) -> None:
    first = crm.sink.apply([contact("M1", at(0), first_name="Ann", last_name="Lee", birth_date="1980-02-29",
                                    sex="F", phone="+15551230001")])
    assert first == [OpResult("contact", "M1", "created",
                              ("first_name", "last_name", "birth_date", "sex", "phone"))]
    created = crm.one("M1")
    assert created.contact_id.startswith("C-")
    assert (created.first_name, created.birth_date, created.phone) == ("Ann", "1980-02-29", "+15551230001")
    assert datetime.fromisoformat(created.updated_at).utcoffset() is not None

    second = crm.sink.apply([contact("M1", at(5), phone="+15551230002", city="Springfield")])
    assert second == [OpResult("contact", "M1", "updated", ("phone", "city"))]
    updated = crm.one("M1")
    assert (updated.contact_id, updated.phone, updated.city, updated.first_name) == (
        created.contact_id, "+15551230002", "Springfield", "Ann")
    assert updated.updated_at > created.updated_at

    third = crm.sink.apply([contact("M1", at(5), phone="+15551230002", city="Springfield")])
    assert outcomes(third) == ["unchanged"]
    assert crm.one("M1").updated_at == updated.updated_at


def test_message_key_makes_a_resend_a_no_op_unless_forced(crm: Crm) -> None:
    assert outcomes(crm.sink.apply([contact("M1", at(0), phone="+15551230001")], message_key="EHR|F|1")) == [
        "created"]
    resend = crm.sink.apply([contact("M1", at(1), phone="+15551239999"),
                             appt("A1", at(1), "M1", status="scheduled")], message_key="EHR|F|1")
    assert outcomes(resend) == ["already_applied", "already_applied"]
    assert crm.one("M1").phone == "+15551230001"
    assert crm.sink.appointments() == []

    forced = crm.sink.apply([contact("M1", at(1), phone="+15551239999")], message_key="EHR|F|1", force=True)
    assert outcomes(forced) == ["updated"]
    assert crm.one("M1").phone == "+15551239999"


def test_all_ops_of_a_message_are_one_transaction(crm: Crm) -> None:
    with pytest.raises(PermanentSinkError) as err:
        crm.sink.apply([contact("M1", at(0), first_name="Ann"),
                        contact("M1", at(0), birth_date="1980-13-45")], message_key="k")
    assert "1980" not in str(err.value) and "birth_date" in str(err.value)
    assert crm.sink.contacts() == []
    # The key was not recorded either: the fixed message applies.
    assert outcomes(crm.sink.apply([contact("M1", at(0), first_name="Ann")], message_key="k")) == ["created"]


def test_apply_many_commits_each_message_on_its_own(crm: Crm) -> None:
    """A batch (what the delivery workers send): the bad message fails alone, the others are committed,
    a resend inside the same batch is a no-op, and the results come back in order."""
    results = crm.sink.apply_many([
        ApplyRequest([contact("B1", at(0), first_name="Ann")], "k1"),
        ApplyRequest([contact("B2", at(0), first_name="Bob"),
                      contact("B2", at(0), birth_date="1980-13-45")], "k2"),  # half valid: all of it undone
        ApplyRequest([appt("BA1", at(0), mrn="B3", status="scheduled")], "k3"),
        ApplyRequest([contact("B1", at(0), first_name="Ann")], "k1"),  # the same message again
    ])
    assert isinstance(results[0], list) and outcomes(results[0]) == ["created"]
    assert isinstance(results[1], PermanentSinkError) and "1980" not in str(results[1])
    assert isinstance(results[2], list) and outcomes(results[2]) == ["created"]
    assert isinstance(results[3], list) and outcomes(results[3]) == ["already_applied"]
    assert sorted(c.mrn for c in crm.sink.contacts()) == ["B1", "B3"]
    assert [a.appointment_id for a in crm.sink.appointments()] == ["BA1"]
    assert crm.sink.apply_many([]) == []
    assert crm.sink.max_batch > 1


@pytest.mark.parametrize("op", [
    contact("M1", at(0), favourite_colour="blue"),
    contact("M1", at(0).replace(tzinfo=None), first_name="Ann"),
    appt("A1", at(0), status="rescheduled-ish"),
    appt("A1", at(0), start="2024-03-01T09:00:00"),
    appt("A1", at(0), duration_minutes="forty"),
    CrmOp("appointment", "merge", "A1", at(0), prior_key="A0"),
])
def test_bad_data_is_a_permanent_error(crm: Crm, op: CrmOp) -> None:
    with pytest.raises(PermanentSinkError):
        crm.sink.apply([op])


# --- stale guard -----------------------------------------------------------------------------------------


def test_a_stale_message_does_not_regress_newer_values(crm: Crm) -> None:
    crm.sink.apply([contact("M1", at(10), phone="+15551230002", city="Newtown")])
    stale = crm.sink.apply([contact("M1", at(5), phone="+15551230001", email="old@example.org")])
    assert outcomes(stale) == ["stale"]
    c = crm.one("M1")
    assert (c.phone, c.city, c.email) == ("+15551230002", "Newtown", None)


def test_stale_guard_compares_instants_not_text(crm: Crm) -> None:
    # 10:00-05:00 is 15:00Z; 14:30Z reads "later" as text but is half an hour older.
    crm.sink.apply([contact("M1", datetime(2024, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=-5))),
                            phone="+15551230002")])
    older = crm.sink.apply([contact("M1", datetime(2024, 3, 1, 14, 30, tzinfo=UTC), phone="+15551230001")])
    assert outcomes(older) == ["stale"]
    newer = crm.sink.apply([contact("M1", datetime(2024, 3, 1, 15, 30, tzinfo=UTC), phone="+15551230003")])
    assert outcomes(newer) == ["updated"]
    assert crm.one("M1").phone == "+15551230003"


def test_stale_appointment_is_ignored(crm: Crm) -> None:
    crm.sink.apply([appt("A1", at(10), "M1", status="cancelled")])
    assert outcomes(crm.sink.apply([appt("A1", at(5), "M1", status="scheduled")])) == ["stale"]
    assert crm.sink.appointments()[0].status == "cancelled"


# --- conflict rules --------------------------------------------------------------------------------------


def test_rule_ehr_overwrites_a_crm_edit(crm: Crm) -> None:
    crm.sink.apply([contact("M1", at(0), phone="+15551230001")])
    crm.sink.edit("contact", "M1", {"phone": "+15557770000"}, at=at(30))
    assert crm.one("M1").phone == "+15557770000"
    result = crm.sink.apply([contact("M1", at(10), phone="+15551230002")])  # older than the edit: still wins
    assert result == [OpResult("contact", "M1", "updated", ("phone",))]
    assert crm.one("M1").phone == "+15551230002"


def test_rule_crm_only_fills_an_empty_field(crm: Crm) -> None:
    crm.sink.apply([contact("M1", at(0), "crm", email="first@example.org")])
    assert crm.one("M1").email == "first@example.org"  # empty: the EHR fills it
    crm.sink.edit("contact", "M1", {"email": "owner@example.org"})
    assert outcomes(crm.sink.apply([contact("M1", at(60), "crm", email="ehr@example.org")])) == ["unchanged"]
    assert crm.one("M1").email == "owner@example.org"
    # A CRM user empties it: the EHR may fill it again.
    crm.sink.edit("contact", "M1", {"email": None})
    crm.sink.apply([contact("M1", at(90), "crm", email="ehr@example.org")])
    assert crm.one("M1").email == "ehr@example.org"


def test_rule_newest_compares_event_time_with_the_crm_edit(crm: Crm) -> None:
    crm.sink.apply([contact("M1", at(0), "newest", phone="+15551230001")])
    crm.sink.edit("contact", "M1", {"phone": "+15557770000"}, at=at(30))
    kept = crm.sink.apply([contact("M1", at(20), "newest", phone="+15551230002", city="Oldtown")])
    assert kept == [OpResult("contact", "M1", "updated", ("city",))]
    assert crm.one("M1").phone == "+15557770000"
    overwritten = crm.sink.apply([contact("M1", at(40), "newest", phone="+15551230003")])
    assert outcomes(overwritten) == ["updated"]
    assert crm.one("M1").phone == "+15551230003"


def test_edit_of_an_unknown_row_is_an_error(crm: Crm) -> None:
    with pytest.raises(PermanentSinkError):
        crm.sink.edit("contact", "nobody", {"phone": "+15551230001"})


def test_explicit_null_clears_and_absent_leaves_alone(crm: Crm) -> None:
    crm.sink.apply([contact("M1", at(0), phone="+15551230001", email="a@example.org", city="X")])
    result = crm.sink.apply([contact("M1", at(1), phone=None, email="")])
    assert result == [OpResult("contact", "M1", "updated", ("phone", "email"))]
    c = crm.one("M1")
    assert (c.phone, c.email, c.city) == (None, None, "X")


# --- appointments ----------------------------------------------------------------------------------------


def test_appointment_creates_a_minimal_contact_and_links_it(crm: Crm) -> None:
    result = crm.sink.apply([appt("A1", at(0), "M1", {"first_name": "Ann", "last_name": "Lee"},
                                  start="2024-03-09T23:30:00-05:00", duration_minutes="30",
                                  status="scheduled", type="Follow-up", provider="Smith, Jo",
                                  location="Clinic 2")])
    assert outcomes(result) == ["created"]
    c = crm.one("M1")
    assert (c.first_name, c.last_name, c.phone) == ("Ann", "Lee", None)
    [a] = crm.sink.appointments("M1")
    assert (a.appointment_id, a.mrn, a.contact_id) == ("A1", "M1", c.contact_id)
    assert (a.start, a.duration_minutes, a.status, a.type, a.provider, a.location) == (
        "2024-03-09T23:30:00-05:00", 30, "scheduled", "Follow-up", "Smith, Jo", "Clinic 2")


def test_appointment_contact_fields_never_overwrite_a_newer_contact(crm: Crm) -> None:
    crm.sink.apply([contact("M1", at(10), first_name="Annabel", last_name="Lee")])
    crm.sink.apply([appt("A1", at(5), "M1", {"first_name": "Ann", "phone": "+15551230001"},
                         status="scheduled")])
    c = crm.one("M1")
    assert (c.first_name, c.phone) == ("Annabel", None)
    assert crm.sink.appointments("M1")[0].contact_id == c.contact_id


def test_a_minimal_contact_does_not_block_the_registration_that_follows(crm: Crm) -> None:
    # SIU first (event 12:10) creates the contact from its PID; the A04 (event 12:05) arrives after it.
    crm.sink.apply([appt("A1", at(10), "M1", {"first_name": "Ann", "last_name": "Lee"}, status="scheduled")])
    result = crm.sink.apply([contact("M1", at(5), first_name="A.", phone="+15551230001", city="Springfield")])
    assert result == [OpResult("contact", "M1", "updated", ("phone", "city"))]
    c = crm.one("M1")
    assert (c.first_name, c.phone, c.city) == ("Ann", "+15551230001", "Springfield")


def test_cancellation_and_deletion_keep_the_row(crm: Crm) -> None:
    crm.sink.apply([appt("A1", at(0), "M1", status="scheduled", start="2024-03-01T09:00:00+00:00")])
    assert crm.sink.apply([appt("A1", at(1), "M1", status="cancelled")]) == [
        OpResult("appointment", "A1", "updated", ("status",))]
    crm.sink.apply([appt("A1", at(2), "M1", status="deleted")])
    [a] = crm.sink.appointments()
    assert (a.status, a.start) == ("deleted", "2024-03-01T09:00:00+00:00")


def test_only_if_changed_skips_when_the_trigger_fields_hold(crm: Crm) -> None:
    crm.sink.apply([appt("A1", at(0), "M1", status="scheduled", provider="Dr A")])
    watched = ("status", "start")
    skipped = crm.sink.apply([appt("A1", at(1), "M1", only=watched, status="scheduled", provider="Dr B")])
    assert outcomes(skipped) == ["skipped"]
    assert crm.sink.appointments()[0].provider == "Dr A"
    synced = crm.sink.apply([appt("A1", at(2), "M1", only=watched, status="cancelled", provider="Dr B")])
    assert synced == [OpResult("appointment", "A1", "updated", ("status", "provider"))]
    assert outcomes(crm.sink.apply([contact("M1", at(3), only=("phone",), city="X")])) == ["skipped"]
    assert crm.one("M1").city is None


def test_appointment_moves_to_another_patient(crm: Crm) -> None:
    crm.sink.apply([appt("A1", at(0), "M1", status="scheduled")])
    moved = crm.sink.apply([appt("A1", at(1), "M2", status="scheduled")])
    assert moved == [OpResult("appointment", "A1", "updated", ("mrn", "contact_id"))]
    assert crm.sink.appointments("M1") == []
    assert crm.sink.appointments("M2")[0].contact_id == crm.one("M2").contact_id


# --- merge (A40) and identifier change (A47) --------------------------------------------------------------


def test_merge_leaves_one_contact_with_all_appointments_and_an_audit_row(crm: Crm) -> None:
    crm.sink.apply([contact("KEEP", at(0), first_name="Ann", last_name="Lee"),
                    contact("GONE", at(0), first_name="Anne", phone="+15551230001"),
                    appt("A1", at(0), "KEEP", status="scheduled"),
                    appt("A2", at(0), "GONE", status="scheduled"),
                    appt("A3", at(0), "GONE", status="cancelled")])
    keep_id = crm.one("KEEP").contact_id
    gone_id = crm.one("GONE").contact_id

    result = crm.sink.apply([merge("KEEP", "GONE", at(5))], message_key="EHR|F|A40-1")
    assert result == [OpResult("contact", "KEEP", "merged", ("phone",))]
    assert [c.mrn for c in crm.sink.contacts()] == ["KEEP"]
    survivor = crm.one("KEEP")
    assert (survivor.contact_id, survivor.first_name, survivor.phone) == (keep_id, "Ann", "+15551230001")
    appts = crm.sink.appointments()
    assert [(a.appointment_id, a.mrn, a.contact_id) for a in appts] == [
        ("A1", "KEEP", keep_id), ("A2", "KEEP", keep_id), ("A3", "KEEP", keep_id)]
    assert crm.rows("SELECT kind, surviving_mrn, merged_mrn, surviving_contact_id, merged_contact_id, "
                    "appointments_moved, message_key FROM merges") == [
        ("merge", "KEEP", "GONE", keep_id, gone_id, 2, "EHR|F|A40-1")]

    # The same A40 again (a resend under a new control ID, or a replay): nothing changes.
    again = crm.sink.apply([merge("KEEP", "GONE", at(5))], message_key="EHR|F|A40-2")
    assert outcomes(again) == ["unchanged"]
    assert crm.sink.contacts() == [survivor]
    assert crm.sink.appointments() == appts
    assert len(crm.rows("SELECT * FROM merges")) == 1
    assert crm.sink.contacts("GONE") == []


def test_merge_into_an_unknown_survivor_rekeys_the_prior(crm: Crm) -> None:
    crm.sink.apply([contact("OLD", at(0), first_name="Ann"), appt("A1", at(0), "OLD", status="scheduled")])
    old_id = crm.one("OLD").contact_id
    assert outcomes(crm.sink.apply([merge("NEW", "OLD", at(1))])) == ["merged"]
    c = crm.one("NEW")
    assert (c.contact_id, c.first_name) == (old_id, "Ann")
    assert crm.sink.contacts("OLD") == []
    assert [(a.mrn, a.contact_id) for a in crm.sink.appointments()] == [("NEW", old_id)]


def test_change_id_moves_the_contact_and_its_appointments(crm: Crm) -> None:
    crm.sink.apply([contact("OLD", at(0), first_name="Ann"), appt("A1", at(0), "OLD", status="scheduled")])
    old_id = crm.one("OLD").contact_id
    result = crm.sink.apply([merge("NEW", "OLD", at(1), action="change_id")])
    assert result == [OpResult("contact", "NEW", "updated", ("mrn",))]
    assert crm.sink.contacts("OLD") == []
    assert crm.one("NEW").contact_id == old_id
    assert [(a.mrn, a.contact_id) for a in crm.sink.appointments()] == [("NEW", old_id)]
    assert outcomes(crm.sink.apply([merge("NEW", "OLD", at(1), action="change_id")])) == ["unchanged"]


def test_change_id_onto_an_existing_mrn_merges(crm: Crm) -> None:
    crm.sink.apply([contact("NEW", at(0), first_name="Ann"), contact("OLD", at(0), phone="+15551230001"),
                    appt("A1", at(0), "OLD", status="scheduled")])
    new_id = crm.one("NEW").contact_id
    assert outcomes(crm.sink.apply([merge("NEW", "OLD", at(1), action="change_id")])) == ["updated"]
    assert [c.mrn for c in crm.sink.contacts()] == ["NEW"]
    assert crm.one("NEW").phone == "+15551230001"
    assert [(a.mrn, a.contact_id) for a in crm.sink.appointments()] == [("NEW", new_id)]


# --- housekeeping ----------------------------------------------------------------------------------------


def test_delete_where_mrn_prefix(crm: Crm) -> None:
    crm.sink.apply([contact("GOLIVE-1", at(0)), contact("GOLIVE-2", at(0)), contact("REAL-1", at(0)),
                    appt("A1", at(0), "GOLIVE-1", status="scheduled"), appt("A2", at(0), "REAL-1")])
    assert crm.sink.delete_where_mrn_prefix("GOLIVE-") == 2
    assert [c.mrn for c in crm.sink.contacts()] == ["REAL-1"]
    assert [a.appointment_id for a in crm.sink.appointments()] == ["A2"]
    with pytest.raises(ValueError):
        crm.sink.delete_where_mrn_prefix("")


def test_ping_on_a_healthy_sink(crm: Crm) -> None:
    crm.sink.ping()


# --- concurrency -----------------------------------------------------------------------------------------


def _race(n_threads: int, work: Any) -> list[Any]:
    """Run work(i) on n threads released together; re-raise the first failure."""
    barrier = threading.Barrier(n_threads, timeout=30)
    results: list[Any] = [None] * n_threads
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return results


def test_concurrent_upserts_of_a_new_mrn_make_one_contact(crm: Crm) -> None:
    for n in range(10):
        mrn = f"RACE-{n}"
        results = _race(2, lambda i, mrn=mrn: crm.sink.apply([contact(mrn, at(0), first_name="Ann")]))
        assert sorted(r[0].outcome for r in results) == ["created", "unchanged"]
        assert len(crm.sink.contacts(mrn)) == 1


def test_concurrent_appointments_for_a_new_patient_share_one_contact(crm: Crm) -> None:
    _race(4, lambda i: crm.sink.apply([appt(f"A{i}", at(0), "NEWPT", {"last_name": "Lee"},
                                            status="scheduled")]))
    c = crm.one("NEWPT")
    assert [(a.mrn, a.contact_id) for a in crm.sink.appointments()] == [("NEWPT", c.contact_id)] * 4
