"""The embedded journal: one SQLite file in WAL mode.

One writer lock: SQLite serialises writers anyway, and one lock lets the intake's group commits, the
workers' marks and operator commands share a single write path without SQLITE_BUSY churn. Under it, two
writer connections: one with synchronous=FULL (appends, operator commands), one with synchronous=NORMAL
(marks), so no transaction has to switch the level first (a switch was two more statements, and GIL
round trips, per delivered message while holding the lock the ACK path waits for). Reads (next_ready,
query, counts, ...) use a third connection under its own lock: in WAL mode readers never block the
writer, so a slow scan over a large backlog cannot delay an ACK. Other processes (the CLI while `serve`
runs) coexist through WAL + busy_timeout.

Durability: `append_batch` and the operator commands commit with synchronous=FULL (the WAL is fsynced
before COMMIT returns, so an AA sent afterwards survives power loss). `mark` commits with
synchronous=NORMAL: a worker's state change lost in a power cut only means the message is delivered again
(sinks are idempotent), and the next FULL commit fsyncs it anyway. That keeps one fsync per delivered
message off the workers' path.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hl7bridge.errors import JournalUnavailable
from hl7bridge.records import AppendResult, HistoryEvent, JournalEntry, JournalState, Mark, NewEntry
from hl7bridge.store import schema as s

__all__ = ["SqliteJournal"]


@dataclass(slots=True, eq=False)
class _MarkRequest:
    """One worker state update waiting for the next group commit."""

    marks: Sequence[Mark]
    error: JournalUnavailable | None = None
    done: bool = False


def _ts(dt: datetime) -> str:
    # Fixed width (always microseconds, always Z) so that text order is time order in SQL comparisons.
    utc = s.aware_utc(dt)
    if utc.year < 1000:  # strftime does not pad the year to four digits; isoformat does
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # The same text as that strftime, cheaper: isoformat ends "+00:00" in UTC.
    return utc.isoformat(timespec="microseconds")[:-6] + "Z"


def _dt(text: str) -> datetime:
    dt = datetime.fromisoformat(text)
    # Our own timestamps end in Z, which reads as UTC itself: astimezone() would return it unchanged.
    return dt if dt.tzinfo is UTC else dt.astimezone(UTC)


def _unavailable(exc: sqlite3.Error) -> JournalUnavailable:
    # SQLite's messages name schema objects and conditions, never bound values: PHI-free.
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    return JournalUnavailable(f"journal unavailable: {name}: {str(exc)[:160]}")


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    # A large statement cache: append_batch builds one multi-row statement per batch size.
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False,
                           cached_statements=512)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


class SqliteJournal:
    """Journal in one SQLite file. Thread-safe; call `migrate()` once after opening."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._rlock = threading.Lock()
        self._mark_leader = threading.Lock()
        self._mark_queue_lock = threading.Lock()
        self._mark_queue: list[_MarkRequest] = []
        self._conn: sqlite3.Connection | None = None  # synchronous=FULL
        self._mconn: sqlite3.Connection | None = None  # synchronous=NORMAL, for mark()
        self._rconn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = _connect(self.path, busy_timeout)
            self._conn.execute("PRAGMA synchronous=FULL")
            self._mconn = _connect(self.path, busy_timeout)
            self._mconn.execute("PRAGMA synchronous=NORMAL")
            self._rconn = _connect(self.path, busy_timeout)
        except sqlite3.Error as e:
            self.close()
            raise _unavailable(e) from e
        except OSError as e:
            self.close()
            raise JournalUnavailable("journal unavailable: cannot create the data directory") from e

    # --- plumbing ------------------------------------------------------------------------------------

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; BEGIN IMMEDIATE takes the write lock up front so that a
        concurrent writer in another process waits (busy_timeout) instead of failing mid-transaction."""
        with self._lock:
            conn = self._conn if durable else self._mconn
            if conn is None:
                raise JournalUnavailable("journal unavailable: closed")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise _unavailable(e) from e

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._rlock:
            conn = self._rconn
            if conn is None:
                raise JournalUnavailable("journal unavailable: closed")
            try:
                yield conn
            except sqlite3.Error as e:
                raise _unavailable(e) from e

    # --- Journal protocol ----------------------------------------------------------------------------

    def migrate(self) -> None:
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS journal_schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM journal_schema_version").fetchone()
            current = current[0]
            if current > s.SCHEMA_VERSION:
                raise JournalUnavailable(
                    f"journal schema version {current} is newer than this hl7bridge ({s.SCHEMA_VERSION})"
                )
            now = _ts(datetime.now(UTC))
            for version in range(current + 1, s.SCHEMA_VERSION + 1):
                for statement in s.SQLITE_MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO journal_schema_version VALUES (?, ?)", (version, now))

    def append_batch(self, entries: Sequence[NewEntry], dedup_window: timedelta) -> list[AppendResult]:
        # A handful of statements per batch whatever its size (one dedup lookup, one multi-row INSERT per
        # table), not a few per entry: every sqlite3 call releases and re-takes the GIL, and in a process
        # whose workers parse messages each re-take can wait a whole switch interval (5 ms).
        if not entries:
            return []
        now = _ts(datetime.now(UTC))
        with self._write() as conn:
            keys = list({k for e in entries if (k := s.dedup_key(e)) is not None})
            originals = _originals(conn, keys)
            plan = s.plan_batch(entries, dedup_window, originals)
            new_ids = _insert_entries(conn, [s.insert_values(entries[i], _ts, now) for i in plan.store])
            resends = s.group_resends(plan, new_ids)
            if resends:
                conn.executemany(
                    "UPDATE journal SET resend_count = resend_count + ?, updated_at = ? WHERE id = ?",
                    [(n, now, eid) for eid, n in resends.items()],
                )
            history = s.history_rows(plan, entries, new_ids)
            _insert_rows(conn, "journal_history (entry_id, at, event, detail)",
                         [(eid, now, event, detail) for eid, event, detail in history])
        return plan.results(entries, new_ids)

    def next_ready(
        self, limit: int, now: datetime, exclude_keys: Collection[str], hold: bool
    ) -> list[JournalEntry]:
        # Heads of lanes first (MIN(id) per key, an index-only scan of `journal_lane` over pending rows),
        # then the due filter: a head that is not due blocks its lane, keeping per-patient order.
        sql = f"""
            SELECT {s.ENTRY_COLUMNS} FROM journal AS j
            WHERE j.id IN (
                SELECT MIN(id) FROM journal
                WHERE state = 'pending' AND patient_key IS NOT NULL
                  AND patient_key NOT IN (SELECT value FROM json_each(?))
                GROUP BY patient_key
                UNION ALL
                SELECT id FROM journal WHERE state = 'pending' AND patient_key IS NULL
            )
            AND (j.next_attempt_at IS NULL OR j.next_attempt_at <= ?)
            AND (? = 0 OR j.patient_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM journal AS d WHERE d.state = 'dead' AND d.patient_key = j.patient_key))
            ORDER BY j.id LIMIT ?
        """
        params = (json.dumps(list(exclude_keys)), _ts(now), 1 if hold else 0, max(0, limit))
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [s.entry_from_row(r, _dt) for r in rows]

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
        request = _MarkRequest(marks)
        with self._mark_queue_lock:
            self._mark_queue.append(request)
        # Group commit for worker updates: whichever marker gets here first writes every queued mark in one
        # transaction, so the workers take the write lock (which intake's commits need) once per batch.
        with self._mark_leader:
            if not request.done:
                with self._mark_queue_lock:
                    batch, self._mark_queue = self._mark_queue, []
                self._write_marks(batch)
        if request.error is not None:
            raise request.error

    def _write_marks(self, batch: list[_MarkRequest]) -> None:
        now = _ts(datetime.now(UTC))
        updates = [
            (m.state, m.reason, m.error_kind, m.attempts,
             None if m.next_attempt_at is None else _ts(m.next_attempt_at), now, m.entry_id)
            for request in batch for m in request.marks
        ]
        try:
            with self._write(durable=False) as conn:
                # An entry deleted meanwhile (journal prune) gets no history line: only ids that still exist.
                ids = [u[-1] for u in updates]
                existing: set[int] = set()
                if len(set(ids)) == len(ids):
                    # One statement per 256 marks, which also says which ids exist (RETURNING).
                    for start in range(0, len(updates), _ROWS_PER_STATEMENT):
                        existing.update(_update_marks(conn, updates[start : start + _ROWS_PER_STATEMENT]))
                else:  # an entry marked twice in one batch: in order, so that the last mark wins
                    for chunk in _chunks(ids, 500):
                        existing.update(r[0] for r in conn.execute(
                            f"SELECT id FROM journal WHERE id IN ({','.join('?' * len(chunk))})", chunk))
                    conn.executemany(
                        "UPDATE journal SET state = ?, reason = ?, error_kind = ?, "
                        "attempts = COALESCE(?, attempts), next_attempt_at = ?, updated_at = ? WHERE id = ?",
                        updates,
                    )
                _insert_rows(conn, "journal_history (entry_id, at, event, detail)",
                             [(m.entry_id, now, m.event, m.reason)
                              for request in batch for m in request.marks if m.entry_id in existing])
        except JournalUnavailable as exc:
            for request in batch:
                request.error = exc
        finally:
            for request in batch:
                request.done = True

    def get(self, entry_id: int) -> JournalEntry | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {s.ENTRY_COLUMNS} FROM journal WHERE id = ?", (entry_id,)).fetchone()
        return None if row is None else s.entry_from_row(row, _dt)

    def history(self, entry_id: int) -> list[HistoryEvent]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT at, event, detail FROM journal_history WHERE entry_id = ? ORDER BY id", (entry_id,)
            ).fetchall()
        return [HistoryEvent(_dt(at), event, detail) for at, event, detail in rows]

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
            "?", _ts, states=states, since=since, until=until, message_type=message_type,
            error_kind=error_kind, patient_key=patient_key, after_id=after_id, limit=limit,
        )
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [s.entry_from_row(r, _dt) for r in rows]

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
        now = _ts(datetime.now(UTC))
        # Requeue resets the retry bookkeeping; discard keeps attempts and error_kind for the record.
        reset = ", attempts = 0, next_attempt_at = NULL, error_kind = ''" if to_state == "pending" else ""
        changed: list[int] = []
        with self._write() as conn:
            for chunk in _chunks(id_list, 500):
                marks = ", ".join("?" * len(chunk))
                froms = ", ".join("?" * len(from_states))
                rows = conn.execute(
                    f"UPDATE journal SET state = ?, reason = ?, updated_at = ?{reset} "
                    f"WHERE id IN ({marks}) AND state IN ({froms}) RETURNING id",
                    (to_state, reason, now, *chunk, *from_states),
                ).fetchall()
                changed += [r[0] for r in rows]
            conn.executemany(
                "INSERT INTO journal_history (entry_id, at, event, detail) VALUES (?, ?, ?, ?)",
                [(eid, now, event, reason) for eid in changed],
            )
        return len(changed)

    def purge(self, older_than: datetime, states: Collection[str], reason: str) -> int:
        wanted = s.check_states(list(states))
        if not wanted:
            return 0
        cutoff = _ts(older_than)
        marks = ", ".join("?" * len(wanted))
        match = f"FROM journal WHERE state IN ({marks}) AND received_at < ?"
        with self._write() as conn:
            conn.execute(
                f"DELETE FROM journal_history WHERE entry_id IN (SELECT id {match})", (*wanted, cutoff)
            )
            count = conn.execute(f"DELETE {match}", (*wanted, cutoff)).rowcount
            conn.execute(
                "INSERT INTO journal_purge_audit (at, requested_by, states, older_than, reason, purged) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (_ts(datetime.now(UTC)), s.requester(), ",".join(wanted), cutoff, reason, count),
            )
        return count

    def purge_audit(self) -> list[dict[str, Any]]:
        """The purge audit trail, oldest first (not part of the Journal protocol; for the CLI and tests)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT at, requested_by, states, older_than, reason, purged "
                "FROM journal_purge_audit ORDER BY id"
            ).fetchall()
        return [
            {"at": _dt(r[0]), "requested_by": r[1], "states": r[2].split(","), "older_than": _dt(r[3]),
             "reason": r[4], "purged": r[5]}
            for r in rows
        ]

    def counts(self) -> dict[str, int]:
        with self._read() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM journal GROUP BY state").fetchall()
        out = dict.fromkeys(s.STATES, 0)
        out.update({state: int(n) for state, n in rows})
        return out

    def oldest_pending(self) -> datetime | None:
        with self._read() as conn:
            row = conn.execute("SELECT MIN(received_at) FROM journal WHERE state = 'pending'").fetchone()
        return None if row is None or row[0] is None else _dt(row[0])

    def ping(self) -> None:
        # BEGIN IMMEDIATE takes the write lock: fails on a read-only file, a full lock or a missing disk.
        with self._write() as conn:
            conn.execute("SELECT 1 FROM journal_schema_version LIMIT 1").fetchall()

    # --- for LoggedJournal (store/logged.py): the index behind the intake log -----------------------

    def log_position(self) -> int:
        """The highest intake-log position indexed into this file (0 when none)."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM journal_meta WHERE name = ?", (_LOG_POSITION,)).fetchone()
        return 0 if row is None else int(row[0])

    def next_entry_id(self) -> int:
        """The id AUTOINCREMENT would give next: above the highest id and every purged one."""
        with self._read() as conn:
            return int(conn.execute(_MAX_ID).fetchone()[0]) + 1

    def index_logged(
        self, rows: Sequence[tuple[Any, ...]], history: Sequence[tuple[Any, ...]],
        resends: Sequence[tuple[int, str, str]], position: int, *, durable: bool = False,
    ) -> int:
        """In one transaction: insert journal rows with explicit ids, ascending (`id` then INSERT_COLUMNS),
        their history lines (entry_id, at, event, detail), the resends (original's id, at, peer: +1
        resend_count and a "resent" line, if the original still exists), and record `position`. Rows whose
        id exists already are skipped with their lines (a record indexed twice); returns how many were
        skipped. synchronous=NORMAL unless `durable` (FULL also makes every earlier commit durable): the
        caller's log still holds the records, and a lost commit loses the position with them."""
        with self._write(durable=durable) as conn:
            skip: set[int] = set()
            if rows:
                skip = {r[0] for r in conn.execute("SELECT id FROM journal WHERE id BETWEEN ? AND ?",
                                                   (rows[0][0], rows[-1][0]))}
            if skip:
                rows = [r for r in rows if r[0] not in skip]
                history = [h for h in history if h[0] not in skip]
            _insert_rows(conn, f"journal ({', '.join(_INSERT_ENTRY_COLUMNS)})", list(rows))
            _insert_rows(conn, "journal_history (entry_id, at, event, detail)", list(history))
            if resends:
                conn.executemany("UPDATE journal SET resend_count = resend_count + 1, updated_at = ? WHERE id = ?",
                                 [(at, eid) for eid, at, _peer in resends])
                conn.executemany(
                    "INSERT INTO journal_history (entry_id, at, event, detail) SELECT ?, ?, 'resent', ? "
                    "WHERE EXISTS (SELECT 1 FROM journal WHERE id = ?)",
                    [(eid, at, peer, eid) for eid, at, peer in resends])
            conn.execute("INSERT INTO journal_meta (name, value) VALUES (?, ?) ON CONFLICT (name) "
                         "DO UPDATE SET value = MAX(value, excluded.value)", (_LOG_POSITION, position))
        return len(skip)

    def close(self) -> None:
        with self._rlock:
            if self._rconn is not None:
                with suppress(sqlite3.Error):
                    self._rconn.close()
                self._rconn = None
        with self._lock:
            for conn in (self._mconn, self._conn):
                if conn is not None:
                    with suppress(sqlite3.Error):
                        conn.close()
            self._conn = self._mconn = None


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_LOG_POSITION = "intake_log_position"
_MAX_ID = ("SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'journal'), 0), "
           "COALESCE((SELECT MAX(id) FROM journal), 0))")

