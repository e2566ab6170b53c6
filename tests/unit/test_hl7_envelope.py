from __future__ import annotations

from pathlib import Path

import pytest

from hl7bridge.errors import AckCode, ErrCode, MissingRequired, UnreadableMessage, UnsupportedMessage
from hl7bridge.hl7.envelope import (
    DEFAULT_SUPPORTED,
    PatientIdPolicy,
    Scanned,
    best_effort_envelope,
    is_supported,
    patient_key,
    scan,
    scan_bytes,
    validate,
)
from hl7bridge.records import Envelope

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
GOOD = sorted(p for p in FIXTURES.glob("*.hl7") if not p.name.startswith(("bad_", "batch_")))
ENC = "^~\\&"
PHI = ("Doe", "Jane", "19800214", "123456", "E12345", "999-99-9999", "Müller", "77001", "Nguyen", "55501")


def text_of(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="latin-1")


def msg(*segments: str) -> str:
    return "\r".join(segments)


MSH = "MSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|20261115093000-0500||ADT^A08^ADT_A01|C1|P|2.5.1"


def with_pid3(pid3: str, msh: str = MSH) -> str:
    return msg(msh, "EVN|A08", f"PID|1||{pid3}||Doe^Jane")


# --- scanning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_every_fixture_scans_and_validates(path: Path) -> None:
    scanned, text = scan_bytes(path.read_bytes())
    assert scanned.envelope.control_id
    assert scanned.patient_key
    assert scanned.segment_ids[0] == "MSH"
    assert "\n" not in text
    validate(scanned)


def test_envelope_fields_of_a04() -> None:
    scanned, _ = scan_bytes((FIXTURES / "adt_a04_enhanced.hl7").read_bytes())
    assert scanned.envelope == Envelope(
        field_sep="|",
        encoding_chars=ENC,
        sending_application="EPIC",
        sending_facility="NORTHCLINIC",
        receiving_application="HL7BRIDGE",
        receiving_facility="CRM",
        message_time="20261115093000-0500",
        message_type="ADT",
        trigger="A04",
        structure="ADT_A01",
        control_id="MSG00001E",
        processing_id="P",
        version="2.5.1",
        accept_ack_type="AL",
        app_ack_type="NE",
        charset="UNICODE UTF-8",
    )
    assert scanned.envelope.enhanced_mode
    assert scanned.patient_key == "123456"  # the MR repetition, not the first (PI) one
    assert scanned.segment_ids == ("MSH", "EVN", "PID", "PV1")


def test_envelope_keeps_components_of_hd_fields_and_takes_first_of_repeating_ones() -> None:
    text = "MSH|^~\\&|EPIC^1.2.3^ISO|NC|||20260101||SIU^S14|X9|T^A|2.5.1^USA|||ER|AL||8859/1~UTF-8"
    env = scan(msg(text, "SCH|1", "PID|1||9^^^^MR")).envelope
    assert env.sending_application == "EPIC^1.2.3^ISO"
    assert (env.message_type, env.trigger, env.structure) == ("SIU", "S14", "")
    assert (env.processing_id, env.version, env.charset) == ("T", "2.5.1", "8859/1")
    assert (env.accept_ack_type, env.app_ack_type) == ("ER", "AL")


def test_latin1_fixture_is_decoded_by_its_msh18() -> None:
    scanned, text = scan_bytes((FIXTURES / "adt_a28.hl7").read_bytes())
    assert "Müller" in text
    assert scanned.envelope.charset == "8859/1"
    assert scanned.patient_key == "77001"  # PID-3 MR, not PID-2


@pytest.mark.parametrize("terminator", ["\n", "\r\n", "\r"])
def test_any_segment_terminator(terminator: str) -> None:
    text = text_of("siu_s12.hl7").replace("\n", terminator)
    scanned = scan(text)
    assert scanned.segment_ids == ("MSH", "SCH", "PID", "PV1", "RGS", "AIS", "AIL", "AIP")
    assert scanned.patient_key == "123456"
    scanned_bytes, _ = scan_bytes(text.encode())
    assert scanned_bytes == scanned


def test_other_separators() -> None:
    original = text_of("adt_a04.hl7")
    table = str.maketrans({"|": "#", "^": "$", "~": "%", "\\": "!", "&": "*"})
    assert not set("#$%!*") & set(original)
    scanned = scan(original.translate(table))
    assert (scanned.envelope.field_sep, scanned.envelope.encoding_chars) == ("#", "$%!*")
    assert scanned.envelope.trigger == "A04"
    assert scanned.envelope.structure == "ADT_A01"
    assert scanned.patient_key == "123456"
    validate(scanned)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "PID|1||123456^^^NC^MR",
        "EVN|A08\r" + MSH,  # MSH not first
        "MSHA^~\\&AEPICANC",  # alphanumeric MSH-1
        "MSH|^~^&|EPIC|NC|HL7BRIDGE|CRM|2026||ADT^A08|C1|P|2.5.1",  # repeated encoding char
        "MSH|^~|EPIC|NC|HL7BRIDGE|CRM|2026||ADT^A08|C1|P|2.5.1",  # too few encoding chars
        "MSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|2026||ADT^A08|C1|P",  # only 11 fields
    ],
)
def test_unreadable_headers(text: str) -> None:
    with pytest.raises(UnreadableMessage) as info:
        scan(text + "\rPID|1||123456^^^NC^MR||Doe^Jane")
    assert info.value.ack_code is AckCode.AR
    assert not any(p in info.value.reason for p in PHI)


