"""Differential tests: the workers' lean reader gives the mapper exactly what python-hl7 gives it.

python-hl7 is the reference. For every fixture and for hypothesis-generated messages, every field of every
segment is compared through the interface the mapper reads (MessageView: segment names, normalised
repetitions/components/sub-components, raw field text, escape decoding), and the mapper's output is compared."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hl7bridge.hl7.access import MessageView
from hl7bridge.hl7.lean import lean_view
from hl7bridge.hl7.parse import parse_message
from hl7bridge.mapping import compile_rules, load_rules

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
MESSAGE_FIXTURES = sorted(p for p in FIXTURES.glob("*.hl7") if not p.name.startswith(("bad_", "batch_")))


def assert_same_view(raw: bytes) -> None:
    ref = MessageView.from_message(parse_message(raw))
    lean = lean_view(raw)
    assert list(lean.names()) == list(ref.names())
    assert lean.seps == ref.seps
    for index, _name in ref.names():
        for number in range(1, 40):
            assert lean.field(index, number) == ref.field(index, number), (index, number)
            assert lean.raw_field(index, number) == ref.raw_field(index, number), (index, number)
            for rep in ref.field(index, number):
                for comp in rep:
                    for leaf in comp:
                        assert lean.decode(leaf) == ref.decode(leaf)


@pytest.mark.parametrize("path", MESSAGE_FIXTURES, ids=lambda p: p.name)
def test_every_fixture_reads_the_same(path: Path) -> None:
    assert_same_view(path.read_bytes())


@pytest.mark.parametrize("path", MESSAGE_FIXTURES, ids=lambda p: p.name)
def test_every_fixture_maps_the_same(path: Path) -> None:
    mapper = compile_rules(load_rules(None), default_timezone="America/Chicago")
    raw = path.read_bytes()
    assert mapper.map(lean_view(raw)) == mapper.map(parse_message(raw))


_TEXT = st.text(alphabet="abcXYZ019 .-/\\&~^é", min_size=0, max_size=12)
_COMPONENT = st.lists(_TEXT.filter(lambda t: "&" not in t and "^" not in t and "~" not in t and "\\" not in t),
                      min_size=1, max_size=3).map("&".join)
_REPETITION = st.lists(_COMPONENT, min_size=1, max_size=4).map("^".join)
_FIELD = st.one_of(st.just(""), st.just('""'), st.lists(_REPETITION, min_size=1, max_size=3).map("~".join),
                   st.sampled_from(["O\\S\\Brien", "a\\T\\b", "x\\F\\y", "\\.br\\", "caf\\XC3A9\\"]))
_SEGMENT = st.tuples(st.sampled_from(["PID", "PV1", "SCH", "AIL", "AIP", "NTE", "ZXY"]),
                     st.lists(_FIELD, min_size=0, max_size=25)).map(lambda t: "|".join([t[0], *t[1]]))


@settings(max_examples=300, deadline=None)
@example(segments=["PID| "], msh_tail=[])  # trailing blanks at the end of the message (found by hypothesis)
@given(st.lists(_SEGMENT, min_size=1, max_size=6), st.lists(_FIELD, min_size=0, max_size=8))
def test_generated_messages_read_the_same(segments: list[str], msh_tail: list[str]) -> None:
    msh = "|".join(["MSH", "^~\\&", "APP", "FAC", "HL7BRIDGE", "CRM", "20261115093000", "", "ADT^A08",
                    "GEN1", "P", "2.5.1", *msh_tail])
    raw = ("\r".join([msh, *segments]) + "\r").encode("utf-8")
    assert_same_view(raw)
