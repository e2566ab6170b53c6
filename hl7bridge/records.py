"""Typed records passed between pipeline stages. Frozen and slotted: a stage never mutates its input.

intake:   raw bytes --scan--> Envelope (+ patient key) --journal--> AppendResult --> ACK
workers:  JournalEntry --parse+map--> list[CrmOp] | Filtered --sink--> list[OpResult]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

__all__ = [
    "Action",
    "AppendResult",
    "ApplyRequest",
    "Conflict",
    "CrmOp",
    "Entity",
    "Envelope",
    "FieldSet",
    "Filtered",
    "HistoryEvent",
    "JournalEntry",
    "JournalState",
    "Mark",
    "NewEntry",
    "OpResult",
]

#: Journal states. `pending` waits for a worker; `done`/`filtered` are settled successes; `rejected` was
#: refused at intake; `dead` is a dead letter (replayable); `discarded` is a dead letter an operator gave up
#: on (kept, with the reason, never silently deleted).
JournalState = Literal["pending", "done", "filtered", "rejected", "dead", "discarded"]
Entity = Literal["contact", "appointment"]
Action = Literal["upsert", "merge", "change_id"]
#: Per-field conflict rule: `ehr` (EHR always wins), `crm` (EHR only fills an empty field),
#: `newest` (the later of the message's event time and the field's last change wins).
Conflict = Literal["ehr", "crm", "newest"]


@dataclass(frozen=True, slots=True)
class Envelope:
    """What intake reads from MSH without a full parse. Values are raw field text (escapes not decoded),
    except that components of MSH-9 are split out."""

    field_sep: str
    encoding_chars: str
    sending_application: str  # MSH-3
    sending_facility: str  # MSH-4
    receiving_application: str  # MSH-5
    receiving_facility: str  # MSH-6
    message_time: str  # MSH-7 (raw DTM)
    message_type: str  # MSH-9.1, e.g. "ADT"
    trigger: str  # MSH-9.2, e.g. "A04"
    structure: str  # MSH-9.3, may be empty
    control_id: str  # MSH-10
    processing_id: str  # MSH-11 (first component)
    version: str  # MSH-12 (first component)
    accept_ack_type: str  # MSH-15 (AL, NE, ER, SU or empty)
    app_ack_type: str  # MSH-16
    charset: str  # MSH-18 (first repetition), empty means the configured default

    @property
    def enhanced_mode(self) -> bool:
        """HL7 enhanced acknowledgement mode is in force when MSH-15 or MSH-16 is valued."""
        return bool(self.accept_ack_type or self.app_ack_type)

    @property
    def dedup_key(self) -> tuple[str, str, str]:
        """(MSH-3, MSH-4, MSH-10): MSH-10 alone is not unique across feeds of one EHR."""
        return (self.sending_application, self.sending_facility, self.control_id)


@dataclass(frozen=True, slots=True)
class NewEntry:
    """One inbound message as intake hands it to the journal."""

    received_at: datetime  # aware, UTC
    peer: str  # "host:port" of the sender; stored, never used as a metric label
    raw: bytes  # exactly the frame payload received
    envelope: Envelope | None  # None when MSH could not be read
    patient_key: str | None  # the MRN (with assigning authority when configured), None if absent
    state: JournalState  # pending, rejected or filtered
    ack_code: str  # the ACK code we will answer with if this entry is stored
    reason: str = ""  # readable, PHI-free
    error_kind: str = ""  # Hl7BridgeError.kind for rejected entries
    err_code: str = ""  # HL7 table 0357 code for rejected entries


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The journal's answer for one NewEntry. For a resend of an accepted message within the dedup window,
    `duplicate` is True, `journal_id` is the original entry and `ack_code` the code stored for it."""

    journal_id: int
    duplicate: bool
    ack_code: str


@dataclass(frozen=True, slots=True)
class Mark:
    """A worker's state change for one journal entry, with the history line that records it."""

    entry_id: int
    state: JournalState
    event: str
    reason: str = ""
    error_kind: str = ""
    attempts: int | None = None  # None keeps the stored count
    next_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class JournalEntry:
    id: int
    received_at: datetime
    peer: str
    sending_application: str
    sending_facility: str
    control_id: str
    message_type: str
    trigger: str
    version: str
    patient_key: str | None
    raw: bytes
    state: JournalState
    ack_code: str
    reason: str
    error_kind: str
    attempts: int
    next_attempt_at: datetime | None
    updated_at: datetime
    resend_count: int = 0

    @property
    def message_key(self) -> str:
        """Stable identity of the message across stores: MSH-3|MSH-4|MSH-10."""
        return f"{self.sending_application}|{self.sending_facility}|{self.control_id}"


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One line of a journal entry's history: received, retry scheduled, dead-lettered, requeued, ..."""

    at: datetime
    event: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class FieldSet:
    """Set one CRM field. `value=None` is HL7's explicit null (`""`): clear the field.
    A field the message leaves empty is simply absent from CrmOp.fields (no change)."""

    value: str | int | None
    conflict: Conflict = "ehr"


@dataclass(frozen=True, slots=True)
class CrmOp:
    """One CRM operation produced by the mapping.

    - upsert contact: key = MRN; fields from the record model.
    - upsert appointment: key = appointment ID; `contact_key` = the patient's MRN (the contact is created
      minimally from `contact_fields` when unknown).
    - merge contact (A40): key = surviving MRN, `prior_key` = the MRN merged away.
    - change_id contact (A47): key = new MRN, `prior_key` = old MRN.
    """

    entity: Entity
    action: Action
    key: str
    event_time: datetime  # aware: EVN-2 for ADT when present, else MSH-7
    fields: Mapping[str, FieldSet] = field(default_factory=dict)
    contact_key: str | None = None
    contact_fields: Mapping[str, FieldSet] = field(default_factory=dict)
    prior_key: str | None = None
    #: Field-change trigger: when non-empty, write only if one of these fields would change.
    only_if_changed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ApplyRequest:
    """One message's operations for `Sink.apply_many`, with the key that makes re-applying it a no-op."""

    ops: Sequence[CrmOp]
    message_key: str | None = None
    force: bool = False


@dataclass(frozen=True, slots=True)
class Filtered:
    """The rules deliberately ignore this message. A success (AA), journal state `filtered`."""

    reason: str


@dataclass(frozen=True, slots=True)
class OpResult:
    """What a sink did with one CrmOp: created, updated, unchanged, stale (older than what the CRM
    holds), skipped (a field-change trigger found nothing to sync), merged, or already_applied."""

    entity: Entity
    key: str
    outcome: str
    changed_fields: tuple[str, ...] = ()
