"""What both journal backends share: states, columns, time handling, the dedup planner.

The backends differ only in SQL dialect and locking. Everything that decides *what* happens to a batch
(which entries are duplicates of what) lives here as pure functions, so SQLite and PostgreSQL cannot
drift apart in semantics.
"""

from __future__ import annotations

import getpass
import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from hl7bridge.records import AppendResult, JournalEntry, JournalState, NewEntry

__all__ = [
    "ACCEPTED_STATES",
    "ENTRY_COLUMNS",
    "INSERT_COLUMNS",
    "POSTGRES_MIGRATIONS",
    "SCHEMA_VERSION",
    "SQLITE_MIGRATIONS",
    "STATES",
    "BatchPlan",
    "DedupKey",
    "Original",
    "aware_utc",
    "check_states",
    "dedup_key",
    "entry_from_row",
    "group_resends",
    "history_rows",
    "insert_values",
    "lock_id",
    "plan_batch",
    "requester",
    "split_message_type",
]

#: Bump when a migration is added; each backend keeps its own list of steps up to this number.
SCHEMA_VERSION = 2

STATES: tuple[JournalState, ...] = ("pending", "done", "filtered", "rejected", "dead", "discarded")
#: States an entry can be a dedup target in: everything the sender was told we took.
ACCEPTED_STATES: tuple[JournalState, ...] = tuple(s for s in STATES if s != "rejected")

#: Column order of every SELECT that builds a JournalEntry (see `entry_from_row`).
ENTRY_COLUMNS = (
    "id, received_at, peer, sending_application, sending_facility, control_id, message_type, trigger, "
    "version, patient_key, raw, state, ack_code, reason, error_kind, attempts, next_attempt_at, "
    "updated_at, resend_count"
)

#: Column order of `insert_values`.
INSERT_COLUMNS = (
    "received_at", "peer", "sending_application", "sending_facility", "receiving_application",
    "receiving_facility", "control_id", "message_type", "trigger", "version", "patient_key", "raw",
    "state", "ack_code", "reason", "error_kind", "err_code", "updated_at",
)

DedupKey = tuple[str, str, str]


def _schema_v1(serial: str, ts: str, blob: str, ref: str, *, rowid: bool) -> tuple[str, ...]:
    """Version 1 of the schema in a dialect: `serial` is the id column type, `ts` a timestamp, `blob`
    a byte string, `ref` an id reference. SQLite keeps timestamps as fixed-width ISO 8601 UTC text.
    With `rowid` (SQLite) every index already ends with the id, so naming it again would only store it
    twice (a larger index is a slower insert)."""
    states = ", ".join(f"'{st}'" for st in STATES)
    by_id = "" if rowid else ", id"
    return (
        f"""CREATE TABLE journal (
            id {serial},
            received_at {ts} NOT NULL,
            peer TEXT NOT NULL DEFAULT '',
            sending_application TEXT NOT NULL DEFAULT '',
            sending_facility TEXT NOT NULL DEFAULT '',
            receiving_application TEXT NOT NULL DEFAULT '',
            receiving_facility TEXT NOT NULL DEFAULT '',
            control_id TEXT NOT NULL DEFAULT '',
            message_type TEXT NOT NULL DEFAULT '',
            trigger TEXT NOT NULL DEFAULT '',
            version TEXT NOT NULL DEFAULT '',
            patient_key TEXT,
            state TEXT NOT NULL CHECK (state IN ({states})),
            ack_code TEXT NOT NULL DEFAULT '',
            reason TEXT NOT NULL DEFAULT '',
            error_kind TEXT NOT NULL DEFAULT '',
            err_code TEXT NOT NULL DEFAULT '',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at {ts},
            updated_at {ts} NOT NULL,
            resend_count INTEGER NOT NULL DEFAULT 0,
            -- last: SQLite reads columns in order, so scans of the small columns never touch the payload
            raw {blob} NOT NULL
        )""",
        # Dedup lookups. Partial, because rejected entries are never dedup targets; not UNIQUE, because
        # after the window a resend is stored afresh, so one key may own several accepted entries.
        "CREATE INDEX journal_dedup ON journal (sending_application, sending_facility, control_id"
        f"{by_id}) WHERE state <> 'rejected'",
        # next_ready: MIN(id) per patient_key over pending rows (index-only); the `dead` probe for hold.
        f"CREATE INDEX journal_lane ON journal (state, patient_key{by_id})",
        # query by state (+ since/until) and oldest_pending.
        "CREATE INDEX journal_state_received ON journal (state, received_at)",
        "CREATE INDEX journal_received ON journal (received_at)",
        f"""CREATE TABLE journal_history (
            id {serial},
            entry_id {ref} NOT NULL,
            at {ts} NOT NULL,
            event TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        )""",
        f"CREATE INDEX journal_history_entry ON journal_history (entry_id{by_id})",
        f"""CREATE TABLE journal_purge_audit (
            id {serial},
            at {ts} NOT NULL,
            requested_by TEXT NOT NULL,
            states TEXT NOT NULL,
            older_than {ts} NOT NULL,
            reason TEXT NOT NULL,
            purged {ref} NOT NULL
        )""",
    )


