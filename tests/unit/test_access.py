"""Field paths: repetition and segment selection, alternatives, explicit null vs empty, escapes."""

from __future__ import annotations

import hl7
import pytest

from hl7bridge.hl7.access import Found, MessageView, Null, PathError, compile_path


def parse(text: str) -> hl7.Message:
    return hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r"))


MSG = parse(
    "MSH|^~\\&|EPIC|NORTHCLINIC|HL7BRIDGE|CRM|20261115093000-0500||ADT^A04^ADT_A01|1|P|2.5.1\n"
    "EVN|A04|20261115092955-0500\n"
    "PID|1||E1^^^EPIC^PI~123456^^^NORTHCLINIC^MR~999^^^SSA^SS||O\\S\\Brien&van^Se\\T\\n^^^Dr~Alias^Al||"
    "19800214|\"\"|||\"\"||~^PRN^PH^^1^217^5550199~^NET^Internet^a@b.example|^WPN^PH^^1^217^5559876^22\n"
    "AIL|1|D|OLD-ROOM\n"
    "AIL|2|A|NEW-ROOM^101\n"
    "AIP|1||4455^House^Gregory\n"
)
VIEW = MessageView.from_message(MSG)


def get(expr: str) -> Found | Null | None:
    return compile_path(expr).resolve(VIEW)


def text(expr: str) -> str:
    hit = get(expr)
    assert isinstance(hit, Found), hit
    return hit.text


def test_component_of_first_repetition() -> None:
    assert text("PID-5.2") == "Se&n"  # \T\ decoded to the sub-component separator
    assert text("PID-5(2).1") == "Alias"
    assert text("EVN-2") == "20261115092955-0500"


def test_escapes_and_sub_components() -> None:
    assert text("PID-5.1") == "O^Brien"  # component 1 = its first sub-component
    assert text("PID-5.1.2") == "van"


def test_repetition_by_type_code_when_mrn_is_not_first() -> None:
    assert text("PID-3[MR].1") == "123456"
    assert text("PID-3[NORTHCLINIC].1") == "123456"  # CX-4 assigning authority matches too
    assert text("PID-3[SS,MR].1") == "123456"
    assert text("PID-3[!PI].1") == "123456"
    assert get("PID-3[XX].1") is None


def test_xtn_selection_by_use_code_and_equipment_type() -> None:
    assert text("PID-13[NET,Internet].4") == "a@b.example"
    assert text("PID-13[Internet].4") == "a@b.example"
    assert text("PID-13[PRN].7") == "5550199"
    assert text("PID-13[2=PRN].6") == "217"
    assert text("PID-14[WPN].8") == "22"


def test_whole_field_keeps_every_repetition() -> None:
    hit = get("PID-13")
    assert isinstance(hit, Found)
    assert len(hit.reps) == 3
    assert hit.reps[1][1] == ("PRN",)


def test_segment_filter_skips_deleted_resources() -> None:
    assert text("AIL[2!=D]-3.1") == "NEW-ROOM"
    assert text("AIL[2=D]-3") == "OLD-ROOM"
    assert text("AIL-3.1") == "OLD-ROOM"  # no filter: the first segment
    assert text("AIP[2!=D]-3.1") == "4455"  # an empty action code is not D


def test_alternatives_first_value_wins() -> None:
    assert text("SCH-2.1 | PID-5(2).2 | PID-5.2") == "Al"
    assert get("SCH-2.1 | SCH-1.1") is None


def test_explicit_null_versus_empty() -> None:
    assert get("PID-8") == Null("PID-8")
    assert get("PID-11.3") == Null("PID-11.3")  # a "" field clears everything inside it
    assert get("PID-13[NET].4") is not None
    assert get("PID-9") is None  # empty: no change
    assert get("PID-40") is None  # beyond the last field
    assert get("PID-5.9") is None
    assert get("ZZZ-1") is None


def test_null_loses_to_a_later_value_in_alternatives() -> None:
    assert text("PID-8 | PID-7") == "19800214"
    assert get("PID-9 | PID-8") == Null("PID-8")


def test_groups_split_at_each_pid() -> None:
    msg = parse("MSH|^~\\&|A|B|C|D|20260101||ADT^A40|1|P|2.5\nEVN|A40\nPID|1||1^^^^MR\nMRG|2^^^^MR\n"
                "PID|2||3^^^^MR\nMRG|4^^^^MR")
    groups = MessageView.from_message(msg).groups("PID")
    path = compile_path("MRG-1.1")
    assert [path.resolve(g).text for g in groups] == ["2", "4"]  # type: ignore[union-attr]
    assert all(compile_path("EVN-1").resolve(g) is not None for g in groups)


def test_custom_separators_and_hex_in_the_message_charset() -> None:
    msg = parse("MSH#!@$%#A#B#C#D#20260101##ADT!A04#1#P#2.4######8859/1\nPID#1##7!!!!MR##M$XFC$ller!J$F$x")
    view = MessageView.from_message(msg)
    assert compile_path("PID-5.1").resolve(view).text == "Müller"  # type: ignore[union-attr]
    assert compile_path("PID-5.2").resolve(view).text == "J#x"  # type: ignore[union-attr]
    assert compile_path("PID-3[MR].1").resolve(view).text == "7"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "expr",
    ["", "PID", "PID3", "pid-3", "PID-0", "PID-3.0", "PID-3(0)", "PID-3[]", "PV2-3[X]", "AIL[!D]-3",
     "AIL[D]-3", "PID-3 |", "PID-3.1.1.1"],
)
def test_bad_paths_fail_to_compile(expr: str) -> None:
    with pytest.raises(PathError):
        compile_path(expr)


def test_path_metadata() -> None:
    path = compile_path("TQ1-7|SCH-11.4 |AIS-4")
    assert str(path) == "TQ1-7 | SCH-11.4 | AIS-4"
    assert path.locations == ("TQ1-7", "SCH-11.4", "AIS-4")
    assert path.location == "TQ1-7"
    assert compile_path("PID-13").whole_field
    assert not compile_path("PID-13.1").whole_field
