from __future__ import annotations

from pathlib import Path

import hl7
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hl7bridge.errors import AckCode, ErrCode, UnreadableMessage
from hl7bridge.hl7.parse import (
    codec_for,
    decode,
    encode,
    escape,
    normalise_segments,
    parse_message,
    read_separators,
    sniff_charset,
    unescape,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
GOOD = sorted(p for p in FIXTURES.glob("*.hl7") if not p.name.startswith(("bad_", "batch_")))
ENC = "^~\\&"


def test_there_are_fixtures() -> None:
    assert len(GOOD) >= 7


# --- charsets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "codec"),
    [
        ("ASCII", "ascii"),
        ("8859/1", "latin-1"),
        ("8859/15", "iso8859-15"),
        ("UNICODE UTF-8", "utf-8"),
        ("unicode  utf-8", "utf-8"),
        ("UTF-8", "utf-8"),
        ("UNICODE", "utf-8"),
        ("ISO-8859-1", "latin-1"),
        ("", "utf-8"),
        ("KLINGON", "utf-8"),
    ],
)
def test_msh18_labels_map_to_codecs(label: str, codec: str) -> None:
    assert codec_for(label) == codec


def test_unknown_label_uses_the_configured_default() -> None:
    assert codec_for("KLINGON", "8859/1") == "latin-1"
    assert codec_for("", "cp1252") == "cp1252"
    # A bytes-to-bytes codec named by mistake never becomes the text codec.
    assert codec_for("", "zlib") == "utf-8"
    assert codec_for("", "no-such-codec") == "utf-8"


def test_decode_latin1_name() -> None:
    assert decode("Müller".encode("latin-1"), "8859/1") == "Müller"
    assert decode("Müller".encode(), "UNICODE UTF-8") == "Müller"
    assert decode("Müller".encode("latin-1"), "", default_charset="8859/1") == "Müller"
    assert decode(b"\xef\xbb\xbfMSH", "UTF-8") == "MSH"


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        ("Müller".encode("latin-1"), "UNICODE UTF-8"),
        ("Müller".encode(), "ASCII"),
        ("Müller".encode("latin-1"), ""),
    ],
)
def test_undecodable_bytes_are_unreadable_without_phi(raw: bytes, label: str) -> None:
    with pytest.raises(UnreadableMessage) as info:
        decode(raw, label)
    err = info.value
    assert err.location == "MSH-18"
    assert err.ack_code is AckCode.AR
    assert err.err_code is ErrCode.DATA_TYPE
    assert "payload is not valid" in err.reason
    assert "ller" not in err.reason


def test_encode_never_raises() -> None:
    assert encode("Müller", "ASCII") == b"M?ller"
    assert encode("Müller", "8859/1") == "Müller".encode("latin-1")
    assert encode("Müller", "UNICODE UTF-8") == "Müller".encode()  # no BOM on the way out


def test_sniff_charset_reads_msh18_from_bytes() -> None:
    assert sniff_charset((FIXTURES / "adt_a28.hl7").read_bytes()) == "8859/1"
    assert sniff_charset((FIXTURES / "adt_a04.hl7").read_bytes()) == "UNICODE UTF-8"
    assert sniff_charset((FIXTURES / "adt_a08.hl7").read_bytes()) == ""
    # MSH-18 is the 17th field after "MSH"; only its first repetition counts.
    assert sniff_charset(b"MSH|^~\\&" + b"|" * 16 + b"8859/1~UNICODE UTF-8\rPID|") == "8859/1"
    assert sniff_charset(b"MSH|^~\\&" + b"|" * 15 + b"8859/1\rPID|") == ""
    assert sniff_charset(b"") == ""
    assert sniff_charset(b"garbage") == ""
    assert sniff_charset(b"MSH\rPID|1|2|3|4|5|6|7|8|9|10|11|12|13|14|15|16|17|18") == ""
    assert sniff_charset(b"\x00" * 64 + b"MSH|") == ""


# --- terminators ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "MSH|a\rPID|b\rPV1|c",
        "MSH|a\nPID|b\nPV1|c",
        "MSH|a\r\nPID|b\r\nPV1|c\r\n",
        "MSH|a\r\n\r\nPID|b\n\nPV1|c\r\r\n \n",
        "\nMSH|a\rPID|b\rPV1|c\r\r",
    ],
)
def test_normalise_segments(text: str) -> None:
    assert normalise_segments(text) == "MSH|a\rPID|b\rPV1|c"


def test_normalise_keeps_trailing_spaces_inside_a_field() -> None:
    assert normalise_segments("MSH|a\rNTE|text  ") == "MSH|a\rNTE|text  "


# --- separators -------------------------------------------------------------------------------------


def test_read_separators() -> None:
    assert read_separators("MSH|^~\\&|X") == ("|", "^~\\&")
    assert read_separators("MSH#$%!*#X") == ("#", "$%!*")
    assert read_separators("MSH|^~\\&#|X") == ("|", "^~\\&#")  # v2.7 truncation character


@pytest.mark.parametrize(
    "text",
    [
        "PID|1||123",
        "",
        "MSH",
        "MSHA^~\\&A",  # alphanumeric field separator
        "MSH ^~\\& X",  # whitespace field separator
        "MSH|^~\\&",  # encoding characters not terminated
        "MSH|^~\\|",  # too few
        "MSH|^~\\&#@|",  # too many
        "MSH|^~^&|",  # repeated
        "MSH|^|\\&|",  # field separator among encoding chars
        "MSH|^~A&|",  # alphanumeric encoding char
    ],
)
def test_bad_separators_are_unreadable(text: str) -> None:
    with pytest.raises(UnreadableMessage):
        read_separators(text)


