"""Sans-I/O MLLP framing: bytes in, events out. No sockets, no asyncio (after h11 and wsproto).

An MLLP block is ``<VT> payload <FS> <CR>`` (0x0b ... 0x1c 0x0d). The framer is a small state machine fed
with whatever chunks the transport delivers; it never buffers more than ``max_frame_bytes`` of payload and
scans with ``bytes.find`` so that a frame split into many chunks costs O(n), not O(n^2).

Decisions (the standard leaves them open; drivers rely on them):

- Bytes outside a frame are discarded and reported once per run as `JunkDiscarded`, when the run ends (at
  the next ``<VT>`` or at EOF). Runs made only of whitespace (CR, LF, space, tab) are dropped silently:
  senders commonly put a newline after ``<FS><CR>``, and that is not worth an alarm.
- A frame larger than ``max_frame_bytes`` yields `FrameTooLarge` as soon as the limit is crossed; the framer
  then drops everything up to the next ``<VT>`` (no junk is reported for those bytes).
- A ``<VT>`` inside a frame, or EOF inside a frame, yields `TruncatedFrame` for the partial payload; after a
  ``<VT>`` the new frame starts.
- ``require_trailing_cr=False`` (default, tolerant, like Camel's ``requireEndOfData=false``): the frame is
  delivered at ``<FS>`` without waiting for the CR, so a sender that never sends it is still answered; a CR
  right after ``<FS>`` (possibly in the next chunk) is swallowed, any other byte is outside-frame data.
- ``require_trailing_cr=True`` (strict): the frame is delivered only once the CR after ``<FS>`` arrives.
  If another byte (or EOF) follows ``<FS>``, the frame is *not* delivered: `MissingTrailingCr` is reported
  and the byte is processed as outside-frame data. Until the CR arrives `in_frame` stays true, so a
  driver's mid-frame timeout covers a sender that stops after ``<FS>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "CR",
    "FS",
    "VT",
    "Event",
    "Frame",
    "FrameTooLarge",
    "JunkDiscarded",
    "MissingTrailingCr",
    "MllpFramer",
    "TruncatedFrame",
    "encode_frame",
]

#: Start of block.
VT = b"\x0b"
#: End of block.
FS = b"\x1c"
#: End of data (carriage return after FS).
CR = b"\x0d"

_WHITESPACE = b" \t\r\n"
DEFAULT_MAX_FRAME_BYTES = 10 * 1024 * 1024


# --- events (frozen and slotted; don't subclass these) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete frame; `payload` is the bytes between ``<VT>`` and ``<FS>``."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class JunkDiscarded:
    """A run of `nbytes` bytes outside any frame was dropped."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A frame grew past `limit` bytes; it is dropped and the framer skips to the next ``<VT>``."""

    limit: int


