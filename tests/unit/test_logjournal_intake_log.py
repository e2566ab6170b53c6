"""The intake log (store/intake_log.py) on real files: round trip, rollover, torn tails, release, locking."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from hl7bridge.store import intake_log as il
from hl7bridge.store.intake_log import IntakeLog, IntakeLogBusy, IntakeLogCorrupt, IntakeLogError


def payload(i: int, size: int = 100) -> bytes:
    return (f"PID|{i}|SECRET-{i}|".encode() * size)[:size]


def records(log: IntakeLog, after: int = 0) -> list[tuple[int, bytes]]:
    return list(log.read_from(after))


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


@pytest.fixture(params=[il.DEFAULT_PREFILL_BYTES, 0], ids=["prefill", "no-prefill"])
def prefill(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_round_trip_and_reopen(tmp_path: Path, prefill: int) -> None:
    log = IntakeLog(tmp_path / "log", prefill_bytes=prefill)
    assert (log.first_seq, log.next_seq, log.last_seq) == (1, 1, 0)
    assert log.append([payload(1)]) == 1
    assert log.append([payload(2), payload(3), b""]) == 4  # a batch: consecutive seqs, the last returned
    assert log.append([]) == 4
    assert records(log) == [(1, payload(1)), (2, payload(2)), (3, payload(3)), (4, b"")]
    assert records(log, after=2) == [(3, payload(3)), (4, b"")]
    assert records(log, after=4) == []
    log.close()

    again = IntakeLog(tmp_path / "log", prefill_bytes=prefill)
    try:
        assert (again.first_seq, again.next_seq) == (1, 5)
        assert again.append([payload(5)]) == 5
        assert [seq for seq, _ in records(again)] == [1, 2, 3, 4, 5]
    finally:
        again.close()


def test_prefilled_segment_ends_cleanly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = IntakeLog(tmp_path, prefill_bytes=64 * 1024)
    log.append([payload(1)])
    log.close()
    [segment] = segment_files(tmp_path)
    assert segment.stat().st_size >= 64 * 1024  # zeros ahead of the write position
    with caplog.at_level(logging.WARNING):
        again = IntakeLog(tmp_path, prefill_bytes=64 * 1024)
    assert not caplog.records  # the zeros are the end marker, not a torn tail
    assert records(again) == [(1, payload(1))]
    again.close()


def test_rollover_names_segments_by_first_seq(tmp_path: Path, prefill: int) -> None:
    log = IntakeLog(tmp_path, segment_bytes=4096, prefill_bytes=prefill)
    for i in range(1, 61):
        log.append([payload(i, 300)])
    log.append([payload(61, 10_000)])  # larger than a segment: gets one of its own
    files = segment_files(tmp_path)
    assert len(files) > 5 and files[0].name == f"{1:020d}.log"
    firsts = [int(f.name[:20]) for f in files]
    assert firsts == sorted(firsts)
    assert all(f.stat().st_size <= 4096 or f == files[-1] or f == files[-2] for f in files)
    assert records(log) == [(i, payload(i, 300)) for i in range(1, 61)] + [(61, payload(61, 10_000))]
    log.close()
    again = IntakeLog(tmp_path, segment_bytes=4096, prefill_bytes=prefill)
    assert again.next_seq == 62 and len(records(again)) == 61
    again.close()


def _three_records(directory: Path) -> tuple[Path, int, int]:
    """A log holding records 1..3; returns the segment and the byte range of record 3."""
    log = IntakeLog(directory, prefill_bytes=0)
    log.append([payload(1)])
    log.append([payload(2)])
    [segment] = segment_files(directory)
    start = segment.stat().st_size
    log.append([payload(3)])
    log.close()
    return segment, start, segment.stat().st_size


def _reopened_holds_two(directory: Path) -> None:
    log = IntakeLog(directory)
    try:
        assert [seq for seq, _ in records(log)] == [1, 2]
        assert log.next_seq == 3
        assert log.append([payload(9)]) == 3  # the torn record's seq is reused: it was never acknowledged
        assert records(log, after=2) == [(3, payload(9))]
    finally:
        log.close()


def test_torn_last_record_is_cut_at_every_byte_offset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pristine = tmp_path / "pristine"
    segment, start, end = _three_records(pristine)
    data = segment.read_bytes()
    for cut in range(start, end):
        for damage in ("short", "flip", "zeros"):
            work = tmp_path / f"{damage}-{cut}"
            shutil.copytree(pristine, work)
            target = work / segment.name
            if damage == "short":  # the write stopped here
                target.write_bytes(data[:cut])
            elif damage == "flip":  # a sector of the batch never made it (garbage instead)
                target.write_bytes(data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1:])
            else:  # zero-filled space where the rest of the record should be
                target.write_bytes(data[:cut] + bytes(end - cut))
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="hl7bridge.store.intake_log"):
                _reopened_holds_two(work)
            if cut > start or damage == "flip":  # cut at the record start: a clean end, nothing torn
                assert [r.levelname for r in caplog.records] == ["WARNING"], (damage, cut)
                assert "torn tail" in caplog.text and "SECRET" not in caplog.text and "PID" not in caplog.text
            shutil.rmtree(work)


def test_corruption_inside_an_older_segment_is_an_error(tmp_path: Path) -> None:
    log = IntakeLog(tmp_path, segment_bytes=4096, prefill_bytes=0)
    for i in range(1, 40):
        log.append([payload(i, 300)])
    log.close()
    first = segment_files(tmp_path)[0]
    data = bytearray(first.read_bytes())
    offset = len(il.MAGIC) + (16 + 300) + 20  # inside record 2's payload
    data[offset] ^= 0x01
    first.write_bytes(bytes(data))

    again = IntakeLog(tmp_path, segment_bytes=4096)  # opening scans only the last segment
    try:
        with pytest.raises(IntakeLogCorrupt) as info:
            records(again)
        message = str(info.value)
        assert first.name in message and f"offset {len(il.MAGIC) + 316}" in message and "checksum" in message
        assert "SECRET" not in message and "PID" not in message
        assert records(again, after=20)  # records after the damaged segment are still readable
    finally:
        again.close()


def test_missing_records_between_segments_are_an_error(tmp_path: Path) -> None:
    log = IntakeLog(tmp_path, segment_bytes=4096, prefill_bytes=0)
    for i in range(1, 40):
        log.append([payload(i, 300)])
    log.close()
    files = segment_files(tmp_path)
    files[1].unlink()
    again = IntakeLog(tmp_path, segment_bytes=4096)
    try:
        with pytest.raises(IntakeLogCorrupt, match=files[0].name):
            records(again)
    finally:
        again.close()


def test_release_deletes_whole_segments_never_the_active_one(tmp_path: Path, prefill: int) -> None:
    log = IntakeLog(tmp_path, segment_bytes=4096, prefill_bytes=prefill)
    for i in range(1, 50):
        log.append([payload(i, 300)])
    firsts = [int(f.name[:20]) for f in segment_files(tmp_path)]
    assert len(firsts) >= 3
    assert log.release_through(firsts[1] - 2) == 0  # the first segment still holds a record above
    assert log.release_through(firsts[1] - 1) == 1
    assert log.first_seq == firsts[1]
    assert [seq for seq, _ in records(log)] == list(range(firsts[1], 50))
    assert log.release_through(10**9) == len(firsts) - 2
    assert len(segment_files(tmp_path)) == 1 and log.segment_count() == 1  # the active one stays
    assert log.append([payload(50)]) == 50
    log.close()
    again = IntakeLog(tmp_path, segment_bytes=4096)
    assert again.first_seq == firsts[-1] and again.next_seq == 51
    again.close()


def test_advance_to_starts_after_an_index_position(tmp_path: Path) -> None:
    log = IntakeLog(tmp_path)
    log.append([payload(1)])
    log.advance_to(100)
    assert log.next_seq == 100 and log.append([payload(100)]) == 100
    assert records(log) == [(100, payload(100))]
    assert [f.name for f in segment_files(tmp_path)] == [f"{100:020d}.log"]
    log.advance_to(50)  # never backwards
    assert log.next_seq == 101
    log.close()


def test_one_owner_at_a_time(tmp_path: Path) -> None:
    log = IntakeLog(tmp_path)
    with pytest.raises(IntakeLogBusy):
        IntakeLog(tmp_path)
    log.close()
    IntakeLog(tmp_path).close()


def test_concurrent_appends_get_distinct_consecutive_seqs(tmp_path: Path) -> None:
    log = IntakeLog(tmp_path, segment_bytes=64 * 1024)
    got: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(50):
            last = log.append([payload(n * 1000 + i), payload(n * 1000 + i + 500)])
            with lock:
                got.append(last)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got) == list(range(2, 401, 2))
    assert [seq for seq, _ in records(log)] == list(range(1, 401))
    log.close()


def test_failed_write_appends_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = IntakeLog(tmp_path, prefill_bytes=0)
    log.append([payload(1)])
    real = os.pwrite

    def half_then_full(fd: int, data: bytes | memoryview, offset: int) -> int:
        monkeypatch.setattr(il.os, "pwrite", full)
        return real(fd, bytes(data)[: len(data) // 2], offset)

    def full(fd: int, data: bytes | memoryview, offset: int) -> int:
        monkeypatch.setattr(il.os, "pwrite", real)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(il.os, "pwrite", half_then_full)
    with pytest.raises(IntakeLogError, match="ENOSPC") as info:
        log.append([payload(2, 5000)])
    assert "SECRET" not in str(info.value)
    assert log.next_seq == 2 and log.broken is None
    assert log.append([payload(3)]) == 2
    assert records(log) == [(1, payload(1)), (2, payload(3))]
    log.close()
    again = IntakeLog(tmp_path)
    assert records(again) == [(1, payload(1)), (2, payload(3))]
    again.close()


def test_failed_fdatasync_refuses_further_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = IntakeLog(tmp_path)
    log.append([payload(1)])

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(il.os, "fdatasync", eio)
    with pytest.raises(IntakeLogError, match="EIO"):
        log.append([payload(2)])
    monkeypatch.undo()
    assert log.broken is not None
    with pytest.raises(IntakeLogError, match="unusable"):
        log.append([payload(3)])
    log.close()
    again = IntakeLog(tmp_path)  # reopening reads what really is on disk
    assert again.append([payload(4)]) >= 2
    again.close()
