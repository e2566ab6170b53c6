"""Field values through the default rules: phones, e-mail, names, sex, clearing, durations, statuses, errors."""

from __future__ import annotations

import hl7
import pytest

from hl7bridge.errors import BadFieldValue, ErrCode, MissingRequired
from hl7bridge.mapping import DEFAULT_RULES_PATH, Mapper, compile_rules, load_rules, parse_rules
from hl7bridge.records import CrmOp

MSH_ADT = "MSH|^~\\&|EPIC|NORTHCLINIC|HL7BRIDGE|CRM|20261116101500-0500||ADT^{ev}^ADT_A01|1|P|2.5.1\nEVN|{ev}|{evn}\n"
MSH_SIU = "MSH|^~\\&|EPIC|NORTHCLINIC|HL7BRIDGE|CRM|20261116101500-0500||SIU^{ev}^SIU_S12|1|P|2.5.1\n"


def parse(text: str) -> hl7.Message:
    return hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r"))


@pytest.fixture(scope="module")
def mapper() -> Mapper:
    return compile_rules(load_rules(None), default_timezone="America/Chicago")


def custom(*replacements: tuple[str, str]) -> Mapper:
    text = DEFAULT_RULES_PATH.read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return compile_rules(parse_rules(text, "custom.yaml"), default_timezone="America/Chicago")


def adt(mapper: Mapper, pid: str, ev: str = "A08", evn: str = "20261116101455-0500", extra: str = "") -> CrmOp:
    result = mapper.map(parse(MSH_ADT.format(ev=ev, evn=evn) + pid + extra))
    assert isinstance(result, list) and len(result) == 1, result
    return result[0]


def siu(mapper: Mapper, body: str, ev: str = "S12") -> CrmOp:
    result = mapper.map(parse(MSH_SIU.format(ev=ev) + body))
    assert isinstance(result, list) and len(result) == 1, result
    return result[0]


def contact(mapper: Mapper, tail: str) -> dict[str, object]:
    op = adt(mapper, "PID|1||123456^^^NORTHCLINIC^MR||" + tail)
    return {k: v.value for k, v in op.fields.items()}


# --- phone and e-mail -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pid13", "phone"),
    [
        ("~^PRN^PH^^1^217^5550199", "+12175550199"),  # empty first repetition: look at the next
        ("^NET^Internet^x@y.example~^PRN^PH^^^217^555-0199", "+12175550199"),  # e-mail first, default country 1
        ("^PRN^FX^^1^217^5550100~^PRN^CP^^1^217^5550199", "+12175550199"),  # fax is not a voice number
        ("^PRN^PH^^1^217^5550199^42", "+12175550199"),  # the extension is dropped
        ("(217) 555-0199 x42^PRN^PH", "+12175550199"),  # free text with an extension
        ("^PRN^PH^^44^20^79460958", "+442079460958"),
        ("+44 20 7946 0958", "+442079460958"),
    ],
)
def test_phone_to_e164(mapper: Mapper, pid13: str, phone: str) -> None:
    assert contact(mapper, f"Doe^Jane||19800214|F|||||{pid13}")["phone"] == phone


def test_email_only_leaves_phone_unchanged(mapper: Mapper) -> None:
    got = contact(mapper, "Doe^Jane||19800214|F|||||^NET^Internet^Jane.Doe@Example.COM")
    assert "phone" not in got
    assert got["email"] == "Jane.Doe@example.com"


def test_invalid_phone_is_a_data_type_error_without_the_value(mapper: Mapper) -> None:
    with pytest.raises(BadFieldValue) as info:
        contact(mapper, "Doe^Jane||19800214|F|||||call the front desk^PRN^PH")
    assert (info.value.err_code, info.value.location) == (ErrCode.DATA_TYPE, "PID-13")
    assert "front desk" not in str(info.value)


