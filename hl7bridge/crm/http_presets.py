"""The HTTP sink's presets: how each CRM's REST API reads, writes, searches and deletes records.

A preset speaks in record-model field names (`first_name`, `start`) and natural keys (MRN, appointment
ID); the field map of the config turns them into CRM field names. The exact requests are documented in
docs/http-sink.md. `SyncState` is the per-record bookkeeping the sink keeps in one CRM field: the event
time of the last message applied (the stale guard) and, per field, a fingerprint of the value we last
wrote with when and by whom it was last changed (so a CRM user's edit is recognised by its value).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from hl7bridge.crm.conflict import EDITABLE, FieldMeta, Origin, Value
from hl7bridge.records import Entity

if TYPE_CHECKING:
    from hl7bridge.crm.http_client import CrmClient
    from hl7bridge.crm.http_config import HttpSinkConfig

__all__ = [
    "DEFAULTS",
    "RemoteRecord",
    "SyncState",
    "Write",
    "canon",
    "make_remote",
]

log = logging.getLogger("hl7bridge.crm.http")

#: Per preset and entity: object name, sync-state field, and record-model field -> CRM field.
#: `mrn` on an appointment is the patient's MRN; `contact_id` (Salesforce) is the Contact lookup field.
DEFAULTS: Mapping[str, Mapping[str, tuple[str, str, Mapping[str, str]]]] = {
    "salesforce": {
        "contact": ("Contact", "HL7_Sync__c", {
            "mrn": "HL7_MRN__c", "first_name": "FirstName", "last_name": "LastName", "birth_date": "Birthdate",
            "sex": "HL7_Sex__c", "phone": "Phone", "email": "Email", "address_line1": "MailingStreet",
            "city": "MailingCity", "state": "MailingState", "postal_code": "MailingPostalCode"}),
        "appointment": ("HL7_Appointment__c", "HL7_Sync__c", {
            "appointment_id": "HL7_Appointment_ID__c", "mrn": "HL7_Patient_MRN__c", "contact_id": "Contact__c",
            "start": "Start__c", "duration_minutes": "Duration_Minutes__c", "status": "Status__c",
            "type": "Type__c", "provider": "Provider__c", "location": "Location__c"}),
    },
    "hubspot": {
        "contact": ("contacts", "hl7_sync_state", {
            "mrn": "hl7_mrn", "first_name": "firstname", "last_name": "lastname", "birth_date": "date_of_birth",
            "sex": "hl7_sex", "phone": "phone", "email": "email", "address_line1": "address", "city": "city",
            "state": "state", "postal_code": "zip"}),
        "appointment": ("appointments", "hl7_sync_state", {
            "appointment_id": "hl7_appointment_id", "mrn": "hl7_patient_mrn", "start": "hl7_start",
            "duration_minutes": "hl7_duration_minutes", "status": "hl7_status", "type": "hl7_type",
            "provider": "hl7_provider", "location": "hl7_location"}),
    },
}
KEY_FIELD: Mapping[str, str] = {"contact": "mrn", "appointment": "appointment_id"}


# --- values --------------------------------------------------------------------------------------------


def canon(name: str, raw: Any) -> Value:
    """A value as the CRM returns it, in the record model's form, so it compares equal to what we sent:
    CRMs answer numbers as floats or strings, datetimes in UTC with their own spelling, empty as ""."""
    if raw is None or raw == "":
        return None
    if name == "duration_minutes":
        try:
            return int(float(raw))
        except (TypeError, ValueError):
            return str(raw)
    text = str(raw)
    if name == "start":
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return text
        return dt.astimezone(UTC).isoformat() if dt.utcoffset() is not None else text
    # HubSpot: midnight UTC in epoch ms (ASCII digits only: "²".isdigit() is True, int("²") raises)
    if name == "birth_date" and text.isascii() and text.isdigit() and len(text) > 8:
        return datetime.fromtimestamp(int(text) / 1000, UTC).date().isoformat()
    if name == "birth_date" and len(text) > 10:
        try:
            return date.fromisoformat(text[:10]).isoformat()
        except ValueError:
            return text
    return text


def parse_time(raw: Any) -> datetime | None:
    if not raw:
        return None
    try:
        dt = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt.astimezone(UTC) if dt.utcoffset() is not None else dt.replace(tzinfo=UTC)


def fingerprint(name: str, value: Value) -> str:
    """Short hash of a value we wrote: a different value in the CRM means a CRM user changed it."""
    text = "\x00" if value is None else str(value)
    return hashlib.blake2s(f"{name}\x1f{text}".encode(), digest_size=5).hexdigest()


def _us(dt: datetime) -> int:
    return round(dt.timestamp() * 1_000_000)


def _from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


@dataclass(frozen=True, slots=True)
class SyncState:
    """What the sink stores in the record's sync field (compact JSON, see docs/http-sink.md)."""

    event: datetime | None
    #: field -> (fingerprint of its value when recorded, when it last changed, who changed it)
    fields: Mapping[str, tuple[str, FieldMeta]]

    def encode(self) -> dict[str, Any]:
        return {"v": 1, "e": None if self.event is None else _us(self.event),
                "f": {n: [h, _us(m.at), "e" if m.by is Origin.EHR else "c"]
                      for n, (h, m) in sorted(self.fields.items())}}

    def encode_str(self) -> str:
        return json.dumps(self.encode(), separators=(",", ":"), sort_keys=True)

    @staticmethod
    def decode(raw: Any) -> SyncState | None:
        """None for a missing or unreadable state (a CRM user may have typed into the field)."""
        if raw in (None, ""):
            return None
        try:
            obj = json.loads(raw) if isinstance(raw, str) else raw
            event = None if obj.get("e") is None else _from_us(int(obj["e"]))
            fields = {str(n): (str(h), FieldMeta(_from_us(int(at)), Origin.EHR if by == "e" else Origin.CRM))
                      for n, (h, at, by) in obj.get("f", {}).items()}
            return SyncState(event, fields)
        except (ValueError, TypeError, AttributeError, KeyError):
            log.warning("crm http: unreadable sync state ignored (stale guard off for that record)")
            return None


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    """One CRM record in record-model terms."""

    remote_id: str  # the CRM's own ID (Salesforce Id, HubSpot hs_object_id, generic id field or the key)
    key: str  # natural key: MRN or appointment ID
    values: Mapping[str, Value]
    sync: SyncState | None
    sync_raw: Any  # as read, written back unchanged by CRM-side edits
    modified_at: datetime | None
    contact_mrn: str | None = None  # appointments: the patient's MRN
    contact_id: str | None = None  # appointments: the contact's CRM ID when the CRM returns it

    def meta(self, entity: Entity, now: datetime) -> dict[str, FieldMeta]:
        """Per field, who changed it last and when. A value matching the fingerprint we recorded keeps the
        recorded change; any other non-empty value (or a cleared one) was changed in the CRM, at the
        record's last-modified time (the closest the CRM tells us; see docs/http-sink.md)."""
        recorded = self.sync.fields if self.sync else {}
        out: dict[str, FieldMeta] = {}
        for name in EDITABLE[entity]:
            value, rec = self.values.get(name), recorded.get(name)
            if rec is not None and rec[0] == fingerprint(name, value):
                out[name] = rec[1]
            elif rec is not None or value is not None:
                out[name] = FieldMeta(self.modified_at or now, Origin.CRM)
        return out