#: Version 2 (SQLite only): a name -> integer table where the log-backed journal (store/logged.py) keeps
#: its highest indexed intake-log position, updated in the indexing transaction. PostgreSQL has no intake
#: log, so its step 2 is empty (the version number is shared, the schema need not be).
_SQLITE_V2 = ("CREATE TABLE journal_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",)


#: Schema steps per version, per dialect. Never edit a released step: add one and bump SCHEMA_VERSION.
#: SQLite uses AUTOINCREMENT so that ids are never reused after a purge (audit trails quote ids).
SQLITE_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: _schema_v1("INTEGER PRIMARY KEY AUTOINCREMENT", "TEXT", "BLOB", "INTEGER", rowid=True),
    2: _SQLITE_V2,
}
POSTGRES_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: _schema_v1("BIGSERIAL PRIMARY KEY", "TIMESTAMPTZ", "BYTEA", "BIGINT", rowid=False),
    2: (),
}


def aware_utc(dt: datetime) -> datetime:
    """Normalise to UTC; a naive datetime is a caller bug (its zone is unknowable), so refuse it."""
    if dt.tzinfo is UTC:
        return dt  # what astimezone(UTC) returns for it, without the checks (the common case)
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("journal datetimes must be timezone-aware")
    return dt.astimezone(UTC)


def check_states(states: Sequence[str] | set[str] | frozenset[str]) -> list[str]:
    unknown = sorted(set(states) - set(STATES))
    if unknown:
        raise ValueError(f"unknown journal state(s): {', '.join(unknown)}")
    return sorted(set(states))


def split_message_type(message_type: str) -> tuple[str, str | None]:
    """"ADT" -> ("ADT", None); "ADT^A04" -> ("ADT", "A04")."""
    kind, sep, trigger = message_type.partition("^")
    return kind, (trigger if sep else None)


def requester() -> str:
    """Who asked for a purge, for the audit table: the OS user (best effort, never fails)."""
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def dedup_key(entry: NewEntry) -> DedupKey | None:
    """(MSH-3, MSH-4, MSH-10), or None when the message has no usable MSH-10 (never deduplicated)."""
    env = entry.envelope
    if env is None or not env.control_id:
        return None
    return env.dedup_key


