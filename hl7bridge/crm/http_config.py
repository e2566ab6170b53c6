"""Configuration of the HTTP CRM sink (`HttpSinkConfig`) and what each preset can enforce.

Secrets are never values here: only the NAME of an environment variable or the path of a secrets file, so
the config file (and the rules file) can be committed. Unknown keys are errors (extra="forbid").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hl7bridge.crm.conflict import EDITABLE
from hl7bridge.crm.http_generic import PLACEHOLDER, placeholder_paths
from hl7bridge.crm.http_presets import DEFAULTS, KEY_FIELD
from hl7bridge.records import Entity

__all__ = [
    "GenericConfig",
    "GenericEntityConfig",
    "HttpAuthConfig",
    "HttpEntityConfig",
    "HttpRequestTemplate",
    "HttpSinkConfig",
    "rules_problems",
    "unsupported_conflicts",
]

Preset = Literal["salesforce", "hubspot", "generic"]
_VERSIONS = {"salesforce": "v60.0", "hubspot": "v3", "generic": ""}
#: Default requests/second: HubSpot's smallest private-app quota is 100 per 10 s; Salesforce limits per day.
_RATES = {"salesforce": 20.0, "hubspot": 9.0, "generic": 0.0}


# --- configuration -------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class HttpAuthConfig(_Model):
    kind: Literal["none", "bearer", "oauth2_client_credentials", "api_key"] = "none"
    #: Environment variable holding the secret (bearer token, API key, or OAuth2 client secret).
    secret_env: str | None = None
    #: File holding the secret (a Docker/Kubernetes secret mount); read once at start.
    secret_file: Path | None = None
    #: api_key: the header that carries the key.
    header: str = "X-API-Key"
    #: oauth2_client_credentials: token endpoint, absolute or relative to base_url.
    token_url: str | None = None
    client_id: str | None = None
    client_id_env: str | None = None
    scope: str | None = None

    @field_validator("secret_env", "client_id_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.fullmatch(v):
            raise ValueError("must be the NAME of an environment variable (letters, digits, _), not the secret")
        return v

    @model_validator(mode="after")
    def _complete(self) -> HttpAuthConfig:
        named = (self.secret_env is not None) + (self.secret_file is not None)
        if self.kind == "none" and named:
            raise ValueError("auth.kind is none but a secret is named")
        if self.kind != "none" and named != 1:
            raise ValueError("give exactly one of auth.secret_env and auth.secret_file")
        if self.kind == "oauth2_client_credentials":
            if not self.token_url:
                raise ValueError("oauth2_client_credentials needs auth.token_url")
            if (self.client_id is None) == (self.client_id_env is None):
                raise ValueError("give exactly one of auth.client_id and auth.client_id_env")
        return self


class HttpEntityConfig(_Model):
    """Salesforce/HubSpot: object name, sync-state field, and record-model -> CRM field names (merged over
    the preset's defaults; null = not sent)."""

    object: str | None = None
    sync_field: str | None = None
    fields: dict[str, str | None] = {}


class HttpRequestTemplate(_Model):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    #: Relative to base_url; placeholders {key} (natural key) and {id} (the CRM's ID), URL-encoded.
    url: str
    #: Query parameters; `{mrn}` allowed; a parameter that renders empty is left out.
    params: dict[str, str] = {}


class GenericEntityConfig(_Model):
    upsert: HttpRequestTemplate
    #: JSON body template: "{first_name}" placeholders (record-model names, {mrn}, {appointment_id}, {hl7_sync}).
    body: dict[str, Any]
    read: HttpRequestTemplate | None = None
    list: HttpRequestTemplate | None = None
    delete: HttpRequestTemplate | None = None
    id_field: str = "id"
    modified_field: str | None = None
    #: Key of the record list in a list response that is an object (a bare JSON list needs none).
    items_key: str | None = None


class GenericConfig(_Model):
    contact: GenericEntityConfig
    appointment: GenericEntityConfig
    ping: HttpRequestTemplate | None = None


class HttpSinkConfig(_Model):
    preset: Preset
    base_url: str
    #: Salesforce "v60.0", HubSpot "v3" by default.
    api_version: str | None = None
    contact: HttpEntityConfig = HttpEntityConfig()
    appointment: HttpEntityConfig = HttpEntityConfig()
    generic: GenericConfig | None = None
    auth: HttpAuthConfig = HttpAuthConfig()
    timeout: float = Field(10.0, gt=0)
    #: Requests/second across all threads; None = the preset's default, 0 = no limit.
    rate_limit_per_second: float | None = Field(None, ge=0)
    max_connections: int = Field(10, ge=1, le=1000)
    #: HubSpot inputs per batch request (the API's limit is 100).
    batch_size: int = Field(100, ge=1, le=100)
    #: HubSpot: how long a batch waits for concurrent messages to join it (seconds).
    batch_linger: float = Field(0.02, ge=0, le=1)
    #: CA bundle for a CRM behind a private certificate authority.
    ca_file: Path | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> HttpSinkConfig:
        if self.preset == "generic":
            if self.generic is None:
                raise ValueError("preset generic needs a `generic` section (request templates per entity)")
            if self.contact != HttpEntityConfig() or self.appointment != HttpEntityConfig():
                raise ValueError("preset generic takes field names from generic.*.body, not contact/appointment")
            for name, ent in (("contact", self.generic.contact), ("appointment", self.generic.appointment)):
                _check_template(name, ent)  # type: ignore[arg-type]
        elif self.generic is not None:
            raise ValueError(f"preset {self.preset} does not use a `generic` section")
        else:
            for entity in ("contact", "appointment"):
                allowed = {*EDITABLE[entity], "mrn", KEY_FIELD[entity]}
                if entity == "appointment":
                    allowed.add("contact_id")
                unknown = set(getattr(self, entity).fields) - allowed
                if unknown:
                    raise ValueError(f"{entity}.fields: not record-model fields: {', '.join(sorted(unknown))}")
                fm = self.field_map(entity)  # type: ignore[arg-type]
                if not fm.get(KEY_FIELD[entity]) or not fm.get("mrn"):
                    raise ValueError(f"{entity}.fields: the key and mrn fields cannot be unmapped")
        return self

    def version(self) -> str:
        return self.api_version or _VERSIONS[self.preset]

    def rate_limit(self) -> float:
        return _RATES[self.preset] if self.rate_limit_per_second is None else self.rate_limit_per_second

    def object_name(self, entity: Entity) -> str:
        return getattr(self, entity).object or DEFAULTS[self.preset][entity][0]

    def sync_field(self, entity: Entity) -> str:
        return getattr(self, entity).sync_field or DEFAULTS[self.preset][entity][1]

    def field_map(self, entity: Entity) -> dict[str, str | None]:
        return {**DEFAULTS[self.preset][entity][2], **getattr(self, entity).fields}


def _check_template(entity: Entity, ent: GenericEntityConfig) -> None:
    allowed = {*EDITABLE[entity], KEY_FIELD[entity], "hl7_sync"} | ({"mrn"} if entity == "appointment" else set())
    used = set(PLACEHOLDER.findall(str(ent.body)))
    if used - allowed:
        raise ValueError(f"generic.{entity}.body: unknown placeholders {sorted(used - allowed)}")
    for what in ("upsert", "read", "list", "delete"):
        tpl: HttpRequestTemplate | None = getattr(ent, what)
        if tpl is not None and set(PLACEHOLDER.findall(tpl.url)) - {"key", "id"}:
            raise ValueError(f"generic.{entity}.{what}.url: only {{key}} and {{id}} are allowed")
        if tpl is not None and set(PLACEHOLDER.findall(str(tpl.params))) - {"mrn"}:
            raise ValueError(f"generic.{entity}.{what}.params: only {{mrn}} is allowed")


# --- what each preset can do ---------------------------------------------------------------------------


def unsupported_conflicts(preset: HttpSinkConfig | str, entity: Entity | None = None) -> set[str]:
    """Conflict rules the preset cannot enforce (`mapping check` rejects rules that use them).

    `crm` needs the CRM's current value (a read); `newest` also needs when the CRM last changed the record
    and our sync state. Salesforce and HubSpot support both; the generic preset only with `read`, and for
    `newest` also `modified_field` and a `{hl7_sync}` placeholder. Given only a preset name, generic is
    assumed to have none of them."""
    if isinstance(preset, str):
        return {"crm", "newest"} if preset == "generic" else set()
    if preset.preset != "generic" or preset.generic is None:
        return set()
    out: set[str] = set()
    for name in (entity,) if entity else ("contact", "appointment"):
        ent: GenericEntityConfig = getattr(preset.generic, name)
        if ent.read is None:
            out |= {"crm", "newest"}
        if ent.modified_field is None or "hl7_sync" not in placeholder_paths(ent.body):
            out.add("newest")
    return out


def rules_problems(cfg: HttpSinkConfig, rules: Any) -> list[str]:
    """Why these mapping rules cannot run against this HTTP CRM (empty when they can): a conflict rule the
    preset cannot enforce, or a mapped field with no place in the CRM. `rules` is a mapping.Rules."""
    problems = []
    for entity, ent in rules.entity_items():
        bad = unsupported_conflicts(cfg, entity)
        if cfg.preset == "generic" and cfg.generic is not None:
            stored = set(placeholder_paths(getattr(cfg.generic, entity).body))
        else:
            stored = {n for n, f in cfg.field_map(entity).items() if f}
        for name, rule in ent.fields.items():
            where = f"entities.{entity}.fields.{name}"
            if rule.conflict in bad:
                problems.append(f"{where}: conflict rule `{rule.conflict}` needs the CRM's current value"
                                f"{' and change time' if rule.conflict == 'newest' else ''}, which the "
                                f"{cfg.preset} HTTP preset cannot read as configured (see docs/http-sink.md)")
            if name not in stored:
                problems.append(f"{where}: the {cfg.preset} HTTP preset has no CRM field for `{name}` "
                                f"(map it in the sink's {entity} field names)")
    return problems