#: Rows per multi-row statement: well under SQLite's bound-parameter limit (32766) with 19 columns.
_ROWS_PER_STATEMENT = 256
_INSERT_ENTRY_COLUMNS = ("id", *s.INSERT_COLUMNS)


def _originals(conn: sqlite3.Connection, keys: list[s.DedupKey]) -> dict[s.DedupKey, s.Original]:
    """The latest accepted entry for each dedup key, in one statement per 256 keys (an index search
    per key through `journal_dedup`)."""
    out: dict[s.DedupKey, s.Original] = {}
    for start in range(0, len(keys), _ROWS_PER_STATEMENT):
        chunk = keys[start : start + _ROWS_PER_STATEMENT]
        sql = (
            f"WITH k(a, f, c) AS (VALUES {', '.join(['(?, ?, ?)'] * len(chunk))}) "
            "SELECT k.a, k.f, k.c, j.id, j.ack_code, j.received_at FROM k JOIN journal AS j ON j.id = ("
            "SELECT MAX(id) FROM journal WHERE sending_application = k.a AND sending_facility = k.f "
            "AND control_id = k.c AND state <> 'rejected')"
        )
        params = [v for key in chunk for v in key]
        for a, f, c, eid, ack_code, received_at in conn.execute(sql, params).fetchall():
            out[(a, f, c)] = s.Original(eid, ack_code, _dt(received_at))
    return out


