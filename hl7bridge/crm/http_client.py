"""Transport of the HTTP CRM sink: the pooled client, the shared rate limit, and the failure classes.

Every request the sink sends goes through `CrmClient.request`, so politeness and error classification live
in one place:

- a client-side rate limit shared by every thread, a ceiling on the requests the CRM sees in any second
  (see `RateLimiter` for why spacing alone is not enough);
- 429 and 503 honour Retry-After: `TransientSinkError(retry_after=...)`, and the limiter holds every other
  request until then (the quota is per account, not per request);
- 5xx, 408, 409, timeouts and network errors are transient (the delivery pipeline's backoff applies);
- 401 with OAuth2: the token is refreshed once and the request resent. A 401 that survives that, or any
  401 with a static credential, is transient too: a wrong or revoked credential is an operator problem,
  not a bad message, and dead-lettering every message would not help;
- any other 4xx is permanent, with the CRM's error codes and messages PHI-redacted.

Reasons name the operation ("contact upsert"), never a URL: Salesforce URLs carry the MRN. Credentials
are added by an `Auth` (http_auth.py) and never logged.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from hl7bridge.crm.http_auth import Auth, NoAuth, TokenFetcher
from hl7bridge.errors import PermanentSinkError, SinkError, TransientSinkError

__all__ = ["CrmClient", "RateLimiter", "parse_retry_after", "redact"]

# httpx logs every request URL at INFO; Salesforce upsert URLs carry the MRN (PHI), so its loggers stay quiet.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

#: Longest Retry-After we honour; a CRM asking for more is treated as asking for this.
_MAX_RETRY_AFTER = 3600.0


# --- rate limit --------------------------------------------------------------------------------------


class _Ticket:
    __slots__ = ("done", "end")

    def __init__(self) -> None:
        self.end: float | None = None
        self.done = threading.Event()


class RateLimiter:
    """At most `per_second` requests reach the CRM in any one second, as the CRM counts them.

    Spacing starts 1/rate apart is not enough: a thread can be delayed between taking its slot and
    reaching the wire, and requests then arrive bunched. So, in addition, a request starts only once the
    request `rate` places before it has finished, and a second after that: its arrival lay between its start
    and its end, ours lies after our start, so any rate + 1 consecutive requests arrive over at least a
    second. The price is about one round trip per second of throughput. Starts are taken in turn (one
    thread waits for the next slot, the others queue behind it); `hold` pauses everything (Retry-After).
    """

    def __init__(self, per_second: float | None, *, max_wait: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self._interval = 1.0 / per_second if per_second else 0.0
        self._window = max(1, int(per_second)) if per_second else 0
        self._max_wait = max_wait
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._turn = threading.Lock()
        self._recent: deque[_Ticket] = deque()
        self._next = 0.0
        self._hold_until = 0.0

    def acquire(self) -> _Ticket:
        """Wait for this request's turn; pass the ticket to `release` when its response (or error) is in."""
        if not self._turn.acquire(timeout=self._max_wait):
            raise TransientSinkError("crm: client-side rate limit queue is full", retry_after=1.0)
        try:
            for _ in range(100_000):  # each pass sleeps or waits for a release; bounded all the same
                with self._lock:
                    now = self._clock()
                    if self._hold_until - now > 1.0:
                        # A long Retry-After would pin worker threads here: let delivery reschedule instead.
                        raise TransientSinkError("crm: holding off as the CRM asked (Retry-After)",
                                                 retry_after=self._hold_until - now)
                    slot = max(now, self._next, self._hold_until)
                    oldest = self._recent[0] if self._window and len(self._recent) >= self._window else None
                    if oldest is not None and oldest.end is not None:
                        slot = max(slot, oldest.end + 1.0)
                if oldest is not None and oldest.end is None:
                    oldest.done.wait(self._max_wait)
                    continue
                if slot - now > self._max_wait:
                    raise TransientSinkError("crm: client-side rate limit queue is full", retry_after=slot - now)
                if slot > now:
                    self._sleep(slot - now)
                    continue
                ticket = _Ticket()
                with self._lock:
                    self._next = now + self._interval
                    if self._window:
                        self._recent.append(ticket)
                        while len(self._recent) > self._window:
                            self._recent.popleft()
                return ticket
            raise TransientSinkError("crm: client-side rate limit did not clear")
        finally:
            self._turn.release()

    def release(self, ticket: _Ticket) -> None:
        with self._lock:
            ticket.end = self._clock()
        ticket.done.set()

    def hold(self, seconds: float) -> None:
        """The CRM said Retry-After: no request starts before then."""
        with self._lock:
            self._hold_until = max(self._hold_until, self._clock() + seconds)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


