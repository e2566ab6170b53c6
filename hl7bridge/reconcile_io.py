"""Reading EHR export CSVs for reconciliation (the columns are documented in docs/reconcile.md).

Which file is which is told by its header; rows become `EhrPatient` / `EhrAppointment` records with only
the columns the export has, so a column left out is not compared. Errors name the file, line and column,
never a value (PHI).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path

from hl7bridge.hl7.timestamps import localize

__all__ = ["APPOINTMENT_COLUMNS", "PATIENT_COLUMNS", "EhrAppointment", "EhrPatient", "ExportError", "read_exports"]

#: Patients export: `mrn` is required, every other column is compared when present in the header.
PATIENT_COLUMNS = ("mrn", "first_name", "last_name", "birth_date", "sex", "phone", "email", "address_line1",
                   "city", "state", "postal_code")
#: Appointments export: `appointment_id`, `mrn` and `start` are required.
APPOINTMENT_COLUMNS = ("appointment_id", "mrn", "start", "duration_minutes", "status", "type", "provider",
                       "location")


class ExportError(ValueError):
    """An export file that cannot be read. Names the file, line and column, never a value (PHI)."""


@dataclass(frozen=True, slots=True)
class EhrPatient:
    mrn: str
    #: Only the columns the export has: a column left out of the export is not compared.
    fields: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EhrAppointment:
    appointment_id: str
    mrn: str
    start: datetime | None  # aware
    fields: Mapping[str, str | int | None] = field(default_factory=dict)


def _header_key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def read_exports(paths: Iterable[Path], timezone: tzinfo | None = None
                 ) -> tuple[list[EhrPatient] | None, list[EhrAppointment] | None]:
    """Read EHR export CSVs; which file is which is told by its header. None = no such file given.

    `timezone` reads appointment starts written as local time (no offset); without it they are an error.
    """
    patients: list[EhrPatient] | None = None
    appointments: list[EhrAppointment] | None = None
    for path in paths:
        try:
            with Path(path).open(encoding="utf-8-sig", newline="") as fh:
                reader = csv.reader(fh)
                header = [_header_key(h) for h in next(reader, [])]
                if "appointment_id" in header:
                    appointments = (appointments or []) + _read_appointments(path, header, reader, timezone)
                elif "mrn" in header:
                    patients = (patients or []) + _read_patients(path, header, reader)
                else:
                    raise ExportError(f"{path}: the header names neither a patients export (mrn, ...) nor an "
                                      "appointments export (appointment_id, mrn, start, ...); see docs/reconcile.md")
        except OSError as exc:
            raise ExportError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from exc
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ExportError(f"{path}: not a UTF-8 CSV file ({type(exc).__name__})") from exc
    return patients, appointments


def _rows(path: Path, header: list[str], reader: Iterable[list[str]], known: Sequence[str],
          required: Sequence[str]) -> Iterable[tuple[int, dict[str, str | None]]]:
    missing = [c for c in required if c not in header]
    if missing:
        raise ExportError(f"{path}: required column(s) missing: {', '.join(missing)}")
    columns = [(i, h) for i, h in enumerate(header) if h in known]
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        values = {h: (row[i].strip() or None) if i < len(row) else None for i, h in columns}
        for c in required:
            if not values.get(c):
                raise ExportError(f"{path} line {line}: column {c} is empty")
        yield line, values


def _read_patients(path: Path, header: list[str], reader: Iterable[list[str]]) -> list[EhrPatient]:
    out = []
    for _, v in _rows(path, header, reader, PATIENT_COLUMNS, ("mrn",)):
        mrn = str(v.pop("mrn"))
        out.append(EhrPatient(mrn, v))
    return out


def _read_appointments(path: Path, header: list[str], reader: Iterable[list[str]],
                       zone: tzinfo | None) -> list[EhrAppointment]:
    out = []
    for line, v in _rows(path, header, reader, APPOINTMENT_COLUMNS, ("appointment_id", "mrn", "start")):
        start = _parse_start(str(v.pop("start")), zone, f"{path} line {line}")
        fields: dict[str, str | int | None] = dict(v)
        if fields.get("duration_minutes") is not None:
            try:
                fields["duration_minutes"] = int(str(fields["duration_minutes"]))
            except ValueError:
                raise ExportError(f"{path} line {line}: duration_minutes is not a whole number") from None
        out.append(EhrAppointment(str(fields.pop("appointment_id")), str(fields.pop("mrn")), start, fields))
    return out


def _parse_start(text: str, zone: tzinfo | None, where: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ExportError(f"{where}: start is not an ISO 8601 date-time") from None
    if dt.utcoffset() is None:
        if zone is None:
            raise ExportError(f"{where}: start has no UTC offset; pass --timezone for local times")
        dt = localize(dt, zone)  # the bridge's own DST rules: gaps shift forward, ambiguity -> first
    # A fixed offset: PEP 495 makes an ambiguous zoned time unequal to every time in another zone.
    return dt.astimezone(timezone(dt.utcoffset() or timedelta(0)))
