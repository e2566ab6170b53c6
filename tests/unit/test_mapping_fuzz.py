"""Whatever a sender puts in the fields, mapping answers with operations, Filtered or an Hl7BridgeError
whose reason carries no message content."""

from __future__ import annotations

import hl7
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7bridge.errors import ErrCode, Hl7BridgeError
from hl7bridge.mapping import compile_rules, load_rules

MAPPER = compile_rules(load_rules(None), default_timezone="America/Chicago")
FIELD = st.text(alphabet=st.sampled_from('ABCxyz019 -+.^~&\\"|'), max_size=24)


@settings(max_examples=300, deadline=None)
@given(st.lists(FIELD, min_size=14, max_size=14), st.sampled_from(["ADT^A04", "ADT^A40", "SIU^S12", "SIU^S14"]),
       st.lists(FIELD, min_size=12, max_size=12))
def test_mapping_never_crashes_or_leaks(pid: list[str], event: str, sch: list[str]) -> None:
    pid[2] = "SECRET7^^^^MR~" + pid[2]
    body = "PID|" + "|".join(pid) + "\rSCH|" + "|".join(sch) + "\rMRG|" + pid[5] + "\rAIL|1|" + pid[6]
    msg = hl7.parse(f"MSH|^~\\&|A|B|C|D|20260101120000||{event}|1|P|2.5\r{body}")
    try:
        MAPPER.map(msg)
    except Hl7BridgeError as exc:
        assert exc.err_code != ErrCode.INTERNAL, exc.__cause__  # a bug, not a bad message
        assert "SECRET7" not in str(exc)
        assert exc.location is None or "SECRET7" not in exc.location
