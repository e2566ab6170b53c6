"""The embedded CRM sink: one SQLite file in the data directory.

One connection, guarded by a lock (the pipeline calls the sink from worker threads), WAL with
synchronous=FULL so an applied message survives a power cut, and `BEGIN IMMEDIATE` so a second process on
the same file waits for the write lock instead of failing half-way. All decisions live in `conflict.py`
and the SQL both backends share in `_sql.py`; this module is the SQLite dialect and connection only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from hl7bridge.crm._sql import Dialect, SqlSink, SqlTx, as_is, raise_sink_error, schema_v1
from hl7bridge.crm.conflict import Outcome, apply_op, iso, meta_json_text
from hl7bridge.errors import ErrCode, PermanentSinkError, SinkError, TransientSinkError
from hl7bridge.records import ApplyRequest, CrmOp, OpResult

__all__ = ["SqliteSink"]


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else iso(dt)


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


#: Times are stored as fixed-width ISO 8601 UTC text (so they also sort as instants), field_meta as JSON
#: text; no row locks, because BEGIN IMMEDIATE already holds the whole file.
_SQLITE = Dialect(
    mark="?", lock="", collate="", starts_with="substr({col}, 1, length(?)) = ?", starts_with_args=2,
    text="TEXT", integer="INTEGER", timestamp="TEXT", json="TEXT", serial_pk="INTEGER PRIMARY KEY AUTOINCREMENT",
    time_param=_iso, time_value=_dt, meta_param=json.dumps, meta_value=json.loads, stamp=as_is,
    meta_encode=meta_json_text,
)

#: Schema steps; step i brings the schema to version i + 1. Append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (schema_v1(_SQLITE),)

# Primary result codes after which a retry can succeed: BUSY, LOCKED, IOERR, FULL, CANTOPEN, PROTOCOL.
_TRANSIENT_CODES = frozenset({5, 6, 10, 13, 14, 15})


def _translate(exc: sqlite3.Error) -> SinkError:
    """A sink error with a PHI-free reason (SQLite messages can quote values, so only codes are kept)."""
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    text = str(exc).lower()
    transient = (code is not None and code & 0xFF in _TRANSIENT_CODES) or (
        code is None and ("locked" in text or "busy" in text))
    if transient:
        return TransientSinkError(f"crm: sqlite unavailable ({name})")
    if isinstance(exc, sqlite3.IntegrityError):
        return PermanentSinkError(f"crm: constraint violation ({name})", err_code=ErrCode.DUPLICATE_KEY)
    return PermanentSinkError(f"crm: sqlite error ({name})")


def _reraise(exc: sqlite3.Error) -> NoReturn:
    raise_sink_error(_translate(exc), exc)


def _as_sink_error(exc: BaseException) -> SinkError:
    """Errors raised while applying one message of a batch, as the sink error its caller will see."""
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, sqlite3.Error):
        return _translate(exc)
    return PermanentSinkError(f"crm: cannot apply ({type(exc).__name__})")


@dataclass(slots=True, eq=False)
class _ApplyRequest:
    """One message waiting for the next group commit."""

    ops: Sequence[CrmOp]
    message_key: str | None
    force: bool
    results: list[OpResult] = field(default_factory=list)
    error: SinkError | None = None
    done: bool = False


class SqliteSink(SqlSink):
    """The `Sink` protocol over a SQLite file (created with its directory when missing)."""

    dialect = _SQLITE
    migrations = _MIGRATIONS

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_ApplyRequest] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, the module never opens one behind us.
            # A large statement cache: the batch statements below come in one text per batch size.
            self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False, cached_statements=512)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            _reraise(exc)
        except OSError as exc:
            raise TransientSinkError(f"crm: cannot open the sqlite file ({type(exc).__name__})") from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                _reraise(exc)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                _reraise(exc)

    def _crm_tx(self, conn: sqlite3.Connection) -> SqlTx:
        return SqlTx(conn.execute, _SQLITE)

    def _select(self, sql: str, args: Sequence[Any]) -> list[Any]:
        with self._read() as conn:
            return conn.execute(sql, args).fetchall()

    def apply(self, ops: Sequence[CrmOp], *, message_key: str | None = None,
              force: bool = False) -> list[OpResult]:
        """Group commit: applies waiting on the lock are committed together (one fsync per batch), each
        message on its own (see `_run_batch`), so one message's failure never undoes or blocks another's.
        Results are handed out only after the batch's COMMIT, so nobody reports an uncommitted apply."""
        request = _ApplyRequest(ops, message_key, force)
        with self._queue_lock:
            self._queue.append(request)
        with self._lock:
            if not request.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._apply_batch(batch)
        if request.error is not None:
            raise request.error
        return request.results

    def apply_many(self, requests: Sequence[ApplyRequest]) -> list[list[OpResult] | SinkError]:
        """The same group commit as `apply`, with a whole batch of messages queued at once."""
        pending = [_ApplyRequest(r.ops, r.message_key, r.force) for r in requests]
        if not pending:
            return []
        with self._queue_lock:
            self._queue.extend(pending)
        with self._lock:
            if not pending[-1].done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._apply_batch(batch)
        return [p.error if p.error is not None else p.results for p in pending]

    def _apply_batch(self, batch: list[_ApplyRequest]) -> None:
        conn = self._conn
        now = datetime.now(UTC)
        try:
            # Optimistically without per-message savepoints (two statements per message saved); if any
            # message fails, that transaction is rolled back whole and the batch runs again with them, so
            # what commits is what the savepoint run alone would commit.
            if not self._run_batch(conn, batch, now, isolate=False):
                self._run_batch(conn, batch, now, isolate=True)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = _as_sink_error(exc)
            for request in batch:
                request.error, request.results = error, []
        for request in batch:
            request.done = True

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_ApplyRequest], now: datetime, *,
                   isolate: bool) -> bool:
        """Apply the batch in one transaction and commit it. With `isolate` each message runs in its own
        savepoint and a failure is that message's alone; without, the first failure rolls the whole
        transaction back and False is returned (nothing written, the outcomes so far void).

        The idempotency records cost two statements per batch, not two per message: one lookup of the
        batch's keys up front, one INSERT of the applied ones before COMMIT (the same transaction as the
        upserts). Under the write lock only this batch changes `applied`, so "recorded before the batch,
        or applied earlier in it" is exactly what a lookup per message would have found."""
        conn.execute("BEGIN IMMEDIATE")
        seen = _applied_keys(conn, [r.message_key for r in batch if r.message_key is not None and not r.force])
        applied: list[str] = []
        for request in batch:
            request.error, request.results = None, []
            key = request.message_key
            if key is not None and not request.force and key in seen:
                request.results = [OpResult(op.entity, op.key, Outcome.ALREADY_APPLIED.value) for op in request.ops]
                continue
            if isolate:
                conn.execute("SAVEPOINT message")
            try:
                results = self._apply_one(conn, request, now)
                if isolate:
                    conn.execute("RELEASE message")
            except Exception as exc:
                if not isolate:
                    if conn.in_transaction:  # (SQLite may have rolled it back itself)
                        conn.execute("ROLLBACK")
                    return False
                conn.execute("ROLLBACK TO message")
                conn.execute("RELEASE message")
                request.error = _as_sink_error(exc)
                continue
            request.results = results
            if key is not None:
                seen.add(key)
                applied.append(key)
        _record_applied(conn, applied, iso(now))
        conn.execute("COMMIT")
        return True

    def _apply_one(self, conn: sqlite3.Connection, request: _ApplyRequest, now: datetime) -> list[OpResult]:
        tx = self._crm_tx(conn)
        return [apply_op(tx, op, now=now, message_key=request.message_key) for op in request.ops]

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


#: Keys per statement: well under SQLite's bound-parameter limit.
_KEYS_PER_STATEMENT = 256


def _applied_keys(conn: sqlite3.Connection, keys: list[str]) -> set[str]:
    """Which of `keys` are recorded as applied."""
    found: set[str] = set()
    for start in range(0, len(keys), _KEYS_PER_STATEMENT):
        chunk = keys[start : start + _KEYS_PER_STATEMENT]
        found.update(r[0] for r in conn.execute(
            f"SELECT message_key FROM applied WHERE message_key IN ({', '.join('?' * len(chunk))})", chunk))
    return found


def _record_applied(conn: sqlite3.Connection, keys: list[str], at: str) -> None:
    """Record `keys` as applied at `at` (a forced re-apply moves the time of a key already recorded)."""
    for start in range(0, len(keys), _KEYS_PER_STATEMENT):
        chunk = keys[start : start + _KEYS_PER_STATEMENT]
        conn.execute(
            f"INSERT INTO applied (message_key, applied_at) VALUES {', '.join(['(?, ?)'] * len(chunk))} "
            "ON CONFLICT (message_key) DO UPDATE SET applied_at = excluded.applied_at",
            [v for key in chunk for v in (key, at)])
