"""The HTTP CRM sink: upserts into a CRM's REST API (Salesforce, HubSpot, or a generic template).

The decisions are the SQL sinks' own (`conflict.apply_op`): `_Tx` implements `CrmTx` over the REST API,
reading records through (GET by external ID, or a batch read) and buffering writes until `flush`, which
sends contacts first (so an appointment's contact reference resolves), then appointments, then deletes.

What differs from a database, and how the sink copes (docs/http-sink.md has the details):
- No transactions. Every write is an upsert keyed by the natural key, so a retry after a partial apply
  converges and a replay has no second effect; `message_key` cannot be stored in the CRM, so a re-apply
  is an identical upsert (reported `unchanged`, never `already_applied`).
- Field change times: per record, one sync-state field holds the last applied event time (the stale
  guard) and per field a fingerprint of the value we wrote. A value that no longer matches its
  fingerprint was changed by a CRM user, at the record's last-modified time (the approximation `newest`
  relies on).
- Batching (HubSpot): concurrent `apply` calls are coalesced into one batch read and one batch upsert per
  entity; a permanent failure re-applies the batch's messages one by one so only the bad one fails.
"""

from __future__ import annotations

import copy
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx

from hl7bridge.crm.conflict import EDITABLE, MergeAudit, Row, Value, apply_op, plan_edit, utc
from hl7bridge.crm.http_auth import ApiKeyAuth, BearerAuth, CrmConfigError, OAuth2ClientCredentials, load_secret
from hl7bridge.crm.http_client import CrmClient
from hl7bridge.crm.http_config import (
    GenericConfig,
    GenericEntityConfig,
    HttpAuthConfig,
    HttpEntityConfig,
    HttpRequestTemplate,
    HttpSinkConfig,
    rules_problems,
    unsupported_conflicts,
)
from hl7bridge.crm.http_presets import RemoteRecord, SyncState, Write, canon, fingerprint, make_remote
from hl7bridge.crm.model import Appointment, Contact
from hl7bridge.errors import ErrCode, PermanentSinkError, SinkError, TransientSinkError
from hl7bridge.records import ApplyRequest, CrmOp, Entity, FieldSet, OpResult

__all__ = [
    "CrmConfigError",
    "GenericConfig",
    "GenericEntityConfig",
    "HttpAuthConfig",
    "HttpEntityConfig",
    "HttpRequestTemplate",
    "HttpSink",
    "HttpSinkConfig",
    "open_http_sink",
    "rules_problems",
    "unsupported_conflicts",
]

# --- the transaction over REST -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Slot:
    original: RemoteRecord | None  # what the CRM held when read; None: absent
    row: Row | None  # the decided state; None: absent or deleted
    dirty: bool = False