def test_undecodable_bytes_are_unreadable() -> None:
    with pytest.raises(UnreadableMessage) as info:
        scan_bytes((FIXTURES / "bad_charset.hl7").read_bytes())
    assert info.value.location == "MSH-18"


def test_v21_trigger_comes_from_evn() -> None:
    text = msg("MSH|^~\\&|OLD|NC|||198901011200||ADT|C7|P|2.1", "EVN|A04|198901011200", "PID|1||42")
    scanned = scan(text)
    assert (scanned.envelope.message_type, scanned.envelope.trigger) == ("ADT", "A04")
    assert scanned.patient_key == "42"
    validate(scanned)


# --- patient key ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pid3", "policy", "key"),
    [
        ("E1^^^EPIC^PI~123456^^^NC^MR~999^^^SSA^SS", PatientIdPolicy(), "123456"),
        ("123456^^^NC^MR~777^^^OTHER^MR", PatientIdPolicy(), "123456"),  # first MR wins
        ("123456^^^NC^MR~777^^^OTHER^MR", PatientIdPolicy(assigning_authorities=("OTHER",)), "777"),
        ("123456^^^NC^MR", PatientIdPolicy(assigning_authorities=("OTHER",)), None),
        ("123456^^^^MR", PatientIdPolicy(assigning_authorities=("NC",)), None),
        ("123456^^^NC&1.2.840&ISO^MR", PatientIdPolicy(assigning_authorities=("NC",)), "123456"),
        ("123456^^^NC^MR", PatientIdPolicy(include_authority=True), "123456^NC"),
        ("123456^^^NC&1.2&ISO^MR", PatientIdPolicy(include_authority=True), "123456^NC"),
        ("123456^^^^MR", PatientIdPolicy(include_authority=True), "123456"),
        ("5^^^NC^MRN~6^^^NC^MR", PatientIdPolicy(type_codes=("MRN",)), "5"),
        ("E1^^^EPIC^PI", PatientIdPolicy(), None),
        ("55501", PatientIdPolicy(), "55501"),  # v2.3: one untyped identifier
        ("55501^^^EAST", PatientIdPolicy(), "55501"),
        ("55501", PatientIdPolicy(single_untyped_fallback=False), None),
        ("55501~55502", PatientIdPolicy(), None),  # several untyped: ambiguous
        ("55501~E1^^^EPIC^PI", PatientIdPolicy(), None),
        ("12\\T\\34^^^NC^MR", PatientIdPolicy(), "12&34"),  # escape-decoded
        ("^^^NC^MR~88^^^NC^MR", PatientIdPolicy(), "88"),  # empty CX-1 skipped
        ("", PatientIdPolicy(), None),
    ],
)
def test_patient_key_policy(pid3: str, policy: PatientIdPolicy, key: str | None) -> None:
    assert patient_key(pid3, ENC, "|", policy) == key
    assert scan(with_pid3(pid3), policy).patient_key == key


def test_never_pid2_pid4_pid18_pid19() -> None:
    pid = "PID|1|111^^^NC^MR|^^^^PI|222^^^NC^MR|Doe^Jane|||||||||||||333^^^NC^MR|444"
    assert scan(msg(MSH, pid)).patient_key is None
    scanned, _ = scan_bytes((FIXTURES / "bad_no_mrn.hl7").read_bytes())
    assert scanned.patient_key is None


def test_a40_key_is_the_surviving_patient_from_pid3() -> None:
    scanned = scan(text_of("adt_a40.hl7"))
    assert scanned.patient_key == "123456"
    assert scanned.segment_ids[-1] == "MRG"


# --- validation -------------------------------------------------------------------------------------


def _raises(text: str, exc: type[Exception], err: ErrCode, location: str, **kw: object) -> None:
    with pytest.raises(exc) as info:
        validate(scan(text), **kw)  # type: ignore[arg-type]
    error = info.value
    assert error.err_code is err  # type: ignore[attr-defined]
    assert error.location == location  # type: ignore[attr-defined]
    assert not any(p in str(error) for p in PHI)