def _insert_entries(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[int]:
    """Insert journal rows with explicit ids, returned in order. The ids are the next ones AUTOINCREMENT
    would give (above both the highest id and the sqlite_sequence high-water mark, so purged ids are
    never reused); the caller holds the write transaction, so nobody else can take them."""
    if not rows:
        return []
    base = conn.execute(_MAX_ID).fetchone()[0]
    ids = list(range(base + 1, base + 1 + len(rows)))
    _insert_rows(conn, f"journal ({', '.join(_INSERT_ENTRY_COLUMNS)})",
                 [(eid, *row) for eid, row in zip(ids, rows, strict=True)])
    return ids


def _update_marks(conn: sqlite3.Connection, updates: list[tuple[Any, ...]]) -> list[int]:
    """Apply marks (state, reason, error_kind, attempts, next_attempt_at, updated_at, id), ids distinct,
    in one statement; returns the ids that exist."""
    sql = (
        f"WITH m(state, reason, error_kind, attempts, next_attempt_at, updated_at, id) AS "
        f"(VALUES {', '.join(['(?, ?, ?, ?, ?, ?, ?)'] * len(updates))}) "
        "UPDATE journal SET state = m.state, reason = m.reason, error_kind = m.error_kind, "
        "attempts = COALESCE(m.attempts, journal.attempts), next_attempt_at = m.next_attempt_at, "
        "updated_at = m.updated_at FROM m WHERE journal.id = m.id RETURNING journal.id"
    )
    return [r[0] for r in conn.execute(sql, [v for u in updates for v in u]).fetchall()]


def _insert_rows(conn: sqlite3.Connection, target: str, rows: list[tuple[Any, ...]]) -> None:
    """INSERT many rows with one statement per 256 (one step each, where executemany steps per row)."""
    if not rows:
        return
    width = len(rows[0])
    one = f"({', '.join('?' * width)})"
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        conn.execute(f"INSERT INTO {target} VALUES {', '.join([one] * len(chunk))}",
                     [v for row in chunk for v in row])
