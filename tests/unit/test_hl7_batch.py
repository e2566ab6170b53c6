from __future__ import annotations

from pathlib import Path

import pytest

from hl7bridge.hl7.batch import read_paths, split_messages
from hl7bridge.hl7.envelope import scan_bytes

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
GOOD = sorted(p for p in FIXTURES.glob("*.hl7") if not p.name.startswith(("bad_", "batch_")))


def as_cr(path: Path) -> bytes:
    """A fixture as one message with \\r terminators (what split_messages returns)."""
    return path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r")


def control_ids(messages: list[bytes]) -> list[str]:
    return [scan_bytes(m)[0].envelope.control_id for m in messages]


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_single_message_file(path: Path) -> None:
    (message,) = split_messages(path.read_bytes())
    assert message == as_cr(path)
    assert message.endswith(b"\r") and b"\n" not in message


@pytest.mark.parametrize("separator", [b"\n", b"\r", b"\r\n"])
def test_several_messages_in_one_file(separator: bytes) -> None:
    data = separator.join(p.read_bytes().replace(b"\n", separator) for p in GOOD)
    messages = split_messages(data)
    assert messages == [as_cr(p) for p in GOOD]


def test_blank_lines_between_messages_are_ignored() -> None:
    data = b"\n\n".join(p.read_bytes() for p in GOOD[:3]) + b"\n\n\n"
    assert split_messages(data) == [as_cr(p) for p in GOOD[:3]]


def test_fhs_bhs_batch_drops_envelope_segments() -> None:
    messages = split_messages((FIXTURES / "batch_three.hl7").read_bytes())
    assert control_ids(messages) == ["MSG00201", "MSG00202", "MSG00203"]
    for message in messages:
        assert message.startswith(b"MSH|")
        for envelope_segment in (b"FHS", b"BHS", b"BTS", b"FTS"):
            assert b"\r" + envelope_segment not in message
    assert messages[2].split(b"\r")[-2].startswith(b"AIL|")


def test_bhs_only_batch() -> None:
    data = b"BHS|^~\\&|EPIC\n" + (FIXTURES / "adt_a08.hl7").read_bytes() + b"BTS|1\n"
    assert split_messages(data) == [as_cr(FIXTURES / "adt_a08.hl7")]


def test_mllp_capture_frames_are_extracted() -> None:
    messages = split_messages((FIXTURES / "batch_mllp_capture.hl7").read_bytes())
    assert messages == [as_cr(FIXTURES / "adt_a04.hl7"), as_cr(FIXTURES / "siu_s15.hl7")]


def test_mllp_frame_with_newline_terminators_and_truncated_last_frame() -> None:
    a08 = (FIXTURES / "adt_a08.hl7").read_bytes()
    s12 = (FIXTURES / "siu_s12.hl7").read_bytes()
    data = b"\x0b" + a08 + b"\x1c\r" + b"\x0b" + s12  # capture cut off mid-frame
    assert split_messages(data) == [as_cr(FIXTURES / "adt_a08.hl7"), as_cr(FIXTURES / "siu_s12.hl7")]


def test_mixed_charsets_in_one_file_keep_their_bytes() -> None:
    latin1 = (FIXTURES / "adt_a28.hl7").read_bytes()
    utf8 = (
        b"MSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|20261115093000||ADT^A08^ADT_A01|U1|P|2.5.1||||||UNICODE UTF-8\n"
        + "PID|1||9^^^NC^MR||Ünal^Zoë\n".encode()
    )
    messages = split_messages(latin1 + utf8)
    assert len(messages) == 2
    (_, text_latin1), (_, text_utf8) = (scan_bytes(m) for m in messages)
    assert "Müller" in text_latin1
    assert "Ünal^Zoë" in text_utf8


def test_byte_order_mark_is_dropped() -> None:
    data = b"\xef\xbb\xbf" + (FIXTURES / "adt_a08.hl7").read_bytes()
    assert split_messages(data) == [as_cr(FIXTURES / "adt_a08.hl7")]


def test_content_outside_messages_is_kept_visible_not_dropped() -> None:
    a08 = (FIXTURES / "adt_a08.hl7").read_bytes()
    data = b"this is not hl7\n" + a08 + b"BTS|1\nstray line\n"
    messages = split_messages(data)
    assert messages == [b"this is not hl7\r", as_cr(FIXTURES / "adt_a08.hl7"), b"stray line\r"]


@pytest.mark.parametrize("data", [b"", b"\n\r\n  \n", b"\x0b\x1c\r"])
def test_nothing_to_split(data: bytes) -> None:
    assert split_messages(data) == []


def test_read_paths_walks_sorted_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "two.hl7").write_bytes((FIXTURES / "batch_three.hl7").read_bytes())
    (tmp_path / "a.hl7").write_bytes((FIXTURES / "adt_a08.hl7").read_bytes())
    (tmp_path / ".secret.hl7").write_bytes((FIXTURES / "adt_a04.hl7").read_bytes())
    (tmp_path / ".hidden" / "x.hl7").write_bytes((FIXTURES / "adt_a04.hl7").read_bytes())
    single = tmp_path / "single.hl7"
    single.write_bytes((FIXTURES / "siu_s15.hl7").read_bytes())

    got = list(read_paths([tmp_path, single]))
    assert [(p.relative_to(tmp_path).as_posix(), i) for p, i, _ in got] == [
        ("a.hl7", 0),
        ("b/two.hl7", 0),
        ("b/two.hl7", 1),
        ("b/two.hl7", 2),
        ("single.hl7", 0),
        ("single.hl7", 0),
    ]
    assert control_ids([m for _, _, m in got]) == [
        "MSG00002",
        "MSG00201",
        "MSG00202",
        "MSG00203",
        "MSG00101",
        "MSG00101",
    ]


def test_read_paths_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(read_paths([tmp_path / "nope.hl7"]))
