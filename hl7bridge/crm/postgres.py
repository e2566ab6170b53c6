"""The PostgreSQL CRM sink (psycopg 3 with a connection pool).

One transaction per message. Rows are read with SELECT ... FOR UPDATE, so two writers on one contact
serialise; a new MRN is inserted with ON CONFLICT DO NOTHING, so two writers creating the same patient end
with one row (the loser waits for the winner's commit, then updates its row). The pool checks a connection
before lending it and gives up reconnecting after a short while, so it recovers on its own after a server
restart. All decisions live in `conflict.py` and the SQL both backends share in `_sql.py`; this module is
the PostgreSQL dialect and connection handling only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NoReturn

import psycopg
from psycopg import errors as pgerr
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolClosed

from hl7bridge.crm._sql import Dialect, SqlSink, SqlTx, as_is, raise_sink_error, schema_v1
from hl7bridge.crm.conflict import Outcome, apply_op, iso
from hl7bridge.errors import ErrCode, PermanentSinkError, SinkError, TransientSinkError
from hl7bridge.records import ApplyRequest, CrmOp, OpResult

__all__ = ["PostgresSink"]

#: pg_advisory_xact_lock key serialising concurrent migrate() calls ("hl7crm" in ASCII).
_MIGRATE_LOCK = 0x68_6C_37_63_72_6D


def _ts(value: datetime | None) -> str | None:
    return None if value is None else iso(value)


#: timestamptz and jsonb columns: psycopg passes datetimes and dicts (wrapped in Jsonb) both ways.
#: COLLATE "C" makes listings byte-ordered like SQLite's, whatever the database's locale.
_POSTGRES = Dialect(
    mark="%s", lock=" FOR UPDATE", collate=' COLLATE "C"', starts_with="starts_with({col}, %s)", starts_with_args=1,
    text="text", integer="integer", timestamp="timestamptz", json="jsonb",
    serial_pk="bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    time_param=as_is, time_value=as_is, meta_param=Jsonb, meta_value=as_is, stamp=_ts,
)

#: Schema steps; step i brings the schema to version i + 1. Append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (schema_v1(_POSTGRES),)


def _translate(exc: psycopg.Error) -> SinkError:
    """A sink error with a PHI-free reason: server messages quote key values, so only class names are kept."""
    name = type(exc).__name__
    if isinstance(exc, PoolClosed):
        return PermanentSinkError("crm: the postgres sink is closed")
    # OperationalError covers connection loss, timeouts, pool timeouts, admin shutdown, and (through
    # TransactionRollback) deadlocks and serialization failures: all worth a retry.
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return TransientSinkError(f"crm: postgres unavailable ({name})")
    if isinstance(exc, pgerr.UniqueViolation):
        return PermanentSinkError(f"crm: constraint violation ({name})", err_code=ErrCode.DUPLICATE_KEY)
    if isinstance(exc, psycopg.IntegrityError):
        return PermanentSinkError(f"crm: constraint violation ({name})")
    if isinstance(exc, psycopg.DataError):
        return PermanentSinkError(f"crm: bad data ({name})", err_code=ErrCode.DATA_TYPE)
    return PermanentSinkError(f"crm: postgres error ({name})")


def _reraise(exc: psycopg.Error) -> NoReturn:
    raise_sink_error(_translate(exc), exc)


class PostgresSink(SqlSink):
    """The `Sink` protocol over a PostgreSQL database given by URL (postgresql://...)."""

    dialect = _POSTGRES
    migrations = _MIGRATIONS

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 5.0,
                 ping_timeout_s: float = 2.0) -> None:
        self._timeout_s = timeout_s
        self._ping_timeout_s = ping_timeout_s
        self._pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=True,  # connects in the background: a sink built while the server is down still starts
            timeout=timeout_s,
            # check: a connection broken by a server restart is replaced before it is lent, not failed on.
            check=ConnectionPool.check_connection,
            # Give up a reconnect cycle after 10 s so a new request starts a fresh attempt at once instead
            # of waiting out a long exponential backoff built up during the outage.
            reconnect_timeout=10.0,
            name="hl7bridge-crm",
            kwargs={
                "connect_timeout": 2,
                "application_name": "hl7bridge-crm",
                "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                # A hung statement (a lock never released) becomes a retryable error, not a stuck worker.
                "options": "-c statement_timeout=60000",
            },
        )

    @contextmanager
    def _connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection(timeout=timeout or self._timeout_s) as conn:
                yield conn
        except psycopg.Error as exc:
            _reraise(exc)

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        with self._connection() as conn, conn.transaction():
            yield conn

    def _crm_tx(self, conn: psycopg.Connection[Any]) -> SqlTx:
        return SqlTx(conn.cursor(row_factory=dict_row).execute, _POSTGRES)

    def _select(self, sql: str, args: Sequence[Any]) -> list[Any]:
        with self._connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(sql, args).fetchall()
            conn.rollback()
        return rows

    def _lock_schema(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))

    def apply(self, ops: Sequence[CrmOp], *, message_key: str | None = None,
              force: bool = False) -> list[OpResult]:
        [result] = self.apply_many([ApplyRequest(ops, message_key, force)])
        if isinstance(result, SinkError):
            raise result
        return result

    def apply_many(self, requests: Sequence[ApplyRequest]) -> list[list[OpResult] | SinkError]:
        """One transaction (one commit) for the batch, each message in its own savepoint."""
        if not requests:
            return []
        now = datetime.now(UTC)
        out: list[list[OpResult] | SinkError] = []
        try:
            with self._tx() as conn:
                for request in requests:
                    try:
                        with conn.transaction():  # a savepoint: this message alone rolls back on failure
                            out.append(self._apply_one(conn, request, now))
                    except psycopg.Error as exc:
                        if len(requests) == 1:
                            raise  # the single message's error is the transaction's: one translation
                        out.append(_translate(exc))
                    except SinkError as exc:
                        out.append(exc)
        except SinkError as exc:  # the transaction itself failed (connection, commit): every message failed
            return [exc] * len(requests)
        return out

    def _apply_one(self, conn: psycopg.Connection[Any], request: ApplyRequest, now: datetime) -> list[OpResult]:
        ops, message_key = request.ops, request.message_key
        if message_key is not None:
            # Claim the key first: a concurrent apply of the same message waits here for our commit.
            cur = conn.execute("INSERT INTO applied (message_key, applied_at) VALUES (%s, %s) "
                               "ON CONFLICT (message_key) DO NOTHING", (message_key, now))
            if cur.rowcount == 0:
                if not request.force:
                    return [OpResult(op.entity, op.key, Outcome.ALREADY_APPLIED.value) for op in ops]
                conn.execute("UPDATE applied SET applied_at = %s WHERE message_key = %s", (now, message_key))
        tx = self._crm_tx(conn)
        return [apply_op(tx, op, now=now, message_key=message_key) for op in ops]

    def ping(self) -> None:
        try:
            with self._connection(self._ping_timeout_s) as conn:
                conn.execute("SELECT 1")
                conn.rollback()
        except PermanentSinkError as exc:
            raise TransientSinkError(exc.reason) from exc

    def close(self) -> None:
        self._pool.close(timeout=5.0)