# --- redaction ---------------------------------------------------------------------------------------

_REDACTED = "[redacted]"
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`|«[^»]*»")
_AFTER_VALUE = re.compile(r"(?i)\b(values?|input|id)(\s*[:=]\s*)(?!\[redacted\])([^\s,;\]\)]+)")
_DIGITS = re.compile(r"\+?\(?\d[\d\s().-]{2,}\d")
_WORD_WITH_DIGIT = re.compile(r"[\w.-]*\d[\w.-]*")
#: Error codes look like INVALID_EMAIL_ADDRESS or NOT_FOUND: upper case, no digits.
_CODE = re.compile(r"^[A-Z][A-Z_]{2,}$")
#: A field name as CRMs report it (FirstName, hl7_mrn, HL7_MRN__c): no spaces, no digits but a "7" of HL7.
_FIELD = re.compile(r"^(?:[A-Za-z_]|HL7|hl7)+$")


def redact(text: str, sensitive: Iterable[str] = (), keep: Iterable[str] = ()) -> str:
    """Strip what may be PHI from a CRM error message: every value we sent (`sensitive`: names, MRNs,
    phones...), e-mail addresses, quoted text, "value: ..." clauses and tokens with digits (MRNs, phone
    numbers, dates), keeping `keep` (our field names) and error codes. Bounded to 300 characters."""
    out = _EMAIL.sub(_REDACTED, text)
    for value in sorted({v for v in sensitive if v and len(v) >= 2}, key=len, reverse=True):
        # Whole words only: a state code "IL" must not eat the "il" of "Email".
        out = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", _REDACTED, out, flags=re.IGNORECASE)
    out = _QUOTED.sub(_REDACTED, out)
    out = _AFTER_VALUE.sub(lambda m: m.group(1) + m.group(2) + _REDACTED, out)
    kept = set(keep)

    def word(m: re.Match[str]) -> str:
        return m.group(0) if m.group(0) in kept else _REDACTED

    out = _WORD_WITH_DIGIT.sub(word, _DIGITS.sub(_REDACTED, out))
    out = re.sub(r"\[redacted\](?:[\s,]*\[redacted\])+", _REDACTED, out).strip()
    return out[:300]


def _error_parts(body: Any) -> list[tuple[str, str, list[str]]]:
    """(code, message, field names) from the error shapes of Salesforce, HubSpot and common REST APIs.
    JSON embedded in a message (HubSpot nests its per-property errors that way) is unpacked too."""
    if isinstance(body, list):
        return [p for item in body[:5] for p in _error_parts(item)]
    if not isinstance(body, dict):
        return [("", str(body), [])] if body not in (None, "") else []
    code = next((str(body[k]) for k in ("errorCode", "category", "code", "error", "subCategory")
                 if isinstance(body.get(k), str | int) and not isinstance(body.get(k), bool)), "")
    message = next((str(body[k]) for k in ("message", "error_description", "detail", "title")
                    if isinstance(body.get(k), str)), "")
    fields = [str(f) for f in body.get("fields") or []] if isinstance(body.get("fields"), list) else []
    fields += [str(body[k]) for k in ("name", "propertyName") if isinstance(body.get(k), str)]
    nested: list[tuple[str, str, list[str]]] = []
    starts = [i for i in (message.find("["), message.find("{")) if i >= 0]
    if starts:
        try:
            inner = json.loads(message[min(starts):])
        except ValueError:
            pass
        else:
            message = message[: min(starts)].rstrip(" :")
            nested = _error_parts(inner)
    parts = [(code, message, fields)] if code or message else []
    for key in ("errors", "details"):
        if isinstance(body.get(key), list):
            nested += [p for item in body[key][:5] for p in _error_parts(item)]
    return parts + nested


def _describe_error(resp: httpx.Response, sensitive: Iterable[str], keep: Iterable[str]) -> str:
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text[:500]
    sent, kept = list(sensitive), list(keep)
    pieces = []
    for code, message, fields in _error_parts(body):
        code = code if _CODE.match(code) or code in kept else (redact(code, sent, kept) if code else "")
        named = ",".join(f for f in fields if f in kept or _FIELD.match(f))
        text = redact(message, sent, kept) if message else ""
        named = "" if named and text.startswith(named) else named
        pieces.append(": ".join(p for p in (code, named, text) if p))
    return "; ".join(dict.fromkeys(p for p in pieces if p))[:400] or "no error details"


def _status_error(what: str, resp: httpx.Response, sensitive: Iterable[str],
                  keep: Iterable[str] = ()) -> SinkError:
    err = _classify(what, resp, sensitive, keep)
    err.http_status = resp.status_code  # type: ignore[attr-defined]
    return err


def _classify(what: str, resp: httpx.Response, sensitive: Iterable[str], keep: Iterable[str]) -> SinkError:
    status = resp.status_code
    if status in (429, 503):
        hint = parse_retry_after(resp.headers.get("Retry-After"))
        return TransientSinkError(f"crm: {what} throttled (HTTP {status})", retry_after=hint)
    if status >= 500 or status in (408, 409):
        return TransientSinkError(f"crm: {what} failed (HTTP {status})")
    if status == 401:
        return TransientSinkError(f"crm: {what} not authorised (HTTP 401): check the CRM credentials")
    return PermanentSinkError(f"crm: {what} rejected (HTTP {status}): {_describe_error(resp, sensitive, keep)}")


# --- the client --------------------------------------------------------------------------------------


class CrmClient:
    """httpx.Client (pooled, timeouts) + auth + rate limit + failure classes. Thread-safe."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, max_connections: int = 10,
                 rate_limit: float | None = None, verify: ssl.SSLContext | bool = True,
                 field_names: Iterable[str] = (), transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            verify=verify, follow_redirects=False, transport=transport,
            headers={"Accept": "application/json", "User-Agent": "hl7bridge"},
        )
        self.limiter = RateLimiter(rate_limit)
        self.auth: Auth = NoAuth()
        self._keep = frozenset(field_names)

    def token_fetcher(self, token_url: str) -> TokenFetcher:
        """For OAuth2: POST the form to the token endpoint (through the same limiter, never with auth)."""
        def fetch(form: Mapping[str, str]) -> httpx.Response:
            return self._send("OAuth2 token request", "POST", token_url, {"data": dict(form)})
        return fetch

    def request(self, what: str, method: str, url: str, *, json_body: Any = None,
                params: Mapping[str, str] | None = None, absent_ok: bool = False,
                sensitive: Iterable[str] = ()) -> httpx.Response | None:
        """Send one request; returns the 2xx response (None for a 404 when `absent_ok`), else raises a
        SinkError. `what` names the operation in errors; `sensitive` are values to redact from them."""
        kw: dict[str, Any] = {"params": params}
        if json_body is not None:
            kw["content"] = json.dumps(json_body, ensure_ascii=False, separators=(",", ":")).encode()
            kw["headers"] = {"Content-Type": "application/json"}
        auth = self.auth.headers()
        resp = self._send(what, method, url, kw, auth)
        if resp.status_code == 401 and self.auth.refresh(auth):
            resp = self._send(what, method, url, kw, self.auth.headers())
        if resp.status_code == 404 and absent_ok:
            return None
        if resp.status_code >= 300:
            err = _status_error(what, resp, sensitive, self._keep)
            if isinstance(err, TransientSinkError) and err.retry_after:
                self.limiter.hold(err.retry_after)
            raise err
        return resp

    def _send(self, what: str, method: str, url: str, kw: Mapping[str, Any],
              auth: Mapping[str, str] | None = None) -> httpx.Response:
        ticket = self.limiter.acquire()
        headers = {**kw.get("headers", {}), **(auth or {})}
        try:
            return self._http.request(method, url, **{**kw, "headers": headers})
        except httpx.TransportError as exc:
            # Class names only: transport errors are about hosts and sockets, but keep the reason bounded.
            raise TransientSinkError(f"crm: {what} failed ({type(exc).__name__})") from None
        finally:
            self.limiter.release(ticket)

    def rejected(self, what: str, resp: httpx.Response, sensitive: Iterable[str] = ()) -> PermanentSinkError:
        """A permanent error for a response whose body reports failures despite a 2xx (HubSpot's 207)."""
        return PermanentSinkError(f"crm: {what} rejected (HTTP {resp.status_code}): "
                                  f"{_describe_error(resp, sensitive, self._keep)}")

    def close(self) -> None:
        self._http.close()
