"""Credentials of the HTTP CRM sink: where secrets come from, and how requests are authenticated.

Secrets come from an environment variable or a file named in the config (never from the config or rules
file itself), are held in `Secret` (whose repr hides them), and never appear in logs or exception reasons.
Kinds: a bearer token, an API-key header, or OAuth2 client credentials with a cached token that is
refreshed when it expires, or once after a 401 (see `OAuth2ClientCredentials`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import httpx

from hl7bridge.errors import TransientSinkError

__all__ = [
    "ApiKeyAuth",
    "Auth",
    "BearerAuth",
    "CrmConfigError",
    "NoAuth",
    "OAuth2ClientCredentials",
    "Secret",
    "TokenFetcher",
    "load_secret",
]

#: Refresh an OAuth2 token this long before the CRM says it expires.
_TOKEN_MARGIN = 30.0


class CrmConfigError(ValueError):
    """The HTTP sink cannot start: a secret is missing or unreadable. Names the variable or file, never a value."""


class Secret:
    """A credential. Its repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def load_secret(env: str | None, file: Path | None, what: str) -> Secret:
    """Read a secret from the environment variable named `env` or the file `file` (trailing newline dropped)."""
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise CrmConfigError(f"crm http: {what}: environment variable {env} is not set")
        return Secret(value)
    if file is not None:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CrmConfigError(f"crm http: {what}: cannot read {file} ({type(exc).__name__})") from None
        if not value:
            raise CrmConfigError(f"crm http: {what}: {file} is empty")
        return Secret(value)
    raise CrmConfigError(f"crm http: {what}: name an environment variable or a secrets file")


class Auth(Protocol):
    def headers(self) -> dict[str, str]:
        """Headers that authenticate one request (may fetch a token first)."""

    def refresh(self, rejected: Mapping[str, str]) -> bool:
        """After a 401 on a request sent with `rejected` headers: True if a new credential is worth one retry."""


class NoAuth:
    def headers(self) -> dict[str, str]:
        return {}

    def refresh(self, rejected: Mapping[str, str]) -> bool:
        return False


class BearerAuth:
    def __init__(self, token: Secret) -> None:
        self._token = token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.reveal()}"}

    def refresh(self, rejected: Mapping[str, str]) -> bool:
        return False


class ApiKeyAuth:
    def __init__(self, header: str, key: Secret) -> None:
        self._header, self._key = header, key

    def headers(self) -> dict[str, str]:
        return {self._header: self._key.reveal()}

    def refresh(self, rejected: Mapping[str, str]) -> bool:
        return False


TokenFetcher = Callable[[Mapping[str, str]], httpx.Response]


class OAuth2ClientCredentials:
    """OAuth2 client-credentials grant with a cached token, refreshed when it expires or once after a 401.

    Threads share one token; a refresh happens under the lock and only if the rejected token is still the
    cached one, so twenty threads hitting 401 together cause exactly one token request.
    """

    def __init__(self, fetch: TokenFetcher, client_id: str, secret: Secret, scope: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch_raw, self._client_id, self._secret, self._scope = fetch, client_id, secret, scope
        self._clock = clock
        self._lock = threading.Lock()
        self._token: Secret | None = None
        self._expires_at = 0.0
        #: Token requests made (observability and tests).
        self.fetches = 0

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at:
                self._fetch()
            assert self._token is not None
            return {"Authorization": f"Bearer {self._token.reveal()}"}

    def refresh(self, rejected: Mapping[str, str]) -> bool:
        with self._lock:
            current = None if self._token is None else f"Bearer {self._token.reveal()}"
            if rejected.get("Authorization") == current:
                self._fetch()
            return True

    def _fetch(self) -> None:
        form = {"grant_type": "client_credentials", "client_id": self._client_id,
                "client_secret": self._secret.reveal()}
        if self._scope:
            form["scope"] = self._scope
        self.fetches += 1
        resp = self._fetch_raw(form)
        if resp.status_code in (400, 401, 403):
            raise TransientSinkError(f"crm: the OAuth2 token endpoint refused the client credentials "
                                     f"(HTTP {resp.status_code})")
        if resp.status_code >= 300:
            raise TransientSinkError(f"crm: OAuth2 token request failed (HTTP {resp.status_code})")
        try:
            body = resp.json()
            token = str(body["access_token"])
            ttl = float(body.get("expires_in") or 3600)
        except (ValueError, KeyError, TypeError):
            raise TransientSinkError("crm: the OAuth2 token endpoint answered without an access_token") from None
        self._token = Secret(token)
        self._expires_at = self._clock() + max(ttl - _TOKEN_MARGIN, 1.0)
