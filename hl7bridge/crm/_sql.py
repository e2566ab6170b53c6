"""What the SQL CRM sinks (SQLite, PostgreSQL) share: the schema, `conflict.CrmTx` in SQL, row <-> record
conversion, and the Sink operations whose statements both dialects speak.

A backend describes its dialect once (`Dialect`: placeholder, row locking, column types, how times and
field metadata travel through its driver) and keeps only what is its own: connection handling, error
translation, the idempotency claim in `apply`, and `ping`/`close`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, NoReturn, Protocol

from hl7bridge.crm.conflict import (
    EDITABLE,
    FieldMeta,
    MergeAudit,
    Row,
    Value,
    meta_from_json,
    meta_to_json,
    plan_edit,
)
from hl7bridge.crm.model import Appointment, Contact
from hl7bridge.errors import ErrCode, PermanentSinkError, SinkError, TransientSinkError
from hl7bridge.records import Entity

__all__ = ["Dialect", "SqlSink", "SqlTx", "as_is", "raise_sink_error", "schema_v1"]

_C = EDITABLE["contact"]
_A = EDITABLE["appointment"]


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


#: A driver's execute(sql, params): sqlite3.Connection.execute, psycopg Connection/Cursor.execute.
Execute = Callable[[str, Sequence[Any]], Cursor]


def as_is(value: Any) -> Any:
    """The conversion for a driver that already speaks the Python type."""
    return value


@dataclass(frozen=True, slots=True)
class Dialect:
    #: The parameter placeholder: "?" (sqlite3) or "%s" (psycopg).
    mark: str
    #: Appended to a row read inside a transaction to lock the row until commit ("" where the transaction
    #: already holds the whole database).
    lock: str
    #: ORDER BY suffix on text keys so both backends list rows in the same (byte-wise) order.
    collate: str
    #: "Column {col} starts with the parameter", and how many times that parameter is passed.
    starts_with: str
    starts_with_args: int
    #: Column types of the schema.
    text: str
    integer: str
    timestamp: str
    json: str
    serial_pk: str
    #: Times and field metadata into a parameter, and back out of a column.
    time_param: Callable[[datetime | None], Any]
    time_value: Callable[[Any], datetime | None]
    meta_param: Callable[[dict[str, Any]], Any]
    meta_value: Callable[[Any], Mapping[str, Any] | None]
    #: A stored updated_at as the record model's ISO 8601 string.
    stamp: Callable[[Any], str | None]
    #: Field metadata straight into a parameter, where the driver takes text: must equal
    #: `meta_param(meta_to_json(meta))`, only cheaper (None: that composition is used).
    meta_encode: Callable[[Mapping[str, FieldMeta]], Any] | None = None
    #: The contact statements SqlTx runs per message, built once from the above (see `_contact_sql`).
    contact_sql: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "contact_sql", _contact_sql(self))

    def marks(self, n: int) -> str:
        return ", ".join([self.mark] * n)

    def assign(self, names: Sequence[str]) -> str:
        return ", ".join(f'"{n}" = {self.mark}' for n in names)


def _cols(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def schema_v1(d: Dialect) -> tuple[str, ...]:
    """Schema step 1 in `d`'s types. Steps after it are each backend's own (append, never edit)."""
    text, ts, js, i = d.text, d.timestamp, d.json, d.integer
    return (
        f"""CREATE TABLE contacts (
            contact_id {text} PRIMARY KEY,
            mrn {text} NOT NULL UNIQUE,
            {", ".join(f'"{c}" {text}' for c in _C)},
            updated_at {ts} NOT NULL,
            last_event_at {ts},
            field_meta {js} NOT NULL DEFAULT '{{}}')""",
        f"""CREATE TABLE appointments (
            appointment_id {text} PRIMARY KEY,
            mrn {text},
            contact_id {text},
            "start" {text}, duration_minutes {i}, status {text}, "type" {text}, provider {text}, location {text},
            updated_at {ts} NOT NULL,
            last_event_at {ts},
            field_meta {js} NOT NULL DEFAULT '{{}}')""",
        "CREATE INDEX appointments_mrn ON appointments (mrn)",
        "CREATE INDEX appointments_contact_id ON appointments (contact_id)",
        f"""CREATE TABLE merges (
            id {d.serial_pk},
            kind {text} NOT NULL,
            merged_at {ts} NOT NULL,
            surviving_mrn {text} NOT NULL,
            merged_mrn {text} NOT NULL,
            surviving_contact_id {text} NOT NULL,
            merged_contact_id {text} NOT NULL,
            appointments_moved {i} NOT NULL,
            message_key {text})""",
        f"CREATE TABLE applied (message_key {text} PRIMARY KEY, applied_at {ts} NOT NULL)",
    )


def raise_sink_error(err: SinkError, exc: Exception) -> NoReturn:
    """Raise a driver error translated to `err`."""
    # Driver messages can quote row values (a duplicate key names the MRN), so the cause stays chained
    # only for transient failures, whose messages name hosts and codes.
    if isinstance(err, TransientSinkError):
        raise err from exc
    raise err from None


def _contact_sql(d: Dialect) -> dict[str, str]:
    """The contact statements in dialect `d`: "update" leaves the MRN as it is, "update_mrn" sets it."""
    m = d.mark
    update = (f"{d.assign(_C)}, last_event_at = {m}, field_meta = {m}, updated_at = COALESCE({m}, updated_at) "
              f"WHERE contact_id = {m}")
    return {
        "select": f"SELECT * FROM contacts WHERE mrn = {m}{d.lock}",
        "insert": f"INSERT INTO contacts (contact_id, mrn, {_cols(_C)}, updated_at, last_event_at, field_meta) "
                  f"VALUES ({d.marks(len(_C) + 5)}) ON CONFLICT (mrn) DO NOTHING",
        "update": f"UPDATE contacts SET {update}",
        "update_mrn": f"UPDATE contacts SET mrn = {m}, {update}",
    }


class SqlTx:
    """conflict.CrmTx over one open transaction: `lock_*` reads with the dialect's row lock."""

    def __init__(self, execute: Execute, dialect: Dialect) -> None:
        self._x, self._d = execute, dialect
        # The stored MRN of each contact this transaction read (locked) or wrote, by contact_id: an update
        # that keeps the MRN leaves the column out, sparing the UNIQUE index an entry rewrite (SQLite
        # rewrites an index entry for every column SET, equal or not; PostgreSQL loses the HOT update).
        self._mrns: dict[str, str] = {}
        self._sql = dialect.contact_sql

    def _meta(self, row: Row) -> Any:
        encode = self._d.meta_encode
        if encode is not None:
            return encode(row.meta)
        return self._d.meta_param(meta_to_json(row.meta))

    def lock_contact(self, mrn: str) -> Row | None:
        d = self._d
        r = self._x(self._sql["select"], (mrn,)).fetchone()
        if r is None:
            return None
        self._mrns[r["contact_id"]] = r["mrn"]
        return Row(r["contact_id"], r["mrn"], {c: r[c] for c in _C}, meta_from_json(d.meta_value(r["field_meta"])),
                   d.time_value(r["last_event_at"]))

    def insert_contact(self, row: Row, now: datetime) -> bool:
        d = self._d
        values = row.values
        cur = self._x(
            self._sql["insert"],
            (row.row_id, row.key, *[values.get(c) for c in _C], d.time_param(now),
             d.time_param(row.last_event_at), self._meta(row)))
        if cur.rowcount == 1:
            self._mrns[row.row_id] = row.key
            return True
        return False

    def update_contact(self, row: Row, updated_at: datetime | None) -> None:
        d = self._d
        values = row.values
        args = (*[values.get(c) for c in _C], d.time_param(row.last_event_at), self._meta(row),
                d.time_param(updated_at), row.row_id)
        if self._mrns.get(row.row_id) == row.key:
            self._x(self._sql["update"], args)
        else:
            self._x(self._sql["update_mrn"], (row.key, *args))
            self._mrns[row.row_id] = row.key

    def delete_contact(self, contact_id: str) -> None:
        self._x(f"DELETE FROM contacts WHERE contact_id = {self._d.mark}", (contact_id,))
        self._mrns.pop(contact_id, None)

    def lock_appointment(self, appointment_id: str) -> Row | None:
        d = self._d
        r = self._x(f"SELECT * FROM appointments WHERE appointment_id = {d.mark}{d.lock}",
                    (appointment_id,)).fetchone()
        if r is None:
            return None
        return Row(r["appointment_id"], r["appointment_id"], {a: r[a] for a in _A},
                   meta_from_json(d.meta_value(r["field_meta"])), d.time_value(r["last_event_at"]),
                   r["mrn"], r["contact_id"])

    def insert_appointment(self, row: Row, now: datetime) -> bool:
        d = self._d
        cur = self._x(
            f"INSERT INTO appointments (appointment_id, mrn, contact_id, {_cols(_A)}, updated_at, "
            f"last_event_at, field_meta) VALUES ({d.marks(len(_A) + 6)}) "
            "ON CONFLICT (appointment_id) DO NOTHING",
            (row.row_id, row.mrn, row.contact_id, *(row.values.get(a) for a in _A), d.time_param(now),
             d.time_param(row.last_event_at), self._meta(row)))
        return cur.rowcount == 1

    def update_appointment(self, row: Row, updated_at: datetime | None) -> None:
        d, m = self._d, self._d.mark
        self._x(
            f"UPDATE appointments SET mrn = {m}, contact_id = {m}, {d.assign(_A)}, last_event_at = {m}, "
            f"field_meta = {m}, updated_at = COALESCE({m}, updated_at) WHERE appointment_id = {m}",
            (row.mrn, row.contact_id, *(row.values.get(a) for a in _A), d.time_param(row.last_event_at),
             self._meta(row), d.time_param(updated_at), row.row_id))

    def move_appointments(self, from_contact_id: str, from_mrn: str, to_contact_id: str, to_mrn: str,
                          now: datetime) -> int:
        m = self._d.mark
        cur = self._x(
            f"UPDATE appointments SET mrn = {m}, contact_id = {m}, updated_at = {m} "
            f"WHERE contact_id = {m} OR mrn = {m}",
            (to_mrn, to_contact_id, self._d.time_param(now), from_contact_id, from_mrn))
        return cur.rowcount

    def record_merge(self, audit: MergeAudit) -> None:
        self._x(
            "INSERT INTO merges (kind, merged_at, surviving_mrn, merged_mrn, surviving_contact_id, "
            f"merged_contact_id, appointments_moved, message_key) VALUES ({self._d.marks(8)})",
            (audit.kind, self._d.time_param(audit.at), audit.surviving_mrn, audit.merged_mrn,
             audit.surviving_contact_id, audit.merged_contact_id, audit.appointments_moved, audit.message_key))


