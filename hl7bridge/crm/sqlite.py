"""The embedded CRM sink: one SQLite file in the data directory.

One connection, guarded by a lock (the pipeline calls the sink from worker threads), WAL with
synchronous=FULL so an applied message survives a power cut, and `BEGIN IMMEDIATE` so a second process on
the same file waits for the write lock instead of failing half-way. All decisions live in `conflict.py`;
this module is SQL only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

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

__all__ = ["SqliteSink"]

_C = EDITABLE["contact"]
_A = EDITABLE["appointment"]

#: Schema steps; step i brings the schema to version i + 1. Append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE contacts (
            contact_id TEXT PRIMARY KEY,
            mrn TEXT NOT NULL UNIQUE,
            {", ".join(f'"{c}" TEXT' for c in _C)},
            updated_at TEXT NOT NULL,
            last_event_at TEXT,
            field_meta TEXT NOT NULL DEFAULT '{{}}')""",
        """CREATE TABLE appointments (
            appointment_id TEXT PRIMARY KEY,
            mrn TEXT,
            contact_id TEXT,
            "start" TEXT, duration_minutes INTEGER, status TEXT, "type" TEXT, provider TEXT, location TEXT,
            updated_at TEXT NOT NULL,
            last_event_at TEXT,
            field_meta TEXT NOT NULL DEFAULT '{}')""",
        "CREATE INDEX appointments_mrn ON appointments (mrn)",
        "CREATE INDEX appointments_contact_id ON appointments (contact_id)",
        """CREATE TABLE merges (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            merged_at TEXT NOT NULL,
            surviving_mrn TEXT NOT NULL,
            merged_mrn TEXT NOT NULL,
            surviving_contact_id TEXT NOT NULL,
            merged_contact_id TEXT NOT NULL,
            appointments_moved INTEGER NOT NULL,
            message_key TEXT)""",
        "CREATE TABLE applied (message_key TEXT PRIMARY KEY, applied_at TEXT NOT NULL)",
    ),
)

# Primary result codes after which a retry can succeed: BUSY, LOCKED, IOERR, FULL, CANTOPEN, PROTOCOL.
_TRANSIENT_CODES = frozenset({5, 6, 10, 13, 14, 15})