def lock_id(key: DedupKey) -> int:
    """A stable signed 64-bit id for a dedup key (PostgreSQL advisory locks). Python's hash() is salted
    per process, so two bridge processes would not agree on it; blake2b does."""
    digest = hashlib.blake2b("\x1f".join(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def insert_values(entry: NewEntry, conv: Callable[[datetime], Any], updated_at: Any) -> tuple[Any, ...]:
    """Values for INSERT_COLUMNS; `conv` turns datetimes into the backend's representation and
    `updated_at` is already converted (one value per batch)."""
    env = entry.envelope
    return (
        conv(aware_utc(entry.received_at)),
        entry.peer,
        env.sending_application if env else "",
        env.sending_facility if env else "",
        env.receiving_application if env else "",
        env.receiving_facility if env else "",
        env.control_id if env else "",
        env.message_type if env else "",
        env.trigger if env else "",
        env.version if env else "",
        entry.patient_key,
        bytes(entry.raw),
        entry.state,
        entry.ack_code,
        entry.reason,
        entry.error_kind,
        entry.err_code,
        updated_at,
    )


def entry_from_row(row: Sequence[Any], conv: Callable[[Any], datetime]) -> JournalEntry:
    """Build a JournalEntry from a row in ENTRY_COLUMNS order; `conv` reads the backend's datetimes."""
    # Positional: JournalEntry's fields are ENTRY_COLUMNS in order (checked at import, below), and 19
    # keyword arguments cost more than the rest of the call on the workers' and the poller's paths.
    return JournalEntry(
        int(row[0]), conv(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9],
        bytes(row[10]), cast(JournalState, row[11]), row[12], row[13], row[14], int(row[15]),
        None if row[16] is None else conv(row[16]), conv(row[17]), int(row[18]),
    )


if tuple(f.name for f in fields(JournalEntry)) != tuple(ENTRY_COLUMNS.split(", ")):  # pragma: no cover
    raise ImportError("JournalEntry's fields no longer follow ENTRY_COLUMNS: update entry_from_row")


@dataclass(frozen=True, slots=True)
class Original:
    """The latest accepted stored entry for a dedup key."""

    id: int
    ack_code: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class _InBatch:
    index: int
    ack_code: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What to do with a batch. `store` lists the indexes of entries to insert, in order. For each entry,
    `dup_of[i]` is None (stored afresh), an `Original` (a stored entry) or an int (the index of an earlier
    entry of this very batch)."""

    store: list[int]
    dup_of: list[Original | int | None]

    def results(self, entries: Sequence[NewEntry], new_ids: Sequence[int]) -> list[AppendResult]:
        """AppendResults once the stored entries got their ids (`new_ids` parallel to `store`)."""
        id_of = dict(zip(self.store, new_ids, strict=True))
        out: list[AppendResult] = []
        for i, target in enumerate(self.dup_of):
            if target is None:
                out.append(AppendResult(id_of[i], False, entries[i].ack_code))
            elif isinstance(target, Original):
                out.append(AppendResult(target.id, True, target.ack_code))
            else:
                out.append(AppendResult(id_of[target], True, entries[target].ack_code))
        return out


def plan_batch(
    entries: Sequence[NewEntry], window: timedelta, originals: Mapping[DedupKey, Original]
) -> BatchPlan:
    """Decide which entries are resends. An entry is a duplicate when the latest *accepted* entry with
    its key (stored before, or earlier in this batch) was received within `window` before it. Rejected
    entries are stored but never become targets: a fixed resend with the same MSH-10 is processed afresh.
    """
    latest: dict[DedupKey, Original | _InBatch] = dict(originals)
    store: list[int] = []
    dup_of: list[Original | int | None] = []
    for i, entry in enumerate(entries):
        key = dedup_key(entry)
        received = aware_utc(entry.received_at)
        target = latest.get(key) if key is not None and window > timedelta(0) else None
        if target is not None and target.received_at >= received - window:
            dup_of.append(target if isinstance(target, Original) else target.index)
            continue
        store.append(i)
        dup_of.append(None)
        if key is not None and entry.state != "rejected":
            latest[key] = _InBatch(i, entry.ack_code, received)
    return BatchPlan(store, dup_of)


def group_resends(plan: BatchPlan, new_ids: Sequence[int]) -> dict[int, int]:
    """entry id -> how many resends of it this batch carried."""
    id_of = dict(zip(plan.store, new_ids, strict=True))
    counts: dict[int, int] = {}
    for target in plan.dup_of:
        if target is None:
            continue
        eid = target.id if isinstance(target, Original) else id_of[target]
        counts[eid] = counts.get(eid, 0) + 1
    return counts


def history_rows(
    plan: BatchPlan, entries: Sequence[NewEntry], new_ids: Sequence[int]
) -> list[tuple[int, str, str]]:
    """(entry id, event, detail) lines an appended batch writes: "received" for every stored entry, plus
    its settled state ("rejected: reason", "filtered: reason"), and "resent" on the original of a resend.
    Details carry the peer and PHI-free reasons only."""
    id_of = dict(zip(plan.store, new_ids, strict=True))
    rows: list[tuple[int, str, str]] = []
    for i, target in enumerate(plan.dup_of):
        entry = entries[i]
        if target is None:
            rows.append((id_of[i], "received", entry.peer))
            if entry.state != "pending":
                rows.append((id_of[i], entry.state, entry.reason))
        else:
            eid = target.id if isinstance(target, Original) else id_of[target]
            rows.append((eid, "resent", entry.peer))
    return rows


def build_query(
    ph: str,
    ts: Callable[[datetime], Any],
    *,
    states: Collection[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    message_type: str | None = None,
    error_kind: str | None = None,
    patient_key: str | None = None,
    after_id: int | None = None,
    limit: int | None = None,
) -> tuple[str, list[Any]]:
    """The SELECT behind Journal.query for one dialect: `ph` is its placeholder, `ts` its timestamp encoder."""
    where: list[str] = []
    params: list[Any] = []
    if states is not None:
        wanted = check_states(list(states))
        where.append(f"state IN ({', '.join([ph] * len(wanted))})" if wanted else "1 = 0")
        params += wanted
    for column, op, value in (("received_at", ">=", since), ("received_at", "<", until)):
        if value is not None:
            where.append(f"{column} {op} {ph}")
            params.append(ts(value))
    if message_type:
        kind, trigger = split_message_type(message_type)
        where.append(f"message_type = {ph}")
        params.append(kind)
        if trigger is not None:
            where.append(f"trigger = {ph}")
            params.append(trigger)
    for column, value in (("error_kind", error_kind), ("patient_key", patient_key)):
        if value is not None:
            where.append(f"{column} = {ph}")
            params.append(value)
    if after_id is not None:
        where.append(f"id > {ph}")
        params.append(after_id)
    sql = f"SELECT {ENTRY_COLUMNS} FROM journal"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id"
    if limit is not None:
        sql += f" LIMIT {ph}"
        params.append(max(0, limit))
    return sql, params