@dataclass
class _Tx:
    """conflict.CrmTx over a preset: reads through, writes buffered for flush()."""

    remote: Any
    now: datetime
    slots: dict[tuple[Entity, str], _Slot] = field(default_factory=dict)

    def prefetch(self, ops: Sequence[CrmOp]) -> None:
        want: dict[Entity, list[str]] = {"contact": [], "appointment": []}
        for op in ops:
            want[op.entity].append(op.key)
            want["contact"] += [k for k in (op.contact_key, op.prior_key) if k]
        for entity in ("contact", "appointment"):
            self._load(entity, [k for k in dict.fromkeys(want[entity]) if (entity, k) not in self.slots])

    def _load(self, entity: Entity, keys: Sequence[str]) -> None:
        if not keys:
            return
        found = self.remote.read(entity, keys)
        for key in keys:
            rec = found.get(key)
            self.slots[(entity, key)] = _Slot(rec, None)
        for key in keys:  # rows after all slots exist: an appointment's row may look up its contact
            rec = found.get(key)
            if rec is not None:
                self.slots[(entity, key)] = _Slot(rec, self._row(entity, rec))

    def _row(self, entity: Entity, rec: RemoteRecord) -> Row:
        if entity == "contact":
            return Row(rec.remote_id, rec.key, rec.values, rec.meta(entity, self.now),
                       rec.sync.event if rec.sync else None)
        contact_id = rec.contact_id
        if contact_id is None and rec.contact_mrn:
            contact = self.lock_contact(rec.contact_mrn)
            contact_id = contact.row_id if contact else None
        return Row(rec.key, rec.key, rec.values, rec.meta(entity, self.now), rec.sync.event if rec.sync else None,
                   rec.contact_mrn, contact_id)

    def _lock(self, entity: Entity, key: str) -> Row | None:
        if (entity, key) not in self.slots:
            self._load(entity, [key])
        return self.slots[(entity, key)].row

    def _find(self, entity: Entity, row_id: str) -> tuple[Entity, str]:
        return next(k for k, s in self.slots.items() if k[0] == entity and s.row is not None and s.row.row_id == row_id)

    def _insert(self, entity: Entity, row: Row) -> bool:
        slot = self.slots.get((entity, row.key))
        if slot is not None and slot.row is not None:
            return False
        self.slots[(entity, row.key)] = _Slot(slot.original if slot else None, row, True)
        return True

    def _update(self, entity: Entity, row: Row) -> None:
        k = self._find(entity, row.row_id)
        slot = self.slots[k]
        if k[1] != row.key:  # a new MRN (merge or A47): the record moves to the new key
            self.slots[k] = _Slot(None, None)
        self.slots[(entity, row.key)] = _Slot(slot.original, row, True)

    def lock_contact(self, mrn: str) -> Row | None:
        return self._lock("contact", mrn)

    def insert_contact(self, row: Row, now: datetime) -> bool:
        return self._insert("contact", row)

    def update_contact(self, row: Row, updated_at: datetime | None) -> None:
        self._update("contact", row)

    def delete_contact(self, contact_id: str) -> None:
        k = self._find("contact", contact_id)
        self.slots[k] = _Slot(self.slots[k].original, None, True)

    def lock_appointment(self, appointment_id: str) -> Row | None:
        return self._lock("appointment", appointment_id)

    def insert_appointment(self, row: Row, now: datetime) -> bool:
        return self._insert("appointment", row)

    def update_appointment(self, row: Row, updated_at: datetime | None) -> None:
        self._update("appointment", row)

    def move_appointments(self, from_contact_id: str, from_mrn: str, to_contact_id: str, to_mrn: str,
                          now: datetime) -> int:
        for rec in self.remote.search("appointment", mrn=from_mrn):
            if ("appointment", rec.key) not in self.slots:
                self.slots[("appointment", rec.key)] = _Slot(rec, self._row("appointment", rec))
        moved = 0
        for k, s in list(self.slots.items()):
            if k[0] == "appointment" and s.row is not None and (s.row.mrn == from_mrn
                                                                or s.row.contact_id == from_contact_id):
                self.slots[k] = _Slot(s.original, replace(s.row, mrn=to_mrn, contact_id=to_contact_id), True)
                moved += 1
        return moved

    def record_merge(self, audit: MergeAudit) -> None:
        return None  # no audit table in a CRM; the journal keeps the A40/A47 message itself

    # --- flush -----------------------------------------------------------------------------------------

    def _write(self, entity: Entity, slot: _Slot) -> Write | None:
        row, orig = slot.row, slot.original
        assert row is not None
        old = orig.values if orig else {}
        changed = {f: row.values.get(f) for f in EDITABLE[entity]
                   if row.values.get(f) != old.get(f) and (orig is not None or row.values.get(f) is not None)}
        sync = SyncState(row.last_event_at, {f: (fingerprint(f, row.values.get(f)), m) for f, m in row.meta.items()})
        link = entity == "appointment" and (orig is None or row.mrn != orig.contact_mrn)
        w = Write(row.key, changed, dict(row.values), sync, orig, row.mrn if entity == "appointment" else None, link)
        same_sync = orig is not None and orig.sync is not None and orig.sync.encode() == sync.encode()
        return None if not (changed or link or w.renamed or not same_sync) else w

    def flush(self) -> None:
        writes: dict[Entity, list[Write]] = {"contact": [], "appointment": []}
        deletes: list[RemoteRecord] = []
        placeholders: dict[str, str] = {}  # contact row_id -> MRN, for contacts created now
        for (entity, _), slot in self.slots.items():
            if not slot.dirty:
                continue
            if slot.row is None:
                if slot.original is not None:
                    deletes.append(slot.original)
                continue
            w = self._write(entity, slot)
            if w is not None:
                writes[entity].append(w)
            if entity == "contact" and slot.original is None:
                placeholders[slot.row.row_id] = slot.row.key
        contact_ids = self.remote.write("contact", writes["contact"]) if writes["contact"] else {}
        appt_ids = self.remote.write("appointment", writes["appointment"]) if writes["appointment"] else {}
        pairs = []
        for w in writes["appointment"]:
            row = self.slots[("appointment", w.key)].row
            cid = row.contact_id if row else None
            cid = contact_ids.get(placeholders[cid], cid) if cid in placeholders else cid
            if w.link_changed and cid and appt_ids.get(w.key):
                pairs.append((appt_ids[w.key], cid))
        if pairs:
            self.remote.associate(pairs)
        if deletes:  # after the appointments moved away from a merged contact
            self.remote.delete("contact", deletes)