@dataclass(frozen=True, slots=True)
class Write:
    """One record to write. `values` are the changed fields, `full` the whole record (generic sends it)."""

    key: str
    values: Mapping[str, Value]
    full: Mapping[str, Value]
    sync: SyncState
    record: RemoteRecord | None  # what the CRM held; None: create
    contact_mrn: str | None = None
    link_changed: bool = False  # appointments: the patient link is new or different

    @property
    def renamed(self) -> bool:
        return self.record is not None and self.record.key != self.key


class Remote(Protocol):
    #: Coalesce concurrent applies into one batch (HubSpot's batch endpoints).
    batches: bool

    def read(self, entity: Entity, keys: Sequence[str]) -> dict[str, RemoteRecord]: ...
    def write(self, entity: Entity, writes: Sequence[Write]) -> dict[str, str]: ...
    def associate(self, pairs: Sequence[tuple[str, str]]) -> None: ...
    def delete(self, entity: Entity, records: Sequence[RemoteRecord]) -> None: ...
    def search(self, entity: Entity, *, mrn: str | None = None, prefix: str | None = None) -> list[RemoteRecord]: ...
    def patch(self, entity: Entity, record: RemoteRecord, values: Mapping[str, Value]) -> None: ...
    def ping(self) -> None: ...


def sensitive_values(values: Mapping[str, Value], *keys: str | None) -> list[str]:
    return [str(v) for v in (*values.values(), *keys) if v not in (None, "")]


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- Salesforce ------------------------------------------------------------------------------------------


