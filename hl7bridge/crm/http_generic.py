"""The generic preset: a configurable method, URL template and JSON body template per entity, for
home-grown CRMs.

The body template is a JSON document whose strings may be placeholders. A string that is exactly
`"{name}"` becomes the typed value (null, a number, or for `{hl7_sync}` an object); placeholders inside
longer strings are substituted as text. The same template tells the sink where to find each field in the
records the CRM returns, so one template describes both directions. Writes send the whole record (the
template), so PUT semantics are safe. URL placeholders: `{key}` (the natural key) and `{id}` (the CRM's
ID, for delete); list parameters: `{mrn}` (a parameter that renders empty is left out).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from hl7bridge.crm.conflict import EDITABLE, Value
from hl7bridge.crm.http_presets import KEY_FIELD, RemoteRecord, SyncState, Write, canon, parse_time, sensitive_values
from hl7bridge.errors import PermanentSinkError
from hl7bridge.records import Entity

if TYPE_CHECKING:
    from hl7bridge.crm.http_client import CrmClient
    from hl7bridge.crm.http_config import GenericEntityConfig, HttpRequestTemplate, HttpSinkConfig

__all__ = ["Generic", "placeholder_paths", "render"]

PLACEHOLDER = re.compile(r"\{([a-z_0-9]+)\}")
Path = tuple[str | int, ...]


def render(template: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template)
        if whole:
            return values.get(whole.group(1))
        return PLACEHOLDER.sub(lambda m: "" if values.get(m.group(1)) is None else str(values[m.group(1)]), template)
    if isinstance(template, dict):
        return {k: render(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, values) for v in template]
    return template


def placeholder_paths(template: Any, at: Path = ()) -> dict[str, Path]:
    """Where each whole-string placeholder sits in the template (the first occurrence wins)."""
    out: dict[str, Path] = {}
    items: list[tuple[str | int, Any]] = []
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template)
        return {whole.group(1): at} if whole else {}
    if isinstance(template, dict):
        items = list(template.items())
    elif isinstance(template, list):
        items = list(enumerate(template))
    for k, v in items:
        for name, path in placeholder_paths(v, (*at, k)).items():
            out.setdefault(name, path)
    return out


def _get(doc: Any, path: Path) -> Any:
    for step in path:
        if isinstance(step, int) and isinstance(doc, list) and step < len(doc):
            doc = doc[step]
        elif isinstance(step, str) and isinstance(doc, dict):
            doc = doc.get(step)
        else:
            return None
    return doc


class Generic:
    batches = False

    def __init__(self, cfg: HttpSinkConfig, client: CrmClient) -> None:
        assert cfg.generic is not None
        self._c, self._g = client, cfg.generic

    def _e(self, entity: Entity) -> GenericEntityConfig:
        return self._g.contact if entity == "contact" else self._g.appointment

    def _need(self, entity: Entity, what: str) -> HttpRequestTemplate:
        tpl = getattr(self._e(entity), what)
        if tpl is None:
            raise PermanentSinkError(f"crm: the generic preset has no `{what}` request for {entity} records")
        return tpl  # type: ignore[no-any-return]

    def _url(self, tpl: HttpRequestTemplate, key: str = "", rid: str = "") -> str:
        return render(tpl.url, {"key": quote(key, safe=""), "id": quote(rid, safe="")})  # type: ignore[no-any-return]

    def _record(self, entity: Entity, doc: Any, key: str | None = None) -> RemoteRecord:
        ent = self._e(entity)
        paths = placeholder_paths(ent.body)
        if not isinstance(doc, dict):
            raise PermanentSinkError(f"crm: the generic CRM returned a {entity} that is not a JSON object")
        got = {n: _get(doc, p) for n, p in paths.items()}
        rec_key = str(got.get(KEY_FIELD[entity]) or key or "")
        values = {n: canon(n, got.get(n)) for n in EDITABLE[entity] if n in paths}
        sync_raw = got.get("hl7_sync")
        rid = doc.get(ent.id_field)
        return RemoteRecord(
            str(rid) if rid not in (None, "") else rec_key, rec_key, values, SyncState.decode(sync_raw), sync_raw,
            parse_time(doc.get(ent.modified_field)) if ent.modified_field else None,
            contact_mrn=(str(got["mrn"]) if got.get("mrn") else None) if entity == "appointment" else None)

    def read(self, entity: Entity, keys: Sequence[str]) -> dict[str, RemoteRecord]:
        tpl = self._need(entity, "read")
        out = {}
        for key in dict.fromkeys(keys):
            resp = self._c.request(f"{entity} read", tpl.method, self._url(tpl, key), absent_ok=True, sensitive=[key])
            if resp is not None and resp.content:
                out[key] = self._record(entity, resp.json(), key)
        return out

    def _put(self, entity: Entity, key: str, full: Mapping[str, Value], sync: Any, contact_mrn: str | None) -> str:
        ent = self._e(entity)
        values: dict[str, Any] = {**full, KEY_FIELD[entity]: key, "hl7_sync": sync}
        if entity == "appointment":
            values["mrn"] = contact_mrn
        resp = self._c.request(f"{entity} upsert", ent.upsert.method, self._url(ent.upsert, key),
                               json_body=render(ent.body, values), sensitive=sensitive_values(full, key, contact_mrn))
        try:
            doc = resp.json() if resp is not None and resp.content else {}
        except ValueError:
            doc = {}
        rid = doc.get(ent.id_field) if isinstance(doc, dict) else None
        return str(rid) if rid not in (None, "") else key

    def write(self, entity: Entity, writes: Sequence[Write]) -> dict[str, str]:
        ids = {}
        for w in writes:
            ids[w.key] = self._put(entity, w.key, w.full, w.sync.encode(), w.contact_mrn)
            if w.renamed and w.record is not None:
                # Keys live in the URL: an MRN change is a new record under the new key, then the old one goes.
                self.delete(entity, [w.record])
        return ids

    def associate(self, pairs: Sequence[tuple[str, str]]) -> None:
        return None  # the body template carries the patient's MRN

    def delete(self, entity: Entity, records: Sequence[RemoteRecord]) -> None:
        tpl = self._need(entity, "delete")
        for rec in records:
            self._c.request(f"{entity} delete", tpl.method, self._url(tpl, rec.key, rec.remote_id), absent_ok=True)

    def search(self, entity: Entity, *, mrn: str | None = None, prefix: str | None = None) -> list[RemoteRecord]:
        tpl, ent = self._need(entity, "list"), self._e(entity)
        params = {k: v for k, v in ((k, render(v, {"mrn": mrn or ""})) for k, v in tpl.params.items()) if v != ""}
        resp = self._c.request(f"{entity} list", tpl.method, self._url(tpl), params=params, sensitive=[mrn or ""])
        assert resp is not None
        data = resp.json()
        items = data.get(ent.items_key or "items", []) if isinstance(data, dict) else data
        out = [self._record(entity, d) for d in items or []]
        if mrn is not None:  # a CRM that ignores the parameter must not hand back other patients
            out = [r for r in out if (r.contact_mrn if entity == "appointment" else r.key) == mrn]
        if prefix is not None:
            out = [r for r in out if ((r.contact_mrn if entity == "appointment" else r.key) or "").startswith(prefix)]
        return out

    def patch(self, entity: Entity, record: RemoteRecord, values: Mapping[str, Value]) -> None:
        # A CRM user's edit: the sync state is written back exactly as read, so the change is seen as theirs.
        self._put(entity, record.key, {**record.values, **values}, record.sync_raw, record.contact_mrn)

    def ping(self) -> None:
        tpl = self._g.ping
        if tpl is not None:
            self._c.request("ping", tpl.method, self._url(tpl))
            return
        try:
            self._c.request("ping", "GET", "/", absent_ok=True)
        except PermanentSinkError as exc:
            if getattr(exc, "http_status", None) in (401, 403):
                raise
            # Any other answer (405, 400...) proves the CRM is up and reachable.
