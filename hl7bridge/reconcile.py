"""Reconciliation: does the CRM match the EHR? Compare an EHR export (CSV) with the CRM state.

The comparison is one pure function over plain records (`reconcile`), so every kind of drift is testable
without a database; reading the export (`read_exports`, in `reconcile_io.py` and re-exported here) and
rendering the result (JSON, Markdown, the Prometheus textfile) are separate. The CSV columns are documented
in docs/reconcile.md.

Values are compared after normalisation (phones to E.164, case and whitespace folded, sex and status
codes mapped to the CRM vocabulary), so only differences a user would notice count as drift. Appointment
start times are compared as instants; a shift by whole hours (up to 14, or a real :30/:45 offset) is the
signature of a timezone bug, a shift by whole days that of a date bug, and both are named as such.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from typing import Any

import phonenumbers

from hl7bridge.crm.model import Appointment, Contact
from hl7bridge.reconcile_io import (
    APPOINTMENT_COLUMNS,
    PATIENT_COLUMNS,
    EhrAppointment,
    EhrPatient,
    ExportError,
    read_exports,
)

__all__ = [
    "APPOINTMENT_COLUMNS",
    "PATIENT_COLUMNS",
    "EhrAppointment",
    "EhrPatient",
    "ExportError",
    "FieldDiff",
    "Issue",
    "IssueKind",
    "ReconcileReport",
    "classify_shift",
    "read_exports",
    "reconcile",
]

_APPT_COMPARED = ("duration_minutes", "type", "provider", "location")


class IssueKind(StrEnum):
    """Kinds of drift. The values are the `kind` label of hl7bridge_reconcile_issues."""

    #: In the EHR export, no CRM contact with that MRN (new patients not flowing).
    MISSING_CONTACT = "missing_contact"
    #: A CRM contact whose MRN is not in the EHR export.
    EXTRA_CONTACT = "extra_contact"
    #: Several CRM contacts for one MRN (a broken MRN <-> contact link).
    DUPLICATE_CONTACT = "duplicate_contact"
    #: A contact field differs after normalisation.
    CONTACT_FIELD_MISMATCH = "contact_field_mismatch"
    MISSING_APPOINTMENT = "missing_appointment"
    #: A CRM appointment within the export's date range that the EHR does not list (and not deleted).
    EXTRA_APPOINTMENT = "extra_appointment"
    #: The appointment hangs off another patient in the CRM.
    APPOINTMENT_WRONG_PATIENT = "appointment_wrong_patient"
    #: Start shifted by whole hours: probable timezone bug (naive time read in the wrong zone).
    START_TIMEZONE_SHIFT = "start_timezone_shift"
    #: Start shifted by whole days: probable date bug.
    START_DATE_SHIFT = "start_date_shift"
    START_MISMATCH = "start_mismatch"
    #: E.g. cancelled in the EHR, scheduled in the CRM (SIU^S15 not handled).
    STATUS_MISMATCH = "status_mismatch"
    APPOINTMENT_FIELD_MISMATCH = "appointment_field_mismatch"


@dataclass(frozen=True, slots=True)
class FieldDiff:
    field: str
    ehr: str | int | None
    crm: str | int | None


@dataclass(frozen=True, slots=True)
class Issue:
    kind: IssueKind
    key: str  # MRN or appointment ID
    detail: str
    diffs: tuple[FieldDiff, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "key": self.key, "detail": self.detail,
                "diffs": [{"field": d.field, "ehr": d.ehr, "crm": d.crm} for d in self.diffs]}


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    issues: tuple[Issue, ...]
    #: Records compared: MRNs and appointment IDs on either side (the drift ratio's denominator).
    compared: int
    ehr_patients: int
    ehr_appointments: int
    crm_contacts: int
    crm_appointments: int
    generated_at: datetime

    @property
    def counts(self) -> dict[str, int]:
        """Issues per kind, every kind present (0 when none), so a cleared kind reads 0 in metrics."""
        out = {k.value: 0 for k in IssueKind}
        for issue in self.issues:
            out[issue.kind.value] += 1
        return out

    @property
    def drift_ratio(self) -> float:
        return len(self.issues) / self.compared if self.compared else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at.isoformat(), "compared": self.compared,
            "ehr_patients": self.ehr_patients, "ehr_appointments": self.ehr_appointments,
            "crm_contacts": self.crm_contacts, "crm_appointments": self.crm_appointments,
            "drift_ratio": self.drift_ratio, "counts": self.counts,
            "issues": [i.to_json() for i in self.issues],
        }

    def to_markdown(self) -> str:
        lines = [
            "# hl7bridge reconciliation report", "",
            f"Generated {self.generated_at.isoformat()}. Compared {self.compared} records: "
            f"EHR export {self.ehr_patients} patients / {self.ehr_appointments} appointments, "
            f"CRM {self.crm_contacts} contacts / {self.crm_appointments} appointments.", "",
            f"**Issues: {len(self.issues)}; drift ratio {self.drift_ratio:.4f}.**", "",
            "| kind | count |", "|---|---|",
            *(f"| {k} | {n} |" for k, n in self.counts.items()), "",
        ]
        if self.issues:
            lines += ["## Issues", "", "| kind | record | detail |", "|---|---|---|"]
            lines += [f"| {i.kind.value} | {_md(i.key)} | {_md(i.detail)} |" for i in self.issues]
            lines.append("")
        return "\n".join(lines)

    def to_prometheus(self) -> str:
        """The last result as a Prometheus textfile (exposition format), read by /metrics."""
        lines = ["# HELP hl7bridge_reconcile_issues Drift in the last reconciliation.",
                 "# TYPE hl7bridge_reconcile_issues gauge"]
        lines += [f'hl7bridge_reconcile_issues{{kind="{k}"}} {n}' for k, n in self.counts.items()]
        lines += ["# HELP hl7bridge_reconcile_drift_ratio Share of records with drift in the last reconciliation.",
                  "# TYPE hl7bridge_reconcile_drift_ratio gauge",
                  f"hl7bridge_reconcile_drift_ratio {self.drift_ratio!r}",
                  "# HELP hl7bridge_reconcile_last_run_timestamp_seconds Unix time of the last reconcile.",
                  "# TYPE hl7bridge_reconcile_last_run_timestamp_seconds gauge",
                  f"hl7bridge_reconcile_last_run_timestamp_seconds {self.generated_at.timestamp()!r}"]
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- normalisation -----------------------------------------------------------------------------------

_SEX = {"f": "F", "female": "F", "m": "M", "male": "M", "o": "O", "other": "O", "a": "O",
        "u": "U", "unknown": "U", "n": "U"}
_STATUS = {"booked": "scheduled", "scheduled": "scheduled", "pending": "scheduled", "confirmed": "confirmed",
           "cancelled": "cancelled", "canceled": "cancelled", "cancel": "cancelled", "noshow": "no_show",
           "no_show": "no_show", "completed": "completed", "complete": "completed", "deleted": "deleted"}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split()).casefold()
    return text or None


def _phone(value: Any, region: str) -> str | None:
    text = _text(value)
    if text is None:
        return None
    try:
        num = phonenumbers.parse(text, None if text.startswith("+") else region)
    except phonenumbers.NumberParseException:
        return text
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def _date(value: Any) -> str | None:
    text = _text(value)
    if text and re.fullmatch(r"\d{8}", text):
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text[:10] if text and re.match(r"\d{4}-\d{2}-\d{2}", text) else text


def _status(value: Any) -> str | None:
    text = _text(value)
    if text is None:
        return None
    key = re.sub(r"[\s\-]+", "_", text)
    return _STATUS.get(key.replace("_", ""), _STATUS.get(key, key))


def _norm(name: str, value: Any, region: str) -> Any:
    if name == "phone":
        return _phone(value, region)
    if name == "birth_date":
        return _date(value)
    if name == "sex":
        text = _text(value)
        return _SEX.get(text, text) if text else None
    if name == "status":
        return _status(value)
    if name == "duration_minutes":
        return None if value in (None, "") else int(value)
    return _text(value)


def _diffs(ehr: Mapping[str, Any], crm: Any, names: Iterable[str], region: str) -> tuple[FieldDiff, ...]:
    out = []
    for name in names:
        if name in ehr:  # a column the export does not have is not compared
            theirs = getattr(crm, name)
            if _norm(name, ehr[name], region) != _norm(name, theirs, region):
                out.append(FieldDiff(name, ehr[name], theirs))
    return tuple(out)


def _diff_text(diffs: Sequence[FieldDiff]) -> str:
    return "; ".join(f"{d.field}: EHR {d.ehr!r}, CRM {d.crm!r}" for d in diffs)


# --- the comparison ----------------------------------------------------------------------------------


def classify_shift(delta: timedelta) -> IssueKind | None:
    """None when equal; whole days -> date bug; whole hours up to 14 (or a :30/:45 UTC offset) -> timezone
    bug; anything else a plain start mismatch."""
    if not delta:
        return None
    if delta % timedelta(days=1) == timedelta(0):
        return IssueKind.START_DATE_SHIFT
    size = abs(delta)
    if size <= timedelta(hours=14) and (size % timedelta(hours=1) == timedelta(0) or
                                        size % timedelta(hours=1) in (timedelta(minutes=30),
                                                                      timedelta(minutes=45))):
        return IssueKind.START_TIMEZONE_SHIFT
    return IssueKind.START_MISMATCH


def _shift_words(delta: timedelta) -> str:
    later = "later" if delta > timedelta(0) else "earlier"
    size = abs(delta)
    if size % timedelta(days=1) == timedelta(0):
        return f"{size.days} day(s) {later}"
    return f"{size.total_seconds() / 3600:g} h {later}"


def reconcile(ehr_patients: Sequence[EhrPatient] | None, ehr_appointments: Sequence[EhrAppointment] | None,
              crm_contacts: Sequence[Contact], crm_appointments: Sequence[Appointment], *,
              region: str = "US", now: datetime | None = None) -> ReconcileReport:
    """Compare. A side given as None (no such export) is not compared at all."""
    issues: list[Issue] = []
    compared = 0
    if ehr_patients is not None:
        n, found = _contacts(ehr_patients, crm_contacts, region)
        compared += n
        issues += found
    if ehr_appointments is not None:
        n, found = _appointments(ehr_appointments, crm_appointments, region)
        compared += n
        issues += found
    return ReconcileReport(tuple(issues), compared, len(ehr_patients or ()), len(ehr_appointments or ()),
                           len(crm_contacts), len(crm_appointments), now or datetime.now(UTC))


def _contacts(ehr: Sequence[EhrPatient], crm: Sequence[Contact], region: str) -> tuple[int, list[Issue]]:
    by_mrn: dict[str, list[Contact]] = {}
    for c in crm:
        by_mrn.setdefault(c.mrn.strip(), []).append(c)
    ehr_by_mrn = {p.mrn.strip(): p for p in ehr}  # an MRN listed twice in the export counts once
    issues: list[Issue] = []
    for mrn, patient in ehr_by_mrn.items():
        contacts = by_mrn.get(mrn, [])
        if not contacts:
            issues.append(Issue(IssueKind.MISSING_CONTACT, mrn, "in the EHR export, no CRM contact"))
            continue
        if len(contacts) > 1:
            issues.append(Issue(IssueKind.DUPLICATE_CONTACT, mrn, f"{len(contacts)} CRM contacts for one MRN: "
                                + ", ".join(c.contact_id for c in contacts)))
        for c in contacts:
            diffs = _diffs(patient.fields, c, PATIENT_COLUMNS[1:], region)
            if diffs:
                issues.append(Issue(IssueKind.CONTACT_FIELD_MISMATCH, mrn, _diff_text(diffs), diffs))
    for mrn, contacts in by_mrn.items():
        if mrn not in ehr_by_mrn:
            issues.append(Issue(IssueKind.EXTRA_CONTACT, mrn, "CRM contact not in the EHR export ("
                                + ", ".join(c.contact_id for c in contacts) + ")"))
            if len(contacts) > 1:
                issues.append(Issue(IssueKind.DUPLICATE_CONTACT, mrn, f"{len(contacts)} CRM contacts for one "
                                    "MRN: " + ", ".join(c.contact_id for c in contacts)))
    return len(ehr_by_mrn.keys() | by_mrn.keys()), issues


def _crm_start(a: Appointment) -> datetime | None:
    if not a.start:
        return None
    try:
        dt = datetime.fromisoformat(a.start)
    except ValueError:
        return None
    return dt if dt.utcoffset() is not None else None


def _appointments(ehr: Sequence[EhrAppointment], crm: Sequence[Appointment],
                  region: str) -> tuple[int, list[Issue]]:
    crm_by_id = {a.appointment_id: a for a in crm}
    ehr_by_id = {a.appointment_id: a for a in ehr}
    issues: list[Issue] = []
    for aid, e in ehr_by_id.items():
        c = crm_by_id.get(aid)
        if c is None:
            issues.append(Issue(IssueKind.MISSING_APPOINTMENT, aid, f"in the EHR export (MRN {e.mrn}), not in "
                                "the CRM"))
            continue
        if (c.mrn or "").strip() != e.mrn.strip():
            issues.append(Issue(IssueKind.APPOINTMENT_WRONG_PATIENT, aid,
                                f"EHR patient {e.mrn}, CRM patient {c.mrn}",
                                (FieldDiff("mrn", e.mrn, c.mrn),)))
        issues += _start_issue(aid, e, c)
        if "status" in e.fields and _status(e.fields["status"]) != _status(c.status):
            issues.append(Issue(IssueKind.STATUS_MISMATCH, aid,
                                f"EHR {_status(e.fields['status'])}, CRM {_status(c.status)}",
                                (FieldDiff("status", e.fields["status"], c.status),)))
        diffs = _diffs(e.fields, c, _APPT_COMPARED, region)
        if diffs:
            issues.append(Issue(IssueKind.APPOINTMENT_FIELD_MISMATCH, aid, _diff_text(diffs), diffs))
    # The export covers a period: only CRM appointments starting within its first..last day can be extra.
    starts = [e.start for e in ehr if e.start is not None]
    extra = 0
    if starts:
        lo = datetime.combine(min(starts).astimezone(UTC).date(), time(0), UTC)
        hi = datetime.combine(max(starts).astimezone(UTC).date(), time(0), UTC) + timedelta(days=1)
        for aid, c in crm_by_id.items():
            start = _crm_start(c)
            if aid in ehr_by_id or c.status == "deleted" or (start is not None and not lo <= start < hi):
                continue
            extra += 1
            issues.append(Issue(IssueKind.EXTRA_APPOINTMENT, aid, f"CRM appointment (MRN {c.mrn}, status "
                                f"{c.status}, start {c.start}) not in the EHR export"))
    return len(ehr_by_id) + extra, issues


def _start_issue(aid: str, e: EhrAppointment, c: Appointment) -> list[Issue]:
    if e.start is None:
        return []
    crm_start = _crm_start(c)
    diff = (FieldDiff("start", e.start.isoformat(), c.start),)
    if crm_start is None:
        return [Issue(IssueKind.START_MISMATCH, aid, f"EHR start {e.start.isoformat()}, CRM start "
                      f"{c.start!r} (missing or without UTC offset)", diff)]
    delta = crm_start - e.start
    kind = classify_shift(delta)
    if kind is None:
        return []
    why = {IssueKind.START_TIMEZONE_SHIFT: ": probable timezone bug",
           IssueKind.START_DATE_SHIFT: ": probable date bug"}.get(kind, "")
    return [Issue(kind, aid, f"CRM start is {_shift_words(delta)} than the EHR's (EHR {e.start.isoformat()}, "
                  f"CRM {c.start}){why}", diff)]
