from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import hl7
import pytest

from hl7bridge.errors import (
    AckCode,
    BadFieldValue,
    ErrCode,
    FramingError,
    Hl7BridgeError,
    JournalUnavailable,
    MappingError,
    MissingRequired,
    PermanentSinkError,
    TransientSinkError,
    UnreadableMessage,
    UnsupportedMessage,
)
from hl7bridge.hl7.ack import (
    ack_for,
    ack_requested,
    build_ack,
    error_location,
    new_control_id,
    parse_ack,
)
from hl7bridge.hl7.envelope import best_effort_envelope, scan, scan_bytes, validate
from hl7bridge.hl7.parse import encode
from hl7bridge.records import Envelope

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
GOOD = sorted(p for p in FIXTURES.glob("*.hl7") if not p.name.startswith(("bad_", "batch_")))
NOW = datetime(2026, 11, 15, 14, 30, 5, 123456, tzinfo=UTC)
PHI = (
    "Doe", "Jane", "Marie", "19800214", "123456", "E12345", "999-99-9999", "Main St", "5550123",
    "Müller", "Jürgen", "77001", "Nguyen", "Linh", "55501", "jane.doe",
)  # fmt: skip


def envelope_of(name: str) -> Envelope:
    return scan_bytes((FIXTURES / name).read_bytes())[0].envelope


A08 = envelope_of("adt_a08.hl7")  # original mode
A04 = envelope_of("adt_a04_enhanced.hl7")  # MSH-15 AL / MSH-16 NE: enhanced mode


def fields(ack: str, segment: str) -> list[str]:
    for line in ack.split("\r"):
        if line.startswith(segment):
            return line.split("|")
    raise AssertionError(f"no {segment}")


# --- original mode ----------------------------------------------------------------------------------


def test_aa_in_original_mode() -> None:
    ack = build_ack(A08, AckCode.AA, now=NOW)
    assert ack.endswith("\r") and ack.count("\r") == 2
    msh = fields(ack, "MSH")
    assert msh[1] == "^~\\&"
    assert msh[2:6] == ["HL7BRIDGE", "CRM", "EPIC", "NORTHCLINIC"]  # sender and receiver swapped
    assert msh[6] == "20261115143005.1234+0000"
    assert msh[8] == "ACK^A08^ACK"
    assert 0 < len(msh[9]) <= 20
    assert msh[10:12] == ["P", "2.5.1"]
    assert fields(ack, "MSA") == ["MSA", "AA", "MSG00002"]
    assert "ERR" not in ack


def test_python_hl7_reads_it_like_its_own_create_ack() -> None:
    for path in GOOD:
        envelope = envelope_of(path.name)
        ours = hl7.parse(build_ack(envelope, AckCode.AA, now=NOW))
        ref = hl7.parse(path.read_text(encoding="latin-1").replace("\n", "\r")).create_ack(
            "CA" if envelope.enhanced_mode else "AA"
        )
        for field in ("MSH.F1", "MSH.F2", "MSH.F3", "MSH.F4", "MSH.F5", "MSH.F6", "MSH.F9", "MSH.F11",
                      "MSH.F12", "MSA.F1", "MSA.F2"):  # fmt: skip
            assert str(ours[field]) == str(ref[field]), (path.name, field)
        assert str(ours["MSH.F10"]) != str(ref["MSH.F10"])


def test_empty_receiver_falls_back_to_our_defaults() -> None:
    original = replace(A08, receiving_application="", receiving_facility="")
    msh = fields(build_ack(original, AckCode.AA, sending_facility="CLINIC-CRM"), "MSH")
    assert msh[2:4] == ["HL7BRIDGE", "CLINIC-CRM"]


def test_timestamp_is_aware_and_keeps_the_given_offset() -> None:
    est = timezone(timedelta(hours=-5))
    assert fields(build_ack(A08, AckCode.AA, now=NOW.astimezone(est)), "MSH")[6] == "20261115093005.1234-0500"
    with pytest.raises(ValueError):
        build_ack(A08, AckCode.AA, now=datetime(2026, 1, 1))  # naive on purpose
    stamp = fields(build_ack(A08, AckCode.AA), "MSH")[6]
    assert re.fullmatch(r"\d{14}\.\d{4}[+-]\d{4}", stamp)


