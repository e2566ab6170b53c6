"""Configuration: one YAML file, HL7BRIDGE_* environment variables and CLI flags, validated once at start.

Precedence (highest first): CLI flags, environment (`HL7BRIDGE_LISTENER__PORT=2576`; nested keys joined by
`__`), the config file, defaults. Unknown keys are errors everywhere, so a typo cannot silently fall back
to a default. Errors are reported path-qualified (`listener.port: ...`).
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from hl7bridge.crm.http_config import HttpSinkConfig

__all__ = ["Config", "ConfigError", "load_config"]


#: The YAML file's content while a Config is being built (a source, not global state: reset right after).
_yaml_data: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("_yaml_data")


class ConfigError(ValueError):
    """Invalid configuration. The message lists every problem with its key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(2575, ge=0, le=65535)
    max_connections: int = Field(256, ge=1)
    #: Seconds without a frame before an idle connection is closed (re-armed on every frame).
    idle_timeout: float = Field(600.0, gt=0)
    #: Seconds from <VT> to <FS><CR> before a half-sent frame is abandoned.
    frame_timeout: float = Field(30.0, gt=0)
    max_frame_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    require_trailing_cr: bool = False
    ack_write_timeout: float = Field(30.0, gt=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None


class IntakeConfig(_Section):
    #: after_commit: AA once durably journaled (default, fast). after_apply: AA only once the CRM upsert
    #: succeeded, AE on a permanent failure (end-to-end, slower: the sender waits for the CRM).
    ack_mode: Literal["after_commit", "after_apply"] = "after_commit"
    #: How long to wait for the CRM in after_apply mode before answering AE ("stored, not yet applied").
    after_apply_timeout: float = Field(30.0, gt=0)
    #: Resends of an accepted message (same MSH-3, MSH-4, MSH-10) within this window have no second effect.
    dedup_window_hours: float = Field(72.0, ge=0)
    #: Unsupported types/triggers: reject with AR (default) or accept and journal them as filtered.
    accept_unsupported: bool = False
    default_charset: str = "utf-8"
    #: Identifier type codes (CX-5) that mark the MRN repetition of PID-3.
    mrn_type_codes: tuple[str, ...] = ("MR",)
    #: When non-empty, the MRN repetition's assigning authority (CX-4.1) must be one of these.
    mrn_assigning_authorities: tuple[str, ...] = ()
    include_authority_in_key: bool = False
    #: lenient: intake checks what the ACK, the journal and the mapping need (MSH, PID-3, a supported
    #: type). strict: each message is also validated against its HL7 message structure with hl7apy
    #: (segment order and cardinality, required fields, data types; Z-segments tolerated) and rejected
    #: with AE and the ERR location when it does not conform. Costs ~15-35 ms of CPU per message, so it
    #: suits feeds of tens of messages a second; many real feeds deviate from the standard somewhere.
    validation: Literal["lenient", "strict"] = "lenient"


class DeliveryConfig(_Section):
    #: Patients applied concurrently. Each patient's messages are always applied in arrival order.
    lanes: int = Field(8, ge=1, le=256)
    max_attempts: int = Field(50, ge=1)
    max_age_hours: float = Field(24.0, gt=0)
    backoff_initial: float = Field(0.5, gt=0)
    backoff_max: float = Field(300.0, gt=0)
    #: continue: a dead letter does not block the patient's later messages. hold: they wait for it.
    head_of_line: Literal["continue", "hold"] = "continue"
    #: Upper bound on how long an idle worker waits before looking at the journal again.
    poll_interval: float = Field(1.0, gt=0)
    #: process: the workers run in a child process that `serve` supervises (restarted if it dies), so
    #: delivery and the listener use separate cores and a stuck CRM client cannot stall ACKs.
    #: in_process: workers share the listener's process (one process to watch; slower under load).
    worker: Literal["process", "in_process"] = "process"


class StoreConfig(_Section):
    data_dir: Path = Path("hl7bridge-data")
    #: Journal and CRM in one PostgreSQL database (postgresql://...). Overrides data_dir for both.
    url: str | None = None
    #: Separate journal location (PostgreSQL URL or SQLite file); defaults to url, else data_dir.
    journal: str | None = None
    #: Separate CRM sink location (PostgreSQL URL or SQLite file); defaults to url, else data_dir.
    crm: str | None = None

    def journal_location(self) -> str:
        return self.journal or self.url or str(self.data_dir / "journal.sqlite3")

    def crm_location(self) -> str:
        return self.crm or self.url or str(self.data_dir / "crm.sqlite3")


class OpsConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(9575, ge=0, le=65535)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json")
    #: Log message content (PHI) at DEBUG. Off unless explicitly switched on for troubleshooting.
    log_phi: bool = False


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HL7BRIDGE_", env_nested_delimiter="__", extra="forbid", frozen=True,
        populate_by_name=True,
    )

    listener: ListenerConfig = ListenerConfig()
    intake: IntakeConfig = IntakeConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    store: StoreConfig = StoreConfig()
    ops: OpsConfig = OpsConfig()
    logging: LoggingConfig = LoggingConfig()
    #: Where CRM operations go: the `store` (SQLite in data_dir, or PostgreSQL) or an HTTP CRM (`http:`).
    sink: Literal["store", "http"] = "store"
    #: The HTTP CRM (preset salesforce | hubspot | generic, base_url, auth, rate limit); see docs/http-sink.md.
    http: HttpSinkConfig | None = None
    #: Mapping rules file; None = the built-in default rules.
    rules: Path | None = None
    #: Default facility timezone for timestamps without an offset; None = the system's zone.
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown IANA timezone {v!r}") from exc
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if (self.listener.tls_cert is None) != (self.listener.tls_key is None):
            raise ValueError("listener.tls_cert and listener.tls_key must be given together")
        if self.sink == "http" and self.http is None:
            raise ValueError("sink: http needs an `http:` section (preset, base_url, auth)")
        if self.sink != "http" and self.http is not None:
            raise ValueError("an `http:` section is only used with sink: http")
        return self

    # Sources, highest precedence first: flags (init kwargs), environment, the YAML file.
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, _yaml_data.get({})))


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {path}: {err['msg']}")
    return "\n".join(lines)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the one Config of this process. `overrides`: CLI flags as nested dicts (None = not given)."""
    data: dict[str, Any] = {}
    source = "defaults + environment"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = loaded or {}
    flags = _drop_none(overrides or {})
    try:
        token = _yaml_data.set(data)
        try:
            return Config(**flags)  # pydantic-settings deep-merges the sources, key by nested key
        finally:
            _yaml_data.reset(token)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from exc


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            sub = _drop_none(v)
            if sub:
                out[k] = sub
        elif v is not None:
            out[k] = v
    return out
