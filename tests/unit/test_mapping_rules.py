"""Loading rules: every problem found at load time, each named by file, line and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from hl7bridge.mapping import DEFAULT_RULES_PATH, RulesError, compile_rules, load_rules, parse_rules

DEFAULT = DEFAULT_RULES_PATH.read_text(encoding="utf-8")


def line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def broken(old: str, new: str) -> tuple[str, int]:
    assert old in DEFAULT, old
    text = DEFAULT.replace(old, new, 1)
    return text, line_of(text, new)


def problems(text: str) -> list[str]:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.yaml")
    return str(info.value).splitlines()


def test_default_rules_load_and_cover_the_record_model() -> None:
    rules = load_rules(None)
    assert set(rules.entities.contact.fields) == {
        "first_name", "last_name", "birth_date", "sex", "phone", "email", "address_line1", "city", "state",
        "postal_code",
    }
    assert rules.entities.appointment is not None
    assert set(rules.entities.appointment.fields) == {
        "start", "duration_minutes", "status", "type", "provider", "location"
    }
    assert rules.entities.contact.triggers.upsert == ["ADT^A01", "ADT^A04", "ADT^A05", "ADT^A08", "ADT^A28", "ADT^A31"]
    assert rules.entities.contact.triggers.merge == ["ADT^A40"]
    assert rules.entities.contact.triggers.change_id == ["ADT^A47"]
    assert rules.origin == str(DEFAULT_RULES_PATH)
    mapper = compile_rules(rules, default_timezone="UTC")
    assert mapper.triggers == {
        "ADT^A01", "ADT^A04", "ADT^A05", "ADT^A08", "ADT^A28", "ADT^A31", "ADT^A40", "ADT^A47",
        "SIU^S12", "SIU^S13", "SIU^S14", "SIU^S15", "SIU^S16", "SIU^S17", "SIU^S26",
    }


@pytest.mark.parametrize(
    ("old", "new", "path", "says"),
    [
        ("transform: phone", "transform: fone", "entities.contact.fields.phone.transform", "unknown transform 'fone'"),
        ("source: PID-11.3", "source: PID-11.x", "entities.contact.fields.city.source", "bad path"),
        ("      city:\n", "      town:\n", "entities.contact.fields.town", "unknown contact field 'town'"),
        ("upsert: [SIU^S12,", "upsert: [SIU-S12,", "entities.appointment.triggers.upsert[0]", "bad event"),
        ("SIU^S26: {status: no_show}", "SIU^S26: {status: noshow}",
         "entities.appointment.event_overrides.SIU^S26.status", "not a valid status"),
        ('"Noshow": "no_show"', '"Noshow": "absent"', "code_tables.appointment_status.map.Noshow",
         "not a valid status"),
        ("args: {table: appointment_status}", "args: {table: appt}", "entities.appointment.fields.status.args.table",
         "no code table 'appt'"),
        ("args: {on_invalid: error}", "args: {on_invalid: maybe}", "entities.contact.fields.phone.args.on_invalid",
         "Input should be"),
        ("args: {on_invalid: error}", "args: {region: XX}", "entities.contact.fields.phone.args.region",
         "unknown phone region"),
        ("start: TQ1-7 | SCH-11.4 | AIS-4\n", "start: TQ1-7 || AIS-4\n",
         "entities.appointment.fields.duration_minutes.args.start", "bad path"),
        ("        type: date\n", "        type: string\n", "entities.contact.fields.birth_date.type", "is a date"),
        ("    facilities: {}", "    facilities: {EASTCLINIC: Mars/Olympus}", "settings.timezones.facilities.EASTCLINIC",
         "unknown time zone"),
        ("default_region: US", "default_region: ZZ", "settings.phone.default_region", "unknown region"),
        ("    # sync_when_changed: [status, start]", "    sync_when_changed: [colour]",
         "entities.appointment.sync_when_changed[0]", "not a mapped field"),
        ("      patient_id: true  #", "      patient_id: yes_please  #", "entities.contact.key.patient_id",
         "valid boolean"),
        ("        conflict: newest\n        description: Home", "        conflict: latest\n        description: Home",
         "entities.contact.fields.phone.conflict", "Input should be"),
        ("    default_region: US", "    bogus: 1\n    default_region: US", "settings.phone.bogus", "unknown key"),
    ],
)
def test_each_problem_names_file_line_and_key(old: str, new: str, path: str, says: str) -> None:
    text, line = broken(old, new)
    lines = problems(text)
    hit = [p for p in lines if f": {path}: " in p]
    assert hit, lines
    assert hit[0].startswith(f"rules.yaml:{line}: "), (hit[0], line)
    assert says in hit[0]


def test_all_problems_are_reported_together() -> None:
    text = DEFAULT.replace("transform: phone", "transform: fone").replace("source: PID-11.3", "source: nope")
    assert len(problems(text)) == 2


def test_duplicate_keys_are_errors_not_silently_overwritten() -> None:
    text = DEFAULT.replace("      city:\n", "      state:\n        source: PID-11.4\n      city:\n", 1)
    [problem] = problems(text)
    assert "duplicate key" in problem and "entities.contact.fields.state" in problem


def test_yaml_syntax_error_names_the_line() -> None:
    [problem] = problems("version: 1\nentities: {contact: [\n")
    assert problem.startswith("rules.yaml:3: not valid YAML")


def test_merge_needs_a_prior_key() -> None:
    start = DEFAULT.index("    prior_key:")
    end = DEFAULT.index("    triggers:", start)
    lines = problems(DEFAULT[:start] + DEFAULT[end:])
    assert any("entities.contact.prior_key: merge and change_id triggers need" in p for p in lines)


def test_load_rules_from_a_file_and_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(DEFAULT.replace("transform: phone", "transform: fone"), encoding="utf-8")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value).startswith(f"{path}:")
    assert isinstance(info.value, ValueError)
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")


def test_bad_timezone_flag() -> None:
    with pytest.raises(RulesError, match="--timezone"):
        compile_rules(load_rules(None), default_timezone="Not/AZone")