def test_control_ids_are_fresh_short_and_time_ordered() -> None:
    ids = [new_control_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 20 and i.isalnum() for i in ids)
    prefixes = [i[:9] for i in ids]
    assert prefixes == sorted(prefixes)
    assert fields(build_ack(A08, AckCode.AA), "MSH")[9] != fields(build_ack(A08, AckCode.AA), "MSH")[9]
    assert fields(build_ack(A08, AckCode.AA, control_id="FIXED1"), "MSH")[9] == "FIXED1"


def test_version_processing_id_and_charset_are_echoed() -> None:
    a28 = envelope_of("adt_a28.hl7")
    ack = build_ack(a28, AckCode.AA)
    msh = hl7.parse(ack).segment("MSH")
    assert (str(msh(11)), str(msh(12)), str(msh(18))) == ("P", "2.4", "8859/1")
    assert ack.split("\r")[0].count("|") == 17
    assert encode(ack, a28.charset) == ack.encode("latin-1")


def test_other_separators_are_honoured() -> None:
    text = (
        (FIXTURES / "adt_a08.hl7")
        .read_text()
        .translate(str.maketrans({"|": "#", "^": "$", "~": "%", "\\": "!", "&": "*"}))
    )
    original = scan(text).envelope
    error = MissingRequired("PID-3 has no MR | ^ & ~ \\ identifier", location="PID-3")
    ack = build_ack(original, AckCode.AE, error=error)
    assert ack.startswith("MSH#$%!*#HL7BRIDGE#CRM#EPIC#NORTHCLINIC#")
    assert "#ACK$A08$ACK#" in ack
    parsed = hl7.parse(ack)
    assert str(parsed["MSA.F1"]) == "AE"
    err = parsed.segment("ERR")
    assert str(err(2)) == "PID$1$3"
    assert str(err(3)(1)(1)) == "101"
    assert parsed.unescape(str(err(8))) == error.reason
    assert parse_ack(ack) == ("AE", "MSG00002", "101")


def test_no_original_gives_a_default_header() -> None:
    error = UnreadableMessage("message does not start with an MSH segment", location="MSH")
    ack = build_ack(None, AckCode.AR, error=error, now=NOW)
    msh = fields(ack, "MSH")
    assert msh[1:7] == ["^~\\&", "HL7BRIDGE", "", "", "", "20261115143005.1234+0000"]
    assert msh[8] == "ACK^^ACK"
    assert msh[10:12] == ["P", "2.5.1"]
    assert fields(ack, "MSA") == ["MSA", "AR", "", error.reason]
    assert fields(ack, "ERR")[2:5] == ["MSH^1", "102^Data type error^HL70357", "E"]
    hl7.parse(ack)


# --- NACKs ------------------------------------------------------------------------------------------


def test_nack_err_segment_fields() -> None:
    error = MissingRequired("PID-3 has no patient identifier (MRN)", location="PID-3")
    ack = build_ack(A08, error.ack_code, error=error)
    msa = fields(ack, "MSA")
    assert msa == ["MSA", "AE", "MSG00002", "PID-3 has no patient identifier (MRN)"]
    err = fields(ack, "ERR")
    assert err[1] == ""  # ERR-1 is for v2.4 and older
    assert err[2] == "PID^1^3"
    assert err[3] == "101^Required field missing^HL70357"
    assert err[4] == "E"
    assert err[8] == error.reason
    parsed = hl7.parse(ack)
    assert str(parsed["ERR.F3.R1.C3"]) == "HL70357"


def test_text_overrides_msa3_but_err8_keeps_the_reason() -> None:
    error = UnsupportedMessage("unsupported trigger event ADT^A99", err_code=ErrCode.UNSUPPORTED_EVENT)
    ack = build_ack(A08, AckCode.AR, error=error, text="not handled here")
    assert fields(ack, "MSA")[3] == "not handled here"
    assert fields(ack, "ERR")[3].startswith("201^")
    assert fields(ack, "ERR")[8] == "not handled here"


