"""The PostgreSQL CRM sink (psycopg 3 with a connection pool).

One transaction per message. Rows are read with SELECT ... FOR UPDATE, so two writers on one contact
serialise; a new MRN is inserted with ON CONFLICT DO NOTHING, so two writers creating the same patient end
with one row (the loser waits for the winner's commit, then updates its row). The pool checks a connection
before lending it and gives up reconnecting after a short while, so it recovers on its own after a server
restart. All decisions live in `conflict.py`; this module is SQL only.
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

from hl7bridge.crm.conflict import (
    EDITABLE,
    MergeAudit,
    Outcome,
    Row,
    Value,
    apply_op,
    iso,
    meta_from_json,
    meta_to_json,
    plan_edit,
)
from hl7bridge.crm.model import Appointment, Contact
from hl7bridge.errors import ErrCode, PermanentSinkError, SinkError, TransientSinkError
from hl7bridge.records import CrmOp, Entity, OpResult

__all__ = ["PostgresSink"]

_C = EDITABLE["contact"]
_A = EDITABLE["appointment"]
#: pg_advisory_xact_lock key serialising concurrent migrate() calls ("hl7crm" in ASCII).
_MIGRATE_LOCK = 0x68_6C_37_63_72_6D

#: Schema steps; step i brings the schema to version i + 1. Append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE contacts (
            contact_id text PRIMARY KEY,
            mrn text NOT NULL UNIQUE,
            {", ".join(f'"{c}" text' for c in _C)},
            updated_at timestamptz NOT NULL,
            last_event_at timestamptz,
            field_meta jsonb NOT NULL DEFAULT '{{}}')""",
        """CREATE TABLE appointments (
            appointment_id text PRIMARY KEY,
            mrn text,
            contact_id text,
            "start" text, duration_minutes integer, status text, "type" text, provider text, location text,
            updated_at timestamptz NOT NULL,
            last_event_at timestamptz,
            field_meta jsonb NOT NULL DEFAULT '{}')""",
        "CREATE INDEX appointments_mrn ON appointments (mrn)",
        "CREATE INDEX appointments_contact_id ON appointments (contact_id)",
        """CREATE TABLE merges (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            kind text NOT NULL,
            merged_at timestamptz NOT NULL,
            surviving_mrn text NOT NULL,
            merged_mrn text NOT NULL,
            surviving_contact_id text NOT NULL,
            merged_contact_id text NOT NULL,
            appointments_moved integer NOT NULL,
            message_key text)""",
        "CREATE TABLE applied (message_key text PRIMARY KEY, applied_at timestamptz NOT NULL)",
    ),
)