def test_unsupported_type() -> None:
    _raises(
        text_of("bad_unsupported_type.hl7"), UnsupportedMessage, ErrCode.UNSUPPORTED_MESSAGE_TYPE, "MSH-9"
    )


def test_unsupported_trigger() -> None:
    text = with_pid3("1^^^NC^MR", MSH.replace("ADT^A08", "ADT^A99"))
    _raises(text, UnsupportedMessage, ErrCode.UNSUPPORTED_EVENT, "MSH-9")


@pytest.mark.parametrize("version", ["2.9", "3.0", "", "2.5.1x"])
def test_unsupported_version(version: str) -> None:
    text = with_pid3("1^^^NC^MR", MSH.replace("|2.5.1", f"|{version}"))
    _raises(text, UnsupportedMessage, ErrCode.UNSUPPORTED_VERSION, "MSH-12")


@pytest.mark.parametrize(
    "version", ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"]
)
def test_supported_versions(version: str) -> None:
    validate(scan(with_pid3("1^^^NC^MR", MSH.replace("|2.5.1", f"|{version}"))))


def test_unsupported_processing_id() -> None:
    text = with_pid3("1^^^NC^MR", MSH.replace("|C1|P|", "|C1|X|"))
    _raises(text, UnsupportedMessage, ErrCode.UNSUPPORTED_PROCESSING_ID, "MSH-11")
    validate(scan(text), processing_ids=frozenset({"X"}))


def test_missing_control_id() -> None:
    text = with_pid3("1^^^NC^MR", MSH.replace("|C1|", "||"))
    _raises(text, MissingRequired, ErrCode.REQUIRED_FIELD_MISSING, "MSH-10")


def test_missing_pid_segment() -> None:
    _raises(msg(MSH, "EVN|A08"), MissingRequired, ErrCode.SEGMENT_SEQUENCE, "PID")
    validate(scan(msg(MSH, "EVN|A08")), require_patient=False)


def test_missing_mrn() -> None:
    _raises(text_of("bad_no_mrn.hl7"), MissingRequired, ErrCode.REQUIRED_FIELD_MISSING, "PID-3")
    error = MissingRequired("x")
    assert error.ack_code is AckCode.AE


def test_siu_without_sch() -> None:
    text = text_of("siu_s15.hl7").replace("\nSCH|", "\nZZZ|")
    _raises(text, MissingRequired, ErrCode.SEGMENT_SEQUENCE, "SCH")


def test_accept_unsupported_marks_nothing_as_error() -> None:
    unsupported_type = scan(text_of("bad_unsupported_type.hl7"))
    validate(unsupported_type, accept_unsupported=True)
    assert not is_supported(unsupported_type.envelope, DEFAULT_SUPPORTED)
    no_patient = scan(msg(MSH.replace("ADT^A08", "ADT^A99"), "EVN|A99"))
    validate(no_patient, accept_unsupported=True)
    assert not is_supported(no_patient.envelope, DEFAULT_SUPPORTED)
    # Header errors still reject.
    with pytest.raises(UnsupportedMessage):
        validate(scan(with_pid3("1", MSH.replace("|2.5.1", "|9.9"))), accept_unsupported=True)


def test_custom_supported_table() -> None:
    scanned = scan(text_of("bad_unsupported_type.hl7"))
    validate(scanned, supported={"ORU": frozenset({"R01"})})
    assert is_supported(scanned.envelope, {"ORU": frozenset({"R01"})})


def test_default_supported_covers_the_go_live_events() -> None:
    assert {"A01", "A04", "A08", "A28", "A31", "A40", "A47"} <= DEFAULT_SUPPORTED["ADT"]
    assert {"S12", "S14", "S15", "S17", "S26"} <= DEFAULT_SUPPORTED["SIU"]


def test_scanned_is_frozen() -> None:
    scanned = scan(text_of("adt_a08.hl7"))
    assert isinstance(scanned, Scanned)
    with pytest.raises(AttributeError):
        scanned.patient_key = "x"  # type: ignore[misc]


# --- best effort header -----------------------------------------------------------------------------


def test_best_effort_envelope_from_undecodable_message() -> None:
    env = best_effort_envelope((FIXTURES / "bad_charset.hl7").read_bytes())
    assert env is not None
    assert (env.sending_application, env.control_id, env.trigger) == ("CERNER", "CER-884299", "A28")


def test_best_effort_envelope_from_short_msh() -> None:
    env = best_effort_envelope(b"MSH|^~\\&|EPIC|NC|||2026||ADT^A04|C55\rPID|broken")
    assert env is not None
    assert (env.control_id, env.trigger, env.version) == ("C55", "A04", "")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        (FIXTURES / "bad_no_msh.hl7").read_bytes(),
        (FIXTURES / "bad_separators.hl7").read_bytes(),
    ],
)
def test_best_effort_envelope_gives_up(raw: bytes) -> None:
    assert best_effort_envelope(raw) is None