def test_escaping_in_free_text() -> None:
    error = MissingRequired("a|b^c~d&e\\f\nnext line", location="PID-3")
    parsed = hl7.parse(build_ack(A08, AckCode.AE, error=error))
    assert len(parsed.segment("ERR")) == 9
    # (python-hl7's unescape turns \.br\ into \r.)
    assert parsed.unescape(str(parsed.segment("MSA")(3))) == "a|b^c~d&e\\f\rnext line"


def test_msa3_is_cut_to_80_characters() -> None:
    ack = build_ack(A08, AckCode.AE, error=MissingRequired("x" * 200))
    assert len(fields(ack, "MSA")[3]) == 80
    assert len(fields(ack, "ERR")[8]) == 200


def test_nack_without_error_object_still_has_err() -> None:
    ack = build_ack(A08, AckCode.AE, text="something failed")
    assert fields(ack, "ERR")[3] == "207^Application internal error^HL70357"


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4"])
def test_old_versions_also_get_err1(version: str) -> None:
    error = MissingRequired("PID-3 has no patient identifier (MRN)", location="PID-3")
    ack = build_ack(replace(A08, version=version), AckCode.AE, error=error)
    assert fields(ack, "ERR")[1] == "PID^1^3^101&Required field missing&HL70357"
    assert fields(ack, "MSH")[11] == version
    # A v2.3 client that only reads ERR-1 still finds the code.
    v23 = ack.replace(fields(ack, "ERR")[3], "")
    assert parse_ack(v23) == ("AE", "MSG00002", "101")


@pytest.mark.parametrize(
    ("location", "erl"),
    [
        ("PID-3", "PID^1^3"),
        ("PID-3.1", "PID^1^3^1^1"),
        ("PID-3[2].1", "PID^1^3^2^1"),
        ("PID-3.4.1", "PID^1^3^1^4^1"),
        ("SCH", "SCH^1"),
        ("MSH-10", "MSH^1^10"),
        ("", ""),
        (None, ""),
        ("not a location", ""),
    ],
)
def test_error_location(location: str | None, erl: str) -> None:
    assert error_location(location) == erl


# --- enhanced mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [(AckCode.AA, "CA"), (AckCode.AE, "CE"), (AckCode.AR, "CR"), (AckCode.CA, "CA")],
)
def test_enhanced_mode_codes(code: AckCode, expected: str) -> None:
    ack = build_ack(A04, code, text="x")
    assert fields(ack, "MSA")[1] == expected
    assert fields(ack, "MSH")[17] == "UNICODE UTF-8"
    assert ("ERR" in ack) == (expected != "CA")


# --- ack_for / ack_requested / parse_ack ------------------------------------------------------------

