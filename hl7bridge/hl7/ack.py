"""ACK / NACK messages (HL7 v2.5 §2.9, §2.15.8 MSA, §2.15.5 ERR). Pure text in, text out.

The ACK code comes from the error class (errors.py owns the policy); this module only lays out the
segments. A NACK never carries PHI: it echoes MSH header fields and MSH-10 (identifiers of the message,
not of the patient) and PHI-free reasons.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from datetime import datetime, timedelta

from hl7bridge.errors import AckCode, ErrCode, Hl7BridgeError, UnreadableMessage, enhanced
from hl7bridge.hl7.parse import (
    DEFAULT_ENCODING_CHARS,
    DEFAULT_FIELD_SEP,
    escape,
    normalise_segments,
    read_separators,
)
from hl7bridge.records import Envelope

__all__ = [
    "ERR_DESCRIPTIONS",
    "ack_for",
    "ack_requested",
    "build_ack",
    "error_location",
    "new_control_id",
    "parse_ack",
    "parse_ack_with_text",
]

#: HL7 table 0357 display texts, for ERR-3.2.
ERR_DESCRIPTIONS: dict[ErrCode, str] = {
    ErrCode.ACCEPTED: "Message accepted",
    ErrCode.SEGMENT_SEQUENCE: "Segment sequence error",
    ErrCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrCode.DATA_TYPE: "Data type error",
    ErrCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrCode.UNSUPPORTED_EVENT: "Unsupported event code",
    ErrCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrCode.UNSUPPORTED_VERSION: "Unsupported version id",
    ErrCode.UNKNOWN_KEY: "Unknown key identifier",
    ErrCode.DUPLICATE_KEY: "Duplicate key identifier",
    ErrCode.RECORD_LOCKED: "Application record locked",
    ErrCode.INTERNAL: "Application internal error",
}

_POSITIVE = frozenset({AckCode.AA, AckCode.CA})
_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: MSA-3 is 80 characters in v2.5; longer text is cut (before escaping, so no escape is split).
_MSA3_MAX = 80
_LOCATION = re.compile(r"^([A-Z][A-Z0-9]{2})(?:-(\d+)(?:\[(\d+)\])?(?:\.(\d+)(?:\.(\d+))?)?)?$")


#: Two base-36 digits per table entry: half the divisions of a digit-by-digit conversion.
_B36_PAIRS = tuple(a + b for a in _B36 for b in _B36)


def _base36(value: int, width: int) -> str:
    """`value` in `width` base-36 digits (upper case, zero-padded, high digits beyond `width` dropped)."""
    pairs = []
    for _ in range((width + 1) // 2):
        value, rem = divmod(value, 1296)
        pairs.append(_B36_PAIRS[rem])
    text = "".join(reversed(pairs))
    return text[1:] if width % 2 else text


class _ControlIds:
    """Fresh MSH-10 values without a system call per ACK (`secrets` reads os.urandom on every call).

    The random part is a per-process start drawn once from os.urandom (and drawn again in a forked
    child, so forked workers cannot repeat each other) plus a counter: ids never repeat within a
    process, and two processes collide only if their 57-bit starts land within a few counts of each
    other in the same millisecond.
    """

    __slots__ = ("_high", "_ms", "_next", "_prefix")

    def __init__(self) -> None:
        self._ms = -1
        self._prefix = ""
        self._next = 0
        self._high: tuple[int, str] = (-1, "")  # (value // 36**2, its 9 digits), replaced as a whole
        self.reseed()

    def reseed(self) -> None:
        self._next = secrets.randbelow(_RANDOM_SPACE)

    def __call__(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms != self._ms:  # the 9-digit time prefix changes at most once per millisecond
            self._ms, self._prefix = ms, _base36(ms, 9)
        value = self._next
        self._next = (value + 1) % _RANDOM_SPACE
        # _base36(value, 11) is the top 9 digits (value // 36**2) and the last two: the top part only
        # changes every 1,296 ids, so it is converted once per change, not per id.
        high, low = divmod(value, 1296)
        cached = self._high
        if cached[0] != high:
            cached = self._high = (high, _base36(high, 9))
        return self._prefix + cached[1] + _B36_PAIRS[low]


_RANDOM_SPACE = 36**11
_control_ids = _ControlIds()
os.register_at_fork(after_in_child=_control_ids.reseed)


def new_control_id() -> str:
    """A fresh MSH-10 for an outbound message: 20 characters, sortable by time, unique across processes.

    9 base-36 digits of Unix milliseconds (good until the year 5000) then 11 base-36 digits from a
    per-process random start (~57 bits from os.urandom) and a counter (see `_ControlIds`).
    """
    return _control_ids()


class _Stamps:
    """MSH-7 text per (second, UTC offset): strftime is the costliest step of an ACK, and a busy
    listener stamps thousands of ACKs within one second."""

    __slots__ = ("head", "offset", "second", "zone")

    def __init__(self) -> None:
        self.second: datetime | None = None
        self.offset: timedelta | None = None
        self.head = ""
        self.zone = ""


_stamps = _Stamps()


def _timestamp(now: datetime) -> str:
    offset = now.utcoffset()
    if now.tzinfo is None or offset is None:
        raise ValueError("ACK timestamps must be timezone-aware")
    second = now.replace(microsecond=0)
    cache = _stamps
    # Aware datetimes compare as instants, so the offset is compared too: same instant, other zone.
    if cache.second != second or cache.offset != offset:
        head, zone = now.strftime("%Y%m%d%H%M%S|%z").split("|")
        cache.second, cache.offset, cache.head, cache.zone = second, offset, head, zone[:5]  # DTM: ±HHMM only
    return f"{cache.head}.{now.microsecond // 100:04d}{cache.zone}"


_utc_second: tuple[int, str] = (-1, "")  # (Unix second, its "%Y%m%d%H%M%S" in UTC), swapped whole


def _utc_now_stamp() -> str:
    """`_timestamp(datetime.now(UTC))`, read from the clock directly: no datetime per ACK."""
    global _utc_second
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    cache = _utc_second
    if cache[0] != second:
        cache = _utc_second = (second, time.strftime("%Y%m%d%H%M%S", time.gmtime(second)))
    return f"{cache[1]}.{ns // 100_000:04d}+0000"


def error_location(location: str | None, component_sep: str = "^") -> str:
    """ERR-2 (ERL) for a location such as "PID-3", "PID-3.1", "PID-3[2].1" or "SCH": "PID^1^3" etc.

    The segment sequence is always 1: intake only reports the first occurrence. Unrecognised → "".
    """
    if not location:
        return ""
    match = _LOCATION.match(location.strip())
    if match is None:
        return ""
    segment, field, repetition, component, subcomponent = match.groups()
    parts = [segment, "1"]
    if field:
        parts.append(field)
        if repetition or component:
            parts.append(repetition or "1")
        if component:
            parts.append(component)
            if subcomponent:
                parts.append(subcomponent)
    return component_sep.join(parts)


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("."):
        if not (part.isascii() and part.isdigit()):  # "²".isdigit() is True, and int("²") raises
            break
        out.append(int(part))
    return tuple(out)


def ack_for(original: Envelope | None, error: Hl7BridgeError | None) -> tuple[AckCode, str]:
    """The ACK code (enhanced-mode code when the original asked for enhanced mode) and MSA-3 text."""
    code = AckCode.AA if error is None else error.ack_code
    if original is not None and original.enhanced_mode:
        code = enhanced(code)
    return code, "" if error is None else error.reason


def ack_requested(original: Envelope | None, code: AckCode) -> bool:
    """Whether MSH-15 (accept acknowledgment type) asks for this ACK: AL/empty always, NE never,
    ER only for errors, SU only for success. Unknown values → always (answering is the safe side)."""
    if original is None:
        return True
    wanted = original.accept_ack_type.upper()
    positive = code in _POSITIVE
    if wanted == "NE":
        return False
    if wanted == "ER":
        return not positive
    if wanted == "SU":
        return positive
    return True


def build_ack(
    original: Envelope | None,
    code: AckCode,
    *,
    error: Hl7BridgeError | None = None,
    text: str = "",
    control_id: str | None = None,
    now: datetime | None = None,
    sending_application: str = "HL7BRIDGE",
    sending_facility: str = "",
) -> str:
    """The ACK message answering `original` (None when its MSH could not be read), segments joined by \\r
    with a trailing \\r.

    MSH: the original's separators, sender and receiver swapped (our defaults when the original left
    MSH-5/6 empty), MSH-7 aware with an explicit offset, MSH-9 ACK^<trigger>^ACK, a fresh MSH-10,
    MSH-11/12/18 echoed. In enhanced mode (MSH-15/16 valued) AA/AE/AR become CA/CE/CR. Every NACK gets
    an ERR segment (ERR-2 location, ERR-3 code, ERR-4 "E", ERR-8 reason; ERR-1 too for v2.4 and older).
    """
    fs = original.field_sep if original is not None else DEFAULT_FIELD_SEP
    enc = original.encoding_chars if original is not None else DEFAULT_ENCODING_CHARS
    comp = enc[0]
    if original is not None and original.enhanced_mode:
        code = enhanced(code)
    stamp = _timestamp(now) if now is not None else _utc_now_stamp()
    version = (original.version if original is not None else "") or "2.5.1"
    msh = [
        "MSH",
        enc,
        (original.receiving_application if original is not None else "") or sending_application,
        (original.receiving_facility if original is not None else "") or sending_facility,
        original.sending_application if original is not None else "",
        original.sending_facility if original is not None else "",
        stamp,
        "",
        f"ACK{comp}{original.trigger if original is not None else ''}{comp}ACK",
        control_id if control_id is not None else new_control_id(),
        (original.processing_id if original is not None else "") or "P",
        version,
    ]
    charset = original.charset if original is not None else ""
    if charset:
        msh.extend(["", "", "", "", "", charset])  # MSH-13..17 empty, MSH-18
    reason = text or (error.reason if error is not None else "")
    msa = ["MSA", code.value, original.control_id if original is not None else ""]
    if reason:
        msa.append(escape(reason[:_MSA3_MAX], enc, fs))
    segments = [fs.join(msh), fs.join(msa)]
    if code not in _POSITIVE:
        segments.append(_err_segment(error, reason, version, fs, enc))
    return "\r".join(segments) + "\r"


def _err_segment(error: Hl7BridgeError | None, reason: str, version: str, fs: str, enc: str) -> str:
    comp, sub = enc[0], enc[3]
    err_code = error.err_code if error is not None else ErrCode.INTERNAL
    description = ERR_DESCRIPTIONS.get(err_code, "")
    location = error_location(error.location if error is not None else None, comp)
    err1 = ""
    version_tuple = _version_tuple(version)
    if version_tuple and version_tuple < (2, 5):
        # v2.4 and older have no ERR-2..8; ERR-1 (ELD) carries segment^sequence^field^code&text&table.
        eld = location.split(comp)[:3] if location else []
        eld += [""] * (3 - len(eld))
        eld.append(sub.join((err_code.value, escape(description, enc, fs), "HL70357")))
        err1 = comp.join(eld)
    fields = [
        "ERR",
        err1,
        location,
        comp.join((err_code.value, description, "HL70357")),
        "E",
        "",
        "",
        "",
        escape(reason, enc, fs),
    ]
    return fs.join(fields)


def parse_ack(text: str) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, ERR code) from an ACK message; the ERR code is ERR-3.1, else ERR-1.4.1 (v2.4 and
    older), else "". Values are raw field text. Raises UnreadableMessage when there is no MSH or MSA."""
    ack_code, control_id, err_code, _ = parse_ack_with_text(text)
    return ack_code, control_id, err_code


def parse_ack_with_text(text: str) -> tuple[str, str, str, str]:
    """parse_ack plus MSA-3 (the readable text of a NACK)."""
    text = normalise_segments(text.strip("\x0b\x1c"))
    fs, enc = read_separators(text)
    comp, sub = enc[0], enc[3]
    ack_code = control_id = err_code = msa_text = ""
    found_msa = False
    for segment in text.split("\r"):
        fields = segment.split(fs)
        if fields[0] == "MSA" and not found_msa:
            found_msa = True
            ack_code = fields[1].strip() if len(fields) > 1 else ""
            control_id = fields[2] if len(fields) > 2 else ""
            msa_text = fields[3] if len(fields) > 3 else ""
        elif fields[0] == "ERR" and not err_code:
            err3 = fields[3].split(comp, 1)[0].strip() if len(fields) > 3 else ""
            if not err3 and len(fields) > 1:
                eld = fields[1].split(comp)
                err3 = eld[3].split(sub, 1)[0].strip() if len(eld) > 3 else ""
            err_code = err3
    if not found_msa:
        raise UnreadableMessage("acknowledgement has no MSA segment", location="MSA")
    return ack_code, control_id, err_code, msa_text
