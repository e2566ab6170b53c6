"""A test CRM: a real threaded HTTP server on 127.0.0.1 speaking the subset of Salesforce's, HubSpot's and a
generic REST API that the HTTP sink calls.

In-memory store, a request log (method, path, query, body, arrival time, status), injectable faults
(N answers with a given status/headers/body, dropped connections for T seconds, expired OAuth2 tokens) and
the highest number of requests that arrived within any one second.

    with CrmServer(auth=("oauth2", "cid", "secret")) as crm:
        crm.fail_next(1, 429, headers={"Retry-After": "2"})
        ... crm.log, crm.sf("Contact"), crm.hs("contacts"), crm.gen("patients"), crm.max_per_second()
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

Response = tuple[int, dict[str, str], Any]

#: Request templates of the generic preset for this server's /api/patients and /api/appointments.
GENERIC: dict[str, Any] = {
    "contact": {
        "upsert": {"method": "PUT", "url": "/api/patients/{key}"},
        "read": {"url": "/api/patients/{key}"},
        "list": {"url": "/api/patients", "params": {"mrn": "{mrn}"}},
        "delete": {"method": "DELETE", "url": "/api/patients/{key}"},
        "modified_field": "updated_at",
        "body": {"mrn": "{mrn}", "name": {"given": "{first_name}", "family": "{last_name}"},
                 "birth_date": "{birth_date}", "sex": "{sex}", "phone": "{phone}", "email": "{email}",
                 "address": {"line1": "{address_line1}", "city": "{city}", "state": "{state}", "zip": "{postal_code}"},
                 "hl7": "{hl7_sync}"},
    },
    "appointment": {
        "upsert": {"method": "PUT", "url": "/api/appointments/{key}"},
        "read": {"url": "/api/appointments/{key}"},
        "list": {"url": "/api/appointments", "params": {"mrn": "{mrn}"}},
        "delete": {"method": "DELETE", "url": "/api/appointments/{key}"},
        "modified_field": "updated_at",
        "body": {"appointment_id": "{appointment_id}", "patient_mrn": "{mrn}", "start": "{start}",
                 "minutes": "{duration_minutes}", "status": "{status}", "type": "{type}", "provider": "{provider}",
                 "location": "{location}", "hl7": "{hl7_sync}"},
    },
}


def sink_config(preset: str, base_url: str, **overrides: Any) -> Any:
    """An HttpSinkConfig for this server: no rate limit unless given, generic templates for `generic`."""
    from hl7bridge.crm.http import HttpSinkConfig

    extra: dict[str, Any] = {"generic": GENERIC} if preset == "generic" else {}
    return HttpSinkConfig.model_validate({"preset": preset, "base_url": base_url, "rate_limit_per_second": 0,
                                          **extra, **overrides})

SOQL = re.compile(
    r"^SELECT (?P<fields>.+?) FROM (?P<obj>\w+)"
    r"(?: WHERE (?P<field>\w+) (?P<op>=|!=|LIKE) (?P<val>null|'(?:[^'\\]|\\.)*'))?"
    r"(?: ORDER BY (?P<order>[\w, ]+?))?(?: LIMIT (?P<limit>\d+))?$")
#: Salesforce relationship name -> (lookup field, target object, target external ID field)
SF_RELATIONSHIPS = {"Contact__r": ("Contact__c", "Contact")}


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    at: float  # time.monotonic() at arrival
    status: int  # 0: the connection was dropped

    @property
    def line(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class _Fault:
    remaining: int
    status: int
    headers: dict[str, str]
    body: Any
    match: str | None


@dataclass
class _Record:
    id: str
    fields: dict[str, Any]
    modified: datetime = field(default_factory=lambda: datetime.now(UTC))
    created: datetime = field(default_factory=lambda: datetime.now(UTC))


def _sf_time(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+0000"


def _hs_time(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class CrmServer:
    def __init__(self, *, auth: tuple[str, ...] | None = None, soql_page_size: int = 2000,
                 token_ttl: int = 3600, generic_filters: dict[str, str] | None = None) -> None:
        self.auth = auth
        self.soql_page_size = soql_page_size
        self.token_ttl = token_ttl
        self.generic_filters = generic_filters or {"patients": "mrn", "appointments": "patient_mrn"}
        self.log: list[Logged] = []
        self.tokens_issued = 0
        self.associations: set[tuple[str, str, str, str]] = set()
        self._stores: dict[str, dict[str, _Record]] = {}
        self._lock = threading.RLock()
        self._faults: list[_Fault] = []
        self._drop_until = 0.0
        self._tokens: set[str] = set()
        self._ids = itertools.count(1)
        self._cursors: dict[str, list[dict[str, Any]]] = {}
        self._indexes: dict[tuple[str, str], dict[Any, str]] = {}
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> CrmServer:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._http.daemon_threads = True
        self._http.crm = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="crmserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> CrmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._http is not None
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    # --- faults and measures ---------------------------------------------------------------------------

    def fail_next(self, n: int, status: int, *, body: Any = None, headers: dict[str, str] | None = None,
                  match: str | None = None) -> None:
        """The next n requests (whose "METHOD path" contains `match`, if given) get this answer."""
        with self._lock:
            self._faults.append(_Fault(n, status, headers or {}, body, match))

    def drop_for(self, seconds: float) -> None:
        """For `seconds`, every request is read and its connection closed without an answer."""
        with self._lock:
            self._drop_until = time.monotonic() + seconds

    def expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def max_per_second(self, window: float = 1.0) -> int:
        """The most requests that arrived within any `window` seconds (a half-open sliding window)."""
        times = sorted(e.at for e in self.log)
        best = j = 0
        for i, t in enumerate(times):
            while t - times[j] >= window:
                j += 1
            best = max(best, i - j + 1)
        return best

    def lines(self, since: int = 0) -> list[str]:
        return [e.line for e in self.log[since:]]

    # --- store views -----------------------------------------------------------------------------------

    def sf(self, obj: str) -> list[dict[str, Any]]:
        with self._lock:
            return [{"Id": r.id, **r.fields} for r in self._store(f"sf:{obj}").values()]

    def hs(self, obj: str) -> list[dict[str, Any]]:
        with self._lock:
            return [{"id": r.id, **r.fields} for r in self._store(f"hs:{obj}").values()]

    def gen(self, coll: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r.fields) for r in self._store(f"gen:{coll}").values()]

    def _store(self, name: str) -> dict[str, _Record]:
        return self._stores.setdefault(name, {})

    def _find(self, store: str, fld: str, value: Any) -> _Record | None:
        """By field value, through an index kept current by `_put`/`_drop` (linear scans made a 5,000-record
        replay quadratic)."""
        if value is None:
            return None
        idx = self._indexes.get((store, fld))
        if idx is None:
            idx = self._indexes[(store, fld)] = {}
            for r in self._store(store).values():
                if r.fields.get(fld) is not None:
                    idx.setdefault(r.fields[fld], r.id)
        rid = idx.get(value)
        return None if rid is None else self._store(store).get(rid)

    def _put(self, store: str, rec: _Record, fields: dict[str, Any], *, replace: bool = False) -> None:
        """Create or change a record, keeping the indexes current."""
        new = fields if replace else {**rec.fields, **fields}
        for (s, fld), idx in self._indexes.items():
            if s != store:
                continue
            if idx.get(rec.fields.get(fld)) == rec.id:
                del idx[rec.fields[fld]]
            if new.get(fld) is not None:
                idx[new[fld]] = rec.id
        rec.fields = new
        self._store(store)[rec.id] = rec

    def _drop(self, store: str, rid: str) -> None:
        rec = self._store(store).get(rid)
        if rec is not None:
            self._put(store, rec, {}, replace=True)  # out of every index
            del self._store(store)[rid]

    # --- dispatch --------------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Any, raw: bytes, at: float) -> Response:
        url = urlsplit(raw_path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        ctype = headers.get("Content-Type", "")
        body: Any = None
        if raw:
            body = dict(parse_qsl(raw.decode())) if "form" in ctype else json.loads(raw)
        with self._lock:
            status, out_headers, out = self._answer(method, url.path, query, headers, copy.deepcopy(body), at)
            self.log.append(Logged(method, url.path, query, body, at, status))
        return status, out_headers, out

    def _answer(self, method: str, path: str, query: dict[str, str], headers: Any, body: Any, at: float) -> Response:
        if at < self._drop_until:
            return 0, {}, None
        line = f"{method} {path}"
        for fault in self._faults:
            if fault.remaining > 0 and (fault.match is None or fault.match in line):
                fault.remaining -= 1
                return fault.status, fault.headers, fault.body
        if path == "/services/oauth2/token":
            return self._token(body or {})
        if not self._authorised(headers):
            if path.startswith("/services/"):
                return 401, {}, [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
            return 401, {}, {"status": "error", "message": "Authentication credentials not found.",
                             "category": "INVALID_AUTHENTICATION"}
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["services", "data"]:
            return self._salesforce(method, parts[3:], query, body)
        if parts[:1] == ["crm"]:
            return self._hubspot(method, parts[1:], query, body)
        if parts[:1] == ["api"]:
            return self._generic(method, parts[1:], query, body)
        return 404, {}, {"error": "no such endpoint"}

    def _authorised(self, headers: Any) -> bool:
        if self.auth is None:
            return True
        kind = self.auth[0]
        if kind == "bearer":
            return headers.get("Authorization") == f"Bearer {self.auth[1]}"
        if kind == "api_key":
            return headers.get(self.auth[1]) == self.auth[2]
        token = (headers.get("Authorization") or "").removeprefix("Bearer ")
        return token in self._tokens

    def _token(self, form: dict[str, str]) -> Response:
        if self.auth is None or self.auth[0] != "oauth2" or form.get("grant_type") != "client_credentials" \
                or (form.get("client_id"), form.get("client_secret")) != self.auth[1:3]:
            return 400, {}, {"error": "invalid_client", "error_description": "invalid client credentials"}
        self.tokens_issued += 1
        token = f"tok-{self.tokens_issued}-{next(self._ids)}"
        self._tokens.add(token)
        return 200, {}, {"access_token": token, "token_type": "Bearer", "expires_in": self.token_ttl}

    # --- Salesforce ------------------------------------------------------------------------------------

    def _sf_view(self, obj: str, r: _Record, fields: list[str] | None = None) -> dict[str, Any]:
        full = {"Id": r.id, **r.fields, "LastModifiedDate": _sf_time(r.modified), "CreatedDate": _sf_time(r.created)}
        names = fields or list(full)
        return {"attributes": {"type": obj, "url": f"/services/data/v60.0/sobjects/{obj}/{r.id}"},
                **{n: full.get(n) for n in names}}

    def _sf_resolve(self, body: dict[str, Any]) -> Response | None:
        for rel, (lookup, target) in SF_RELATIONSHIPS.items():
            if rel in body:
                ((ext_field, value),) = body.pop(rel).items()
                ref = self._find(f"sf:{target}", ext_field, value)
                if ref is None:
                    return 400, {}, [{"errorCode": "INVALID_FIELD", "fields": [],
                                      "message": f"Foreign key external ID: {value} not found for field "
                                                 f"{ext_field} in entity {target}"}]
                body[lookup] = ref.id
        return None

    def _salesforce(self, method: str, parts: list[str], query: dict[str, str], body: Any) -> Response:
        if parts == ["limits"]:
            return 200, {}, {"DailyApiRequests": {"Max": 15000, "Remaining": 14000}}
        if parts[:1] == ["query"]:
            if len(parts) == 2:
                cursor, _, offset = parts[1].rpartition("-")
                return self._sf_page(cursor, int(offset))
            return self._soql(query["q"])
        if parts[:1] != ["sobjects"] or len(parts) not in (3, 4):
            return 404, {}, [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
        obj, store = parts[1], f"sf:{parts[1]}"
        if len(parts) == 3:  # by Id
            rec = self._store(store).get(parts[2])
            if rec is None:
                return 404, {}, [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
            if method == "DELETE":
                self._drop(store, rec.id)
                return 204, {}, None
            if method == "GET":
                return 200, {}, self._sf_view(obj, rec)
            err = self._sf_resolve(body)
            if err:
                return err
            self._put(store, rec, body)
            rec.modified = datetime.now(UTC)
            return 204, {}, None
        ext_field, value = parts[2], parts[3]
        rec = self._find(store, ext_field, value)
        if method == "GET":
            if rec is None:
                return 404, {}, [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
            fields = query.get("fields", "").split(",") if query.get("fields") else None
            return 200, {}, self._sf_view(obj, rec, fields)
        if method != "PATCH":
            return 405, {}, [{"errorCode": "METHOD_NOT_ALLOWED", "message": "HTTP Method not allowed"}]
        if ext_field in body or "Id" in body:
            return 400, {}, [{"errorCode": "INVALID_FIELD", "message": "Do not specify Id or the external ID field"}]
        err = self._sf_resolve(body)
        if err:
            return err
        if rec is None:
            prefix = "003" if obj == "Contact" else "a0X"
            rec = _Record(f"{prefix}{next(self._ids):015d}", {})
            self._put(store, rec, {ext_field: value, **body})
            return 201, {}, {"id": rec.id, "success": True, "errors": [], "created": True}
        self._put(store, rec, body)
        rec.modified = datetime.now(UTC)
        return 200, {}, {"id": rec.id, "success": True, "errors": [], "created": False}

    def _soql(self, q: str) -> Response:
        m = SOQL.match(q)
        if m is None:
            return 400, {}, [{"errorCode": "MALFORMED_QUERY", "message": "unexpected token"}]
        obj, fields = m["obj"], [f.strip() for f in m["fields"].split(",")]
        rows = list(self._store(f"sf:{obj}").values())
        if m["field"]:
            val = None if m["val"] == "null" else re.sub(r"\\(.)", r"\1", m["val"][1:-1])
            if m["op"] == "=":
                rows = [r for r in rows if r.fields.get(m["field"]) == val]
            elif m["op"] == "!=":
                rows = [r for r in rows if r.fields.get(m["field"]) != val]
            else:
                assert val is not None and val.endswith("%"), "only prefix LIKE is implemented"
                prefix = val[:-1].casefold()
                rows = [r for r in rows if str(r.fields.get(m["field"]) or "").casefold().startswith(prefix)]
        for key in reversed([o.strip() for o in (m["order"] or "").split(",") if o.strip()]):
            rows.sort(key=lambda r, k=key: str(r.fields.get(k) if k != "Id" else r.id))
        views = [self._sf_view(obj, r, fields) for r in rows[: int(m["limit"]) if m["limit"] else None]]
        cursor = f"01g{next(self._ids):015d}"
        self._cursors[cursor] = views
        return self._sf_page(cursor, 0)

    def _sf_page(self, cursor: str, offset: int) -> Response:
        views = self._cursors.get(cursor)
        if views is None:
            return 400, {}, [{"errorCode": "INVALID_QUERY_LOCATOR", "message": "invalid query locator"}]
        end = offset + self.soql_page_size
        page: dict[str, Any] = {"totalSize": len(views), "done": end >= len(views), "records": views[offset:end]}
        if end < len(views):
            page["nextRecordsUrl"] = f"/services/data/v60.0/query/{cursor}-{end}"
        return 200, {}, page

    # --- HubSpot ---------------------------------------------------------------------------------------

    def _hs_view(self, r: _Record, props: list[str] | None = None) -> dict[str, Any]:
        base = {"hs_object_id": r.id, "createdate": _hs_time(r.created), "hs_lastmodifieddate": _hs_time(r.modified)}
        shown = {**base, **({p: r.fields.get(p) for p in props} if props is not None else r.fields)}
        return {"id": r.id, "properties": shown, "createdAt": _hs_time(r.created), "updatedAt": _hs_time(r.modified),
                "archived": False}

    def _hubspot(self, method: str, parts: list[str], query: dict[str, str], body: Any) -> Response:
        if parts[:2] == ["v4", "associations"] and parts[4:] == ["batch", "associate", "default"]:
            results = []
            for inp in body["inputs"]:
                self.associations.add((parts[2], inp["from"]["id"], parts[3], inp["to"]["id"]))
                results.append({"from": inp["from"], "to": inp["to"],
                                "associationSpec": {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 1}})
            return 200, {}, {"status": "COMPLETE", "results": results}
        if parts[:2] != ["v3", "objects"] or len(parts) < 3:
            return 404, {}, {"status": "error", "message": "not found", "category": "OBJECT_NOT_FOUND"}
        obj, store, rest = parts[2], f"hs:{parts[2]}", parts[3:]
        records = self._store(store)
        if not rest and method == "GET":
            limit = int(query.get("limit", "10"))
            return 200, {}, {"results": [self._hs_view(r) for r in list(records.values())[:limit]]}
        if len(rest) == 1 and rest[0] not in ("search", "batch") and method == "PATCH":
            rec = records.get(rest[0])
            if rec is None:
                return 404, {}, {"status": "error", "message": "Object not found", "category": "OBJECT_NOT_FOUND"}
            self._put(store, rec, {k: str(v) for k, v in body["properties"].items()})
            rec.modified = datetime.now(UTC)
            return 200, {}, self._hs_view(rec)
        if rest == ["search"]:
            return self._hs_search(store, body)
        inputs = body.get("inputs", [])
        if len(inputs) > 100:
            return 400, {}, {"status": "error", "category": "VALIDATION_ERROR",
                             "message": "Batch input limit is 100"}
        now = datetime.now(UTC)
        if rest == ["batch", "read"]:
            found, missing = [], []
            for inp in inputs:
                rec = self._find(store, body["idProperty"], inp["id"])
                (found.append(self._hs_view(rec, body.get("properties"))) if rec else missing.append(inp["id"]))
            out: dict[str, Any] = {"status": "COMPLETE", "results": found}
            if missing:
                out["errors"] = [{"status": "error", "category": "OBJECT_NOT_FOUND", "message": "Could not get some "
                                  f"{obj} objects, they may be deleted or not exist.", "context": {"ids": missing}}]
                out["numErrors"] = 1
            return (207 if missing else 200), {}, out
        if rest == ["batch", "upsert"]:
            results = []
            for inp in inputs:
                props = {k: str(v) for k, v in inp["properties"].items()}
                rec = self._find(store, inp["idProperty"], inp["id"])
                new = rec is None
                if rec is None:
                    rec = _Record(str(next(self._ids)), {})
                    props = {inp["idProperty"]: inp["id"], **props}
                self._put(store, rec, props)
                rec.modified = now
                results.append({**self._hs_view(rec), "new": new})
            return 200, {}, {"status": "COMPLETE", "results": results}
        if rest == ["batch", "update"]:
            results = []
            for inp in inputs:
                rec = records.get(inp["id"])
                if rec is None:
                    return 404, {}, {"status": "error", "category": "OBJECT_NOT_FOUND", "message": "Object not found"}
                self._put(store, rec, {k: str(v) for k, v in inp["properties"].items()})
                rec.modified = now
                results.append(self._hs_view(rec))
            return 200, {}, {"status": "COMPLETE", "results": results}
        if rest == ["batch", "archive"]:
            for inp in inputs:
                self._drop(store, inp["id"])
                self.associations = {a for a in self.associations if inp["id"] not in (a[1], a[3])}
            return 204, {}, None
        return 404, {}, {"status": "error", "message": "not found", "category": "OBJECT_NOT_FOUND"}

    def _hs_search(self, store: str, body: dict[str, Any]) -> Response:
        rows = list(self._store(store).values())
        for group in body.get("filterGroups", []):
            for f in group.get("filters", []):
                name, op, value = f["propertyName"], f["operator"], f.get("value")
                if op == "EQ":
                    rows = [r for r in rows if r.fields.get(name) == value]
                elif op == "HAS_PROPERTY":
                    rows = [r for r in rows if r.fields.get(name) not in (None, "")]
                elif op == "CONTAINS_TOKEN" and str(value).endswith("*"):
                    rows = [r for r in rows if str(r.fields.get(name) or "").casefold()
                            .startswith(str(value)[:-1].casefold())]
                else:
                    return 400, {}, {"status": "error", "category": "VALIDATION_ERROR", "message": "bad filter"}
        for s in reversed(body.get("sorts", [])):
            rows.sort(key=lambda r, k=s["propertyName"]: str(r.fields.get(k) or ""),
                      reverse=s.get("direction") == "DESCENDING")
        start, limit = int(body.get("after") or 0), min(int(body.get("limit", 10)), 200)
        page = rows[start : start + limit]
        out: dict[str, Any] = {"total": len(rows), "results": [self._hs_view(r, body.get("properties")) for r in page]}
        if start + limit < len(rows):
            out["paging"] = {"next": {"after": str(start + limit)}}
        return 200, {}, out

    # --- generic ---------------------------------------------------------------------------------------

    def _generic(self, method: str, parts: list[str], query: dict[str, str], body: Any) -> Response:
        coll, store = parts[0], f"gen:{parts[0]}"
        records = self._store(store)
        if len(parts) == 1 and method == "GET":
            docs = [r.fields for r in records.values()]
            if "mrn" in query:
                docs = [d for d in docs if d.get(self.generic_filters.get(coll, "mrn")) == query["mrn"]]
            return 200, {}, {"items": docs}
        if len(parts) != 2:
            return 404, {}, {"error": "not_found", "message": "no such resource"}
        rec = records.get(parts[1])
        if method == "GET":
            return (200, {}, rec.fields) if rec else (404, {}, {"error": "not_found", "message": "no such record"})
        if method == "DELETE":
            if rec is None:
                return 404, {}, {"error": "not_found", "message": "no such record"}
            self._drop(store, parts[1])
            return 204, {}, None
        if method in ("PUT", "PATCH"):
            now = datetime.now(UTC)
            created = rec is None
            if rec is None:
                rec = _Record(parts[1], {"id": f"G-{next(self._ids):06d}"})
            doc = dict(body) if method == "PUT" else {**rec.fields, **body}
            self._put(store, rec, {**doc, "id": rec.fields["id"], "updated_at": _hs_time(now)}, replace=True)
            rec.modified = now
            return (201 if created else 200), {}, rec.fields
        return 405, {}, {"error": "method_not_allowed", "message": "method not allowed"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        crm: CrmServer = self.server.crm  # type: ignore[attr-defined]
        status, headers, body = crm.handle(self.command, self.path, self.headers, raw, time.monotonic())
        if status == 0:
            self.close_connection = True  # dropped: no answer at all
            return
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()
