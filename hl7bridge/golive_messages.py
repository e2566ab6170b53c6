"""Synthetic test data for `hl7bridge golive`: patients and appointments under a per-run MRN prefix, and the
ADT and SIU messages that carry them (segments joined by CR, as sent over MLLP)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

__all__ = ["Appt", "Messages", "Patient", "make_appt", "make_patient"]

_FACILITY_OFFSET = timezone(timedelta(hours=-5))  # appointment times are sent with an explicit offset


@dataclass(frozen=True, slots=True)
class Patient:
    mrn: str
    first_name: str
    last_name: str
    birth_date: str
    sex: str
    phone: str  # E.164
    email: str
    address_line1: str
    city: str
    state: str
    postal_code: str
    pid3: str  # the MRN as sent in PID-3 (the CRM key `mrn` adds "^AUTHORITY" when the rules say so)


def _xtn(e164: str) -> str:
    return f"^PRN^PH^^1^{e164[2:5]}^{e164[5:]}"  # +1 AAA NNNNNNN as XTN-5/6/7


def _hl7_time(dt: datetime) -> str:
    return dt.strftime("%Y%m%d%H%M%S%z")


class Messages:
    """Builds ADT and SIU text (segments joined by CR) with unique MSH-10s and strictly rising times, so the
    bridge's stale-message guard never sees two of our messages for one record as out of order."""

    def __init__(self, run_prefix: str, authority: str) -> None:
        self.prefix, self.authority = run_prefix, authority
        self._ids = itertools.count(1)
        self._last = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)

    def tick(self) -> datetime:
        self._last = max(datetime.now(UTC).replace(microsecond=0), self._last + timedelta(seconds=1))
        return self._last

    def _msh(self, mtype: str, at: datetime) -> tuple[str, str]:
        cid = f"{self.prefix}{next(self._ids):04d}"
        return cid, f"MSH|^~\\&|GOLIVE|GOLIVE|HL7BRIDGE|CRM|{_hl7_time(at)}||{mtype}|{cid}|P|2.5.1"

    def _pid(self, p: Patient, *, full: bool, phone: str | None = None, email: str | None = None) -> str:
        head = f"PID|1||{p.pid3}^^^{self.authority}^MR||{p.last_name}^{p.first_name}||" \
               f"{p.birth_date.replace('-', '')}|{p.sex}"
        if not full:
            return head
        return f"{head}|||{p.address_line1}^^{p.city}^{p.state}^{p.postal_code}^USA^H||" \
               f"{_xtn(phone or p.phone)}~^NET^Internet^{email or p.email}"

    def adt(self, trigger: str, p: Patient, *, phone: str | None = None, email: str | None = None,
            at: datetime | None = None) -> tuple[str, bytes]:
        at = at or self.tick()
        cid, msh = self._msh(f"ADT^{trigger}^ADT_A01", at)
        segs = [msh, f"EVN|{trigger}|{_hl7_time(at)}", self._pid(p, full=True, phone=phone, email=email), "PV1|1|O"]
        return cid, ("\r".join(segs) + "\r").encode()

    def siu(self, trigger: str, p: Patient, appt: Appt, *, at: datetime | None = None) -> tuple[str, bytes]:
        at = at or self.tick()
        cid, msh = self._msh(f"SIU^{trigger}^SIU_S12", at)
        start, end = _hl7_time(appt.start), _hl7_time(appt.start + timedelta(minutes=appt.duration_minutes))
        # An S15 says "cancelled" through its trigger event alone (SCH-25 left empty, as many feeds do):
        # the rules must handle the event, which is the failure this step exists to catch.
        reason, status = ("PATCANCEL^Patient cancelled", "") if trigger == "S15" else ("", "Booked")
        segs = [msh,
                f"SCH|{appt.placer_id}^GOLIVE|{appt.appointment_id}^GOLIVE||||{reason}|FOLLOWUP^Follow-up visit|"
                f"OFFICE^Office visit|{appt.duration_minutes}|MIN|^^{appt.duration_minutes}^{start}^{end}"
                f"|||||||||||||{status}",
                self._pid(p, full=False), "RGS|1|A",
                f"AIS|1|A|99213^Office visit^CPT|{start}|0|MIN|{appt.duration_minutes}|MIN",
                f"AIL|1|A|{appt.location}^^^Golive Room|||{start}",
                f"AIP|1|A|{appt.provider}^Golive^Doctor^^^Dr.|ATTENDING|||{start}"]
        return cid, ("\r".join(segs) + "\r").encode()


@dataclass(frozen=True, slots=True)
class Appt:
    appointment_id: str
    placer_id: str
    start: datetime
    duration_minutes: int = 30
    location: str = "GLROOM1"
    provider: str = "GL900"


def make_patient(prefix: str, n: int, key_suffix: str = "") -> Patient:
    mrn = f"{prefix}-{n:03d}"
    return Patient(mrn=mrn + key_suffix, first_name=f"Test{n:03d}", last_name="Golive",
                    birth_date=f"19{50 + n % 50:02d}-0{1 + n % 9}-{10 + n % 18:02d}", sex="FM"[n % 2],
                    phone=f"+1217555{n % 100:04d}", email=f"{mrn.lower()}@golive.invalid",
                    address_line1=f"{n} Go-Live Street", city="Springfield", state="IL", postal_code="62704",
                    pid3=mrn)


def make_appt(prefix: str, n: int) -> Appt:
    day = (datetime.now(UTC) + timedelta(days=7 + n % 20)).date()
    start = datetime(day.year, day.month, day.day, 9 + n % 8, 30, tzinfo=_FACILITY_OFFSET)
    return Appt(f"{prefix}-A{n:03d}", f"{prefix}-P{n:03d}", start)