ERRORS: list[Hl7BridgeError] = [
    FramingError("frame exceeds the size limit"),
    UnreadableMessage("message does not start with an MSH segment", location="MSH"),
    UnsupportedMessage("unsupported message type ORU", location="MSH-9"),
    UnsupportedMessage("unsupported HL7 version", err_code=ErrCode.UNSUPPORTED_VERSION, location="MSH-12"),
    MissingRequired("MSH-10 message control ID is empty", location="MSH-10"),
    MissingRequired("SCH segment is missing", err_code=ErrCode.SEGMENT_SEQUENCE, location="SCH"),
    BadFieldValue("PID-7 is not a date", location="PID-7"),
    BadFieldValue("PID-8 code not in table", err_code=ErrCode.TABLE_VALUE_NOT_FOUND, location="PID-8"),
    JournalUnavailable("journal unavailable"),
    MappingError("rules produced no key"),
    TransientSinkError("CRM timed out"),
    PermanentSinkError("CRM rejected the record"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: f"{e.kind}-{e.err_code.value}")
def test_ack_for_each_error_class(error: Hl7BridgeError) -> None:
    code, text = ack_for(A08, error)
    assert code is error.ack_code
    assert text == error.reason
    enhanced_code, _ = ack_for(A04, error)
    assert enhanced_code.value == "C" + error.ack_code.value[1]
    ack = build_ack(A08, code, error=error)
    assert parse_ack(ack) == (error.ack_code.value, "MSG00002", error.err_code.value)


def test_ack_for_success() -> None:
    assert ack_for(A08, None) == (AckCode.AA, "")
    assert ack_for(A04, None) == (AckCode.CA, "")
    assert ack_for(None, None) == (AckCode.AA, "")


@pytest.mark.parametrize(
    ("msh15", "code", "wanted"),
    [
        ("", AckCode.AA, True),
        ("AL", AckCode.CE, True),
        ("NE", AckCode.CA, False),
        ("NE", AckCode.CR, False),
        ("ER", AckCode.CA, False),
        ("ER", AckCode.CE, True),
        ("SU", AckCode.CA, True),
        ("SU", AckCode.CR, False),
        ("XX", AckCode.CA, True),
    ],
)
def test_ack_requested(msh15: str, code: AckCode, wanted: bool) -> None:
    assert ack_requested(replace(A04, accept_ack_type=msh15), code) is wanted
    assert ack_requested(None, code)


def test_parse_ack_accepts_newlines_and_framing() -> None:
    ack = build_ack(A08, AckCode.AA)
    assert parse_ack(ack.replace("\r", "\n")) == ("AA", "MSG00002", "")
    assert parse_ack("\x0b" + ack + "\x1c\r") == ("AA", "MSG00002", "")


@pytest.mark.parametrize("text", ["", "MSH|^~\\&|A|B", "PID|1"])
def test_parse_ack_without_msa(text: str) -> None:
    with pytest.raises(UnreadableMessage):
        parse_ack(text)


# --- PHI never leaves in a NACK ---------------------------------------------------------------------


def _mutations(text: str) -> list[str]:
    """Broken variants of a fixture, one per intake failure."""
    lines = text.split("\n")
    msh = lines[0].split("|")
    out = []
    for index, value in ((9, ""), (11, "9.9"), (10, "X"), (8, "ORU^R01"), (8, msh[8].replace("^", "^Z", 1))):
        broken = list(msh)
        broken[index] = value
        out.append("\n".join(["|".join(broken), *lines[1:]]))
    out.append("\n".join(["|".join(msh[:11]), *lines[1:]]))  # MSH too short: unreadable
    out.append("\n".join(line for line in lines if not line.startswith("PID")))
    out.append("\n".join(line for line in lines if not line.startswith("SCH")))
    out.append(text.replace("^MR", "^PI").replace("|55501|", "|55501^^^^PI|"))
    return out


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_no_phi_in_any_nack(path: Path) -> None:
    raw = path.read_bytes()
    text = raw.decode("latin-1")
    nacks = 0
    for variant in _mutations(text):
        try:
            scanned = scan(variant)
            validate(scanned)
        except Hl7BridgeError as error:
            envelope = scanned.envelope if not isinstance(error, UnreadableMessage) else None
            for original in (envelope, best_effort_envelope(variant.encode("latin-1"))):
                code, reason = ack_for(original, error)
                ack = build_ack(original, code, error=error, text=reason)
                nacks += 1
                leaked = [p for p in PHI if p in ack]
                assert not leaked, (path.name, error.kind, leaked)
    for error in ERRORS:
        ack = build_ack(envelope_of(path.name), error.ack_code, error=error)
        assert not [p for p in PHI if p in ack]
    assert nacks >= 12


def test_a_version_with_non_ascii_digits_still_gets_an_err_segment() -> None:
    # Found by the intake fuzz test: "²".isdigit() is True, but int("²") raised inside the ACK builder.
    raw = ("MSH|^~\\&|EPIC|NORTHCLINIC|HL7BRIDGE|CRM|20261115093000-0500||ADT^A04^ADT_A01|FZ1|P|\u00b2.5.1\r"
           "PID|1||100001^^^NORTHCLINIC^MR\r").encode("latin-1")
    env = best_effort_envelope(raw)
    err = UnsupportedMessage("HL7 version is not supported", err_code=ErrCode.UNSUPPORTED_VERSION)
    ack = build_ack(env, AckCode.AR, error=err)
    segments = ack.split("\r")
    assert segments[1].startswith("MSA|AR|FZ1")
    assert any(s.startswith("ERR|") and "203" in s for s in segments)