def test_invalid_phone_ignored_when_configured() -> None:
    lenient = custom(("args: {on_invalid: error}", "args: {on_invalid: ignore}"))
    got = contact(lenient, "Doe^Jane||19800214|F|||||unknown~^ORN^PH^^1^217^5550199")
    assert got["phone"] == "+12175550199"


def test_invalid_email_is_rejected(mapper: Mapper) -> None:
    with pytest.raises(BadFieldValue) as info:
        contact(mapper, "Doe^Jane||19800214|F|||||^NET^Internet^not-an-address")
    assert info.value.location == "PID-13.4"


def test_phone_region_setting_for_free_text() -> None:
    uk = custom(("default_region: US", "default_region: GB"))
    assert contact(uk, "Doe^Jane||19800214|F|||||020 7946 0958")["phone"] == "+442079460958"


# --- clearing versus leaving alone ---------------------------------------------------------------------


def test_explicit_null_pid13_clears_phone_and_email(mapper: Mapper) -> None:
    got = contact(mapper, 'Doe^Jane||19800214|F|||||""')
    assert got["phone"] is None and got["email"] is None
    assert got["first_name"] == "Jane"


def test_explicit_null_pid11_clears_all_four_address_fields(mapper: Mapper) -> None:
    got = contact(mapper, 'Doe^Jane||19800214|F|||""')
    assert {k: got[k] for k in ("address_line1", "city", "state", "postal_code")} == dict.fromkeys(
        ("address_line1", "city", "state", "postal_code")
    )


def test_empty_fields_change_nothing(mapper: Mapper) -> None:
    got = contact(mapper, "Doe^Jane")
    assert set(got) == {"first_name", "last_name"}


def test_null_component_clears_only_that_field(mapper: Mapper) -> None:
    got = contact(mapper, 'Doe^""||19800214')
    assert got["first_name"] is None and got["last_name"] == "Doe"


# --- names and sex -------------------------------------------------------------------------------------


def test_escape_sequences_in_names(mapper: Mapper) -> None:
    got = contact(mapper, "O\\F\\Brien\\T\\Smith^Ren\\XC3A9\\e\\H\\x\\N\\")
    assert got["last_name"] == "O|Brien&Smith"
    assert got["first_name"] == "Renéex"


def test_names_are_stored_as_sent_unless_casing_is_configured(mapper: Mapper) -> None:
    assert contact(mapper, "MCDONALD^MARY-ANN")["last_name"] == "MCDONALD"
    titled = custom(*[("args: {case: as_sent}", "args: {case: title}")])
    got = contact(titled, "MCDONALD^MARY-ANN")
    assert (got["last_name"], got["first_name"]) == ("McDonald", "Mary-Ann")
    assert contact(titled, "O'BRIEN^JO")["last_name"] == "O'Brien"


@pytest.mark.parametrize(("code", "sex"), [("F", "F"), ("M", "M"), ("O", "O"), ("U", "U"), ("A", "O"), ("N", "U"),
                                           ("f", "F")])
def test_sex_codes(mapper: Mapper, code: str, sex: str) -> None:
    assert contact(mapper, f"Doe^Jane||19800214|{code}")["sex"] == sex


def test_unknown_sex_code_is_table_value_not_found(mapper: Mapper) -> None:
    with pytest.raises(BadFieldValue) as info:
        contact(mapper, "Doe^Jane||19800214|X")
    assert (info.value.err_code, info.value.location) == (ErrCode.TABLE_VALUE_NOT_FOUND, "PID-8")


def test_code_table_default_instead_of_error() -> None:
    lenient = custom(('"A": "O", "N": "U"}', '"A": "O", "N": "U"}\n    default: U'))
    assert contact(lenient, "Doe^Jane||19800214|X")["sex"] == "U"


def test_birth_date_keeps_the_calendar_day(mapper: Mapper) -> None:
    assert contact(mapper, "Doe^Jane||198002142330-0800")["birth_date"] == "1980-02-14"
    with pytest.raises(BadFieldValue) as info:
        contact(mapper, "Doe^Jane||1980")
    assert info.value.location == "PID-7"