def _cols(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _assign(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}" = ?' for n in names)


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
    err = _translate(exc)
    # Driver messages can quote row values (a duplicate key names the MRN), so the cause stays chained
    # only for transient failures, whose messages name hosts and codes.
    if isinstance(err, TransientSinkError):
        raise err from exc
    raise err from None


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


class _Tx:
    """conflict.CrmTx over one SQLite connection inside BEGIN IMMEDIATE (so no row locks are needed)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def _contact_row(self, r: sqlite3.Row) -> Row:
        return Row(r["contact_id"], r["mrn"], {c: r[c] for c in _C},
                   meta_from_json(json.loads(r["field_meta"])), _dt(r["last_event_at"]))

    def lock_contact(self, mrn: str) -> Row | None:
        r = self.conn.execute("SELECT * FROM contacts WHERE mrn = ?", (mrn,)).fetchone()
        return None if r is None else self._contact_row(r)

    def insert_contact(self, row: Row, now: datetime) -> bool:
        cur = self.conn.execute(
            f"INSERT INTO contacts (contact_id, mrn, {_cols(_C)}, updated_at, last_event_at, field_meta) "
            f"VALUES ({', '.join('?' * (len(_C) + 5))}) ON CONFLICT (mrn) DO NOTHING",
            (row.row_id, row.key, *(row.values.get(c) for c in _C), iso(now), _iso(row.last_event_at),
             json.dumps(meta_to_json(row.meta))))
        return cur.rowcount == 1

    def update_contact(self, row: Row, updated_at: datetime | None) -> None:
        self.conn.execute(
            f"UPDATE contacts SET mrn = ?, {_assign(_C)}, "
            "last_event_at = ?, field_meta = ?, updated_at = COALESCE(?, updated_at) WHERE contact_id = ?",
            (row.key, *(row.values.get(c) for c in _C), _iso(row.last_event_at),
             json.dumps(meta_to_json(row.meta)), _iso(updated_at), row.row_id))

    def delete_contact(self, contact_id: str) -> None:
        self.conn.execute("DELETE FROM contacts WHERE contact_id = ?", (contact_id,))

    def lock_appointment(self, appointment_id: str) -> Row | None:
        r = self.conn.execute("SELECT * FROM appointments WHERE appointment_id = ?",
                              (appointment_id,)).fetchone()
        if r is None:
            return None
        return Row(r["appointment_id"], r["appointment_id"], {a: r[a] for a in _A},
                   meta_from_json(json.loads(r["field_meta"])), _dt(r["last_event_at"]),
                   r["mrn"], r["contact_id"])

    def insert_appointment(self, row: Row, now: datetime) -> bool:
        cur = self.conn.execute(
            f"INSERT INTO appointments (appointment_id, mrn, contact_id, {_cols(_A)}, updated_at, "
            f"last_event_at, field_meta) VALUES ({', '.join('?' * (len(_A) + 6))}) "
            "ON CONFLICT (appointment_id) DO NOTHING",
            (row.row_id, row.mrn, row.contact_id, *(row.values.get(a) for a in _A), iso(now),
             _iso(row.last_event_at), json.dumps(meta_to_json(row.meta))))
        return cur.rowcount == 1

    def update_appointment(self, row: Row, updated_at: datetime | None) -> None:
        self.conn.execute(
            f"UPDATE appointments SET mrn = ?, contact_id = ?, "
            f"{_assign(_A)}, last_event_at = ?, field_meta = ?, "
            "updated_at = COALESCE(?, updated_at) WHERE appointment_id = ?",
            (row.mrn, row.contact_id, *(row.values.get(a) for a in _A), _iso(row.last_event_at),
             json.dumps(meta_to_json(row.meta)), _iso(updated_at), row.row_id))

    def move_appointments(self, from_contact_id: str, from_mrn: str, to_contact_id: str, to_mrn: str,
                          now: datetime) -> int:
        cur = self.conn.execute(
            "UPDATE appointments SET mrn = ?, contact_id = ?, updated_at = ? WHERE contact_id = ? OR mrn = ?",
            (to_mrn, to_contact_id, iso(now), from_contact_id, from_mrn))
        return cur.rowcount

    def record_merge(self, audit: MergeAudit) -> None:
        self.conn.execute(
            "INSERT INTO merges (kind, merged_at, surviving_mrn, merged_mrn, surviving_contact_id, "
            "merged_contact_id, appointments_moved, message_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (audit.kind, iso(audit.at), audit.surviving_mrn, audit.merged_mrn, audit.surviving_contact_id,
             audit.merged_contact_id, audit.appointments_moved, audit.message_key))


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else iso(dt)


class SqliteSink:
    """The `Sink` protocol over a SQLite file (created with its directory when missing)."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, the module never opens one behind us.
            self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
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

    def migrate(self) -> None:
        with self._tx() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS crm_schema_version (version INTEGER NOT NULL)")
            r = conn.execute("SELECT version FROM crm_schema_version").fetchone()
            version = 0 if r is None else int(r[0])
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            if r is None:
                conn.execute("INSERT INTO crm_schema_version (version) VALUES (?)", (len(_MIGRATIONS),))
            elif version < len(_MIGRATIONS):
                conn.execute("UPDATE crm_schema_version SET version = ?", (len(_MIGRATIONS),))

    def apply(self, ops: Sequence[CrmOp], *, message_key: str | None = None,
              force: bool = False) -> list[OpResult]:
        now = datetime.now(UTC)
        with self._tx() as conn:
            if message_key is not None and not force and conn.execute(
                    "SELECT 1 FROM applied WHERE message_key = ?", (message_key,)).fetchone():
                return [OpResult(op.entity, op.key, Outcome.ALREADY_APPLIED.value) for op in ops]
            tx = _Tx(conn)
            results = [apply_op(tx, op, now=now, message_key=message_key) for op in ops]
            if message_key is not None:
                conn.execute("INSERT INTO applied (message_key, applied_at) VALUES (?, ?) "
                             "ON CONFLICT (message_key) DO UPDATE SET applied_at = excluded.applied_at",
                             (message_key, iso(now)))
        return results

    def contacts(self, mrn: str | None = None) -> list[Contact]:
        where, args = ("WHERE mrn = ?", (mrn,)) if mrn is not None else ("", ())
        with self._read() as conn:
            rows = conn.execute(f"SELECT * FROM contacts {where} ORDER BY mrn, contact_id", args).fetchall()
        return [Contact(contact_id=r["contact_id"], mrn=r["mrn"], **{c: r[c] for c in _C},
                        updated_at=r["updated_at"]) for r in rows]

    def appointments(self, mrn: str | None = None) -> list[Appointment]:
        where, args = ("WHERE mrn = ?", (mrn,)) if mrn is not None else ("", ())
        with self._read() as conn:
            rows = conn.execute(f"SELECT * FROM appointments {where} ORDER BY appointment_id",
                                args).fetchall()
        return [Appointment(appointment_id=r["appointment_id"], mrn=r["mrn"], contact_id=r["contact_id"],
                            **{a: r[a] for a in _A}, updated_at=r["updated_at"]) for r in rows]

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
        match = "substr({col}, 1, length(?)) = ?"
        args: tuple[Any, ...] = (prefix, prefix)
        with self._tx() as conn:
            conn.execute(f"DELETE FROM appointments WHERE {match.format(col='mrn')} OR contact_id IN "
                         f"(SELECT contact_id FROM contacts WHERE {match.format(col='mrn')})", args * 2)
            conn.execute(f"DELETE FROM merges WHERE {match.format(col='surviving_mrn')} "
                         f"OR {match.format(col='merged_mrn')}", args * 2)
            return conn.execute(f"DELETE FROM contacts WHERE {match.format(col='mrn')}", args).rowcount

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