# --- coalescing concurrent applies (group commit) ------------------------------------------------------


@dataclass
class _Item:
    ops: list[CrmOp]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[OpResult] | BaseException | None = None
    finished: bool = False


class _Group:
    """Concurrent callers queue; one of them (the leader) runs batches of up to `size` in FIFO order until
    its own item is done, then hands leadership to the next waiting caller. One batch in flight at a time;
    before each batch the leader waits up to `linger` seconds for it to fill (cheap next to a CRM round trip)."""

    def __init__(self, run: Any, size: int, linger: float) -> None:
        self._run, self._size, self._linger = run, size, linger
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._leading = False

    def submit(self, ops: list[CrmOp]) -> list[OpResult]:
        item = _Item(ops)
        with self._cond:
            self._queue.append(item)
            lead = not self._leading
            self._leading = True
            if len(self._queue) >= self._size:
                self._cond.notify_all()
        if not lead:
            item.done.wait()
        while not item.finished:
            with self._cond:
                deadline = time.monotonic() + self._linger
                while len(self._queue) < self._size and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch = [self._queue.popleft() for _ in range(min(self._size, len(self._queue)))]
            try:
                results = self._run([b.ops for b in batch])
            except BaseException as exc:  # never leave a waiting caller without an answer
                results = [exc] * len(batch)
            for it, res in zip(batch, results, strict=True):
                # One error may answer several callers: each raises its own copy (tracebacks are per raise).
                it.result, it.finished = (copy.copy(res) if isinstance(res, BaseException) else res), True
                if it is not item:
                    it.done.set()
        with self._cond:
            if self._queue:
                self._queue[0].done.set()  # promoted: it leads the next batches
            else:
                self._leading = False
        if isinstance(item.result, BaseException):
            raise item.result
        assert item.result is not None
        return item.result


# --- the sink ------------------------------------------------------------------------------------------


def _canonical_op(op: CrmOp) -> CrmOp:
    """Appointment starts in UTC: the form CRMs store and return, so comparisons and fingerprints match."""
    def fix(fields: Any) -> dict[str, FieldSet]:
        return {n: replace(fs, value=canon(n, fs.value)) if n == "start" and isinstance(fs.value, str) else fs
                for n, fs in fields.items()}
    return replace(op, fields=fix(op.fields), contact_fields=fix(op.contact_fields))


