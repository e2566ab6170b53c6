"""The embedded journal with an intake log in front: the ACK path pays one log write + one fdatasync.

`LoggedJournal` implements the Journal protocol over an `IntakeLog` (store/intake_log.py) and a
`SqliteJournal`. `append_batch` decides dedup, assigns ids, writes the batch as one log record, durably,
and returns; an indexer thread then inserts the records into SQLite in large transactions. Every other
method first waits (bounded) until the index holds every append that returned before the call, then
delegates to the SqliteJournal: in-process, it answers exactly as SqliteJournal would (same ids,
duplicate flags, ACK codes, rows and history lines).

On disk: the SQLite file stays where it is (`<data_dir>/journal.sqlite3`, or the path given); the log is
the sibling directory `<that path>.log/` (segments `<first_seq:020d>.log`, a `LOCK` file). SQLite's
`journal_meta` table holds the highest indexed log position, written in the indexing transaction.

Delivery guarantee:
- When `append_batch` returns, the batch (new entries, and "resent" events for duplicates) is
  fdatasynced to the log: it survives SIGKILL and power loss. Intake sends AA/CA only after that.
- Dedup is decided under one lock against SQLite *and* an in-memory map of the accepted keys logged but
  not yet indexed, so a resend that arrives before its original is indexed is still a duplicate.
- Other processes (the CLI while `serve` runs) read the SQLite file: they see an entry once it is
  indexed, normally milliseconds after its ACK. Only one LoggedJournal owns the log (flock); others are
  passive: reads and operator commands on SQLite, appends refused with JournalUnavailable.
- Crash before the fdatasync returned: nothing was acknowledged; a torn last record is cut off on the
  next open. Crash after it, before the index commit: the next `migrate()` indexes every record after the
  stored position before accepting appends, so nothing acknowledged is lost. Crash after the commit: the
  position moved in the same transaction, so nothing is indexed twice (a row whose id exists is skipped
  in any case). Index commits skip the fsync (synchronous=NORMAL: a commit lost to power failure loses its
  position with it, and is redone from the log); a log segment is deleted only after a synchronous=FULL
  commit covering all of its records.
- If SQLite cannot be written (locked by another process, disk trouble), appends keep succeeding into
  the log while the indexer retries with backoff; `ping` raises JournalUnavailable meanwhile, and once the
  index lags by more than `max_lag_seconds` or `max_lag_entries` appends raise it too (intake answers AR),
  so the log cannot grow without bound. Reads wait at most `catch_up_timeout`, then raise it.
"""

from __future__ import annotations

import io
import logging
import pickle
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from hl7bridge.errors import JournalUnavailable
from hl7bridge.records import AppendResult, HistoryEvent, JournalEntry, JournalState, Mark, NewEntry
from hl7bridge.store import schema as s
from hl7bridge.store.intake_log import (
    DEFAULT_PREFILL_BYTES,
    DEFAULT_SEGMENT_BYTES,
    IntakeLog,
    IntakeLogBusy,
    IntakeLogError,
)
from hl7bridge.store.sqlite import SqliteJournal, _connect, _originals, _ts, _unavailable

__all__ = ["LoggedJournal", "log_dir_for"]

log = logging.getLogger("hl7bridge.store.logged")

_FORMAT = 1  # first item of every log record's payload
_PEER = 1 + s.INSERT_COLUMNS.index("peer")  # positions in a row: (id, *INSERT_COLUMNS)
_STATE = 1 + s.INSERT_COLUMNS.index("state")
_REASON = 1 + s.INSERT_COLUMNS.index("reason")
_INDEX_CHUNK = 4096  # entries per indexing transaction, at most (a record is never split)


def log_dir_for(sqlite_path: Path | str) -> Path:
    """Where the intake log of the SQLite journal at `sqlite_path` lives."""
    p = Path(sqlite_path)
    return p.with_name(p.name + ".log")


@dataclass(frozen=True, slots=True)
class _Record:
    """One logged batch on its way to the index."""

    seq: int
    now: str  # the batch's append time: updated_at and the history lines' `at`
    rows: list[tuple[Any, ...]]  # (id, *INSERT_COLUMNS values)
    resends: list[tuple[int, str]]  # (original's id, peer)
    keys: list[tuple[s.DedupKey, int]]  # accepted keys this record put in the pending map
    appended_at: float  # monotonic


