"""Every fixture through the built-in default rules: the CRM operations a user would see."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import hl7
import pytest

from hl7bridge.mapping import Mapper, compile_rules, load_rules
from hl7bridge.records import CrmOp, FieldSet, Filtered

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def parse(text: str) -> hl7.Message:
    return hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r"))


def fixture(name: str, encoding: str = "utf-8") -> hl7.Message:
    return parse((FIXTURES / f"{name}.hl7").read_bytes().decode(encoding))


@pytest.fixture(scope="module")
def mapper() -> Mapper:
    return compile_rules(load_rules(None), default_timezone="America/Chicago")


def ops_of(mapper: Mapper, msg: hl7.Message) -> list[CrmOp]:
    result = mapper.map(msg)
    assert isinstance(result, list), result
    return result


def values(fields: object) -> dict[str, object]:
    return {k: v.value for k, v in fields.items()}  # type: ignore[attr-defined]


def test_a04_new_patient(mapper: Mapper) -> None:
    [op] = ops_of(mapper, fixture("adt_a04"))
    assert (op.entity, op.action, op.key) == ("contact", "upsert", "123456")
    assert op.event_time == datetime(2026, 11, 15, 14, 29, 55, tzinfo=UTC)  # EVN-2, not MSH-7
    assert values(op.fields) == {
        "first_name": "Jane",
        "last_name": "Doe",
        "birth_date": "1980-02-14",
        "sex": "F",
        "phone": "+12175550123",
        "email": "jane.doe@example.com",
        "address_line1": "123 Main St",
        "city": "Springfield",
        "state": "IL",
        "postal_code": "62704",
    }
    assert op.fields["phone"].conflict == "newest"
    assert op.fields["first_name"].conflict == "ehr"


def test_a08_update(mapper: Mapper) -> None:
    [op] = ops_of(mapper, fixture("adt_a08"))
    assert (op.entity, op.action, op.key) == ("contact", "upsert", "123456")
    assert op.fields["phone"] == FieldSet("+12175550199", "newest")
    assert values(op.fields)["address_line1"] == "456 Oak Ave"
    assert values(op.fields)["postal_code"] == "62701"


def test_a28_latin1_cerner_without_offsets(mapper: Mapper) -> None:
    [op] = ops_of(mapper, fixture("adt_a28", "latin-1"))
    assert op.key == "77001"
    got = values(op.fields)
    assert (got["first_name"], got["last_name"]) == ("Jürgen", "Müller")
    assert got["address_line1"] == "Hauptstraße 5"
    assert got["phone"] == "+13125550144"  # XTN-1 free text
    assert "email" not in got  # not sent: unchanged
    assert op.event_time.isoformat() == "2026-11-15T14:00:00-06:00"  # the default zone (Chicago)


def test_a40_merge(mapper: Mapper) -> None:
    [op] = ops_of(mapper, fixture("adt_a40"))
    assert (op.entity, op.action, op.key, op.prior_key) == ("contact", "merge", "123456", "654321")
    assert values(op.fields)["last_name"] == "Doe"


def test_s12_books_appointment_linked_to_contact(mapper: Mapper) -> None:
    [op] = ops_of(mapper, fixture("siu_s12"))
    assert (op.entity, op.action, op.key, op.contact_key) == ("appointment", "upsert", "FL-99001", "123456")
    assert values(op.fields) == {
        "start": "2026-11-20T14:30:00-05:00",
        "duration_minutes": 30,
        "status": "scheduled",
        "type": "Office visit",
        "provider": "1234",
        "location": "NC-CLINIC",
    }
    contact = values(op.contact_fields)
    assert (contact["first_name"], contact["last_name"], contact["phone"]) == ("Jane", "Doe", "+12175550123")
    assert op.only_if_changed == ()


def test_s15_cancels(mapper: Mapper) -> None:
    [op] = ops_of(mapper, fixture("siu_s15"))
    assert (op.key, op.contact_key) == ("FL-99001", "123456")
    assert op.fields["status"].value == "cancelled"


def test_no_offset_appointment_lands_on_the_right_instant_and_day() -> None:
    rules = load_rules(None)
    zones = rules.settings.timezones.model_copy(update={"facilities": {"EASTCLINIC": "America/New_York"}})
    settings = rules.settings.model_copy(update={"timezones": zones})
    mapper = compile_rules(rules.model_copy(update={"settings": settings}), default_timezone="UTC")
    [op] = ops_of(mapper, fixture("siu_s12_no_offset"))
    start = datetime.fromisoformat(str(op.fields["start"].value))
    assert start.astimezone(UTC) == datetime(2026, 11, 1, 3, 30, tzinfo=UTC)
    assert start.date() == date(2026, 10, 31)
    assert op.fields["start"].value == "2026-10-31T23:30:00-04:00"
    assert op.fields["duration_minutes"].value == 45
    assert (op.key, op.contact_key) == ("88120", "55501")  # SCH-1 placer ID; a single untyped PID-3
    assert values(op.fields)["location"] == "EAST-2"
    assert op.event_time.isoformat() == "2026-10-30T16:00:00-04:00"
    assert values(op.contact_fields)["phone"] == "+16175550102"


def test_timezone_flag_sets_the_default_zone() -> None:
    mapper = compile_rules(load_rules(None), default_timezone="America/New_York")
    [op] = ops_of(mapper, fixture("siu_s12_no_offset"))
    assert op.fields["start"].value == "2026-10-31T23:30:00-04:00"
    mapper = compile_rules(load_rules(None), default_timezone="America/Los_Angeles")
    [op] = ops_of(mapper, fixture("siu_s12_no_offset"))
    assert op.fields["start"].value == "2026-10-31T23:30:00-07:00"


def test_unsupported_event_is_filtered(mapper: Mapper) -> None:
    result = mapper.map(parse("MSH|^~\\&|A|B|C|D|20260101||ADT^A03|1|P|2.5\nEVN|A03\nPID|1||1^^^^MR"))
    assert isinstance(result, Filtered)
    assert "ADT^A03" in result.reason
