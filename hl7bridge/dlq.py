"""Dead-letter queue operations. A dead letter is a journal entry in state `dead`; nothing here deletes a
message without a trace: retry re-queues it (history kept), discard keeps it with the operator's reason,
purge deletes old ones and records the purge in the journal's audit table."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from hl7bridge.errors import Hl7BridgeError
from hl7bridge.hl7.parse import decode, normalise_segments, sniff_charset
from hl7bridge.records import JournalEntry
from hl7bridge.store.base import Journal

__all__ = ["dead_letters", "discard", "entry_summary", "purge", "retry", "show"]


def dead_letters(journal: Journal, *, since: datetime | None = None, until: datetime | None = None,
                 message_type: str | None = None, error_kind: str | None = None, mrn: str | None = None,
                 limit: int | None = None) -> list[JournalEntry]:
    return journal.query(states=["dead"], since=since, until=until, message_type=message_type,
                         error_kind=error_kind, patient_key=mrn, limit=limit)


def entry_summary(e: JournalEntry, *, with_patient: bool = True) -> dict[str, Any]:
    """One entry as JSON-ready fields (the MRN only when asked: it identifies a patient)."""
    out: dict[str, Any] = {
        "id": e.id, "received_at": e.received_at.isoformat(), "state": e.state,
        "type": f"{e.message_type}^{e.trigger}" if e.message_type else "", "control_id": e.control_id,
        "sending_application": e.sending_application, "sending_facility": e.sending_facility,
        "error": e.error_kind, "reason": e.reason, "attempts": e.attempts, "ack": e.ack_code,
        "resends": e.resend_count, "updated_at": e.updated_at.isoformat(),
    }
    if with_patient:
        out["mrn"] = e.patient_key
    return out


def show(journal: Journal, entry_id: int, default_charset: str = "utf-8") -> dict[str, Any]:
    entry = journal.get(entry_id)
    if entry is None:
        raise KeyError(f"no journal entry {entry_id}")
    try:
        text = normalise_segments(decode(entry.raw, sniff_charset(entry.raw), default_charset))
        segments = [s for s in text.split("\r") if s]
    except Hl7BridgeError as exc:
        segments = [f"(undecodable: {exc.reason}) " + entry.raw[:2000].decode("latin-1", "replace")]
    return {
        **entry_summary(entry),
        "segments": segments,
        "history": [{"at": h.at.isoformat(), "event": h.event, "detail": h.detail}
                    for h in journal.history(entry_id)],
    }


def retry(journal: Journal, ids: Collection[int], reason: str = "operator retry") -> int:
    return journal.requeue(ids, reason)


def discard(journal: Journal, ids: Collection[int], reason: str) -> int:
    if not reason.strip():
        raise ValueError("a reason is required to discard a dead letter")
    return journal.discard(ids, reason)


def purge(journal: Journal, older_than: datetime, reason: str = "dlq purge",
          states: Collection[str] = ("dead", "discarded")) -> int:
    if older_than > datetime.now(UTC):
        raise ValueError("--older-than must be in the past")
    return journal.purge(older_than, states, reason)
