"""Opt-in strict validation (hl7apy): fixtures, each kind of structural problem, versions, Z-segments, and
reasons that name locations but never carry a value from the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from hl7bridge.errors import (
    AckCode,
    BadFieldValue,
    ErrCode,
    Hl7BridgeError,
    MissingRequired,
    UnreadableMessage,
    UnsupportedMessage,
)
from hl7bridge.hl7 import strict
from hl7bridge.hl7.envelope import DEFAULT_SUPPORTED, scan_bytes
from hl7bridge.hl7.strict import STRICT_VERSIONS, message_structure, validate_strict

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

#: Values of the synthetic messages below that must never appear in a reason.
NAME, GIVEN, MRN, DOB = "Zebulon", "Quixotica", "4815162342", "19800214"
PHI = (NAME, GIVEN, MRN, DOB, "QuixoteStreet")

MSH = "MSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|20261115093000-0500||ADT^A04^ADT_A01|CTRL0001|P|2.5.1"
EVN = "EVN|A04|20261115092955-0500"
PID = f"PID|1||{MRN}^^^NC^MR||{NAME}^{GIVEN}||{DOB}|F|||1 QuixoteStreet^^Springfield^IL^62704"
PV1 = "PV1|1|O"

SIU_MSH = "MSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|20261115094500-0500||SIU^S12^SIU_S12|CTRL0002|P|2.5.1"
SCH = "SCH|PL-1^EPIC|FL-1^EPIC||||ROUTINE^Routine|||||^^30^20261120143000-0500|||||1234^Welby||||1234^Welby"
SIU_PID = f"PID|1||{MRN}^^^NC^MR||{NAME}^{GIVEN}||{DOB}|F"
RESOURCES = ("RGS|1|A", "AIS|1|A|99213^Office visit^CPT", "AIL|1|A|NC-CLINIC^101", "AIP|1|A|1234^Welby|ATTENDING")


def msg(*segments: str) -> str:
    return "\r".join(segments)


def fixture(name: str) -> tuple[str, str]:
    """(decoded text, MSH-12) of a fixture, read the way intake reads a frame."""
    scanned, text = scan_bytes((FIXTURES / name).read_bytes())
    return text, scanned.envelope.version


def error_of(text: str, version: str = "2.5.1") -> Hl7BridgeError:
    with pytest.raises(Hl7BridgeError) as info:
        validate_strict(text, version)
    err = info.value
    assert err.reason.startswith("strict validation: ")
    for value in PHI:
        assert value not in str(err) and value not in err.reason and value not in (err.location or "")
    assert err.__context__ is None and err.__cause__ is None  # hl7apy's exceptions quote values
    return err


def set_field(text: str, segment: str, number: int, value: str) -> str:
    """`text` with field `number` of every `segment` set to `value` (not for MSH)."""
    segments = text.split("\r")
    for i, seg in enumerate(segments):
        if seg.startswith(segment + "|"):
            fields = seg.split("|")
            fields += [""] * (number + 1 - len(fields))
            fields[number] = value
            segments[i] = "|".join(fields)
    return "\r".join(segments)


# --- the fixtures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adt_a08.hl7", "adt_a28.hl7", "adt_a40.hl7"])
def test_conformant_fixtures_pass(name: str) -> None:
    validate_strict(*fixture(name))


# The other fixtures intake accepts are not conformant to the HL7 structures; strict validation says where.
KNOWN_PROBLEMS = [
    # PID-29 (death date/time, a TS) holds "N": the death indicator belongs one field later, in PID-30.
    ("adt_a04.hl7", BadFieldValue, ErrCode.DATA_TYPE, "PID-29", "PID-29 data type error (DTM) in segment 3"),
    ("adt_a04_enhanced.hl7", BadFieldValue, ErrCode.DATA_TYPE, "PID-29", "PID-29 data type error (DTM) in segment 3"),
    # AIL-3.4 (PL-4 facility, an HD whose IS is at most 20 long) holds the room description (PL-9's job).
    ("siu_s12.hl7", BadFieldValue, ErrCode.DATA_TYPE, "AIL-3.4",
     "AIL-3.4 exceeds the maximum length (20) in segment 7"),
    ("siu_s15.hl7", BadFieldValue, ErrCode.DATA_TYPE, "AIL-3.4",
     "AIL-3.4 exceeds the maximum length (20) in segment 6"),
    # v2.3 TN is "(999)999-9999": no space after the area code.
    ("siu_s12_no_offset.hl7", BadFieldValue, ErrCode.DATA_TYPE, "PID-13", "PID-13 data type error (TN) in segment 3"),
]


@pytest.mark.parametrize(("name", "cls", "code", "location", "reason"), KNOWN_PROBLEMS,
                         ids=[p[0] for p in KNOWN_PROBLEMS])
def test_nonconformant_fixtures_are_reported_precisely(
    name: str, cls: type[Hl7BridgeError], code: ErrCode, location: str, reason: str
) -> None:
    text, version = fixture(name)
    with pytest.raises(cls) as info:
        validate_strict(text, version)
    assert info.value.err_code == code
    assert info.value.location == location
    assert info.value.reason == f"strict validation: {reason}"


def test_adt_a04_passes_once_pid_30_holds_the_death_indicator() -> None:
    text, version = fixture("adt_a04.hl7")
    validate_strict(set_field(set_field(text, "PID", 29, ""), "PID", 30, "N"), version)


def _room_in_pl9(text: str) -> str:
    return text.replace("NC-CLINIC^101^^North Clinic Room 101", "NC-CLINIC^101^^^^^^^North Clinic Room 101")


def _start_in_aip6(text: str) -> str:
    return text.replace("ATTENDING|||2026", "ATTENDING||2026")


#: Each fixture's problems in the order strict validation finds them, with the correction for each.
CORRECTIONS = {
    "siu_s12.hl7": [
        ("AIL-3.4", _room_in_pl9),
        ("AIP-7", _start_in_aip6),  # AIP-7 is the start offset (NM): the start time belongs in AIP-6
        ("SCH-6", lambda t: set_field(t, "SCH", 6, "ROUTINE^Routine")),  # event reason: required
        ("SCH-20", lambda t: set_field(t, "SCH", 20, "1234^Welby")),  # entered by: required
    ],
    "siu_s15.hl7": [
        ("AIL-3.4", _room_in_pl9),
        ("SCH-20", lambda t: set_field(t, "SCH", 20, "1234^Welby")),
    ],
    "siu_s12_no_offset.hl7": [
        ("PID-13", lambda t: t.replace("(617) 555-0102", "(617)555-0102")),
        ("SCH-6", lambda t: set_field(t, "SCH", 6, "X^Y")),  # required in v2.3, as are SCH-16 and SCH-20
        ("SCH-16", lambda t: set_field(t, "SCH", 16, "X^Y")),
        ("SCH-20", lambda t: set_field(t, "SCH", 20, "X^Y")),
        ("RGS", lambda t: t.replace("\rAIL|", "\rRGS|1\rAIL|")),  # the resources group starts with RGS
        ("AIP-4", lambda t: set_field(t, "AIP", 4, "ATTENDING")),  # resource role: required in v2.3
    ],
}


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_siu_fixtures_pass_once_corrected(name: str) -> None:
    text, version = fixture(name)
    for location, correct in CORRECTIONS[name]:
        with pytest.raises(Hl7BridgeError) as info:
            validate_strict(text, version)
        assert info.value.location == location
        text = correct(text)
    validate_strict(text, version)


# --- each kind of problem ----------------------------------------------------------------------------


def test_a_conformant_message_passes() -> None:
    validate_strict(msg(MSH, EVN, PID, PV1), "2.5.1")
    validate_strict(msg(SIU_MSH, SCH, SIU_PID, *RESOURCES), "2.5.1")


@pytest.mark.parametrize(
    ("segments", "location"),
    [
        ((MSH, EVN, f"PID|1||||{NAME}^{GIVEN}||{DOB}|F", PV1), "PID-3"),
        ((MSH, EVN, f"PID|1||{MRN}^^^NC^MR||||{DOB}|F", PV1), "PID-5"),
    ],
    ids=["PID-3", "PID-5"],
)
def test_required_field_missing_is_101(segments: tuple[str, ...], location: str) -> None:
    err = error_of(msg(*segments))
    assert isinstance(err, MissingRequired) and err.ack_code == AckCode.AE
    assert err.err_code == ErrCode.REQUIRED_FIELD_MISSING and err.location == location
    assert err.reason == f"strict validation: required field {location} missing in segment 3"


def test_empty_msh9_is_101() -> None:
    err = error_of(msg(MSH.replace("ADT^A04^ADT_A01", ""), EVN, PID, PV1))
    assert isinstance(err, MissingRequired)
    assert (err.err_code, err.location) == (ErrCode.REQUIRED_FIELD_MISSING, "MSH-9")


def test_required_component_missing_is_101() -> None:
    # From v2.6 on CX-1 (the ID number) is required.
    err = error_of(msg(MSH.replace("2.5.1", "2.6"), EVN, f"PID|1||^^^NC^MR||{NAME}^{GIVEN}||{DOB}|F", PV1), "2.6")
    assert isinstance(err, MissingRequired) and err.err_code == ErrCode.REQUIRED_FIELD_MISSING
    assert err.reason == "strict validation: required component CX-1 missing in PID-3 in segment 3"


def test_required_segment_missing_is_100() -> None:
    err = error_of(msg(MSH, EVN, PID))
    assert isinstance(err, MissingRequired) and err.err_code == ErrCode.SEGMENT_SEQUENCE
    assert err.reason == "strict validation: required segment PV1 missing in ADT_A01"
    err = error_of(msg(SIU_MSH, SCH, SIU_PID, "AIS|1|A|99213^Office visit^CPT"))  # a resources group without RGS
    assert err.err_code == ErrCode.SEGMENT_SEQUENCE and err.location == "RGS"


@pytest.mark.parametrize(
    ("segments", "reason"),
    [
        ((MSH, EVN, PV1, PID), "segment sequence error at segment 4 (PID): out of order"),
        ((MSH, PID, EVN, PV1), "segment sequence error at segment 3 (EVN): out of order"),
        ((MSH, EVN, PID, "NK1|1|Doe", PV1, "NK1|2|Doe"), "segment sequence error at segment 6 (NK1): out of order"),
        ((SIU_MSH, SCH, "PV1|1|O", SIU_PID, *RESOURCES), "segment sequence error at segment 4 (PID): out of order"),
        ((MSH, EVN, PID, PID, PV1),
         "segment sequence error at segment 4 (PID): repeats more often than the structure allows"),
    ],
    ids=["PV1-before-PID", "PID-before-EVN", "NK1-split", "in-a-group", "PID-twice"],
)
def test_segment_out_of_order_is_100(segments: tuple[str, ...], reason: str) -> None:
    # hl7apy itself places segments by name and never checks their order: this is checked on its tree.
    err = error_of(msg(*segments))
    assert isinstance(err, MissingRequired) and err.ack_code == AckCode.AE
    assert err.err_code == ErrCode.SEGMENT_SEQUENCE
    assert err.reason == f"strict validation: {reason}"


@pytest.mark.parametrize(
    ("segments", "reason", "location"),
    [
        ((MSH, EVN, PID.replace(DOB, GIVEN), PV1), "PID-7 data type error (DTM) in segment 3", "PID-7"),
        ((MSH, EVN, PID + "|" * 14 + NAME, PV1), "PID-25 data type error (NM) in segment 3", "PID-25"),
        ((MSH, EVN, PID.replace("PID|1|", f"PID|{NAME}|"), PV1), "PID-1 data type error (SI) in segment 3", "PID-1"),
        ((MSH, EVN, PID.replace("^NC^", f"^{NAME * 3}^"), PV1),
         "PID-3.4 exceeds the maximum length (20) in segment 3", "PID-3.4"),
        ((MSH, EVN, PID.replace("PID|1|", "PID|1~2|"), PV1),
         "PID-1 repeats but is not repeatable in segment 3", "PID-1"),
        ((MSH, EVN, PID + "|" * 40 + NAME, PV1), "PID-51 is not defined in HL7 2.5.1 in segment 3", "PID-51"),
        ((MSH, EVN, PID.replace(DOB, f"{DOB}^Y^{NAME}"), PV1), "PID-7.3 is not defined in HL7 2.5.1 in segment 3",
         "PID-7.3"),
    ],
    ids=["letters-in-DTM", "letters-in-NM", "letters-in-SI", "too-long", "repeated", "extra-field", "extra-component"],
)
def test_wrong_data_type_is_102(segments: tuple[str, ...], reason: str, location: str) -> None:
    err = error_of(msg(*segments))
    assert isinstance(err, BadFieldValue) and err.ack_code == AckCode.AE
    assert err.err_code == ErrCode.DATA_TYPE and err.location == location
    assert err.reason == f"strict validation: {reason}"


def test_withdrawn_field_must_be_empty() -> None:
    err = error_of(msg(MSH.replace("2.5.1", "2.7"), EVN, PID, PV1), "2.7")  # EVN-1 is withdrawn in v2.7
    assert isinstance(err, BadFieldValue) and err.location == "EVN-1"
    assert err.reason == "strict validation: EVN-1 is withdrawn in HL7 2.7 and must be empty in segment 2"


@pytest.mark.parametrize("segment", [f"XYZ|{NAME}", f"{NAME} {GIVEN}", f"PIDX|{NAME}", "ZP"])
def test_unknown_segment_in_the_middle_is_100(segment: str) -> None:
    err = error_of(msg(MSH, EVN, PID, segment, PV1))
    assert isinstance(err, MissingRequired) and err.err_code == ErrCode.SEGMENT_SEQUENCE
    assert err.reason == "strict validation: segment sequence error at segment 4: not an HL7 2.5.1 segment"


def test_segment_not_in_the_structure_is_100() -> None:
    # hl7apy silently drops a segment it cannot place; every segment must be in its tree.
    err = error_of(msg(MSH, EVN, PID, f"OBR|1|{NAME}", PV1))
    assert isinstance(err, MissingRequired) and err.err_code == ErrCode.SEGMENT_SEQUENCE
    assert err.reason == ("strict validation: segment sequence error at segment 4 (OBR): "
                          "OBR is not allowed here in ADT_A01")


@pytest.mark.parametrize(
    "segments",
    [
        (MSH, EVN, PID, PV1, f"ZPI|1|{NAME}|{MRN}"),  # at the end: the usual place
        (MSH, EVN, PID, f"ZPD|1|{NAME}", PV1, "ZV1|x"),  # after PID, as Epic sends them
        (SIU_MSH, SCH, SIU_PID, "RGS|1|A", f"ZRG|{NAME}", *RESOURCES[1:]),  # inside a group
        (MSH, EVN, PID, PV1, "ZPI"),  # no fields at all
    ],
    ids=["end", "middle", "in-a-group", "bare"],
)
def test_z_segments_are_tolerated(segments: tuple[str, ...]) -> None:
    validate_strict(msg(*segments), "2.5.1")


def test_z_segments_still_count_in_segment_numbers() -> None:
    err = error_of(msg(MSH, "ZAA|1", EVN, PV1, PID))
    assert err.reason == "strict validation: segment sequence error at segment 5 (PID): out of order"


# --- versions and message structures -----------------------------------------------------------------


@pytest.mark.parametrize(("version", "shown"), [("2.1", "2.1"), ("2.9", "2.9"), ("3.0", "3.0"), ("", "(invalid)"),
                                                (NAME, "(invalid)"), (f"2.5.1 {MRN}", "(invalid)")])
def test_unsupported_version_is_203(version: str, shown: str) -> None:
    err = error_of(msg(MSH, EVN, PID, PV1), version)
    assert isinstance(err, UnsupportedMessage) and err.ack_code == AckCode.AR
    assert (err.err_code, err.location) == (ErrCode.UNSUPPORTED_VERSION, "MSH-12")
    assert err.reason == f"strict validation: HL7 version {shown} in MSH-12 is not supported"


def test_supported_versions() -> None:
    # 2.1 is left out: hl7apy's v2.1 TS makes TS-2 required, so every v2.1 MSH-7 would fail.
    assert {"2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1", "2.8.2"} == STRICT_VERSIONS


def test_v22_takes_the_trigger_from_evn() -> None:
    validate_strict(msg(MSH.replace("ADT^A04^ADT_A01", "ADT").replace("2.5.1", "2.2"), EVN,
                        f"PID|1||{MRN}||{NAME}^{GIVEN}||{DOB}|F", PV1), "2.2")


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6"])
def test_every_event_hl7bridge_supports_has_a_structure(version: str) -> None:
    for message_type, triggers in DEFAULT_SUPPORTED.items():
        for trigger in triggers:
            if (version, trigger) == ("2.4", "A12"):  # hl7apy's v2.4 has no ADT_A12
                continue
            assert message_structure([message_type, trigger], version)


@pytest.mark.parametrize(
    ("msh9", "version", "structure"),
    [
        (["ADT", "A04"], "2.5.1", "ADT_A01"),
        (["ADT", "A28"], "2.5.1", "ADT_A05"),
        (["ADT", "A28"], "2.3", "ADT_A01"),  # no ADT_A05 before v2.4
        (["ADT", "A40"], "2.5.1", "ADT_A39"),
        (["SIU", "S15"], "2.3", "SIU_S12"),
        (["ADT", "A04"], "2.2", "ADT_A04"),
        (["ADT", "A04", "ADT_A05"], "2.5.1", "ADT_A05"),  # MSH-9.3 wins
    ],
)
def test_message_structure(msh9: list[str], version: str, structure: str) -> None:
    assert message_structure(msh9, version) == structure


def test_unknown_structure_in_msh93_is_200() -> None:
    err = error_of(msg(MSH.replace("ADT_A01", NAME), EVN, PID, PV1))
    assert isinstance(err, UnsupportedMessage) and err.err_code == ErrCode.UNSUPPORTED_MESSAGE_TYPE
    assert err.reason == "strict validation: message structure (invalid) (MSH-9.3) is not defined in HL7 2.5.1"
    err = error_of(msg(MSH.replace("2.5.1", "2.3"), EVN, PID, PV1).replace("ADT_A01", "ADT_A05"), "2.3")
    assert err.reason == "strict validation: message structure ADT_A05 (MSH-9.3) is not defined in HL7 2.3"


def test_unknown_trigger_is_201() -> None:
    err = error_of(msg(MSH.replace("ADT^A04^ADT_A01", "ADT^Z99"), EVN, PID, PV1))
    assert isinstance(err, UnsupportedMessage) and err.err_code == ErrCode.UNSUPPORTED_EVENT
    assert err.reason == "strict validation: no HL7 2.5.1 message structure for ADT^Z99"
    err = error_of(msg(MSH.replace("ADT^A04^ADT_A01", f"{NAME}^{GIVEN}"), EVN, PID, PV1))
    assert err.reason == "strict validation: no HL7 2.5.1 message structure for (invalid)^(invalid)"


def test_no_msh_is_unreadable() -> None:
    with pytest.raises(UnreadableMessage):
        validate_strict(msg(EVN, PID, PV1), "2.5.1")


# --- hl7apy failing in ways it should not --------------------------------------------------------------


@pytest.mark.parametrize("exc", [AttributeError("x"), KeyError(NAME), IndexError(), TypeError(), RecursionError()])
def test_a_crash_inside_hl7apy_is_a_clear_nack(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    def boom(*_args: object, **_kw: object) -> None:
        raise exc

    monkeypatch.setattr(strict, "parse_segments", boom)
    err = error_of(msg(MSH, EVN, PID, PV1))
    assert isinstance(err, UnreadableMessage) and err.ack_code == AckCode.AR
    assert err.err_code == ErrCode.INTERNAL
    assert err.reason == "strict validation: the validator failed on this message"


def test_a_crash_inside_hl7apys_validator_is_a_clear_nack(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object, **_kw: object) -> None:
        raise AttributeError(NAME)

    monkeypatch.setattr(strict.Validator, "validate", staticmethod(boom))
    err = error_of(msg(MSH, EVN, PID, PV1))
    assert isinstance(err, UnreadableMessage) and err.err_code == ErrCode.INTERNAL


def test_an_unexpected_validation_error_text_still_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    from hl7apy.exceptions import ValidationError

    def odd(*_args: object, **_kw: object) -> None:
        raise ValidationError(f"something new about {NAME}")

    monkeypatch.setattr(strict.Validator, "validate", staticmethod(odd))
    err = error_of(msg(MSH, EVN, PID, PV1))
    assert isinstance(err, BadFieldValue) and err.err_code == ErrCode.DATA_TYPE
