"""The sans-I/O MLLP framer: bytes in, events out. No sockets anywhere in this file."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7bridge.mllp.framer import (
    Event,
    Frame,
    FrameTooLarge,
    JunkDiscarded,
    MissingTrailingCr,
    MllpFramer,
    TruncatedFrame,
    encode_frame,
)

MSG_A = b"MSH|^~\\&|EHR|HOSP|BRIDGE|CRM|20240101120000||ADT^A01|MSG0001|P|2.5\rPID|1||12345^^^HOSP^MR\r"
MSG_B = b"MSH|^~\\&|EHR|HOSP|BRIDGE|CRM|20240101120001||ADT^A08|MSG0002|P|2.5\rPID|1||67890^^^HOSP^MR\r"
MSG_C = b"MSH|^~\\&|EHR|HOSP|BRIDGE|CRM|20240101120002||SIU^S12|MSG0003|P|2.5\rSCH|1\r"


def feed_all(framer: MllpFramer, chunks: Iterable[bytes], eof: bool = False) -> list[Event]:
    """Feed every chunk (and EOF if asked); the events in order."""
    events: list[Event] = []
    for chunk in chunks:
        events.extend(framer.feed(chunk))
    if eof:
        events.extend(framer.feed_eof())
    return events


def frames(events: Sequence[Event]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Frame)]


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --- basics -------------------------------------------------------------------------------------------


def test_encode_frame_wraps_payload_in_vt_fs_cr() -> None:
    assert encode_frame(b"abc") == b"\x0babc\x1c\x0d"


def test_one_frame_in_one_chunk() -> None:
    framer = MllpFramer()
    assert framer.feed(encode_frame(MSG_A)) == [Frame(MSG_A)]
    assert not framer.in_frame
    assert framer.feed_eof() == []


def test_several_frames_in_one_chunk_come_out_in_order() -> None:
    stream = b"".join(encode_frame(m) for m in (MSG_A, MSG_B, MSG_C))
    assert MllpFramer().feed(stream) == [Frame(MSG_A), Frame(MSG_B), Frame(MSG_C)]


def test_one_frame_over_many_one_byte_chunks() -> None:
    framer = MllpFramer()
    data = encode_frame(MSG_A)
    events = feed_all(framer, (data[i : i + 1] for i in range(len(data))))
    assert events == [Frame(MSG_A)]


def test_every_split_point_of_a_stream_yields_the_same_frames() -> None:
    stream = b"\r\n" + encode_frame(MSG_A) + encode_frame(MSG_B) + b"\n" + encode_frame(MSG_C)
    for strict in (False, True):
        for i in range(len(stream) + 1):
            events = feed_all(MllpFramer(require_trailing_cr=strict), split_at(stream, [i]), eof=True)
            assert events == [Frame(MSG_A), Frame(MSG_B), Frame(MSG_C)], (strict, i)


def test_every_pair_of_split_points_around_frame_boundaries() -> None:
    stream = encode_frame(b"x\ry") + encode_frame(b"") + encode_frame(b"z")
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert frames(feed_all(MllpFramer(), split_at(stream, [i, j]), eof=True)) == [b"x\ry", b"", b"z"]


def test_empty_chunk_is_not_eof() -> None:
    framer = MllpFramer()
    assert framer.feed(b"\x0bpart") == []
    assert framer.feed(b"") == []
    assert framer.in_frame
    assert framer.feed(b"ial\x1c\x0d") == [Frame(b"partial")]


def test_in_frame_is_true_between_vt_and_fs() -> None:
    framer = MllpFramer()
    assert not framer.in_frame
    framer.feed(b"\x0bMSH")
    assert framer.in_frame
    framer.feed(b"|\x1c")
    assert not framer.in_frame  # tolerant mode: the frame is complete at FS
    framer.feed(b"\x0d")
    assert not framer.in_frame


def test_accepts_bytearray_and_memoryview() -> None:
    framer = MllpFramer()
    assert framer.feed(bytearray(encode_frame(b"a"))) == [Frame(b"a")]
    assert framer.feed(memoryview(encode_frame(b"b"))) == [Frame(b"b")]


def test_rejects_a_nonpositive_limit() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        MllpFramer(max_frame_bytes=0)


def test_framer_module_imports_no_io() -> None:
    code = "import sys, hl7bridge.mllp.framer; print(sorted({'asyncio', 'socket', 'ssl'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- junk -----------------------------------------------------------------------------------------------


def test_junk_before_and_between_frames_is_reported_once_per_run() -> None:
    stream = b"garbage" + encode_frame(MSG_A) + b"xx" + encode_frame(MSG_B)
    assert MllpFramer().feed(stream) == [JunkDiscarded(7), Frame(MSG_A), JunkDiscarded(2), Frame(MSG_B)]


def test_a_junk_run_spread_over_chunks_is_one_event() -> None:
    framer = MllpFramer()
    events = feed_all(framer, [b"ab", b"cd", b"e\x0b", b"m\x1c\x0d"])
    assert events == [JunkDiscarded(5), Frame(b"m")]


def test_junk_at_eof_is_reported() -> None:
    framer = MllpFramer()
    assert framer.feed(encode_frame(b"m") + b"trailing") == [Frame(b"m")]
    assert framer.feed_eof() == [JunkDiscarded(8)]


def test_whitespace_between_frames_is_not_junk() -> None:
    stream = b"\r\n" + encode_frame(MSG_A) + b"\n" + encode_frame(MSG_B) + b"\r\n \t"
    assert feed_all(MllpFramer(), [stream], eof=True) == [Frame(MSG_A), Frame(MSG_B)]


def test_a_run_with_whitespace_and_junk_counts_all_its_bytes() -> None:
    assert MllpFramer().feed(b"\n\nX\n" + encode_frame(b"m")) == [JunkDiscarded(4), Frame(b"m")]


# --- limits -------------------------------------------------------------------------------------------


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    framer = MllpFramer(max_frame_bytes=10)
    assert framer.feed(encode_frame(b"0123456789")) == [Frame(b"0123456789")]


def test_a_frame_over_the_limit_is_dropped_and_the_next_frame_still_decodes() -> None:
    framer = MllpFramer(max_frame_bytes=10)
    stream = encode_frame(b"0123456789X") + b"after-junk-is-skipped" + encode_frame(b"ok")
    assert framer.feed(stream) == [FrameTooLarge(10), Frame(b"ok")]


def test_oversize_is_reported_as_soon_as_the_limit_is_crossed() -> None:
    framer = MllpFramer(max_frame_bytes=10)
    assert framer.feed(b"\x0b0123456789") == []
    assert framer.feed(b"X") == [FrameTooLarge(10)]
    assert not framer.in_frame
    assert framer.feed(b"more bytes\x1c\x0d") == []
    assert framer.feed_eof() == []


def test_feeding_20_mib_never_buffers_beyond_the_limit() -> None:
    limit = 1024 * 1024
    framer = MllpFramer(max_frame_bytes=limit)
    chunk = b"A" * 65536
    events = framer.feed(b"\x0b")
    highest = 0
    for _ in range(20 * 16):  # 20 MiB
        events += framer.feed(chunk)
        highest = max(highest, framer.buffered_bytes)
    events += framer.feed(b"\x1c\x0d" + encode_frame(b"next"))
    assert highest <= limit
    assert framer.buffered_bytes == 0
    assert events == [FrameTooLarge(limit), Frame(b"next")]


def test_a_big_frame_in_small_chunks_is_linear() -> None:
    # O(n^2) re-buffering would copy ~32 GiB here and take minutes; a chunk list is instant.
    payload = bytes(range(256)).replace(b"\x0b", b"").replace(b"\x1c", b"") * 16 * 1024
    data = encode_frame(payload)
    framer = MllpFramer()
    events = feed_all(framer, (data[i : i + 256] for i in range(0, len(data), 256)))
    assert events == [Frame(payload)]


# --- truncation ---------------------------------------------------------------------------------------


def test_eof_mid_frame_reports_a_truncated_frame() -> None:
    framer = MllpFramer()
    assert framer.feed(b"\x0bMSH|") == []
    assert framer.feed(b"partial") == []
    assert framer.feed_eof() == [TruncatedFrame(11)]
    assert not framer.in_frame


def test_a_new_vt_mid_frame_truncates_the_old_frame_and_starts_a_new_one() -> None:
    framer = MllpFramer()
    events = feed_all(framer, [b"\x0babc", b"de\x0b", b"fresh\x1c\x0d"])
    assert events == [TruncatedFrame(5), Frame(b"fresh")]


def test_eof_after_a_complete_frame_reports_nothing() -> None:
    framer = MllpFramer()
    assert framer.feed(encode_frame(b"m")) == [Frame(b"m")]
    assert framer.feed_eof() == []


# --- the trailing CR ---------------------------------------------------------------------------------


def test_tolerant_mode_delivers_at_fs_without_waiting_for_cr() -> None:
    framer = MllpFramer()
    assert framer.feed(b"\x0bm\x1c") == [Frame(b"m")]
    assert framer.feed(b"\x0d") == []  # the late CR is swallowed, not junk
    assert framer.feed_eof() == []


def test_tolerant_mode_accepts_frames_without_cr() -> None:
    stream = b"\x0bA\x1c\x0bB\x1c\x0bC\x1c\x0d"
    assert MllpFramer().feed(stream) == [Frame(b"A"), Frame(b"B"), Frame(b"C")]


def test_tolerant_mode_treats_a_non_cr_byte_after_fs_as_junk() -> None:
    assert MllpFramer().feed(b"\x0bA\x1cZZ\x0bB\x1c\x0d") == [Frame(b"A"), JunkDiscarded(2), Frame(b"B")]


def test_strict_mode_waits_for_cr_even_in_the_next_chunk() -> None:
    framer = MllpFramer(require_trailing_cr=True)
    assert framer.feed(b"\x0bm\x1c") == []
    assert framer.in_frame  # a mid-frame timeout still covers a sender that stops here
    assert framer.feed(b"\x0d") == [Frame(b"m")]
    assert not framer.in_frame


def test_strict_mode_reports_a_missing_cr_and_drops_the_frame() -> None:
    framer = MllpFramer(require_trailing_cr=True)
    stream = b"\x0bA\x1c\x0bB\x1c\x0d"
    assert framer.feed(stream) == [MissingTrailingCr(1), Frame(b"B")]


def test_strict_mode_reports_a_missing_cr_at_eof() -> None:
    framer = MllpFramer(require_trailing_cr=True)
    assert framer.feed(b"\x0babc\x1c") == []
    assert framer.feed_eof() == [MissingTrailingCr(3)]


def test_strict_mode_counts_the_pending_frame_against_the_limit() -> None:
    framer = MllpFramer(max_frame_bytes=4, require_trailing_cr=True)
    assert framer.feed(b"\x0babcd\x1c") == []
    assert framer.buffered_bytes == 4
    assert framer.feed(b"\x0d") == [Frame(b"abcd")]
    assert framer.buffered_bytes == 0


# --- property: chunking never changes the result ---------------------------------------------------------

payloads_st = st.lists(
    st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"")), max_size=8
)
junk_st = st.binary(max_size=20).map(lambda b: b.replace(b"\x0b", b"").lstrip(b"\x0d"))


@settings(max_examples=300, deadline=None)
@given(payloads=payloads_st, junk=st.lists(junk_st, min_size=9, max_size=9), data=st.data())
def test_any_chunking_yields_the_same_events(
    payloads: list[bytes], junk: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(j + encode_frame(p) for j, p in zip(junk, payloads, strict=False)) + junk[-1]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    strict = data.draw(st.booleans())
    whole = feed_all(MllpFramer(require_trailing_cr=strict), [stream], eof=True)
    chunked = feed_all(MllpFramer(require_trailing_cr=strict), split_at(stream, cuts), eof=True)
    assert frames(whole) == payloads
    assert chunked == whole
