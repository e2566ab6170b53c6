"""The CRM record model: exactly the fields `hl7bridge crm ... --json` prints (see architecture.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["APPOINTMENT_FIELDS", "APPOINTMENT_STATUSES", "CONTACT_FIELDS", "Appointment", "Contact"]

CONTACT_FIELDS = (
    "mrn", "first_name", "last_name", "birth_date", "sex", "phone", "email",
    "address_line1", "city", "state", "postal_code",
)
APPOINTMENT_FIELDS = ("start", "duration_minutes", "status", "type", "provider", "location")
APPOINTMENT_STATUSES = ("scheduled", "confirmed", "cancelled", "no_show", "completed", "deleted")


@dataclass(frozen=True, slots=True)
class Contact:
    contact_id: str
    mrn: str
    first_name: str | None = None
    last_name: str | None = None
    birth_date: str | None = None  # YYYY-MM-DD
    sex: str | None = None  # F, M, O, U
    phone: str | None = None  # E.164
    email: str | None = None
    address_line1: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    updated_at: str | None = None  # ISO 8601 with offset

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Appointment:
    appointment_id: str
    mrn: str | None
    contact_id: str | None
    start: str | None = None  # ISO 8601 with UTC offset
    duration_minutes: int | None = None
    status: str | None = None
    type: str | None = None
    provider: str | None = None
    location: str | None = None
    updated_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