def _soql(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


class Salesforce:
    """sObject upsert by external ID, SOQL for searches, delete by Id. One request per record."""

    batches = False

    def __init__(self, cfg: HttpSinkConfig, client: CrmClient) -> None:
        self._c, self._cfg = client, cfg
        self._root = f"/services/data/{cfg.version()}"

    def _fm(self, entity: Entity) -> Mapping[str, str | None]:
        return self._cfg.field_map(entity)

    def _select(self, entity: Entity) -> list[str]:
        fm = self._fm(entity)
        names = ["Id", *(f for f in fm.values() if f), self._cfg.sync_field(entity), "LastModifiedDate"]
        return list(dict.fromkeys(names))

    def _record(self, entity: Entity, obj: Mapping[str, Any]) -> RemoteRecord:
        fm = self._fm(entity)
        key_f = fm[KEY_FIELD[entity]] or ""
        sync_raw = obj.get(self._cfg.sync_field(entity))
        values = {n: canon(n, obj.get(f)) for n, f in fm.items() if f and n in EDITABLE[entity]}
        link = fm.get("contact_id")
        return RemoteRecord(
            str(obj["Id"]), str(obj.get(key_f) or ""), values, SyncState.decode(sync_raw), sync_raw,
            parse_time(obj.get("LastModifiedDate")),
            contact_mrn=(obj.get(fm["mrn"] or "") or None) if entity == "appointment" else None,
            contact_id=(obj.get(link) or None) if entity == "appointment" and link else None)

    def read(self, entity: Entity, keys: Sequence[str]) -> dict[str, RemoteRecord]:
        obj, key_f = self._cfg.object_name(entity), self._fm(entity)[KEY_FIELD[entity]]
        out = {}
        for key in keys:
            resp = self._c.request(f"{entity} read", "GET",
                                   f"{self._root}/sobjects/{obj}/{key_f}/{quote(key, safe='')}",
                                   params={"fields": ",".join(self._select(entity))}, absent_ok=True,
                                   sensitive=[key])
            # A 300 (two records share the external ID) is raised by the client as permanent.
            if resp is not None:
                out[key] = self._record(entity, resp.json())
        return out

    def _body(self, entity: Entity, w: Write) -> dict[str, Any]:
        fm = self._fm(entity)
        body: dict[str, Any] = {fm[n]: v for n, v in w.values.items() if fm.get(n)}
        body[self._cfg.sync_field(entity)] = w.sync.encode_str()
        if entity == "appointment" and w.link_changed:
            if fm.get("mrn"):
                body[fm["mrn"]] = w.contact_mrn
            link = fm.get("contact_id")
            if link:
                # The lookup set by the contact's external ID: no Salesforce Id needed, no extra request.
                rel = link[:-3] + "__r" if link.endswith("__c") else link.removesuffix("Id")
                if w.contact_mrn:
                    body[rel] = {self._cfg.field_map("contact")["mrn"]: w.contact_mrn}
                else:
                    body[link] = None
        return body

    def write(self, entity: Entity, writes: Sequence[Write]) -> dict[str, str]:
        obj, key_f = self._cfg.object_name(entity), self._fm(entity)[KEY_FIELD[entity]]
        ids: dict[str, str] = {}
        for w in writes:
            body = self._body(entity, w)
            secret = sensitive_values(w.values, w.key, w.contact_mrn)
            if w.record is not None and w.renamed:
                body[key_f] = w.key  # an MRN change (A40/A47): by Salesforce Id, the external ID is the change
                self._c.request(f"{entity} update", "PATCH", f"{self._root}/sobjects/{obj}/{w.record.remote_id}",
                                json_body=body, sensitive=secret)
                ids[w.key] = w.record.remote_id
                continue
            resp = self._c.request(f"{entity} upsert", "PATCH",
                                   f"{self._root}/sobjects/{obj}/{key_f}/{quote(w.key, safe='')}",
                                   json_body=body, sensitive=secret)
            new_id = None
            if resp is not None and resp.content:
                new_id = resp.json().get("id")
            ids[w.key] = str(new_id or (w.record.remote_id if w.record else ""))
        return ids

    def associate(self, pairs: Sequence[tuple[str, str]]) -> None:
        return None  # the lookup is written with the appointment

    def delete(self, entity: Entity, records: Sequence[RemoteRecord]) -> None:
        obj = self._cfg.object_name(entity)
        for rec in records:
            self._c.request(f"{entity} delete", "DELETE", f"{self._root}/sobjects/{obj}/{rec.remote_id}",
                            absent_ok=True)

    def search(self, entity: Entity, *, mrn: str | None = None, prefix: str | None = None) -> list[RemoteRecord]:
        fm = self._fm(entity)
        mrn_f, key_f = fm["mrn"], fm[KEY_FIELD[entity]]
        if mrn is not None:
            where = f"{mrn_f} = '{_soql(mrn)}'"
        elif prefix is not None:
            like = _soql(prefix).replace("%", "\\%").replace("_", "\\_")
            where = f"{mrn_f} LIKE '{like}%'"
        else:
            where = f"{key_f} != null"
        q = f"SELECT {', '.join(self._select(entity))} FROM {self._cfg.object_name(entity)} WHERE {where} " \
            f"ORDER BY {key_f}"
        out: list[RemoteRecord] = []
        url, params = f"{self._root}/query", {"q": q}
        for _ in range(10_000):  # bounded: 2,000 records a page
            resp = self._c.request(f"{entity} search", "GET", url, params=params, sensitive=[mrn or "", prefix or ""])
            assert resp is not None
            page = resp.json()
            out += [self._record(entity, r) for r in page.get("records", [])]
            if page.get("done", True) or not page.get("nextRecordsUrl"):
                break
            url, params = page["nextRecordsUrl"], {}
        return out

    def patch(self, entity: Entity, record: RemoteRecord, values: Mapping[str, Value]) -> None:
        fm = self._fm(entity)
        body = {fm[n]: v for n, v in values.items() if fm.get(n)}
        self._c.request(f"{entity} edit", "PATCH",
                        f"{self._root}/sobjects/{self._cfg.object_name(entity)}/{record.remote_id}",
                        json_body=body, sensitive=sensitive_values(values))

    def ping(self) -> None:
        self._c.request("ping", "GET", f"{self._root}/limits")


def make_remote(cfg: HttpSinkConfig, client: CrmClient) -> Remote:
    if cfg.preset == "salesforce":
        return Salesforce(cfg, client)
    if cfg.preset == "hubspot":
        from hl7bridge.crm.http_hubspot import HubSpot

        return HubSpot(cfg, client)
    from hl7bridge.crm.http_generic import Generic

    return Generic(cfg, client)
