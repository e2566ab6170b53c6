"""Builders for synthetic HL7 messages used by the integration tests (segments joined by CR)."""

from __future__ import annotations

import itertools

_counter = itertools.count(1)


def control_id(prefix: str = "T") -> str:
    return f"{prefix}{next(_counter):08d}"


def adt(
    trigger: str = "A04",
    *,
    mrn: str = "100001",
    cid: str | None = None,
    family: str = "Doe",
    given: str = "Jane",
    phone: str = "^PRN^PH^^1^217^5550123",
    when: str = "20261115093000-0500",
    dob: str = "19800214",
    sex: str = "F",
    app: str = "EPIC",
    facility: str = "NORTHCLINIC",
    extra: str = "",
) -> bytes:
    cid = cid or control_id()
    segs = [
        f"MSH|^~\\&|{app}|{facility}|HL7BRIDGE|CRM|{when}||ADT^{trigger}^ADT_A01|{cid}|P|2.5.1",
        f"EVN|{trigger}|{when}",
        f"PID|1||{mrn}^^^{facility}^MR||{family}^{given}||{dob}|{sex}|||1 Main St^^Springfield^IL^62704||{phone}",
        "PV1|1|O",
    ]
    if extra:
        segs.append(extra)
    return ("\r".join(segs) + "\r").encode()


def siu(
    trigger: str = "S12",
    *,
    appt: str = "A-1",
    mrn: str = "100001",
    cid: str | None = None,
    start: str = "20261120143000-0500",
    when: str = "20261115094500-0500",
    status: str = "Booked",
    facility: str = "NORTHCLINIC",
) -> bytes:
    cid = cid or control_id()
    segs = [
        f"MSH|^~\\&|EPIC|{facility}|HL7BRIDGE|CRM|{when}||SIU^{trigger}^SIU_S12|{cid}|P|2.5.1",
        f"SCH|P{appt}|{appt}|||||FOLLOWUP^Follow-up visit|OFFICE|30|MIN|^^30^{start}|||||||||||||{status}",
        f"PID|1||{mrn}^^^{facility}^MR||Doe^Jane||19800214|F",
        "RGS|1|A",
        f"AIS|1|A|99213^Office visit^CPT|{start}|0|MIN|30|MIN",
        "AIL|1|A|ROOM-101^^^North Room 101",
        "AIP|1|A|1234^Welby^Marcus^^^Dr.|ATTENDING",
    ]
    return ("\r".join(segs) + "\r").encode()