class SqlSink(ABC):
    """The Sink operations both SQL backends implement alike. A backend supplies its dialect and schema
    steps, its transactions (`_tx`, `_crm_tx`), reads (`_select`), and `apply`, `ping` and `close`."""

    dialect: ClassVar[Dialect]
    #: Messages per `apply_many`: one commit for all of them, each in its own savepoint.
    max_batch: ClassVar[int] = 64
    #: Schema steps; step i brings the schema to version i + 1.
    migrations: ClassVar[tuple[tuple[str, ...], ...]]

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Any]:
        """One write transaction, yielding the connection; driver errors leave it as sink errors."""

    @abstractmethod
    def _crm_tx(self, conn: Any) -> SqlTx:
        """The row access `conflict` decides over, inside the transaction on `conn`."""

    @abstractmethod
    def _select(self, sql: str, args: Sequence[Any]) -> list[Any]:
        """All rows of one read-only query, addressable by column name."""

    def _lock_schema(self, conn: Any) -> None:  # noqa: B027 - an optional hook, empty by default
        """Serialise concurrent migrate() calls where the write transaction alone does not."""

    def migrate(self) -> None:
        d, steps = self.dialect, self.migrations
        with self._tx() as conn:
            self._lock_schema(conn)
            conn.execute(f"CREATE TABLE IF NOT EXISTS crm_schema_version (version {d.integer} NOT NULL)")
            r = conn.execute("SELECT version FROM crm_schema_version").fetchone()
            version = 0 if r is None else int(r[0])
            for step in steps[version:]:
                for statement in step:
                    conn.execute(statement)
            if r is None:
                conn.execute(f"INSERT INTO crm_schema_version (version) VALUES ({d.mark})", (len(steps),))
            elif version < len(steps):
                conn.execute(f"UPDATE crm_schema_version SET version = {d.mark}", (len(steps),))

    def contacts(self, mrn: str | None = None) -> list[Contact]:
        d = self.dialect
        where, args = (f"WHERE mrn = {d.mark}", (mrn,)) if mrn is not None else ("", ())
        rows = self._select(f"SELECT * FROM contacts {where} ORDER BY mrn{d.collate}, contact_id", args)
        return [Contact(contact_id=r["contact_id"], mrn=r["mrn"], **{c: r[c] for c in _C},
                        updated_at=d.stamp(r["updated_at"])) for r in rows]

    def appointments(self, mrn: str | None = None) -> list[Appointment]:
        d = self.dialect
        where, args = (f"WHERE mrn = {d.mark}", (mrn,)) if mrn is not None else ("", ())
        rows = self._select(f"SELECT * FROM appointments {where} ORDER BY appointment_id{d.collate}", args)
        return [Appointment(appointment_id=r["appointment_id"], mrn=r["mrn"], contact_id=r["contact_id"],
                            **{a: r[a] for a in _A}, updated_at=d.stamp(r["updated_at"])) for r in rows]

    def edit(self, entity: Entity, key: str, values: dict[str, Value], at: datetime | None = None) -> None:
        now = datetime.now(UTC)
        with self._tx() as conn:
            tx = self._crm_tx(conn)
            row = tx.lock_contact(key) if entity == "contact" else tx.lock_appointment(key)
            if row is None:
                raise PermanentSinkError(f"crm: no such {entity}", err_code=ErrCode.UNKNOWN_KEY)
            new, changed = plan_edit(entity, row, values, at or now)
            if changed:
                (tx.update_contact if entity == "contact" else tx.update_appointment)(new, now)

    def delete_where_mrn_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("an empty prefix would delete every contact")
        match = self.dialect.starts_with
        args: tuple[Any, ...] = (prefix,) * self.dialect.starts_with_args
        with self._tx() as conn:
            conn.execute(f"DELETE FROM appointments WHERE {match.format(col='mrn')} OR contact_id IN "
                         f"(SELECT contact_id FROM contacts WHERE {match.format(col='mrn')})", args * 2)
            conn.execute(f"DELETE FROM merges WHERE {match.format(col='surviving_mrn')} "
                         f"OR {match.format(col='merged_mrn')}", args * 2)
            return int(conn.execute(f"DELETE FROM contacts WHERE {match.format(col='mrn')}", args).rowcount)
