"""`hl7bridge reconcile`: every injected kind of drift is found, a clean CRM reports none.

The comparison is a pure function (`reconcile`) tested over plain records, including the one drift the
sink cannot hold (several contacts for one MRN); the CLI is tested once end to end against a real SQLite
CRM written through the Sink API, as the bridge writes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from hl7bridge.cli import app
from hl7bridge.crm import open_sink
from hl7bridge.crm.base import Sink
from hl7bridge.crm.model import Appointment, Contact
from hl7bridge.reconcile import (
    EhrAppointment,
    ExportError,
    IssueKind,
    classify_shift,
    read_exports,
    reconcile,
)
from hl7bridge.records import CrmOp, FieldSet

EXPORTS = Path(__file__).resolve().parents[2] / "fixtures" / "reconcile"
PATIENTS, APPOINTMENTS = EXPORTS / "patients.csv", EXPORTS / "appointments.csv"

#: The CRM as a healthy bridge leaves it for the fixture exports (E.164 phones, other casing, UTC starts).
CONTACTS = [
    Contact("C-1", "100001", "JANE", "DOE", "1980-02-14", "F", "+12175550123", "Jane.Doe@example.com",
            "123 Main St", "Springfield", "IL", "62704"),
    Contact("C-2", "100002", "John", "Smith", "1975-06-30", "M", "+12175550150", "john.smith@example.com",
            "9  Elm St", "Springfield", "IL", "62701"),
    Contact("C-3", "100003", "Linh", "Nguyen", "1992-12-05", "F", "+16175550102", None,
            "44 Harbor Rd", "Boston", "MA", "02110"),
    Contact("C-4", "100004", "Jürgen", "Müller", "1965-11-03", "M", "+13125550144", None,
            "Hauptstraße 5", "Chicago", "IL", "60614"),
]
APPTS = [
    Appointment("FL-1001", "100001", "C-1", "2026-11-20T20:30:00+00:00", 30, "scheduled", "Office visit",
                "1234", "NC-101"),
    Appointment("FL-1002", "100002", "C-2", "2026-11-21T15:00:00+00:00", 45, "scheduled", "New patient",
                "4455", "NC-102"),
    Appointment("FL-1003", "100003", "C-3", "2026-11-23T04:30:00+00:00", 30, "cancelled", "Follow-up visit",
                "1234", "EAST-2"),
    Appointment("FL-1004", "100004", "C-4", "2026-11-23T08:15:00+00:00", 60, "completed", "Procedure",
                "7788", "SC-1"),
]


def _exports() -> tuple[list, list]:
    patients, appointments = read_exports([PATIENTS, APPOINTMENTS])
    assert patients is not None and appointments is not None
    return patients, appointments


def _kinds(report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for issue in report.issues:
        out.setdefault(issue.kind.value, []).append(issue.key)
    return out


def _shift(appt: Appointment, delta: timedelta) -> Appointment:
    assert appt.start is not None
    return replace(appt, start=(datetime.fromisoformat(appt.start) + delta).isoformat())


# --- the pure comparison -----------------------------------------------------------------------------


def test_a_clean_crm_reports_no_drift() -> None:
    patients, appointments = _exports()
    report = reconcile(patients, appointments, CONTACTS, APPTS)
    assert report.issues == ()
    assert report.compared == 8
    assert report.drift_ratio == 0.0


def test_missing_and_extra_contacts() -> None:
    patients, _ = _exports()
    extra = Contact("C-9", "999001", "Ex", "Tra")
    report = reconcile(patients, None, [*CONTACTS[:3], extra], [])
    assert _kinds(report) == {"missing_contact": ["100004"], "extra_contact": ["999001"]}
    assert report.compared == 5
    assert report.drift_ratio == pytest.approx(2 / 5)


def test_several_contacts_for_one_mrn_are_reported_as_duplicates() -> None:
    patients, _ = _exports()
    twin = replace(CONTACTS[1], contact_id="C-2b")
    report = reconcile(patients, None, [*CONTACTS, twin], [])
    assert _kinds(report) == {"duplicate_contact": ["100002"]}
    assert "C-2" in report.issues[0].detail and "C-2b" in report.issues[0].detail


def test_field_mismatches_ignore_phone_format_case_and_whitespace_but_not_values() -> None:
    patients, _ = _exports()
    changed = [replace(CONTACTS[0], phone="+12175550999", city="Chicago"), *CONTACTS[1:]]
    report = reconcile(patients, None, changed, [])
    assert _kinds(report) == {"contact_field_mismatch": ["100001"]}
    assert {d.field for d in report.issues[0].diffs} == {"phone", "city"}


@pytest.mark.parametrize(("delta", "kind", "words"), [
    (timedelta(hours=1), IssueKind.START_TIMEZONE_SHIFT, "probable timezone bug"),
    (timedelta(hours=-5), IssueKind.START_TIMEZONE_SHIFT, "probable timezone bug"),
    (timedelta(days=1), IssueKind.START_DATE_SHIFT, "probable date bug"),
    (timedelta(days=-2), IssueKind.START_DATE_SHIFT, "probable date bug"),
    (timedelta(minutes=20), IssueKind.START_MISMATCH, "20 min"),
])
def test_start_shifts_are_classified(delta: timedelta, kind: IssueKind, words: str) -> None:
    _, appointments = _exports()
    crm = [_shift(APPTS[0], delta), *APPTS[1:]]
    report = reconcile(None, appointments, [], crm)
    assert [(i.kind, i.key) for i in report.issues] == [(kind, "FL-1001")]
    if kind is not IssueKind.START_MISMATCH:
        assert words in report.issues[0].detail


def test_classify_shift_boundaries() -> None:
    assert classify_shift(timedelta(0)) is None
    assert classify_shift(timedelta(hours=14)) is IssueKind.START_TIMEZONE_SHIFT
    assert classify_shift(timedelta(hours=5, minutes=30)) is IssueKind.START_TIMEZONE_SHIFT
    assert classify_shift(timedelta(hours=15)) is IssueKind.START_MISMATCH
    assert classify_shift(timedelta(hours=24)) is IssueKind.START_DATE_SHIFT
    assert classify_shift(timedelta(hours=1, seconds=1)) is IssueKind.START_MISMATCH


def test_cancelled_in_the_ehr_but_scheduled_in_the_crm() -> None:
    _, appointments = _exports()
    crm = [*APPTS[:2], replace(APPTS[2], status="scheduled"), APPTS[3]]
    report = reconcile(None, appointments, [], crm)
    assert _kinds(report) == {"status_mismatch": ["FL-1003"]}
    assert report.issues[0].detail == "EHR cancelled, CRM scheduled"


def test_missing_extra_and_misattached_appointments() -> None:
    _, appointments = _exports()
    inside = Appointment("FL-9001", "100001", "C-1", "2026-11-21T10:00:00+00:00", 30, "scheduled")
    outside = Appointment("FL-9002", "100001", "C-1", "2027-03-01T10:00:00+00:00", 30, "scheduled")
    deleted = Appointment("FL-9003", "100001", "C-1", "2026-11-21T11:00:00+00:00", 30, "deleted")
    crm = [APPTS[0], replace(APPTS[1], mrn="100003", contact_id="C-3"), APPTS[2], inside, outside, deleted]
    report = reconcile(None, appointments, [], crm)
    assert _kinds(report) == {"missing_appointment": ["FL-1004"], "appointment_wrong_patient": ["FL-1002"],
                              "extra_appointment": ["FL-9001"]}


def test_appointment_field_mismatch() -> None:
    _, appointments = _exports()
    crm = [replace(APPTS[0], duration_minutes=45, location="nc-101 "), *APPTS[1:]]
    report = reconcile(None, appointments, [], crm)
    assert _kinds(report) == {"appointment_field_mismatch": ["FL-1001"]}
    assert [d.field for d in report.issues[0].diffs] == ["duration_minutes"]


def test_local_times_need_a_timezone_and_are_read_dst_correct() -> None:
    local = EXPORTS / "appointments_local.csv"
    with pytest.raises(ExportError, match="no UTC offset"):
        read_exports([local])
    patients, appointments = read_exports([local], ZoneInfo("America/Chicago"))
    assert patients is None and appointments is not None
    first, gap = appointments
    assert isinstance(first, EhrAppointment)
    # 01:30 on the fall-back night is read as its first occurrence (CDT, -05:00) ...
    assert first.start == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)
    # ... and 02:30 in the spring-forward gap as 03:30 CDT, like the bridge reads HL7 timestamps.
    assert gap.start == datetime(2026, 3, 8, 8, 30, tzinfo=UTC)
    assert first.fields["status"] == "Booked" and first.fields["duration_minutes"] == 30


def test_an_export_that_is_neither_kind_is_refused(tmp_path: Path) -> None:
    odd = tmp_path / "odd.csv"
    odd.write_text("name,value\nx,1\n", encoding="utf-8")
    with pytest.raises(ExportError, match="neither"):
        read_exports([odd])
    bad_start = tmp_path / "bad.csv"
    bad_start.write_text("appointment_id,mrn,start\nA1,1,tomorrow\n", encoding="utf-8")
    with pytest.raises(ExportError, match="line 2") as info:
        read_exports([bad_start])
    assert "tomorrow" not in str(info.value)  # names the place, never the value


def test_prometheus_textfile_has_every_kind_and_the_ratio() -> None:
    patients, appointments = _exports()
    report = reconcile(patients, appointments, CONTACTS[:3], APPTS[:3],
                       now=datetime(2026, 11, 24, tzinfo=UTC))
    families = {f.name: f for f in text_string_to_metric_families(report.to_prometheus())}
    issues = {s.labels["kind"]: s.value for s in families["hl7bridge_reconcile_issues"].samples}
    assert issues["missing_contact"] == 1 and issues["missing_appointment"] == 1
    assert set(issues) == {k.value for k in IssueKind}
    assert families["hl7bridge_reconcile_drift_ratio"].samples[0].value == pytest.approx(2 / 8)
    assert families["hl7bridge_reconcile_last_run_timestamp_seconds"].samples[0].value == \
        datetime(2026, 11, 24, tzinfo=UTC).timestamp()


# --- the command against a real SQLite CRM -----------------------------------------------------------


def _seed(sink: Sink, contacts: list[Contact], appointments: list[Appointment]) -> None:
    at = datetime(2026, 11, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5)))
    for c in contacts:
        fields = {k: FieldSet(v) for k, v in c.to_json().items()
                  if k not in ("contact_id", "mrn", "updated_at") and v is not None}
        sink.apply([CrmOp("contact", "upsert", c.mrn, at, fields)])
    for a in appointments:
        fields = {k: FieldSet(v) for k, v in a.to_json().items()
                  if k not in ("appointment_id", "mrn", "contact_id", "updated_at") and v is not None}
        sink.apply([CrmOp("appointment", "upsert", a.appointment_id, at, fields, contact_key=a.mrn)])


@pytest.fixture
def crm_dir(tmp_path: Path) -> Iterator[tuple[Path, Sink]]:
    data_dir = tmp_path / "data"
    sink = open_sink(data_dir / "crm.sqlite3")
    _seed(sink, CONTACTS, APPTS)
    try:
        yield data_dir, sink
    finally:
        sink.close()


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["reconcile", *args], env={"COLUMNS": "250"})
    return result.exit_code, result.output


def test_cli_clean_crm_exits_0_and_writes_metrics_and_report(crm_dir: tuple[Path, Sink], tmp_path: Path) -> None:
    data_dir, _ = crm_dir
    code, out = _run(str(PATIENTS), str(APPOINTMENTS), "--data-dir", str(data_dir), "--json",
                     "--report", str(tmp_path / "rec.md"))
    assert code == 0, out
    result = json.loads(out)
    assert result["issues"] == [] and result["compared"] == 8 and result["within_threshold"] is True
    prom = (data_dir / "reconcile.prom").read_text(encoding="utf-8")
    assert "hl7bridge_reconcile_drift_ratio 0.0" in prom
    assert "Issues: 0" in (tmp_path / "rec.md").read_text(encoding="utf-8")
    code, out = _run(str(PATIENTS), str(APPOINTMENTS), "--data-dir", str(data_dir))
    assert code == 0 and "0 issue(s) in 8 records compared" in out


def test_cli_finds_each_injected_drift_and_exits_3(crm_dir: tuple[Path, Sink], tmp_path: Path) -> None:
    data_dir, sink = crm_dir
    sink.delete_where_mrn_prefix("100004")  # missing contact (and its appointment)
    _seed(sink, [Contact("C-x", "999001", "Ex", "Tra")], [])  # extra contact
    sink.edit("contact", "100002", {"phone": "+12175550999"})  # field mismatch
    sink.edit("appointment", "FL-1001", {"start": "2026-11-20T21:30:00+00:00"})  # 1 h: timezone bug
    sink.edit("appointment", "FL-1002", {"start": "2026-11-22T15:00:00+00:00"})  # 1 day: date bug
    sink.edit("appointment", "FL-1003", {"status": "scheduled"})  # cancellation not propagated
    code, out = _run(str(PATIENTS), str(APPOINTMENTS), "--data-dir", str(data_dir), "--json")
    assert code == 3, out
    found = {(i["kind"], i["key"]) for i in json.loads(out)["issues"]}
    assert found == {
        ("missing_contact", "100004"), ("missing_appointment", "FL-1004"), ("extra_contact", "999001"),
        ("contact_field_mismatch", "100002"), ("start_timezone_shift", "FL-1001"),
        ("start_date_shift", "FL-1002"), ("status_mismatch", "FL-1003"),
    }
    prom = (data_dir / "reconcile.prom").read_text(encoding="utf-8")
    assert 'hl7bridge_reconcile_issues{kind="status_mismatch"} 1' in prom
    # The table names the probable causes; a threshold above the ratio lets a scheduled job pass.
    code, out = _run(str(PATIENTS), str(APPOINTMENTS), "--data-dir", str(data_dir))
    assert code == 3 and "probable timezone bug" in out and "probable date bug" in out
    code, _ = _run(str(PATIENTS), str(APPOINTMENTS), "--data-dir", str(data_dir), "--max-drift", "0.9")
    assert code == 0


def test_cli_refuses_unreadable_exports_and_unknown_stores(crm_dir: tuple[Path, Sink], tmp_path: Path) -> None:
    data_dir, _ = crm_dir
    odd = tmp_path / "odd.csv"
    odd.write_text("name\nx\n", encoding="utf-8")
    code, out = _run(str(odd), "--data-dir", str(data_dir))
    assert code == 2 and "neither" in out
    code, out = _run(str(PATIENTS), "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "no CRM database" in out
    assert not (tmp_path / "nowhere").exists()