# --- the patient identifier ------------------------------------------------------------------------------


def test_mrn_is_never_another_identifier(mapper: Mapper) -> None:
    with pytest.raises(MissingRequired) as info:
        adt(mapper, "PID|1|123^^^X^MR|E1^^^EPIC^PI~999^^^SSA^SS|777^^^X^MR||Doe")
    assert (info.value.err_code, info.value.location) == (ErrCode.REQUIRED_FIELD_MISSING, "PID-3")


def test_missing_pid_is_a_segment_error(mapper: Mapper) -> None:
    with pytest.raises(MissingRequired) as info:
        adt(mapper, "PV1|1|O")
    assert (info.value.err_code, info.value.location) == (ErrCode.SEGMENT_SEQUENCE, "PID")


def test_assigning_authority_and_key_with_authority() -> None:
    strict = custom(
        ("assigning_authorities: []", "assigning_authorities: [SOUTH]"),
        ("include_authority: false", "include_authority: true"),
    )
    op = adt(strict, "PID|1||1^^^NORTH^MR~2^^^SOUTH^MR||Doe")
    assert op.key == "2^SOUTH"
    assert strict.patient_policy.assigning_authorities == ("SOUTH",)
    assert strict.patient_key(parse(MSH_ADT.format(ev="A08", evn="") + "PID|1||2^^^SOUTH^MR")) == "2^SOUTH"


# --- event time --------------------------------------------------------------------------------------------


def test_event_time_falls_back_to_msh7(mapper: Mapper) -> None:
    op = adt(mapper, "PID|1||1^^^^MR||Doe", evn="")
    assert op.event_time.isoformat() == "2026-11-16T10:15:00-05:00"


def test_bad_event_time_is_a_data_type_error(mapper: Mapper) -> None:
    with pytest.raises(BadFieldValue) as info:
        adt(mapper, "PID|1||1^^^^MR||Doe", evn="yesterday")
    assert info.value.location == "EVN-2.1"


# --- merges and identifier changes ---------------------------------------------------------------------


def test_a47_changes_the_identifier(mapper: Mapper) -> None:
    op = adt(mapper, "PID|1||NEW1^^^NORTHCLINIC^MR||Doe^Jane", ev="A47", extra="\nMRG|OLD1^^^NORTHCLINIC^MR")
    assert (op.action, op.key, op.prior_key) == ("change_id", "NEW1", "OLD1")


def test_a40_with_several_patient_groups(mapper: Mapper) -> None:
    msg = parse(MSH_ADT.format(ev="A40", evn="") + "PID|1||1^^^^MR\nMRG|2^^^^MR\nPID|2||3^^^^MR\nMRG|4^^^^MR")
    result = mapper.map(msg)
    assert isinstance(result, list)
    assert [(o.key, o.prior_key) for o in result] == [("1", "2"), ("3", "4")]


def test_a40_without_mrg_is_rejected(mapper: Mapper) -> None:
    with pytest.raises(MissingRequired) as info:
        adt(mapper, "PID|1||1^^^^MR", ev="A40")
    assert (info.value.err_code, info.value.location) == (ErrCode.SEGMENT_SEQUENCE, "MRG")


# --- appointments ------------------------------------------------------------------------------------------

PID = "PID|1||123456^^^NORTHCLINIC^MR||Doe^Jane\n"


def test_duration_in_hours_and_status_from_sch25_on_s14(mapper: Mapper) -> None:
    op = siu(mapper, "SCH||A1|||||||1.5|HR|^^^20261120143000-0500" + "|" * 14 + "Complete\n" + PID, ev="S14")
    assert op.fields["duration_minutes"].value == 90
    assert op.fields["status"].value == "completed"


@pytest.mark.parametrize(("sch25", "status"), [("Noshow", "no_show"), ("Deleted", "deleted"), ("Booked", "scheduled"),
                                               ("Pending", "scheduled"), ("cancelled", "cancelled")])
