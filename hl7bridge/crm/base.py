"""The Sink protocol: where CRM operations land (SQLite, PostgreSQL, or an HTTP CRM).

Contract:
- `apply` applies all operations of one message in one transaction: all or nothing.
- Idempotent: when `message_key` is given and was already applied, nothing changes and every result is
  `already_applied` (unless `force`, used by replay after a mapping fix). Upserts are keyed by natural key
  (MRN, appointment ID), so even a forced re-apply of the same values has no visible effect.
- Conflict rules and the stale-message guard are enforced here, because only the sink knows what the CRM
  holds: per field, the time and origin (`ehr` or `crm`) of its last change are recorded.
- Failures are TransientSinkError (retry can help) or PermanentSinkError (dead-letter now).
- `apply_many` applies several messages in one call, each atomically on its own (one message's failure
  neither undoes nor blocks another's) and returns one result or error per message, in order. SQL sinks
  commit them together (one fsync per batch), which is what lets the delivery workers keep up with intake;
  `max_batch` says how many messages a call usefully takes (1 for the HTTP CRM, whose lanes run requests
  side by side instead).
- Synchronous and thread-safe; the pipeline calls it through a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from hl7bridge.crm.model import Appointment, Contact
from hl7bridge.errors import SinkError
from hl7bridge.records import ApplyRequest, CrmOp, Entity, OpResult

__all__ = ["Sink"]


class Sink(Protocol):
    #: How many messages one `apply_many` call usefully takes.
    max_batch: int

    def migrate(self) -> None:
        """Create or upgrade the CRM schema. Idempotent."""

    def apply(self, ops: Sequence[CrmOp], *, message_key: str | None = None, force: bool = False) -> list[OpResult]:
        """Apply one message's operations atomically."""

    def apply_many(self, requests: Sequence[ApplyRequest]) -> list[list[OpResult] | SinkError]:
        """Apply several messages, each atomically; per message its results or its error, in order."""

    def contacts(self, mrn: str | None = None) -> list[Contact]:
        """Contacts ordered by MRN (all contacts with that MRN when given: duplicates must be visible)."""

    def appointments(self, mrn: str | None = None) -> list[Appointment]:
        """Appointments ordered by appointment_id, optionally only those of one MRN."""

    def edit(self, entity: Entity, key: str, values: dict[str, str | int | None], at: datetime | None = None) -> None:
        """A change made on the CRM side (by a CRM user): recorded with origin `crm` so conflict rules see it."""

    def delete_where_mrn_prefix(self, prefix: str) -> int:
        """Remove contacts (and their appointments) whose MRN starts with prefix; used by golive --cleanup."""

    def ping(self) -> None:
        """Raise TransientSinkError unless the CRM is reachable."""

    def close(self) -> None: ...
