"""The PostgreSQL journal: the same schema and semantics as SQLite, behind a psycopg 3 connection pool.

Dedup under concurrency: every append_batch takes transaction-scoped advisory locks on its dedup keys
(sorted, so two batches can never deadlock) before looking for originals. Two bridge threads or processes
receiving the same resend at once therefore serialise on that key, and exactly one entry is stored.

Outages: a checkout checks the connection first (`ConnectionPool.check_connection`), so connections
broken by a server restart are replaced instead of failing the next caller; reconnection attempts give up
after `reconnect_timeout` and the pool then reconnects on demand, so recovery after a long outage does
not wait out an ever-growing backoff. Every driver or pool failure becomes JournalUnavailable, whose
reason names the error class and SQLSTATE only: PostgreSQL's DETAIL lines can quote row values (PHI).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from hl7bridge.errors import JournalUnavailable
from hl7bridge.records import AppendResult, HistoryEvent, JournalEntry, JournalState, Mark, NewEntry
from hl7bridge.store import schema as s

__all__ = ["PostgresJournal"]

#: Advisory lock id serialising concurrent migrate() calls. Dedup locks are blake2b hashes of keys; a
#: collision with this constant would only make one append wait for a migration to finish.
_MIGRATE_LOCK = 0x686C37_6A6F75726E

_INSERT = (
    f"INSERT INTO journal ({', '.join(s.INSERT_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(s.INSERT_COLUMNS))}) RETURNING id"
)
_HISTORY = "INSERT INTO journal_history (entry_id, at, event, detail) VALUES (%s, %s, %s, %s)"

_NEXT_READY = f"""
    SELECT {s.ENTRY_COLUMNS} FROM journal AS j
    WHERE j.id IN (
        SELECT MIN(id) FROM journal
        WHERE state = 'pending' AND patient_key IS NOT NULL AND patient_key <> ALL(%(exclude)s::text[])
        GROUP BY patient_key
        UNION ALL
        SELECT id FROM journal WHERE state = 'pending' AND patient_key IS NULL
    )
    AND (j.next_attempt_at IS NULL OR j.next_attempt_at <= %(now)s)
    AND (NOT %(hold)s OR j.patient_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM journal AS d WHERE d.state = 'dead' AND d.patient_key = j.patient_key))
    ORDER BY j.id LIMIT %(limit)s
