"""CRM field values: which fields may be set, and the validation every value passes before it is stored.

Shared by the conflict rules (`conflict.py`) and the HTTP presets; errors name the field, never the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime

from hl7bridge.crm.model import APPOINTMENT_FIELDS, APPOINTMENT_STATUSES, CONTACT_FIELDS
from hl7bridge.errors import ErrCode, PermanentSinkError
from hl7bridge.records import Entity

__all__ = ["EDITABLE", "Value", "normalise"]

Value = str | int | None

#: Fields a message or a CRM user may set, per entity (keys and links are managed by the sink).
EDITABLE: Mapping[str, tuple[str, ...]] = {
    "contact": tuple(f for f in CONTACT_FIELDS if f != "mrn"),
    "appointment": APPOINTMENT_FIELDS,
}


#: EDITABLE as sets, for the membership test every value passes.
_EDITABLE_SETS: Mapping[str, frozenset[str]] = {entity: frozenset(names) for entity, names in EDITABLE.items()}


def _bad(entity: str, name: str, what: str) -> PermanentSinkError:
    # Names the field, never the value (PHI).
    return PermanentSinkError(f"crm: {entity} field {name!r} {what}", err_code=ErrCode.DATA_TYPE)


def normalise(entity: Entity, name: str, value: Value) -> Value:
    """Validate one value for the record model; "" means empty, like None."""
    if name not in _EDITABLE_SETS[entity]:
        raise _bad(entity, name, "is not a CRM field")
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _bad(entity, name, "has the wrong type")
    if name == "duration_minutes":
        try:
            minutes = int(value)
        except ValueError:
            raise _bad(entity, name, "is not a whole number") from None
        if minutes < 0:
            raise _bad(entity, name, "is negative")
        return minutes
    text = str(value)
    if name == "birth_date":
        try:
            date.fromisoformat(text)
        except ValueError:
            raise _bad(entity, name, "is not a YYYY-MM-DD date") from None
        if len(text) != 10:
            raise _bad(entity, name, "is not a YYYY-MM-DD date")
    elif name == "start":
        try:
            start = datetime.fromisoformat(text)
        except ValueError:
            raise _bad(entity, name, "is not an ISO 8601 date-time") from None
        if start.utcoffset() is None:
            raise _bad(entity, name, "has no UTC offset")
        text = start.isoformat()  # canonical spelling, offset kept as sent
    elif name == "status" and text not in APPOINTMENT_STATUSES:
        raise _bad(entity, name, "is not a known appointment status")
    return text