# --- full parse -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_every_fixture_parses(path: Path) -> None:
    message = parse_message(path.read_bytes())
    assert isinstance(message, hl7.Message)
    assert str(message.segment("MSH")[0]) == "MSH"
    assert message.segment("PID")


def test_latin1_fixture_decodes_the_name() -> None:
    message = parse_message((FIXTURES / "adt_a28.hl7").read_bytes())
    assert str(message["PID.F5.R1.C1"]) == "Müller"
    assert str(message["PID.F5.R1.C2"]) == "Jürgen"


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"])
def test_parse_any_terminator(terminator: str) -> None:
    text = (FIXTURES / "adt_a08.hl7").read_text().replace("\n", terminator)
    message = parse_message(text.encode())
    assert [str(seg[0]) for seg in message] == ["MSH", "EVN", "PID", "PV1"]
    assert str(message["PID.F3.R2.C1"]) == "123456"


def test_parse_other_separators() -> None:
    text = "MSH#$%!*#EPIC#NC#A#B#20260101##ADT$A08#C1#P#2.5.1\rPID#1##111$$$X$MR%222$$$Y$PI##Doe$Jane"
    message = parse_message(text)
    assert str(message["PID.F3.R1.C1"]) == "111"
    assert str(message["PID.F3.R2.C5"]) == "PI"
    assert str(message["PID.F5.R1.C2"]) == "Jane"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"PID|1||123^^^X^MR",
        b"MSH|^~^&|A|B",
        "MSH|^~\\&|A||||||ADT^A08|1|P|2.5.1||||||UNICODE UTF-8\rPID|||Müller".encode("latin-1"),
    ],
)
def test_unparseable_is_unreadable(raw: bytes) -> None:
    with pytest.raises(UnreadableMessage) as info:
        parse_message(raw)
    assert "ller" not in info.value.reason


@pytest.mark.parametrize("name", ["bad_no_msh.hl7", "bad_separators.hl7", "bad_charset.hl7"])
def test_bad_fixtures_are_unreadable(name: str) -> None:
    with pytest.raises(UnreadableMessage) as info:
        parse_message((FIXTURES / name).read_bytes())
    assert "Doe" not in info.value.reason
    assert "123456" not in info.value.reason


# --- escapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("escaped", "plain"),
    [
        ("plain", "plain"),
        ("A\\F\\B", "A|B"),
        ("A\\S\\B", "A^B"),
        ("A\\T\\B", "A&B"),
        ("A\\R\\B", "A~B"),
        ("A\\E\\B", "A\\B"),
        ("line1\\.br\\line2", "line1\nline2"),
        ("a\\.sp2\\b", "a\n\nb"),
        ("caf\\XC3A9\\", "café"),  # hex bytes decoded with the message charset (UTF-8 here)
        ("\\X4DC3BC6C6C6572\\", "Müller"),
        ("\\H\\bold\\N\\", "bold"),
        ("no end \\F", "no end \\F"),  # unterminated: kept
        ("odd \\Q\\ seq", "odd \\Q\\ seq"),  # unknown: kept
        ("bad hex \\XZZ\\", "bad hex \\XZZ\\"),
    ],
)
def test_unescape(escaped: str, plain: str) -> None:
    assert unescape(escaped, ENC, "|") == plain


def test_unescape_hex_with_latin1_charset() -> None:
    assert unescape("M\\XFC\\ller", ENC, "|", charset="latin-1") == "Müller"
    # Invalid UTF-8 hex falls back to latin-1 rather than failing.
    assert unescape("M\\XFC\\ller", ENC, "|") == "Müller"


def test_unescape_other_separators() -> None:
    assert unescape("a!F!b!S!c!E!d", "$%!*", "#") == "a#b$c!d"
    assert unescape("a!P!b", "$%!*@", "#") == "a@b"


def test_agrees_with_python_hl7_on_separator_escapes() -> None:
    message = hl7.parse("MSH|^~\\&|A\rPID|1")
    for value in ["A\\F\\B", "A\\S\\B\\T\\C", "\\R\\x\\E\\"]:
        assert unescape(value, ENC, "|") == message.unescape(value)


def test_python_hl7_hex_unescape_is_why_we_have_our_own() -> None:
    # python-hl7 turns each hex byte into one character: UTF-8 hex escapes come out as mojibake.
    message = hl7.parse("MSH|^~\\&|A\rPID|1")
    assert message.unescape("caf\\XC3A9\\") != "café"
    assert unescape("caf\\XC3A9\\", ENC, "|") == "café"


@given(st.text(alphabet=st.characters(blacklist_characters="\r", blacklist_categories=("Cs",))))
def test_escape_round_trips(value: str) -> None:
    escaped = escape(value, ENC, "|")
    assert not set(escaped) & set("|^~&\r\n")
    assert unescape(escaped, ENC, "|") == value


def test_a_non_ascii_digit_in_an_sp_escape_is_one_line_break_not_a_crash() -> None:
    # "²".isdigit() is True but int("²") raises: the count must be ASCII digits.
    assert unescape("a\\.sp\u00b2\\b", "^~\\&", "|") == "a\nb"
