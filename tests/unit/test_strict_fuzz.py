"""Strict validation on arbitrary input: only hl7bridge errors, never a value from the message in a reason,
and the same answers when many threads validate at once (the caller runs it in a thread pool)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl7bridge.errors import Hl7BridgeError
from hl7bridge.hl7.strict import STRICT_VERSIONS, validate_strict

NAME = "Zebulon"  # lower-case letters: never an HL7 code, segment ID or version, so never echoed

ADT = "\r".join([
    "MSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|20261115093000-0500||ADT^A04^ADT_A01|C1|P|2.5.1",
    "EVN|A04|20261115092955-0500",
    f"PID|1||4815162342^^^NC^MR~E1^^^EPIC^PI||{NAME}^Jane^Q||19800214|F|||1 Main St^^Springfield^IL^62704^USA||"
    "^PRN^PH^^1^217^5550123",
    "NK1|1|Doe^John|SPO^Spouse^HL70063",
    "PV1|1|O|NC-CLINIC^101^A^NORTHCLINIC||||1234^Welby^Marcus^^^Dr.",
    "OBX|1|NM|8302-2^Body height^LN||165|cm^centimeter^UCUM|||||F",
    "AL1|1|DA|70618^Penicillin^RXNORM|MO|Hives|20100101",
    "IN1|1|BCBS^Blue Cross|60054",
])
SIU = "\r".join([
    "MSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|20261115094500-0500||SIU^S12^SIU_S12|C2|P|2.5.1",
    "SCH|PL-1^EPIC|FL-1^EPIC||||ROUTINE^Routine|||||^^30^20261120143000-0500|||||1234^Welby||||1234^Welby",
    f"PID|1||4815162342^^^NC^MR||{NAME}^Jane||19800214|F",
    "RGS|1|A",
    "AIS|1|A|99213^Office visit^CPT|20261120143000-0500",
    "AIL|1|A|NC-CLINIC^101",
    "AIP|1|A|1234^Welby|ATTENDING",
])

TOKENS = [*"|^~\\&\r\n -.+", "A", "Z", "0", "9", "1", "20261115", "^^^", "||", "~", NAME,
          "\rPID|", "\rEVN|", "\rPV1|", "\rZPI|", "\rOBX|", "\rNK1|", "\rRGS|", "\rAIL|", "\rSCH|", "\rMSH|", "\rXYZ|"]
MSH9 = st.one_of(
    st.sampled_from(["ADT^A04^ADT_A01", "ADT^A08", "ADT^A28^ADT_A05", "ADT^A40^ADT_A39", "SIU^S12^SIU_S12",
                     "SIU^S15", "ORU^R01", "", "ADT", "^^", "^A04", f"ADT^A04^{NAME}"]),
    st.text(alphabet="ADTSIU_^~&0148", max_size=14),
)
VERSIONS = st.one_of(st.sampled_from([*sorted(STRICT_VERSIONS), "2.1", "", "9", NAME]),
                     st.text(alphabet="0123456789.", max_size=6))


def outcome(text: str, version: str) -> tuple[str, str, str, str | None] | None:
    """None when valid, else (class, ERR-3, reason, location); fails on anything but an hl7bridge error."""
    try:
        validate_strict(text, version)
    except Hl7BridgeError as err:
        assert NAME not in err.reason and NAME not in str(err) and NAME not in (err.location or "")
        assert err.__context__ is None
        return type(err).__name__, str(err.err_code), err.reason, err.location
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msh9=MSH9, version=VERSIONS, body=st.lists(st.sampled_from(TOKENS), max_size=80).map("".join))
def test_garbage_after_a_valid_looking_msh_raises_only_hl7bridge_errors(msh9: str, version: str, body: str) -> None:
    text = f"MSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|20261115093000-0500||{msh9}|C1|P|{version}\r{body}"
    outcome(text, version)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([ADT, SIU]),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.sampled_from(["set", "insert", "delete"]),
                             st.sampled_from([*"|^~\\&\r 0A", NAME])), min_size=1, max_size=5),
)
def test_edited_messages_raise_only_hl7bridge_errors(base: str, edits: list[tuple[int, str, str]]) -> None:
    # Edits start after MSH-2 so that the separators stay valid and hl7apy gets to parse the rest.
    chars = list(base)
    for position, op, token in edits:
        at = 9 + position % (len(chars) - 9)
        if op == "set":
            chars[at] = token
        elif op == "insert":
            chars.insert(at, token)
        else:
            del chars[at]
    outcome("".join(chars), "2.5.1")


def test_the_unedited_bases_are_valid() -> None:
    assert outcome(ADT, "2.5.1") is None
    assert outcome(SIU, "2.5.1") is None


def test_threads_get_the_same_answers_as_one_thread() -> None:
    cases = [
        (ADT, "2.5.1"),
        (SIU, "2.5.1"),
        (ADT.replace("19800214", "1980021X"), "2.5.1"),
        (ADT.replace("\rPV1|", "\rPV0|"), "2.5.1"),
        (ADT.replace("PID|1||4815162342^^^NC^MR~E1^^^EPIC^PI", "PID|1||"), "2.5.1"),
        (SIU.replace("\rRGS|1|A", ""), "2.5.1"),
        (SIU.replace("AIL|1|A|NC-CLINIC^101", "AIL|1|A|NC-CLINIC^101^^" + "X" * 30), "2.5.1"),
        (ADT.replace("2.5.1", "2.3").replace("ADT_A01", "ADT_A05"), "2.3"),
        (ADT.replace("2.5.1", "2.7"), "2.7"),
        (ADT, "2.1"),
    ]
    expected = [outcome(text, version) for text, version in cases]
    assert expected[0] is None and all(e is not None for e in expected[2:])
    work = cases * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda case: outcome(*case), work, timeout=120))
    assert got == expected * 8