class _Plain(pickle.Unpickler):
    """Log payloads hold only tuples, lists, str, bytes, int and None: refuse anything that needs a global."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError("intake log record holds an object")


def _decode(seq: int, payload: bytes) -> _Record:
    fmt, now, rows, resends = _Plain(io.BytesIO(payload)).load()
    if fmt != _FORMAT:
        raise pickle.UnpicklingError(f"unknown record format {fmt}")
    return _Record(seq, now, [tuple(r) for r in rows], [tuple(r) for r in resends], [], 0.0)


class LoggedJournal:
    """Journal = intake log (durable record) + SQLite (state and indexes, maintained after the ACK).
    Thread-safe; call `migrate()` once after opening (it also recovers the log). `on_indexed` (settable
    later as an attribute) is called from the indexer thread after each commit; it must not block.

    `role`: "owner" must hold the log (waiting up to `lock_timeout` for it; `serve`), "passive" never
    takes it (reads and operator commands only; the CLI), "auto" owns it when it is free."""

    def __init__(
        self,
        path: Path | str,
        *,
        log_dir: Path | str | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        prefill_bytes: int = DEFAULT_PREFILL_BYTES,
        busy_timeout: float = 5.0,
        max_lag_seconds: float = 10.0,
        max_lag_entries: int = 100_000,
        catch_up_timeout: float = 10.0,
        close_timeout: float = 10.0,
        index_delay: float = 0.025,
        role: Literal["auto", "owner", "passive"] = "auto",
        lock_timeout: float = 0.0,
        on_indexed: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.log_dir = Path(log_dir) if log_dir is not None else log_dir_for(self.path)
        self.on_indexed = on_indexed
        self._max_lag_seconds, self._max_lag_entries = max_lag_seconds, max_lag_entries
        self._catch_up_timeout, self._close_timeout = catch_up_timeout, close_timeout
        self._index_delay = index_delay
        self._append_lock = threading.Lock()
        self._cv_lock = threading.Lock()
        self._work = threading.Condition(self._cv_lock)  # indexer: records queued
        self._done = threading.Condition(self._cv_lock)  # readers: index advanced
        self._queue: deque[_Record] = deque()
        self._queued_entries = 0
        self._waiters = 0  # readers waiting for the index: the indexer stops gathering
        self._pending: dict[s.DedupKey, s.Original] = {}  # accepted keys logged but not yet indexed
        self._appended = self._indexed = 0
        self._next_id = 0
        self._failing: str | None = None
        self._started = self._stopping = self._closed = False
        self._stop = threading.Event()
        self._give_up_at = 0.0
        self._thread: threading.Thread | None = None
        self._log: IntakeLog | None = None
        self._dconn: sqlite3.Connection | None = None
        self._sqlite = SqliteJournal(self.path, busy_timeout=busy_timeout)
        if role == "passive":
            return
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                self._log = IntakeLog(self.log_dir, segment_bytes=segment_bytes, prefill_bytes=prefill_bytes)
                # Dedup lookups get their own connection: the shared read one can be busy with a long scan.
                self._dconn = _connect(self.path, busy_timeout)
                return
            except IntakeLogBusy:
                if role == "auto":
                    return  # passive: another LoggedJournal owns the log
                if time.monotonic() >= deadline:
                    self.close()
                    raise JournalUnavailable("journal unavailable: another process appends to this journal (a running "
                                             "bridge holds its intake log; send to it, e.g. replay --to HOST:PORT)"
                                             ) from None
                time.sleep(0.05)  # a short CLI command holding it: wait for it, bounded
            except (IntakeLogError, OSError, sqlite3.Error) as e:
                self.close()
                raise JournalUnavailable(f"journal unavailable: intake log: {_reason(e)}") from None

    @property
    def passive(self) -> bool:
        """True when another LoggedJournal owns the intake log: reads and operator commands only."""
        return self._log is None

    # --- start-up ------------------------------------------------------------------------------------

    def migrate(self) -> None:
        self._sqlite.migrate()
        if self._log is None or self._started or self._closed:
            return
        try:
            self._recover(self._log)
        except IntakeLogError as e:
            raise JournalUnavailable(f"journal unavailable: {e}") from None
        except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
            raise JournalUnavailable(f"journal unavailable: unreadable intake log record ({type(e).__name__})"
                                     ) from None
        self._started = True
        self._thread = threading.Thread(target=self._run, name="hl7bridge-journal-indexer", daemon=True)
        self._thread.start()

    def _recover(self, ilog: IntakeLog) -> None:
        """Index every log record after the stored position (a crash between log and index loses nothing)."""
        position = self._sqlite.log_position()
        if ilog.last_seq < position:
            log.warning("intake log ends at %d but the index is at %d: starting the log after it",
                        ilog.last_seq, position)
            ilog.advance_to(position + 1)
        elif ilog.first_seq > position + 1:
            log.error("intake log records %d..%d were never indexed and are gone; indexing from %d",
                      position + 1, ilog.first_seq - 1, ilog.first_seq)
        batch: list[_Record] = []
        count = max_id = 0
        for seq, payload in ilog.read_from(position):
            record = _decode(seq, payload)
            batch.append(record)
            count += len(record.rows) + len(record.resends)
            if record.rows:
                max_id = max(max_id, record.rows[-1][0])
            if count >= _INDEX_CHUNK:
                self._index(batch, durable=True)
                batch, count = [], 0
        if batch:
            self._index(batch, durable=True)
        self._appended = self._indexed = ilog.last_seq
        self._next_id = max(self._sqlite.next_entry_id(), max_id + 1)
        ilog.release_through(ilog.last_seq)

    # --- the append path ------------------------------------------------------------------------------

    def append_batch(self, entries: Sequence[NewEntry], dedup_window: timedelta) -> list[AppendResult]:
        if not entries:
            return []
        with self._append_lock:
            ilog, dconn = self._writable()
            now = _ts(datetime.now(UTC))
            originals: dict[s.DedupKey, s.Original] = {}
            missing: list[s.DedupKey] = []
            # The map before SQLite: the indexer drops keys only after its commit, so a key is always in
            # one of the two when we look (or in both, and then the map's entry is the newer one).
            with self._cv_lock:
                for key in {k for e in entries if (k := s.dedup_key(e)) is not None}:
                    hit = self._pending.get(key)
                    if hit is None:
                        missing.append(key)
                    else:
                        originals[key] = hit
            try:
                if missing:
                    originals.update(_originals(dconn, missing))
            except sqlite3.Error as e:
                raise _unavailable(e) from e
            plan = s.plan_batch(entries, dedup_window, originals)
            new_ids = list(range(self._next_id, self._next_id + len(plan.store)))
            rows = [(eid, *s.insert_values(entries[i], _ts, now)) for eid, i in zip(new_ids, plan.store, strict=True)]
            bad = {r[_STATE] for r in rows} - set(s.STATES)
            if bad:  # SqliteJournal's CHECK constraint would refuse the batch; so do we, before the log
                raise JournalUnavailable("journal unavailable: IntegrityError: invalid entry state")
            results = plan.results(entries, new_ids)
            resends = [(r.journal_id, entries[i].peer) for i, r in enumerate(results) if r.duplicate]
            payload = pickle.dumps((_FORMAT, now, rows, resends), protocol=5)
            try:
                seq = ilog.append([payload])
            except IntakeLogError as e:
                raise JournalUnavailable(f"journal unavailable: {e}") from None
            self._next_id += len(rows)
            keys: list[tuple[s.DedupKey, int]] = []
            with self._cv_lock:
                for i, eid in zip(plan.store, new_ids, strict=True):
                    entry = entries[i]
                    if entry.state != "rejected" and (key := s.dedup_key(entry)) is not None:
                        self._pending[key] = s.Original(eid, entry.ack_code, s.aware_utc(entry.received_at))
                        keys.append((key, eid))
                self._queue.append(_Record(seq, now, rows, resends, keys, time.monotonic()))
                self._queued_entries += len(rows) + len(resends)
                self._appended = seq
                if len(self._queue) == 1 or self._queued_entries >= _INDEX_CHUNK:
                    self._work.notify()  # otherwise the indexer is busy or gathering, and will look
        return results

    def _writable(self) -> tuple[IntakeLog, sqlite3.Connection]:
        if self._closed or self._stopping:
            raise JournalUnavailable("journal unavailable: closed")
        if self._log is None or self._dconn is None:
            raise JournalUnavailable("journal unavailable: the intake log is owned by another process")
        if not self._started:
            raise JournalUnavailable("journal unavailable: not migrated")
        lag = self._lag()
        if lag:
            raise JournalUnavailable(f"journal unavailable: {lag}")
        return self._log, self._dconn

    def _lag(self) -> str:
        """Why the index is too far behind the log, or ''."""
        with self._cv_lock:
            oldest = self._queue[0].appended_at if self._queue else None
            queued = self._queued_entries
        if queued > self._max_lag_entries:
            return f"index is {queued} entries behind the intake log"
        if oldest is not None and time.monotonic() - oldest > self._max_lag_seconds:
            return f"index is more than {self._max_lag_seconds:g}s behind the intake log"
        return ""

    # --- the indexer ----------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff, failures = 0.05, 0
        while True:
            with self._cv_lock:
                while not self._queue and not self._stopping:
                    self._work.wait()
                if not self._queue:
                    return
                # Off the ACK path a short gathering delay turns many small index transactions into one
                # (each costs GIL round trips the event loop and the appenders feel), unless a reader waits.
                # 25 ms rather than 5: at 2,000 msg/s end to end on 2 cores that cut the intake process's
                # CPU per message by ~20 % and the worker process's (fewer, larger batches) by ~25 %, and
                # the 16-connection p99 ACK latency from ~12-16 to ~9-11 ms. Entries reach the worker
                # process (and the CLI) up to that much later; in-process readers never wait for it.
                until = time.monotonic() + self._index_delay
                while not (self._stopping or self._waiters or self._queued_entries >= _INDEX_CHUNK):
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._work.wait(remaining)
                batch: list[_Record] = []
                count = 0
                for record in islice(self._queue, 0, None):
                    if batch and count + len(record.rows) + len(record.resends) > _INDEX_CHUNK:
                        break
                    batch.append(record)
                    count += len(record.rows) + len(record.resends)
            # Commits skip the fsync (the log holds the records) except the one that lets whole segments
            # go: synchronous=FULL makes it and every earlier commit durable first.
            durable = self._log is not None and self._log.releasable_through(batch[-1].seq)
            try:
                self._index(batch, durable=durable)
            except Exception as e:
                failures += 1
                self._failing = _reason(e)
                if failures == 1 or failures % 30 == 0:
                    log.error("journal indexer: SQLite write failed (%s), attempt %d; the entries are safe in "
                              "the intake log, retrying", self._failing, failures)
                if self._stopping and time.monotonic() >= self._give_up_at:
                    log.error("journal indexer: closing with %d entries not indexed; they stay in the intake "
                              "log and are indexed on the next start", self._queued_entries)
                    return
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if failures:
                log.warning("journal indexer: SQLite writable again after %d failed attempts", failures)
            backoff, failures, self._failing = 0.05, 0, None
            with self._cv_lock:
                for record in batch:
                    self._queue.popleft()
                    self._queued_entries -= len(record.rows) + len(record.resends)
                    for key, eid in record.keys:
                        hit = self._pending.get(key)
                        if hit is not None and hit.id == eid:
                            del self._pending[key]
                self._indexed = batch[-1].seq
                self._done.notify_all()
            self._after_commit(durable)

    def _after_commit(self, durable: bool) -> None:
        callback = self.on_indexed
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("journal indexer: on_indexed callback failed")
        if durable and self._log is not None:
            self._log.release_through(self._indexed)

    def _index(self, batch: Sequence[_Record], *, durable: bool) -> None:
        """One SQLite transaction for the records (entries, their history lines, resends, position)."""
        rows: list[tuple[Any, ...]] = []
        history: list[tuple[Any, ...]] = []
        resends: list[tuple[int, str, str]] = []
        for record in batch:
            now = record.now
            for row in record.rows:
                rows.append(row)
                history.append((row[0], now, "received", row[_PEER]))
                if row[_STATE] != "pending":  # settled at intake: "rejected: reason", "filtered: reason"
                    history.append((row[0], now, row[_STATE], row[_REASON]))
            resends += [(eid, now, peer) for eid, peer in record.resends]
        skipped = self._sqlite.index_logged(rows, history, resends, batch[-1].seq, durable=durable)
        if skipped:
            log.error("journal indexer: %d logged entries had ids already in SQLite and were skipped "
                      "(another writer on this journal?)", skipped)

    # --- reads and operator commands: after the index caught up ----------------------------------------

    def _catch_up(self) -> None:
        """Wait until every append that returned before this call is indexed (read-your-writes)."""
        target = self._appended
        if self._indexed >= target or self._closed or threading.current_thread() is self._thread:
            return
        deadline = time.monotonic() + self._catch_up_timeout
        with self._cv_lock:
            self._waiters += 1
            self._work.notify()
            try:
                while self._indexed < target and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        why = f" ({self._failing})" if self._failing else ""
                        raise JournalUnavailable(f"journal unavailable: the index is behind the intake log{why}")
                    self._done.wait(remaining)
            finally:
                self._waiters -= 1

    def next_ready(
        self, limit: int, now: datetime, exclude_keys: Collection[str], hold: bool
    ) -> list[JournalEntry]:
        self._catch_up()
        return self._sqlite.next_ready(limit, now, exclude_keys, hold)

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
        self._catch_up()
        self._sqlite.mark_many(marks)

    def get(self, entry_id: int) -> JournalEntry | None:
        self._catch_up()
        return self._sqlite.get(entry_id)

    def history(self, entry_id: int) -> list[HistoryEvent]:
        self._catch_up()
        return self._sqlite.history(entry_id)

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
        self._catch_up()
        return self._sqlite.query(states=states, since=since, until=until, message_type=message_type,
                                  error_kind=error_kind, patient_key=patient_key, after_id=after_id, limit=limit)

    def requeue(self, ids: Collection[int], reason: str) -> int:
        self._catch_up()
        return self._sqlite.requeue(ids, reason)

    def discard(self, ids: Collection[int], reason: str) -> int:
        self._catch_up()
        return self._sqlite.discard(ids, reason)

    def purge(self, older_than: datetime, states: Collection[str], reason: str) -> int:
        self._catch_up()
        return self._sqlite.purge(older_than, states, reason)

    def purge_audit(self) -> list[dict[str, Any]]:
        self._catch_up()
        return self._sqlite.purge_audit()

    def counts(self) -> dict[str, int]:
        self._catch_up()
        return self._sqlite.counts()

    def oldest_pending(self) -> datetime | None:
        self._catch_up()
        return self._sqlite.oldest_pending()

    def ping(self) -> None:
        self._writable()  # closed, passive, not migrated, or lagging too far
        if self._log is not None and self._log.broken:
            raise JournalUnavailable(f"journal unavailable: {self._log.broken}")
        if self._failing is not None:
            raise JournalUnavailable(f"journal unavailable: indexing into SQLite is failing ({self._failing})")
        self._sqlite.ping()

    def close(self) -> None:
        with self._append_lock:  # appends in flight finish first; later ones see `_stopping`
            if self._closed:
                return
            with self._cv_lock:
                self._stopping = True
                self._give_up_at = time.monotonic() + self._close_timeout
                self._work.notify_all()
        if self._thread is not None:
            self._thread.join(self._close_timeout + 5)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._append_lock, self._cv_lock:
            self._closed = True
            self._done.notify_all()
        if self._dconn is not None:
            self._dconn.close()
            self._dconn = None
        if self._log is not None:
            self._log.close()
        self._sqlite.close()


def _reason(exc: BaseException) -> str:
    """A PHI-free name for a failure: the SQLite error name, the errno name, or the class."""
    if isinstance(exc, JournalUnavailable):
        exc = exc.__cause__ or exc
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorname", type(exc).__name__)
    if isinstance(exc, IntakeLogError):
        return str(exc)
    return type(exc).__name__