class HttpSink:
    """The `Sink` protocol over a CRM's REST API. Synchronous and thread-safe."""

    max_batch = 1

    def __init__(self, cfg: HttpSinkConfig, client: CrmClient) -> None:
        self.cfg = cfg
        self.client = client
        self._remote = make_remote(cfg, client)
        self._group = _Group(self._run, cfg.batch_size, cfg.batch_linger) if self._remote.batches else None

    def migrate(self) -> None:
        """Nothing to create: the CRM's objects and fields are the CRM admin's (docs/http-sink.md)."""

    def apply(self, ops: Sequence[CrmOp], *, message_key: str | None = None, force: bool = False) -> list[OpResult]:
        canonical = [_canonical_op(op) for op in ops]
        if not canonical:
            return []
        if self._group is not None:
            return self._group.submit(canonical)
        result = self._run([canonical])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def apply_many(self, requests: Sequence[ApplyRequest]) -> list[list[OpResult] | SinkError]:
        """One request at a time: delivery gives this sink batches of one (`max_batch`), its lanes run the
        requests side by side, and batching presets already merge them into batch calls."""
        out: list[list[OpResult] | SinkError] = []
        for r in requests:
            try:
                out.append(self.apply(r.ops, message_key=r.message_key, force=r.force))
            except SinkError as exc:
                out.append(exc)
        return out

    def _run(self, batch: list[list[CrmOp]]) -> list[list[OpResult] | BaseException]:
        """Decide and write a batch of messages. Never raises: each message gets its results or its error."""
        now = datetime.now(UTC)
        tx = _Tx(self._remote, now)
        try:
            tx.prefetch([op for ops in batch for op in ops])
        except Exception as exc:
            return [exc] * len(batch)
        out: list[list[OpResult] | BaseException] = []
        for ops in batch:
            saved = dict(tx.slots)
            try:
                out.append([apply_op(tx, op, now=now) for op in ops])
            except Exception as exc:
                tx.slots = saved  # this message's decisions are dropped; the others' stand
                out.append(exc)
        try:
            tx.flush()
        except TransientSinkError as exc:
            return [r if isinstance(r, BaseException) else exc for r in out]
        except Exception as exc:
            if sum(not isinstance(r, BaseException) for r in out) <= 1:
                return [r if isinstance(r, BaseException) else exc for r in out]
            # Which message did the CRM reject? Apply them one by one: upserts make the repeat harmless.
            return [r if isinstance(r, BaseException) else self._run([ops])[0]
                    for ops, r in zip(batch, out, strict=True)]
        return out

    def contacts(self, mrn: str | None = None) -> list[Contact]:
        recs = self._remote.search("contact", mrn=mrn)
        return sorted((Contact(contact_id=r.remote_id, mrn=r.key, **r.values, updated_at=_iso(r.modified_at))
                       for r in recs), key=lambda c: (c.mrn, c.contact_id))  # type: ignore[arg-type]

    def appointments(self, mrn: str | None = None) -> list[Appointment]:
        recs = self._remote.search("appointment", mrn=mrn)
        missing = sorted({r.contact_mrn for r in recs if r.contact_id is None and r.contact_mrn})
        ids = {k: c.remote_id for k, c in self._remote.read("contact", missing).items()} if missing else {}
        return sorted((Appointment(appointment_id=r.key, mrn=r.contact_mrn,
                                   contact_id=r.contact_id or ids.get(r.contact_mrn or ""),
                                   **r.values, updated_at=_iso(r.modified_at))  # type: ignore[arg-type]
                       for r in recs), key=lambda a: a.appointment_id)

    def edit(self, entity: Entity, key: str, values: dict[str, Value], at: datetime | None = None) -> None:
        """A CRM user's change, made the way a user makes it: a PATCH without our sync state. The CRM
        stamps its own modification time, so `at` cannot be honoured (a REST client cannot set it)."""
        rec = self._remote.read(entity, [key]).get(key)
        if rec is None:
            raise PermanentSinkError(f"crm: no such {entity}", err_code=ErrCode.UNKNOWN_KEY)
        now = datetime.now(UTC)
        row = _Tx(self._remote, now)._row(entity, rec)
        new, changed = plan_edit(entity, row, {n: canon(n, v) if n == "start" else v for n, v in values.items()},
                                 utc(at or now, "edit time"))
        if changed:
            self._remote.patch(entity, rec, {n: new.values.get(n) for n in changed})

    def delete_where_mrn_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("an empty prefix would delete every contact")
        appts = self._remote.search("appointment", prefix=prefix)
        contacts = [c for c in self._remote.search("contact", prefix=prefix) if c.key.startswith(prefix)]
        if appts:
            self._remote.delete("appointment", appts)
        if contacts:
            self._remote.delete("contact", contacts)
        return len(contacts)

    def ping(self) -> None:
        try:
            self._remote.ping()
        except TransientSinkError:
            raise
        except SinkError as exc:
            raise TransientSinkError(exc.reason) from None

    def close(self) -> None:
        self.client.close()


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


def open_http_sink(cfg: HttpSinkConfig, *, transport: httpx.BaseTransport | None = None) -> HttpSink:
    """Build the sink: resolve secrets (CrmConfigError names the variable or file when one is missing),
    open the pooled client. No request is sent until the first apply or ping."""
    names = {f for e in ("contact", "appointment") for f in (*cfg.field_map(e).values(), cfg.sync_field(e)) if f} \
        if cfg.preset != "generic" else set()
    verify: ssl.SSLContext | bool = True
    if cfg.ca_file is not None:
        try:
            verify = ssl.create_default_context(cafile=str(cfg.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise CrmConfigError(f"crm http: cannot load ca_file {cfg.ca_file} ({type(exc).__name__})") from None
    client = CrmClient(cfg.base_url, timeout=cfg.timeout, max_connections=cfg.max_connections,
                       rate_limit=cfg.rate_limit() or None, verify=verify,
                       field_names=names, transport=transport)
    a = cfg.auth
    try:
        if a.kind == "bearer":
            client.auth = BearerAuth(load_secret(a.secret_env, a.secret_file, "bearer token"))
        elif a.kind == "api_key":
            client.auth = ApiKeyAuth(a.header, load_secret(a.secret_env, a.secret_file, "API key"))
        elif a.kind == "oauth2_client_credentials":
            client_id = a.client_id or load_secret(a.client_id_env, None, "OAuth2 client ID").reveal()
            client.auth = OAuth2ClientCredentials(client.token_fetcher(a.token_url or ""), client_id,
                                                  load_secret(a.secret_env, a.secret_file, "OAuth2 client secret"),
                                                  a.scope)
    except BaseException:
        client.close()
        raise
    return HttpSink(cfg, client)

