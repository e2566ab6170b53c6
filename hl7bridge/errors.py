"""The error tree, and the one place that maps failures to HL7 acknowledgement codes.

Every failure that can reach a sender or the dead-letter queue is one of these classes. Each class owns
its ACK code (MSA-1 in original mode; the enhanced-mode code is derived), its HL7 error code (table 0357,
ERR-3), whether a retry can help, and the journal state it leaves behind. Nothing else in the code base
decides an ACK code: `ack.py` asks the exception.

Messages (`reason`) must never carry PHI: they name fields and codes, not values from the message.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "AckCode",
    "BadFieldValue",
    "ErrCode",
    "FramingError",
    "Hl7BridgeError",
    "JournalUnavailable",
    "MappingError",
    "MissingRequired",
    "PermanentSinkError",
    "SinkError",
    "TransientSinkError",
    "UnreadableMessage",
    "UnsupportedMessage",
    "enhanced",
]


class AckCode(StrEnum):
    """MSA-1 acknowledgement codes (HL7 table 0008)."""

    #: Original mode: application accept.
    AA = "AA"
    #: Original mode: application error (the sender should fix the message, not blindly resend).
    AE = "AE"
    #: Original mode: application reject (unsupported, unreadable, or we cannot store right now).
    AR = "AR"
    #: Enhanced mode: commit accept.
    CA = "CA"
    #: Enhanced mode: commit error.
    CE = "CE"
    #: Enhanced mode: commit reject.
    CR = "CR"


_ENHANCED = {AckCode.AA: AckCode.CA, AckCode.AE: AckCode.CE, AckCode.AR: AckCode.CR}


def enhanced(code: AckCode) -> AckCode:
    """The enhanced-mode (commit) counterpart of an original-mode code."""
    return _ENHANCED.get(code, code)


class ErrCode(StrEnum):
    """HL7 table 0357 message error condition codes, as used in ERR-3."""

    #: Message accepted.
    ACCEPTED = "0"
    #: Segment sequence error: a required segment is missing or out of order.
    SEGMENT_SEQUENCE = "100"
    #: Required field missing.
    REQUIRED_FIELD_MISSING = "101"
    #: Data type error: the field cannot be read as its type.
    DATA_TYPE = "102"
    #: Table value not found: a coded value is not in the table the mapping uses.
    TABLE_VALUE_NOT_FOUND = "103"
    #: Unsupported message type.
    UNSUPPORTED_MESSAGE_TYPE = "200"
    #: Unsupported event code.
    UNSUPPORTED_EVENT = "201"
    #: Unsupported processing ID.
    UNSUPPORTED_PROCESSING_ID = "202"
    #: Unsupported version ID.
    UNSUPPORTED_VERSION = "203"
    #: Unknown key identifier (e.g. a merge names a patient we do not know).
    UNKNOWN_KEY = "204"
    #: Duplicate key identifier.
    DUPLICATE_KEY = "205"
    #: Application record locked.
    RECORD_LOCKED = "206"
    #: Application internal error.
    INTERNAL = "207"


class Hl7BridgeError(Exception):
    """Base of every failure hl7bridge reports. Not raised directly.

    Class attributes are the defaults; an instance may narrow `err_code` (for example an unsupported
    *event* rather than an unsupported *type*).
    """

    ack_code: AckCode = AckCode.AE
    err_code: ErrCode = ErrCode.INTERNAL
    retryable: bool = False
    #: Journal state of a message that failed this way at intake ("rejected"), or in a worker ("dead").
    journal_state: str = "rejected"

    def __init__(self, reason: str, *, err_code: ErrCode | None = None, location: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if err_code is not None:
            self.err_code = err_code
        #: HL7 location of the problem (ERR-2), e.g. "PID-3" or "MSH-10"; never a value.
        self.location = location

    @property
    def kind(self) -> str:
        """A short, bounded label for metrics and the DLQ's error column."""
        name = type(self).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")

    def __str__(self) -> str:
        return self.reason


# --- intake: what the sender gets back -------------------------------------------------------------


class FramingError(Hl7BridgeError):
    """An MLLP framing violation (oversize frame, timeout mid-frame). Answered by closing the connection."""

    ack_code = AckCode.AR
    err_code = ErrCode.DATA_TYPE


class UnreadableMessage(Hl7BridgeError):
    """No usable MSH, bad separators, undecodable bytes. AR with a best-effort header; raw bytes kept."""

    ack_code = AckCode.AR
    err_code = ErrCode.DATA_TYPE


class UnsupportedMessage(Hl7BridgeError):
    """Unsupported message type (200), trigger event (201), processing ID (202) or version (203)."""

    ack_code = AckCode.AR
    err_code = ErrCode.UNSUPPORTED_MESSAGE_TYPE


class MissingRequired(Hl7BridgeError):
    """A required segment (100) or field (101) is missing: no MSH-10, no patient identifier, no SCH."""

    ack_code = AckCode.AE
    err_code = ErrCode.REQUIRED_FIELD_MISSING


class BadFieldValue(Hl7BridgeError):
    """A mapped field has the wrong data type (102) or an unknown code (103). Permanent."""

    ack_code = AckCode.AE
    err_code = ErrCode.DATA_TYPE
    journal_state = "dead"


class JournalUnavailable(Hl7BridgeError):
    """The journal cannot store the message right now. AR tells the sender to retry later (HL7 2.5 §2.9.2.2)."""

    ack_code = AckCode.AR
    err_code = ErrCode.INTERNAL
    retryable = True
    journal_state = ""


# --- delivery: what the workers and the DLQ see ----------------------------------------------------


class MappingError(Hl7BridgeError):
    """The rules cannot turn this message into CRM operations. Permanent: a retry gives the same answer
    until the rules change, so the message goes to the dead-letter queue at once."""

    ack_code = AckCode.AE
    err_code = ErrCode.DATA_TYPE
    journal_state = "dead"


class SinkError(Hl7BridgeError):
    """A CRM sink failed to apply operations."""

    ack_code = AckCode.AE
    err_code = ErrCode.INTERNAL
    journal_state = "dead"


class TransientSinkError(SinkError):
    """Unreachable, timed out, deadlock/serialization failure, HTTP 429/5xx: retried with backoff.

    `retry_after` (seconds) is a hint from the sink (HTTP Retry-After) that overrides the backoff when larger.
    """

    retryable = True

    def __init__(self, reason: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(reason, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """Constraint violation, bad data, HTTP 4xx: dead-lettered at once."""

    retryable = False