@dataclass(frozen=True, slots=True)
class TruncatedFrame:
    """A frame ended early (EOF or a new ``<VT>``) after `nbytes` payload bytes; it is dropped."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class MissingTrailingCr:
    """Strict mode only: ``<FS>`` was not followed by CR; the frame of `nbytes` bytes is dropped."""

    nbytes: int


Event = Frame | JunkDiscarded | FrameTooLarge | TruncatedFrame | MissingTrailingCr


class _State(Enum):
    #: Between frames: looking for <VT>, counting junk.
    OUTSIDE = "outside"
    #: After <VT>: collecting payload until <FS>.
    IN_FRAME = "in_frame"
    #: Just after <FS>: the next byte should be CR.
    AFTER_FS = "after_fs"
    #: After an oversize frame: dropping everything until the next <VT>.
    DISCARDING = "discarding"


def encode_frame(payload: bytes) -> bytes:
    """Wrap `payload` in an MLLP block."""
    return b"".join((VT, payload, FS, CR))


class MllpFramer:
    """Incremental MLLP decoder. Call `feed` with each chunk and `feed_eof` when the peer closes."""

    __slots__ = ("_buf", "_junk", "_junk_significant", "_max", "_pending", "_state", "_strict")

    def __init__(
        self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, require_trailing_cr: bool = False
    ) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be at least 1")
        self._max = max_frame_bytes
        self._strict = require_trailing_cr
        self._state = _State.OUTSIDE
        # Payload of the frame being collected; a list of chunks is joined once at <FS> (O(n) overall).
        self._buf: list[bytes] = []
        self._pending = 0  # bytes held in _buf
        self._junk = 0  # length of the current run of outside-frame bytes
        self._junk_significant = False  # the run has a byte that is not whitespace

    @property
    def max_frame_bytes(self) -> int:
        return self._max

    @property
    def in_frame(self) -> bool:
        """True from ``<VT>`` until the frame is complete: a driver arms its mid-frame timeout on it."""
        return self._state is _State.IN_FRAME or (self._state is _State.AFTER_FS and self._strict)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes currently held (never more than `max_frame_bytes`)."""
        return self._pending

    def feed(self, data: bytes) -> list[Event]:
        """Consume a chunk; return the events it completes. ``b""`` is just no data (see `feed_eof`)."""
        if isinstance(data, memoryview | bytearray):
            data = bytes(data)
        events: list[Event] = []
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state is _State.OUTSIDE:
                pos = self._outside(data, pos, events)
            elif state is _State.IN_FRAME:
                pos = self._in_frame(data, pos, events)
            elif state is _State.AFTER_FS:
                if data[pos] == CR[0]:
                    pos += 1
                    if self._strict:
                        events.append(Frame(self._take()))
                elif self._strict:
                    events.append(MissingTrailingCr(len(self._take())))
                # Without a CR the byte is left for the outside state to judge.
                self._state = _State.OUTSIDE
            else:  # DISCARDING
                vt = data.find(VT, pos)
                if vt < 0:
                    return events
                pos = vt + 1
                self._state = _State.IN_FRAME
        return events

    def feed_eof(self) -> list[Event]:
        """The peer closed: report what is left (a partial frame, a junk run) and reset."""
        events: list[Event] = []
        state = self._state
        if state is _State.IN_FRAME:
            events.append(TruncatedFrame(len(self._take())))
        elif state is _State.AFTER_FS and self._strict:
            events.append(MissingTrailingCr(len(self._take())))
        self._flush_junk(events)
        self._state = _State.OUTSIDE
        return events

    # --- states -------------------------------------------------------------------------------------

    def _outside(self, data: bytes, pos: int, events: list[Event]) -> int:
        vt = data.find(VT, pos)
        stop = len(data) if vt < 0 else vt
        if stop > pos:
            self._junk += stop - pos
            if not self._junk_significant and data[pos:stop].strip(_WHITESPACE):
                self._junk_significant = True
        if vt < 0:
            return stop
        self._flush_junk(events)
        self._state = _State.IN_FRAME
        return vt + 1

    def _in_frame(self, data: bytes, pos: int, events: list[Event]) -> int:
        fs = data.find(FS, pos)
        stop = len(data) if fs < 0 else fs
        vt = data.find(VT, pos, stop)
        if vt >= 0:
            # A new start block before the end of this one: the sender gave up on the old frame.
            events.append(TruncatedFrame(self._pending + vt - pos))
            self._drop()
            return vt + 1  # stay IN_FRAME: the new frame starts here
        size = stop - pos
        if self._pending + size > self._max:
            self._drop()
            events.append(FrameTooLarge(self._max))
            self._state = _State.DISCARDING
            return stop
        if fs < 0:
            if size:
                self._buf.append(data[pos:stop])
                self._pending += size
            return stop
        if not self._buf:
            # Fast path: a frame wholly inside one chunk is a single slice.
            self._buf.append(data[pos:stop])
            self._pending = size
        elif size:
            self._buf.append(data[pos:stop])
            self._pending += size
        if not self._strict:
            events.append(Frame(self._take()))
        self._state = _State.AFTER_FS
        return fs + 1

    # --- helpers ------------------------------------------------------------------------------------

    def _take(self) -> bytes:
        """Return and clear the buffered payload (one join for the whole frame)."""
        buf = self._buf
        payload = buf[0] if len(buf) == 1 else b"".join(buf)
        self._drop()
        return payload

    def _drop(self) -> None:
        self._buf = []
        self._pending = 0

    def _flush_junk(self, events: list[Event]) -> None:
        if self._junk and self._junk_significant:
            events.append(JunkDiscarded(self._junk))
        self._junk = 0
        self._junk_significant = False
