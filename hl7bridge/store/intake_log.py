"""A segmented append-only log: the durable record behind `LoggedJournal` (pure file I/O, no SQL).

Layout: a directory of segments `<first_seq:020d>.log` plus a `LOCK` file (flock: one writer process).
A segment is an 8-byte magic followed by records:

    length u32 | crc32 u32 | seq u64 | payload          (little endian; the CRC covers seq + payload)

Every record has a global sequence number, one above the previous record's; a segment's name is the seq of
its first record. `append` writes a whole batch with one `os.pwrite` and makes it durable with one
`os.fdatasync`, so a batch is on disk (or not acknowledged) as a unit; a segment is rolled when the next
batch would take it past `segment_bytes`, and the directory is fsynced when a segment is created.

Zero-filled ahead: the active segment is extended with zeros `prefill_bytes` at a time, so most
fdatasyncs overwrite allocated blocks and change no metadata. On ext4 that halves their cost: a size
change forces a journal commit, which in data=ordered mode also waits for other files' new blocks (the
SQLite WAL being indexed). An all-zero record header therefore marks the end of a segment.

Recovery: a crash can only tear the end of the *last* segment (a batch whose fdatasync never returned, so
nothing in it was acknowledged). On open that tail (short record, bad CRC) is truncated away and logged
with counts only. Anything wrong inside an older segment cannot come from a crash: it raises
`IntakeLogCorrupt` naming the segment and the offset, never the content.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path

__all__ = [
    "DEFAULT_PREFILL_BYTES", "DEFAULT_SEGMENT_BYTES", "IntakeLog", "IntakeLogBusy", "IntakeLogCorrupt",
    "IntakeLogError",
]

log = logging.getLogger("hl7bridge.store.intake_log")

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
#: 256 KiB of zeros cost one slower fdatasync (~0.5 ms here) every ~128 two-kilobyte messages.
DEFAULT_PREFILL_BYTES = 256 * 1024
MAGIC = b"HL7BLOG\x01"
_HEAD = struct.Struct("<IIQ")  # length, crc32, seq
_END = bytes(_HEAD.size)  # zeros: the unwritten, zero-filled rest of a segment
_SEQ = struct.Struct("<Q")
#: A length above this is corruption, not a record (one journal batch is far smaller).
_MAX_RECORD = 1 << 30
_SUFFIX = ".log"


class IntakeLogError(Exception):
    """The log cannot be used (I/O failure, or a previous failure left it in an unknown state)."""


class IntakeLogCorrupt(IntakeLogError):
    """Damage a crash cannot explain (inside an older segment): needs an operator."""


class IntakeLogBusy(IntakeLogError):
    """Another IntakeLog (in this or another process) owns the directory."""


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, type(e).__name__)


def _zeros_from(path: Path, offset: int) -> bool:
    """Whether everything in the file from `offset` on is zero bytes (the prefilled, unused rest)."""
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return False
    return True


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{_SUFFIX}"


def _scan(path: Path, first_seq: int) -> Iterator[tuple[int, int, int, bytes | str]]:
    """(offset, seq, end offset, payload) per valid record; a problem ends the scan with a final tuple whose
    last item is a str (what is wrong) and whose seq is the one expected there."""
    with path.open("rb") as f:
        magic = f.read(len(MAGIC))
        if len(magic) < len(MAGIC) or magic == bytes(len(MAGIC)):
            yield 0, first_seq, 0, "no segment header"  # created (and maybe zero-filled), never written
            return
        if magic != MAGIC:
            yield 0, first_seq, 0, "not an intake log segment"
            return
        offset, expected = len(MAGIC), first_seq
        while True:
            head = f.read(_HEAD.size)
            if not head or head == _END:
                return
            if len(head) < _HEAD.size:
                yield offset, expected, offset, "short record header"
                return
            length, crc, seq = _HEAD.unpack(head)
            if length > _MAX_RECORD:
                yield offset, expected, offset, "implausible record length"
                return
            payload = f.read(length)
            if len(payload) < length:
                yield offset, expected, offset, "short record"
                return
            if _crc(seq, payload) != crc:
                yield offset, expected, offset, "bad checksum"
                return
            if seq != expected:
                yield offset, expected, offset, "sequence out of order"
                return
            end = offset + _HEAD.size + length
            yield offset, seq, end, payload
            offset, expected = end, seq + 1


class IntakeLog:
    """One writer's segmented log in `directory` (created if missing). Thread-safe: appends are serialised.
    Raises IntakeLogBusy when another IntakeLog holds the directory, IntakeLogCorrupt for damage that a
    crash cannot explain."""

    def __init__(
        self, directory: Path | str, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        prefill_bytes: int = DEFAULT_PREFILL_BYTES,
    ) -> None:
        if segment_bytes < 4096 or prefill_bytes < 0:
            raise ValueError("segment_bytes must be at least 4096, prefill_bytes at least 0")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.prefill_bytes = prefill_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None  # the active (last) segment
        self._size = 0  # bytes of the active segment that are whole, durable records (the write offset)
        self._filled = 0  # the active segment's length: zeros from _size on
        self._broken: str | None = None
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.directory.parent)  # the directory entry itself must survive a power cut
        self._lock_fd: int | None = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            self._lock_fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise IntakeLogBusy("the intake log is in use by another process") from None
            raise
        try:
            self._segments = self._list_segments()  # first seqs, ascending
            self._open_last()
        except BaseException:
            self.close()
            raise

    # --- properties -------------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """The seq the next record will get."""
        return self._next

    @property
    def last_seq(self) -> int:
        """The seq of the last durable record (first_seq - 1 when the log holds none)."""
        return self._next - 1

    @property
    def broken(self) -> str | None:
        """Why appends are refused after a failure the log could not undo (None when usable)."""
        return self._broken

    @property
    def first_seq(self) -> int:
        """The seq of the oldest record still held (== next_seq when empty)."""
        return self._segments[0] if self._segments else self._next

    # --- open --------------------------------------------------------------------------------------

    def _list_segments(self) -> list[int]:
        seqs: list[int] = []
        for path in self.directory.iterdir():
            name = path.name
            stem = name[:20]
            if name.endswith(_SUFFIX) and len(name) == 20 + len(_SUFFIX) and stem.isascii() and stem.isdigit():
                seqs.append(int(name[:20]))
        return sorted(seqs)

    def _open_last(self) -> None:
        if not self._segments:
            self._next = 1
            return
        first = self._segments[-1]
        path = self.directory / _segment_name(first)
        good_end, records, problem, expected = 0, 0, "", first
        for offset, seq, end, payload in _scan(path, first):
            if isinstance(payload, str):
                problem, good_end, expected = payload, offset, seq
                break
            good_end, records, expected = end, records + 1, seq + 1
        if problem in ("not an intake log segment", "sequence out of order"):
            raise IntakeLogCorrupt(f"intake log segment {path.name}: {problem} at offset {good_end}")
        size = path.stat().st_size
        if not _zeros_from(path, good_end):
            # A torn batch: its fdatasync never returned, so nothing in it was acknowledged.
            log.warning("intake log: truncated a torn tail of %d bytes after %d whole records in segment %s",
                        size - good_end, records, path.name)
            with path.open("r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
            size = good_end
        self._fd = os.open(path, os.O_WRONLY)
        self._size, self._filled = good_end, size
        self._next = expected

    # --- writing -----------------------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes]) -> int:
        """Write the payloads as consecutive records, durably (one write, one fdatasync); returns the seq of
        the last one. On failure nothing is appended (a partial write is cut off) and IntakeLogError is
        raised; if even that cannot be ensured, the log refuses every later append."""
        if not payloads:
            return self.last_seq
        with self._lock:
            if self._broken is not None:
                raise IntakeLogError(self._broken)
            if self._lock_fd is None:
                raise IntakeLogError("intake log closed")
            seq = self._next
            parts: list[bytes] = []
            for payload in payloads:
                parts.append(_HEAD.pack(len(payload), _crc(seq, payload), seq))
                parts.append(payload)
                seq += 1
            data = b"".join(parts)
            if self._fd is None or (self._size > len(MAGIC) and self._size + len(data) > self.segment_bytes):
                self._roll()
            if self._size == 0:
                data = MAGIC + data
            self._write(data)
            self._next = seq
            return seq - 1

    def _roll(self) -> None:
        """Start a new segment named after the next seq; the directory entry is made durable first."""
        try:
            fd = os.open(self.directory / _segment_name(self._next), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            _fsync_dir(self.directory)
        except OSError as e:
            raise IntakeLogError(f"intake log: cannot create a segment ({_errname(e)})") from None
        if self._fd is not None:
            with suppress(OSError):  # the unused zeros; losing this in a crash changes nothing
                os.ftruncate(self._fd, self._size)
            os.close(self._fd)
        self._fd, self._size, self._filled = fd, 0, 0
        self._segments.append(self._next)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        fd, start = self._fd, self._size
        if self.prefill_bytes and start + len(data) > self._filled:
            self._prefill(start + len(data))
        done = 0
        try:
            while done < len(data):  # a regular file writes all at once unless the disk fills up
                done += os.pwrite(fd, memoryview(data)[done:], start + done)
        except OSError as e:
            name = _errname(e)
            try:  # put the end marker back: zeros where a record began
                os.pwrite(fd, bytes(done), start)
            except OSError:
                self._broken = f"intake log unusable after a failed write ({name})"
            raise IntakeLogError(f"intake log write failed ({name})") from None
        try:
            os.fdatasync(fd)
        except OSError as e:
            # After a failed fsync the page cache state is unknown (the kernel may have dropped the dirty
            # pages): refuse further appends; reopening re-reads what really is on disk.
            name = _errname(e)
            self._broken = f"intake log unusable after a failed fdatasync ({name})"
            raise IntakeLogError(f"intake log fdatasync failed ({name})") from None
        self._size = start + len(data)
        self._filled = max(self._filled, self._size)

    def _prefill(self, end: int) -> None:
        """Extend the active segment with zeros to cover `end` and `prefill_bytes` more; made durable by the
        caller's fdatasync. On failure (disk full) the file is cut back and nothing was written."""
        assert self._fd is not None
        target = max(end, self._filled + self.prefill_bytes)
        try:
            offset = self._filled
            while offset < target:
                offset += os.pwrite(self._fd, bytes(min(target - offset, 1 << 20)), offset)
        except OSError as e:
            with suppress(OSError):
                os.ftruncate(self._fd, self._filled)
            raise IntakeLogError(f"intake log write failed ({_errname(e)})") from None
        self._filled = target

    def advance_to(self, next_seq: int) -> None:
        """Make the next record's seq at least `next_seq` (the index is ahead of the log, e.g. the log
        directory was removed): starts an empty segment there and drops the older ones."""
        with self._lock:
            if next_seq <= self._next:
                return
            previous, self._next = self._next, next_seq
            try:
                self._roll()
            except BaseException:
                self._next = previous
                raise
        self.release_through(next_seq - 1)

    # --- reading and releasing ---------------------------------------------------------------------

    def read_from(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(seq, payload) of every durable record after `seq`, in order, across segments (what was durable
        when the iteration started)."""
        with self._lock:
            segments, active_size, end_seq = list(self._segments), self._size, self._next
        for i, first in enumerate(segments):
            last_in_segment = segments[i + 1] - 1 if i + 1 < len(segments) else end_seq - 1
            if last_in_segment <= seq:
                continue
            path = self.directory / _segment_name(first)
            expected = first
            for offset, rec_seq, _end, payload in _scan(path, first):
                if i + 1 == len(segments) and offset >= active_size:
                    break  # appended after the snapshot (or a tail being written)
                if isinstance(payload, str):
                    raise IntakeLogCorrupt(f"intake log segment {path.name}: {payload} at offset {offset}")
                expected = rec_seq + 1
                if rec_seq > seq:
                    yield rec_seq, payload
            if i + 1 < len(segments) and expected != segments[i + 1]:
                raise IntakeLogCorrupt(
                    f"intake log segment {path.name}: ends at seq {expected - 1}, the next segment starts at "
                    f"{segments[i + 1]}")

    def releasable_through(self, seq: int) -> bool:
        """Whether `release_through(seq)` would delete a segment."""
        head = self._segments[:2]  # a snapshot (another thread may be rolling)
        return len(head) == 2 and head[1] - 1 <= seq

    def release_through(self, seq: int) -> int:
        """Delete whole segments whose records are all <= seq (never the active one); returns how many."""
        if not self.releasable_through(seq):
            return 0  # the usual case, decided without waiting for an append's fdatasync to finish
        with self._lock:
            doomed: list[int] = []
            while len(self._segments) > 1 and self._segments[1] - 1 <= seq:
                doomed.append(self._segments.pop(0))
        for first in doomed:
            with suppress(FileNotFoundError):
                (self.directory / _segment_name(first)).unlink()
        # Not fsyncing the directory: a deletion lost in a crash only re-offers records already indexed.
        return len(doomed)

    def segment_count(self) -> int:
        with self._lock:
            return len(self._segments)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