def test_s14_statuses(mapper: Mapper, sch25: str, status: str) -> None:
    op = siu(mapper, "SCH||A1" + "|" * 23 + sch25 + "\n" + PID, ev="S14")
    assert op.fields["status"].value == status


@pytest.mark.parametrize(("event", "status"), [("S12", "scheduled"), ("S13", "scheduled"), ("S15", "cancelled"),
                                               ("S17", "deleted"), ("S26", "no_show")])
def test_status_by_event_wins_over_sch25(mapper: Mapper, event: str, status: str) -> None:
    op = siu(mapper, "SCH||A1" + "|" * 23 + "Complete\n" + PID, ev=event)
    assert op.fields["status"].value == status


def test_tq1_start_and_duration_then_end_minus_start(mapper: Mapper) -> None:
    op = siu(mapper, "SCH||A1|||||||||^^^20261120143000-0500\n" + PID + "TQ1|1||||||20261120150000-0500\n")
    assert op.fields["start"].value == "2026-11-20T15:00:00-05:00"  # TQ1-7 before SCH-11.4
    assert "duration_minutes" not in op.fields
    op = siu(mapper, "SCH||A1\n" + PID + "TQ1|1|||||20^MIN|20261120143000-0500\n")
    assert op.fields["duration_minutes"].value == 20
    op = siu(mapper, "SCH||A1|||||||||^^^20261120143000-0500^20261120151500-0500\n" + PID)
    assert op.fields["duration_minutes"].value == 45
    op = siu(mapper, "SCH||A1\n" + PID + "AIS|1|A|X|20261120143000-0500|||1|H\n")
    assert (op.fields["start"].value, op.fields["duration_minutes"].value) == ("2026-11-20T14:30:00-05:00", 60)


def test_unknown_duration_unit(mapper: Mapper) -> None:
    with pytest.raises(BadFieldValue) as info:
        siu(mapper, "SCH||A1|||||||30|FORTNIGHTS\n" + PID)
    assert (info.value.err_code, info.value.location) == (ErrCode.TABLE_VALUE_NOT_FOUND, "SCH-10")


def test_provider_and_location_skip_deleted_resources(mapper: Mapper) -> None:
    body = "SCH||A1\n" + PID + "AIL|1|D|OLD\nAIL|2|U|NEW^2\nAIP|1|D|1^Old\nAIP|2|A|2^New^Doc\n"
    op = siu(mapper, body)
    assert (op.fields["location"].value, op.fields["provider"].value) == ("NEW", "2")


def test_provider_rendered_as_a_name_when_configured() -> None:
    named = custom(("source: AIP[2!=D]-3.1\n", "source: AIP[2!=D]-3\n        transform: person_name\n"
                                               "        args: {type: XCN}\n"))
    op = siu(named, "SCH||A1\n" + PID + "AIP|1|A|4455^House^Gregory^^^Dr.\n")
    assert op.fields["provider"].value == "Gregory House"


def test_appointment_key_and_segment_errors(mapper: Mapper) -> None:
    with pytest.raises(MissingRequired) as info:
        siu(mapper, PID)
    assert (info.value.err_code, info.value.location) == (ErrCode.SEGMENT_SEQUENCE, "SCH")
    with pytest.raises(MissingRequired) as info:
        siu(mapper, "SCH|||||||X\n" + PID)
    assert (info.value.err_code, info.value.location) == (ErrCode.REQUIRED_FIELD_MISSING, "SCH-2")
    with pytest.raises(MissingRequired) as info:
        siu(mapper, "SCH||A1\n")
    assert info.value.location == "PID"


def test_sync_when_changed_becomes_only_if_changed() -> None:
    triggered = custom(("    # sync_when_changed: [status, start]", "    sync_when_changed: [status, start]"))
    op = siu(triggered, "SCH||A1\n" + PID)
    assert op.only_if_changed == ("status", "start")
