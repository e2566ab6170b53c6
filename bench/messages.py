"""The benchmark's message: a realistic ~1.6 KB ADT^A04 with a unique MSH-10 and a spread of MRNs.

Built once as a bytes template so that the load generator spends microseconds, not parse time, per
message: `%`-formatting three values into prebuilt bytes is the whole cost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

__all__ = ["PATIENTS", "SIZE", "control_id", "message", "messages", "run_tag"]

#: Distinct patients the MRNs cycle over (per-patient lanes need many keys to run in parallel).
PATIENTS = 20_000

_SEGMENTS = (
    "MSH|^~\\&|EPIC|NORTHCLINIC|HL7BRIDGE|CRM|20261115093000-0500||ADT^A04^ADT_A01|%(cid)s|P|2.5.1|||AL|NE"
    "||UNICODE UTF-8",
    "EVN|A04|20261115092955-0500|||JSMITH^Smith^Jane^^^^^^EPIC^^^^PROV",
    "PID|1||E%(mrn)s^^^EPIC^PI~%(mrn)s^^^NORTHCLINIC^MR~999-99-9999^^^SSA^SS||Doe%(fam)s^Jane^Marie^^Ms.||"
    "19800214|F|||123 Main St^Apt 4^Springfield^IL^62704^USA^H~PO Box 77^^Springfield^IL^62705^USA^M||"
    "^PRN^PH^^1^217^5550123~^NET^Internet^jane.doe@example.com|^WPN^PH^^1^217^5559876^22|EN|M|CHR|"
    "ACC778899|||N||||||||N",
    "PD1|||NORTH CLINIC^^1001|1234^Welby^Marcus^^^Dr.^^^NPI",
    "NK1|1|Doe^John^Q|SPO^Spouse^HL70063|123 Main St^Apt 4^Springfield^IL^62704^USA|^PRN^PH^^1^217^5550124"
    "||EC^Emergency Contact^HL70131",
    "PV1|1|O|NC-CLINIC^101^A^NORTHCLINIC||||1234^Welby^Marcus^^^Dr.|||MED||||1|||1234^Welby^Marcus^^^Dr.|OP|"
    "V%(mrn)s|||||||||||||||||||||||||20261115093000-0500",
    "PV2|||^Annual physical||||||20261115|||||||||||||N",
    "OBX|1|NM|8302-2^Body height^LN||165|cm^centimeter^UCUM|||||F|||20261115093000-0500",
    "OBX|2|NM|29463-7^Body weight^LN||62.5|kg^kilogram^UCUM|||||F|||20261115093000-0500",
    "AL1|1|DA|70618^Penicillin^RXNORM|MO|Hives|20100101",
    "AL1|2|FA|256349002^Peanut^SCT|SV|Anaphylaxis|20050301",
    "DG1|1||Z00.00^Encounter for general adult medical examination^I10|||A",
    "GT1|1||Doe^Jane^Marie||123 Main St^Apt 4^Springfield^IL^62704^USA|^PRN^PH^^1^217^5550123||19800214|F"
    "||SEL^Self^HL70063",
    "IN1|1|BCBS-PPO^Blue Cross PPO|60054|Blue Cross Blue Shield of Illinois|300 E Randolph St^^Chicago^IL^"
    "60601^USA||^WPN^PH^^1^800^5550100|GRP-4411|||||||Doe^Jane^Marie|SEL^Self^HL70063|19800214|"
    "123 Main St^Apt 4^Springfield^IL^62704^USA|||1||||||||||||||XYZ%(mrn)s",
)
_TEMPLATE = ("\r".join(_SEGMENTS) + "\r").encode("ascii")


def run_tag() -> str:
    """Four base-36 characters unique to this run, so MSH-10s never collide with an earlier run's."""
    n = (time.time_ns() // 1_000_000 ^ int.from_bytes(os.urandom(3), "big")) % 36**4
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    for _ in range(4):
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out


def control_id(prefix: str, conn: int, seq: int) -> str:
    """MSH-10: run/point prefix, connection, sequence — unique within a run by construction (≤ 20 chars)."""
    return f"{prefix}{conn:03d}{seq:08d}"


def message(cid: str, n: int) -> bytes:
    """The benchmark ADT^A04 for control ID `cid`; `n` picks the patient (MRN 100000 + n mod PATIENTS)."""
    mrn = 100_000 + n % PATIENTS
    return _TEMPLATE % {b"cid": cid.encode("ascii"), b"mrn": str(mrn).encode("ascii"),
                        b"fam": str(n % 97).encode("ascii")}


def messages(prefix: str, count: int) -> Iterator[bytes]:
    """`count` distinct messages, as for a replay file."""
    for i in range(count):
        yield message(control_id(prefix, 0, i), i)


#: Size of one message in bytes (the MSH-10 and MRN lengths vary by a byte or two).
SIZE = len(message(control_id("XXXXXX", 0, 0), 0))