def _cols(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _assign(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}" = %s' for n in names)


def _marks(n: int) -> str:
    return ", ".join(["%s"] * n)


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
    err = _translate(exc)
    # Driver messages can quote row values (a duplicate key names the MRN), so the cause stays chained
    # only for transient failures, whose messages name hosts and codes.
    if isinstance(err, TransientSinkError):
        raise err from exc
    raise err from None


class _Tx:
    """conflict.CrmTx over one connection inside an open transaction."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.cur = conn.cursor(row_factory=dict_row)

    def lock_contact(self, mrn: str) -> Row | None:
        r = self.cur.execute("SELECT * FROM contacts WHERE mrn = %s FOR UPDATE", (mrn,)).fetchone()
        if r is None:
            return None
        return Row(r["contact_id"], r["mrn"], {c: r[c] for c in _C}, meta_from_json(r["field_meta"]),
                   r["last_event_at"])

    def insert_contact(self, row: Row, now: datetime) -> bool:
        self.cur.execute(
            f"INSERT INTO contacts (contact_id, mrn, {_cols(_C)}, updated_at, last_event_at, field_meta) "
            f"VALUES ({_marks(len(_C) + 5)}) ON CONFLICT (mrn) DO NOTHING",
            (row.row_id, row.key, *(row.values.get(c) for c in _C), now, row.last_event_at,
             Jsonb(meta_to_json(row.meta))))
        return self.cur.rowcount == 1

    def update_contact(self, row: Row, updated_at: datetime | None) -> None:
        self.cur.execute(
            f"UPDATE contacts SET mrn = %s, {_assign(_C)}, last_event_at = %s, field_meta = %s, "
            "updated_at = COALESCE(%s, updated_at) WHERE contact_id = %s",
            (row.key, *(row.values.get(c) for c in _C), row.last_event_at, Jsonb(meta_to_json(row.meta)),
             updated_at, row.row_id))

    def delete_contact(self, contact_id: str) -> None:
        self.cur.execute("DELETE FROM contacts WHERE contact_id = %s", (contact_id,))

    def lock_appointment(self, appointment_id: str) -> Row | None:
        r = self.cur.execute("SELECT * FROM appointments WHERE appointment_id = %s FOR UPDATE",
                             (appointment_id,)).fetchone()
        if r is None:
            return None
        return Row(r["appointment_id"], r["appointment_id"], {a: r[a] for a in _A},
                   meta_from_json(r["field_meta"]), r["last_event_at"], r["mrn"], r["contact_id"])

    def insert_appointment(self, row: Row, now: datetime) -> bool:
        self.cur.execute(
            f"INSERT INTO appointments (appointment_id, mrn, contact_id, {_cols(_A)}, updated_at, "
            f"last_event_at, field_meta) VALUES ({_marks(len(_A) + 6)}) "
            "ON CONFLICT (appointment_id) DO NOTHING",
            (row.row_id, row.mrn, row.contact_id, *(row.values.get(a) for a in _A), now, row.last_event_at,
             Jsonb(meta_to_json(row.meta))))
        return self.cur.rowcount == 1

    def update_appointment(self, row: Row, updated_at: datetime | None) -> None:
        self.cur.execute(
            f"UPDATE appointments SET mrn = %s, contact_id = %s, {_assign(_A)}, last_event_at = %s, "
            "field_meta = %s, updated_at = COALESCE(%s, updated_at) WHERE appointment_id = %s",
            (row.mrn, row.contact_id, *(row.values.get(a) for a in _A), row.last_event_at,
             Jsonb(meta_to_json(row.meta)), updated_at, row.row_id))

    def move_appointments(self, from_contact_id: str, from_mrn: str, to_contact_id: str, to_mrn: str,
                          now: datetime) -> int:
        self.cur.execute(
            "UPDATE appointments SET mrn = %s, contact_id = %s, updated_at = %s "
            "WHERE contact_id = %s OR mrn = %s",
            (to_mrn, to_contact_id, now, from_contact_id, from_mrn))
        return self.cur.rowcount

    def record_merge(self, audit: MergeAudit) -> None:
        self.cur.execute(
            "INSERT INTO merges (kind, merged_at, surviving_mrn, merged_mrn, surviving_contact_id, "
            "merged_contact_id, appointments_moved, message_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (audit.kind, audit.at, audit.surviving_mrn, audit.merged_mrn, audit.surviving_contact_id,
             audit.merged_contact_id, audit.appointments_moved, audit.message_key))


def _ts(value: datetime | None) -> str | None:
    return None if value is None else iso(value)


class PostgresSink:
    """The `Sink` protocol over a PostgreSQL database given by URL (postgresql://...)."""

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

    def migrate(self) -> None:
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS crm_schema_version (version integer NOT NULL)")
            r = conn.execute("SELECT version FROM crm_schema_version").fetchone()
            version = 0 if r is None else int(r[0])
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            if r is None:
                conn.execute("INSERT INTO crm_schema_version (version) VALUES (%s)", (len(_MIGRATIONS),))
            elif version < len(_MIGRATIONS):
                conn.execute("UPDATE crm_schema_version SET version = %s", (len(_MIGRATIONS),))

    def apply(self, ops: Sequence[CrmOp], *, message_key: str | None = None,
              force: bool = False) -> list[OpResult]:
        now = datetime.now(UTC)
        with self._tx() as conn:
            if message_key is not None:
                # Claim the key first: a concurrent apply of the same message waits here for our commit.
                cur = conn.execute("INSERT INTO applied (message_key, applied_at) VALUES (%s, %s) "
                                   "ON CONFLICT (message_key) DO NOTHING", (message_key, now))
                if cur.rowcount == 0:
                    if not force:
                        return [OpResult(op.entity, op.key, Outcome.ALREADY_APPLIED.value) for op in ops]
                    conn.execute("UPDATE applied SET applied_at = %s WHERE message_key = %s",
                                 (now, message_key))
            tx = _Tx(conn)
            return [apply_op(tx, op, now=now, message_key=message_key) for op in ops]

    def contacts(self, mrn: str | None = None) -> list[Contact]:
        where, args = ("WHERE mrn = %s", (mrn,)) if mrn is not None else ("", ())
        with self._connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(f'SELECT * FROM contacts {where} ORDER BY mrn COLLATE "C", contact_id',
                               args).fetchall()
            conn.rollback()
        return [Contact(contact_id=r["contact_id"], mrn=r["mrn"], **{c: r[c] for c in _C},
                        updated_at=_ts(r["updated_at"])) for r in rows]

    def appointments(self, mrn: str | None = None) -> list[Appointment]:
        where, args = ("WHERE mrn = %s", (mrn,)) if mrn is not None else ("", ())
        with self._connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(f'SELECT * FROM appointments {where} ORDER BY appointment_id COLLATE "C"',
                               args).fetchall()
            conn.rollback()
        return [Appointment(appointment_id=r["appointment_id"], mrn=r["mrn"], contact_id=r["contact_id"],
                            **{a: r[a] for a in _A}, updated_at=_ts(r["updated_at"])) for r in rows]

    def edit(self, entity: Entity, key: str, values: dict[str, Value], at: datetime | None = None) -> None:
        now = datetime.now(UTC)
        with self._tx() as conn:
            tx = _Tx(conn)
            row = tx.lock_contact(key) if entity == "contact" else tx.lock_appointment(key)
            if row is None:
                raise PermanentSinkError(f"crm: no such {entity}", err_code=ErrCode.UNKNOWN_KEY)
            new, changed = plan_edit(entity, row, values, at or now)
            if changed:
                (tx.update_contact if entity == "contact" else tx.update_appointment)(new, now)

    def delete_where_mrn_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("an empty prefix would delete every contact")
        with self._tx() as conn:
            conn.execute("DELETE FROM appointments WHERE starts_with(mrn, %s) OR contact_id IN "
                         "(SELECT contact_id FROM contacts WHERE starts_with(mrn, %s))", (prefix, prefix))
            conn.execute("DELETE FROM merges WHERE starts_with(surviving_mrn, %s) "
                         "OR starts_with(merged_mrn, %s)", (prefix, prefix))
            return conn.execute("DELETE FROM contacts WHERE starts_with(mrn, %s)", (prefix,)).rowcount

    def ping(self) -> None:
        try:
            with self._connection(self._ping_timeout_s) as conn:
                conn.execute("SELECT 1")
                conn.rollback()
        except PermanentSinkError as exc:
            raise TransientSinkError(exc.reason) from exc

    def close(self) -> None:
        self._pool.close(timeout=5.0)
