"""The Journal protocol: the durable record of every inbound message and its fate.

Delivery guarantees rest on this contract:
- `append_batch` commits all its entries in one transaction, durably (fsync), before returning. Intake
  sends AA/CA only after it returns. Entries from many connections share one call (group commit).
- Dedup: an entry whose (MSH-3, MSH-4, MSH-10) matches an *accepted* entry (any state except `rejected`)
  received within `dedup_window` is not stored again: the original's `resend_count` is incremented, a
  history line is added, and the result carries the original's id and ACK code. Rejected entries are
  never dedup targets: a fixed resend with the same MSH-10 is processed afresh.
- `next_ready` returns, for each patient key, only that key's *earliest* pending entry, and only when it is
  due (`next_attempt_at` is null or <= now). That is what keeps per-patient order while other patients
  proceed. With `hold=True` a key that has a `dead` entry is not returned at all.
- Methods are synchronous and thread-safe; the asyncio pipeline calls them through a thread.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from hl7bridge.records import AppendResult, HistoryEvent, JournalEntry, JournalState, Mark, NewEntry

__all__ = ["Journal"]


class Journal(Protocol):
    def migrate(self) -> None:
        """Create or upgrade the schema. Idempotent."""

    def append_batch(self, entries: Sequence[NewEntry], dedup_window: timedelta) -> list[AppendResult]:
        """Store entries durably in one transaction; one result per entry, in order.
        Raises JournalUnavailable when the store cannot be written."""

    def next_ready(
        self, limit: int, now: datetime, exclude_keys: Collection[str], hold: bool
    ) -> list[JournalEntry]:
        """Earliest due pending entry per patient key (keys in exclude_keys skipped), oldest first."""

    def mark(
        self,
        entry_id: int,
        state: JournalState,
        *,
        event: str,
        reason: str = "",
        error_kind: str = "",
        attempts: int | None = None,
        next_attempt_at: datetime | None = None,
    ) -> None:
        """Set state (and reason/attempts/next_attempt_at) and append a history line `event`."""

    def mark_many(self, marks: Sequence[Mark]) -> None:
        """Several `mark`s in one transaction (the delivery workers settle a batch at a time)."""

    def get(self, entry_id: int) -> JournalEntry | None: ...

    def history(self, entry_id: int) -> list[HistoryEvent]: ...

    def query(
        self,
        *,
        states: Collection[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        message_type: str | None = None,
        error_kind: str | None = None,
        patient_key: str | None = None,
        after_id: int | None = None,
        limit: int | None = None,
    ) -> list[JournalEntry]:
        """Entries matching every given filter, by id ascending. `message_type` matches "ADT" or "ADT^A04"."""

    def requeue(self, ids: Collection[int], reason: str) -> int:
        """dead/discarded/done/filtered -> pending with attempts reset; returns how many changed."""

    def discard(self, ids: Collection[int], reason: str) -> int:
        """dead -> discarded (kept, with the reason); returns how many changed."""

    def purge(self, older_than: datetime, states: Collection[str], reason: str) -> int:
        """Delete entries in `states` received before `older_than`. Each purge is recorded in an audit
        table (when, who asked, states, count), so nothing disappears without a trace."""

    def counts(self) -> dict[str, int]:
        """Number of entries per state."""

    def oldest_pending(self) -> datetime | None:
        """received_at of the oldest pending entry (backlog age)."""

    def ping(self) -> None:
        """Raise JournalUnavailable unless the journal is readable and writable."""

    def close(self) -> None: ...
