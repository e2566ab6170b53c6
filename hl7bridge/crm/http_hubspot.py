"""The HubSpot preset: CRM v3 batch endpoints keyed by a unique property (`idProperty`), up to 100 inputs a
request, and v4 default associations between an appointment and its contact.

Property values travel as strings ("" clears a property). Reads use `batch/read` with `idProperty`;
searches use the search endpoint (HubSpot caps a search at 10,000 results and 5 requests/second per
account: set `rate_limit_per_second` accordingly). The exact requests are in docs/http-sink.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hl7bridge.crm.conflict import EDITABLE, Value
from hl7bridge.crm.http_presets import (
    KEY_FIELD,
    RemoteRecord,
    SyncState,
    Write,
    canon,
    chunks,
    parse_time,
    sensitive_values,
)
from hl7bridge.records import Entity

if TYPE_CHECKING:
    from hl7bridge.crm.http_client import CrmClient
    from hl7bridge.crm.http_config import HttpSinkConfig

__all__ = ["HubSpot"]


def _prop(value: Value) -> str:
    return "" if value is None else str(value)


class HubSpot:
    batches = True

    def __init__(self, cfg: HttpSinkConfig, client: CrmClient) -> None:
        self._c, self._cfg = client, cfg
        self._root = f"/crm/{cfg.version()}/objects"
        self._size = cfg.batch_size

    def _fm(self, entity: Entity) -> Mapping[str, str | None]:
        return self._cfg.field_map(entity)

    def _key(self, entity: Entity) -> str:
        return self._fm(entity)[KEY_FIELD[entity]] or ""

    def _url(self, entity: Entity, tail: str) -> str:
        return f"{self._root}/{self._cfg.object_name(entity)}/{tail}"

    def _props(self, entity: Entity) -> list[str]:
        fm = self._fm(entity)
        return list(dict.fromkeys([*(f for n, f in fm.items() if f), self._cfg.sync_field(entity)]))

    def _record(self, entity: Entity, obj: Mapping[str, Any]) -> RemoteRecord:
        fm, props = self._fm(entity), obj.get("properties") or {}
        sync_raw = props.get(self._cfg.sync_field(entity))
        values = {n: canon(n, props.get(f)) for n, f in fm.items() if f and n in EDITABLE[entity]}
        mrn_f = fm.get("mrn") if entity == "appointment" else None
        return RemoteRecord(
            str(obj["id"]), str(props.get(self._key(entity)) or ""), values, SyncState.decode(sync_raw), sync_raw,
            parse_time(obj.get("updatedAt") or props.get("hs_lastmodifieddate")),
            contact_mrn=(props.get(mrn_f) or None) if mrn_f else None)

    def read(self, entity: Entity, keys: Sequence[str]) -> dict[str, RemoteRecord]:
        out: dict[str, RemoteRecord] = {}
        for chunk in chunks(list(dict.fromkeys(keys)), self._size):
            body = {"idProperty": self._key(entity), "inputs": [{"id": k} for k in chunk],
                    "properties": self._props(entity)}
            # 207 lists the IDs not found as errors: for a read that simply means "absent".
            resp = self._c.request(f"{entity} batch read", "POST", self._url(entity, "batch/read"), json_body=body,
                                   sensitive=chunk)
            assert resp is not None
            for obj in resp.json().get("results", []):
                rec = self._record(entity, obj)
                out[rec.key] = rec
        return out

    def _properties(self, entity: Entity, w: Write) -> dict[str, str]:
        fm = self._fm(entity)
        props = {fm[n] or "": _prop(v) for n, v in w.values.items() if fm.get(n)}
        props[self._cfg.sync_field(entity)] = w.sync.encode_str()
        if entity == "appointment" and w.link_changed and fm.get("mrn"):
            props[fm["mrn"] or ""] = _prop(w.contact_mrn)
        return props

    def _post(self, entity: Entity, what: str, tail: str, body: dict[str, Any], secret: list[str]) -> Any:
        resp = self._c.request(f"{entity} {what}", "POST", self._url(entity, tail), json_body=body, sensitive=secret)
        assert resp is not None
        data = resp.json() if resp.content else {}
        if resp.status_code == 207 and data.get("errors"):
            # Some inputs failed: the caller isolates the message at fault by applying one at a time.
            raise self._c.rejected(f"{entity} {what}", resp, secret)
        return data

    def write(self, entity: Entity, writes: Sequence[Write]) -> dict[str, str]:
        key_p, ids = self._key(entity), {}
        upserts = [w for w in writes if not w.renamed]
        for chunk in chunks(upserts, self._size):
            secret = [s for w in chunk for s in sensitive_values(w.values, w.key, w.contact_mrn)]
            inputs = [{"idProperty": key_p, "id": w.key, "properties": self._properties(entity, w)} for w in chunk]
            results = self._post(entity, "batch upsert", "batch/upsert", {"inputs": inputs}, secret).get("results", [])
            by_key = {str((r.get("properties") or {}).get(key_p)): str(r["id"]) for r in results if "id" in r}
            for w, r in zip(chunk, results, strict=False):  # HubSpot does not promise the order: key first
                ids[w.key] = by_key.get(w.key) or str(r.get("id", ""))
        renames = [w for w in writes if w.renamed and w.record is not None]
        for chunk in chunks(renames, self._size):
            secret = [s for w in chunk for s in sensitive_values(w.values, w.key, w.contact_mrn)]
            inputs = [{"id": w.record.remote_id, "properties": {**self._properties(entity, w), key_p: w.key}}
                      for w in chunk if w.record is not None]
            self._post(entity, "batch update", "batch/update", {"inputs": inputs}, secret)
            ids.update({w.key: w.record.remote_id for w in chunk if w.record is not None})
        return ids

    def associate(self, pairs: Sequence[tuple[str, str]]) -> None:
        appt, contact = self._cfg.object_name("appointment"), self._cfg.object_name("contact")
        for chunk in chunks(list(dict.fromkeys(pairs)), self._size):
            body = {"inputs": [{"from": {"id": a}, "to": {"id": c}} for a, c in chunk]}
            self._c.request("appointment association", "POST",
                            f"/crm/v4/associations/{appt}/{contact}/batch/associate/default", json_body=body)

    def delete(self, entity: Entity, records: Sequence[RemoteRecord]) -> None:
        for chunk in chunks(list(records), self._size):
            self._c.request(f"{entity} batch archive", "POST", self._url(entity, "batch/archive"),
                            json_body={"inputs": [{"id": r.remote_id} for r in chunk]})

    def search(self, entity: Entity, *, mrn: str | None = None, prefix: str | None = None) -> list[RemoteRecord]:
        mrn_p, key_p = self._fm(entity)["mrn"] or "", self._key(entity)
        if mrn is not None:
            flt = {"propertyName": mrn_p, "operator": "EQ", "value": mrn}
        elif prefix is not None:
            flt = {"propertyName": mrn_p, "operator": "CONTAINS_TOKEN", "value": f"{prefix}*"}
        else:
            flt = {"propertyName": key_p, "operator": "HAS_PROPERTY"}
        body: dict[str, Any] = {"filterGroups": [{"filters": [flt]}], "properties": self._props(entity),
                                "sorts": [{"propertyName": key_p, "direction": "ASCENDING"}], "limit": 100}
        out: list[RemoteRecord] = []
        for _ in range(100):  # HubSpot stops a search at 10,000 results
            resp = self._c.request(f"{entity} search", "POST", self._url(entity, "search"), json_body=body,
                                   sensitive=[mrn or "", prefix or ""])
            assert resp is not None
            page = resp.json()
            out += [self._record(entity, r) for r in page.get("results", [])]
            after = ((page.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                break
            body["after"] = after
        if prefix is not None:  # CONTAINS_TOKEN matches tokens: keep exactly the MRNs with the prefix
            out = [r for r in out if ((r.contact_mrn if entity == "appointment" else r.key) or "").startswith(prefix)]
        return out

    def patch(self, entity: Entity, record: RemoteRecord, values: Mapping[str, Value]) -> None:
        fm = self._fm(entity)
        props = {fm[n] or "": _prop(v) for n, v in values.items() if fm.get(n)}
        self._c.request(f"{entity} edit", "PATCH", self._url(entity, record.remote_id),
                        json_body={"properties": props}, sensitive=[str(v) for v in values.values() if v])

    def ping(self) -> None:
        self._c.request("ping", "GET", f"{self._root}/{self._cfg.object_name('contact')}", params={"limit": "1"})