"""


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _unavailable(exc: Exception) -> JournalUnavailable:
    if isinstance(exc, PoolTimeout):
        return JournalUnavailable("journal unavailable: no database connection (timed out)")
    sqlstate = getattr(exc, "sqlstate", None)
    detail = f" ({sqlstate})" if sqlstate else ""
    return JournalUnavailable(f"journal unavailable: {type(exc).__name__}{detail}")


class PostgresJournal:
    """Journal in PostgreSQL (tables `journal*` in the default schema). Thread-safe; call `migrate()`
    once after opening. `timeout` bounds how long a call waits for a connection before raising
    JournalUnavailable (intake then answers AR at once instead of holding the sender)."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        reconnect_timeout: float = 10.0,
    ) -> None:
        self._timeout = timeout
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(connect_timeout))},
            check=ConnectionPool.check_connection,
            timeout=timeout,
            reconnect_timeout=reconnect_timeout,
            name="hl7bridge-journal",
            open=True,
        )

    @contextmanager
    def _tx(self, *, durable: bool = True, timeout: float | None = None) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor inside one transaction (committed on success, rolled back on any exception)."""
        try:
            with self._pool.connection(timeout=timeout) as conn, conn.transaction(), conn.cursor() as cur:
                if not durable:
                    # A lost worker mark only means a redelivery (sinks are idempotent): skip the fsync.
                    cur.execute("SET LOCAL synchronous_commit = off")
                yield cur
        except psycopg.Error as e:
            raise _unavailable(e) from None

    @contextmanager
    def _read(self) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor for single-statement reads: autocommit, so no BEGIN/COMMIT round trips."""
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except psycopg.Error as e:
            raise _unavailable(e) from None

    def migrate(self) -> None:
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS journal_schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
            )
            row = cur.execute("SELECT COALESCE(MAX(version), 0) FROM journal_schema_version").fetchone()
            current = int(row[0]) if row else 0
            if current > s.SCHEMA_VERSION:
                raise JournalUnavailable(
                    f"journal schema version {current} is newer than this hl7bridge ({s.SCHEMA_VERSION})"
                )
            for version in range(current + 1, s.SCHEMA_VERSION + 1):
                for statement in s.POSTGRES_MIGRATIONS[version]:
                    cur.execute(statement)
                cur.execute("INSERT INTO journal_schema_version VALUES (%s, now())", (version,))

    def append_batch(self, entries: Sequence[NewEntry], dedup_window: timedelta) -> list[AppendResult]:
        if not entries:
            return []
        now = datetime.now(UTC)
        keys = sorted({k for e in entries if (k := s.dedup_key(e)) is not None})
        with self._tx() as cur:
            originals: dict[s.DedupKey, s.Original] = {}
            if keys:
                cur.execute(
                    "SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT unnest(%s::bigint[]) AS k ORDER BY 1) AS l",
                    (sorted({s.lock_id(k) for k in keys}),),
                )
                cur.execute(
                    "SELECT DISTINCT ON (j.sending_application, j.sending_facility, j.control_id) "
                    "j.sending_application, j.sending_facility, j.control_id, j.id, j.ack_code, j.received_at "
                    "FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(a, f, c) "
                    "JOIN journal AS j ON j.sending_application = k.a AND j.sending_facility = k.f "
                    "AND j.control_id = k.c AND j.state <> 'rejected' "
                    "ORDER BY j.sending_application, j.sending_facility, j.control_id, j.id DESC",
                    ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]),
                )
                for a, f, c, eid, ack, received in cur.fetchall():
                    originals[(a, f, c)] = s.Original(int(eid), ack, _utc(received))
            plan = s.plan_batch(entries, dedup_window, originals)
            new_ids: list[int] = []
            if plan.store:
                cur.executemany(
                    _INSERT, [s.insert_values(entries[i], _utc, now) for i in plan.store], returning=True
                )
                while True:
                    row = cur.fetchone()
                    assert row is not None
                    new_ids.append(int(row[0]))
                    if not cur.nextset():
                        break
            resends = s.group_resends(plan, new_ids)
            if resends:
                cur.execute(
                    "UPDATE journal SET resend_count = resend_count + d.n, updated_at = %s "
                    "FROM unnest(%s::bigint[], %s::int[]) AS d(id, n) WHERE journal.id = d.id",
                    (now, list(resends), list(resends.values())),
                )
            history = s.history_rows(plan, entries, new_ids)
            cur.executemany(_HISTORY, [(eid, now, event, detail) for eid, event, detail in history])
        return plan.results(entries, new_ids)

    def next_ready(
        self, limit: int, now: datetime, exclude_keys: Collection[str], hold: bool
    ) -> list[JournalEntry]:
        params = {"exclude": list(exclude_keys), "now": s.aware_utc(now), "hold": hold, "limit": max(0, limit)}
        with self._read() as cur:
            rows = cur.execute(_NEXT_READY, params).fetchall()
        return [s.entry_from_row(r, _utc) for r in rows]

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
        self.mark_many([Mark(entry_id, state, event, reason, error_kind, attempts, next_attempt_at)])

    def mark_many(self, marks: Sequence[Mark]) -> None:
        if not marks:
            return
        s.check_states([m.state for m in marks])
        now = datetime.now(UTC)
        with self._tx(durable=False) as cur:
            cur.executemany(
                "UPDATE journal SET state = %s, reason = %s, error_kind = %s, "
                "attempts = COALESCE(%s, attempts), next_attempt_at = %s, updated_at = now() "
                "WHERE id = %s RETURNING id",
                [(m.state, m.reason, m.error_kind, m.attempts,
                  None if m.next_attempt_at is None else s.aware_utc(m.next_attempt_at), m.entry_id)
                 for m in marks],
                returning=True,
            )
            updated: set[int] = set()
            while True:
                row = cur.fetchone()
                if row is not None:
                    updated.add(row[0])
                if not cur.nextset():
                    break
            history = [(m.entry_id, now, m.event, m.reason) for m in marks if m.entry_id in updated]
            if history:
                cur.executemany(_HISTORY, history)

    def get(self, entry_id: int) -> JournalEntry | None:
        with self._read() as cur:
            row = cur.execute(f"SELECT {s.ENTRY_COLUMNS} FROM journal WHERE id = %s", (entry_id,)).fetchone()
        return None if row is None else s.entry_from_row(row, _utc)

    def history(self, entry_id: int) -> list[HistoryEvent]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT at, event, detail FROM journal_history WHERE entry_id = %s ORDER BY id", (entry_id,)
            ).fetchall()
        return [HistoryEvent(_utc(at), event, detail) for at, event, detail in rows]

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
        sql, params = s.build_query(
            "%s", s.aware_utc, states=states, since=since, until=until, message_type=message_type,
            error_kind=error_kind, patient_key=patient_key, after_id=after_id, limit=limit,
        )
        with self._read() as cur:
            rows = cur.execute(sql, params).fetchall()
        return [s.entry_from_row(r, _utc) for r in rows]

    def requeue(self, ids: Collection[int], reason: str) -> int:
        return self._transition(ids, ("dead", "discarded", "done", "filtered"), "pending", "requeued", reason)

    def discard(self, ids: Collection[int], reason: str) -> int:
        return self._transition(ids, ("dead",), "discarded", "discarded", reason)

    def _transition(
        self, ids: Collection[int], from_states: tuple[str, ...], to_state: str, event: str, reason: str
    ) -> int:
        id_list = sorted({int(i) for i in ids})
        if not id_list:
            return 0
        # Requeue resets the retry bookkeeping; discard keeps attempts and error_kind for the record.
        reset = ", attempts = 0, next_attempt_at = NULL, error_kind = ''" if to_state == "pending" else ""
        now = datetime.now(UTC)
        with self._tx() as cur:
            rows = cur.execute(
                f"UPDATE journal SET state = %s, reason = %s, updated_at = %s{reset} "
                "WHERE id = ANY(%s::bigint[]) AND state = ANY(%s::text[]) RETURNING id",
                (to_state, reason, now, id_list, list(from_states)),
            ).fetchall()
            if rows:
                cur.executemany(_HISTORY, [(r[0], now, event, reason) for r in rows])
        return len(rows)

    def purge(self, older_than: datetime, states: Collection[str], reason: str) -> int:
        wanted = s.check_states(list(states))
        if not wanted:
            return 0
        cutoff = s.aware_utc(older_than)
        match = "FROM journal WHERE state = ANY(%s::text[]) AND received_at < %s"
        with self._tx() as cur:
            cur.execute(f"DELETE FROM journal_history WHERE entry_id IN (SELECT id {match})", (wanted, cutoff))
            cur.execute(f"DELETE {match}", (wanted, cutoff))
            count = cur.rowcount
            cur.execute(
                "INSERT INTO journal_purge_audit (at, requested_by, states, older_than, reason, purged) "
                "VALUES (now(), %s, %s, %s, %s, %s)",
                (s.requester(), ",".join(wanted), cutoff, reason, count),
            )
        return count

    def purge_audit(self) -> list[dict[str, Any]]:
        """The purge audit trail, oldest first (not part of the Journal protocol; for the CLI and tests)."""
        with self._read() as cur:
            rows = cur.execute(
                "SELECT at, requested_by, states, older_than, reason, purged "
                "FROM journal_purge_audit ORDER BY id"
            ).fetchall()
        return [
            {"at": _utc(r[0]), "requested_by": r[1], "states": r[2].split(","), "older_than": _utc(r[3]),
             "reason": r[4], "purged": int(r[5])}
            for r in rows
        ]

    def counts(self) -> dict[str, int]:
        with self._read() as cur:
            rows = cur.execute("SELECT state, COUNT(*) FROM journal GROUP BY state").fetchall()
        out = dict.fromkeys(s.STATES, 0)
        out.update({state: int(n) for state, n in rows})
        return out

    def oldest_pending(self) -> datetime | None:
        with self._read() as cur:
            row = cur.execute("SELECT MIN(received_at) FROM journal WHERE state = 'pending'").fetchone()
        return None if row is None or row[0] is None else _utc(row[0])

    def ping(self, timeout: float = 2.0) -> None:
        # Bounded twice: the wait for a connection, and the statement itself (a hung server).
        with self._tx(timeout=timeout) as cur:
            cur.execute(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
            row = cur.execute("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')").fetchone()
        if row is None or row[0] or row[1] == "on":
            raise JournalUnavailable("journal unavailable: the database is read-only")

    def close(self) -> None:
        self._pool.close()
