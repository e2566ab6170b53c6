"""Value transforms: HL7 source value -> CRM field value. Pure functions, no I/O.

A transform gets the resolved source (`Found`), its validated arguments and a per-message `Context`
(facility time zone, phone defaults, code tables, the message view for extra paths). It returns the CRM
value, or None for "nothing to set" (the field is left unchanged). HL7 explicit null (`""`) never reaches
a transform: the compiler turns it into "clear the field" first.

Failures raise `BadFieldValue` naming the HL7 location (ERR-2) and never the value.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal

import phonenumbers
from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator

from hl7bridge.errors import BadFieldValue, ErrCode
from hl7bridge.hl7.access import Found, MessageView, Path, Rep, compile_path
from hl7bridge.hl7.timestamps import format_date, format_iso, parse_date, parse_dtm

__all__ = ["TRANSFORMS", "CodeTableData", "Context", "DestType", "Transform", "read_dtm"]

#: Destination value types (the data map's "destination type" column).
DestType = Literal["string", "date", "datetime", "integer"]
Value = str | int | None


@dataclass(frozen=True, slots=True)
class CodeTableData:
    """A compiled code table: keys casefolded; `default` None means an unknown code is an error (103)."""

    mapping: Mapping[str, str]
    default: str | None = None


@dataclass(frozen=True, slots=True)
class Context:
    """What a transform may know about the message beyond its own source value."""

    view: MessageView
    zone: tzinfo  # the sending facility's zone, for timestamps without an offset
    phone_region: str = "US"
    country_code: str = "1"
    code_tables: Mapping[str, CodeTableData] = field(default_factory=dict)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Transform:
    name: str
    output: DestType
    args_model: type[_Args]
    fn: Callable[[Found | None, Any, Context], Value]
    describe: Callable[[Any, Mapping[str, CodeTableData]], str]
    #: Called even when the source is absent (the transform has fallbacks of its own).
    reads_absent: bool = False


def _bad(what: str, location: str, code: ErrCode = ErrCode.DATA_TYPE) -> BadFieldValue:
    return BadFieldValue(f"{what} in {location}", err_code=code, location=location)


# --- text, names ---------------------------------------------------------------------------------------


class _NoArgs(_Args):
    pass


Case = Literal["as_sent", "title", "upper", "lower"]


class _NameArgs(_Args):
    case: Case = "as_sent"


def _title_word(word: str) -> str:
    low = word.lower()
    if low.startswith("mc") and len(low) > 2:  # McDonald, not Mcdonald
        return "Mc" + low[2:3].upper() + low[3:]
    return low[:1].upper() + low[1:]


def _recase(text: str, case: Case) -> str:
    if case == "upper":
        return text.upper()
    if case == "lower":
        return text.lower()
    if case == "title":  # word parts split on spaces, hyphens and apostrophes: O'Brien, Smith-Jones
        return re.sub(r"[^\s\-']+", lambda m: _title_word(m.group(0)), text)
    return text


def _text(found: Found | None, args: _NoArgs, ctx: Context) -> Value:
    return found.text.strip() or None if found else None


def _name(found: Found | None, args: _NameArgs, ctx: Context) -> Value:
    text = found.text.strip() if found else ""
    return _recase(text, args.case) if text else None


class _PersonArgs(_Args):
    #: XPN (family name in component 1) or XCN (an ID first, family name in component 2).
    type: Literal["XPN", "XCN"] = "XPN"
    order: Literal["given_family", "family_given"] = "given_family"
    case: Case = "as_sent"


def _leaf(rep: Rep, comp: int) -> str:
    return rep[comp - 1][0].strip() if comp <= len(rep) and rep[comp - 1] else ""


def _person_name(found: Found | None, args: _PersonArgs, ctx: Context) -> Value:
    if found is None:
        return None
    shift = 1 if args.type == "XCN" else 0
    for rep in found.reps:
        family, given = _leaf(rep, 1 + shift), _leaf(rep, 2 + shift)
        if family or given:
            parts = [given, family] if args.order == "given_family" else [family, given]
            sep = " " if args.order == "given_family" else ", "
            return _recase(sep.join(p for p in parts if p), args.case)
    return None


class _IntegerArgs(_Args):
    pass


def _integer(found: Found | None, args: _IntegerArgs, ctx: Context) -> Value:
    text = found.text.strip() if found else ""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise _bad("not an integer", found.location if found else "") from None


# --- dates and times -------------------------------------------------------------------------------------
# Parsing is cached on the exact text: a patient's birth date comes back in every message, and event times
# repeat within a second of traffic. The results are immutable and a parse error is never cached (it is
# raised again, alike, on the next call), so a cached answer is the uncached one.


def read_dtm(text: str, zone: tzinfo, location: str) -> datetime:
    """`parse_dtm(text, zone, location=location)`, cached."""
    try:
        return _read_dtm(text, zone, location)
    except TypeError:  # a zone that cannot be hashed: parse uncached
        return parse_dtm(text, zone, location=location)


@functools.lru_cache(maxsize=4096)
def _read_dtm(text: str, zone: tzinfo, location: str) -> datetime:
    return parse_dtm(text, zone, location=location)


@functools.lru_cache(maxsize=4096)
def _date_text(text: str, location: str) -> str:
    return format_date(parse_date(text, location=location))


def _date(found: Found | None, args: _NoArgs, ctx: Context) -> Value:
    if found is None or not found.text.strip():
        return None
    return _date_text(found.text, found.location)


class _DatetimeArgs(_Args):
    #: `local`: keep the value's own offset, or the facility's; `utc`: convert to +00:00.
    output: Literal["local", "utc"] = "local"


def _datetime(found: Found | None, args: _DatetimeArgs, ctx: Context) -> Value:
    if found is None or not found.text.strip():
        return None
    dt = read_dtm(found.text, ctx.zone, found.location)
    return format_iso(dt.astimezone(UTC) if args.output == "utc" else dt)


#: Duration units (SCH-10, TQ1-6.2, AIS-8; ANSI/ISO+ and UCUM spellings) -> minutes per unit.
_UNITS = {
    **dict.fromkeys(("", "min", "mins", "minute", "minutes", "m"), 1.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 60.0),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1 / 60),
    **dict.fromkeys(("d", "day", "days"), 1440.0),
}


def _path(value: str | None) -> str | None:
    if value is not None:
        compile_path(value)  # PathError is a ValueError: pydantic reports it at this argument
    return value


class _DurationArgs(_Args):
    #: For each source location, where its units are (`SCH-9: SCH-10`); no entry or empty units = minutes.
    units: dict[str, str] = {}
    #: When no amount is sent: end - start.
    start: str | None = None
    end: str | None = None
    _paths: dict[str, Path] = PrivateAttr(default_factory=dict)

    @field_validator("units")
    @classmethod
    def _check_units(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v.values():
            _path(path)
        return v

    @field_validator("start", "end")
    @classmethod
    def _check_ends(cls, v: str | None) -> str | None:
        return _path(v)

    def model_post_init(self, _ctx: Any) -> None:
        self._paths.update({k: compile_path(v) for k, v in self.units.items()})
        for key in ("start", "end"):
            if getattr(self, key):
                self._paths["@" + key] = compile_path(getattr(self, key))


def _duration(found: Found | None, args: _DurationArgs, ctx: Context) -> Value:
    if found is not None and found.text.strip():
        try:
            amount = float(found.text.strip())
        except ValueError:
            raise _bad("not a number", found.location) from None
        units_path = args._paths.get(found.location)
        units_hit = units_path.resolve(ctx.view) if units_path else None
        units = units_hit.text.strip() if isinstance(units_hit, Found) else ""
        factor = _UNITS.get(units.casefold())
        if factor is None:
            where = units_path.location if units_path else found.location
            raise _bad("unknown duration unit", where, ErrCode.TABLE_VALUE_NOT_FOUND)
        return round(amount * factor)
    start_path, end_path = args._paths.get("@start"), args._paths.get("@end")
    if start_path is None or end_path is None:
        return None
    start, end = start_path.resolve(ctx.view), end_path.resolve(ctx.view)
    if not (isinstance(start, Found) and isinstance(end, Found)):
        return None
    begin = read_dtm(start.text, ctx.zone, start.location)
    finish = read_dtm(end.text, ctx.zone, end.location)
    minutes = (finish - begin).total_seconds() / 60
    if minutes < 0:
        raise _bad("end before start", end.location)
    return round(minutes)


# --- phone and e-mail ------------------------------------------------------------------------------------


class _PhoneArgs(_Args):
    region: str | None = None  # default: settings.phone.default_region
    country_code: str | None = None  # default: settings.phone.default_country_code
    on_invalid: Literal["error", "ignore"] = "error"

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and v.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {v!r}")
        return v.upper() if v else v


#: XTN-2 use code / XTN-3 equipment types that are not voice numbers.
_NOT_VOICE_USE = {"net"}
_NOT_VOICE_EQUIPMENT = {"internet", "x.400", "fx", "bp", "md"}


#: "+1" and ten ASCII digits, the first 2-9: the shape XTN-5/6/7 of a NANP number takes (see `_e164`).
_NANP_E164 = re.compile(r"\+1[2-9][0-9]{9}")
_NON_DIGITS = re.compile(r"\D")


@functools.lru_cache(maxsize=8192)
def _e164(text: str, region: str | None) -> str | None:
    # Cached: phonenumbers costs ~25 µs a number, and a patient's number repeats in every message.
    if region is None and _NANP_E164.fullmatch(text):
        # What phonenumbers.parse makes of this shape, without its generic parsing (half the cost): country
        # code 1, the ten digits as the national number (no national prefix to strip, as the first digit
        # is not 1; no leading zero). Validity is still phonenumbers' own check, and the E.164 spelling of
        # that number is the text itself. tests/unit/test_mapping_phone_fastpath.py holds the two routes to
        # the same answer.
        number = phonenumbers.PhoneNumber(country_code=1, national_number=int(text[2:]))
        return text if phonenumbers.is_valid_number(number) else None
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    # E.164 cannot carry an extension: format_number drops it.
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _xtn_number(rep: Rep, args: _PhoneArgs, ctx: Context) -> tuple[bool, str | None]:
    """(carries a number, E.164 or None if unparseable): XTN-5/6/7 when sent, else XTN-1 free text."""
    area = _NON_DIGITS.sub("", _leaf(rep, 6))
    local = _NON_DIGITS.sub("", _leaf(rep, 7))
    if area or local:
        country = _NON_DIGITS.sub("", _leaf(rep, 5)) or args.country_code or ctx.country_code
        return True, _e164(f"+{country}{area}{local}", None)
    free = _leaf(rep, 1)
    if not free:
        return False, None
    return True, _e164(free, args.region or ctx.phone_region)


def _phone(found: Found | None, args: _PhoneArgs, ctx: Context) -> Value:
    if found is None:
        return None
    if "." in found.location:  # a leaf path (e.g. PID-13[PRN].1): free text
        reps: tuple[Rep, ...] = (((found.text,),),)
    else:  # the whole field: the first voice repetition; an empty one means "not sent", look further
        reps = found.reps
    for rep in reps:
        if _leaf(rep, 2).casefold() in _NOT_VOICE_USE or _leaf(rep, 3).casefold() in _NOT_VOICE_EQUIPMENT:
            continue
        has_number, e164 = _xtn_number(rep, args, ctx)
        if not has_number:
            continue
        if e164 is None and args.on_invalid == "error":
            raise _bad("invalid phone number", found.location)
        if e164 is not None:
            return e164
    return None


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class _EmailArgs(_Args):
    on_invalid: Literal["error", "ignore"] = "error"


def _email(found: Found | None, args: _EmailArgs, ctx: Context) -> Value:
    text = found.text.strip() if found else ""
    if not text or found is None:
        return None
    if not _EMAIL.match(text):
        if args.on_invalid == "ignore":
            return None
        raise _bad("invalid e-mail address", found.location)
    local, _, domain = text.rpartition("@")
    return f"{local}@{domain.lower()}"  # domains are case-insensitive; local parts, strictly, are not


# --- codes -------------------------------------------------------------------------------------------------


class _CodeArgs(_Args):
    table: str  # a name under code_tables (checked at load time)


def _lookup(table: CodeTableData, name: str, found: Found) -> str:
    value = table.mapping.get(found.text.strip().casefold())
    if value is None:
        if table.default is None:
            raise _bad(f"code not in table {name}", found.location, ErrCode.TABLE_VALUE_NOT_FOUND)
        value = table.default
    return value


def _code(found: Found | None, args: _CodeArgs, ctx: Context) -> Value:
    if found is None or not found.text.strip():
        return None
    return _lookup(ctx.code_tables[args.table], args.table, found)


_SEX = CodeTableData({"f": "F", "m": "M", "o": "O", "u": "U", "a": "O", "n": "U"})


def _sex(found: Found | None, args: _NoArgs, ctx: Context) -> Value:
    if found is None or not found.text.strip():
        return None
    return _lookup(_SEX, "sex", found)


def _describe_table(name: str, tables: Mapping[str, CodeTableData]) -> str:
    table = tables.get(name)
    if table is None:
        return f"code table {name}"
    pairs = ", ".join(f"{k}→{v}" for k, v in table.mapping.items())
    other = f"anything else → {table.default}" if table.default is not None else "unknown → error 103"
    return f"code table {name} ({pairs}; {other})"


def _t(name: str, output: DestType, model: type[_Args], fn: Callable[..., Value],
       describe: Callable[[Any, Mapping[str, CodeTableData]], str], reads_absent: bool = False) -> Transform:
    return Transform(name, output, model, fn, describe, reads_absent)


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        _t("text", "string", _NoArgs, _text, lambda a, _: "as sent (escapes decoded, trimmed)"),
        _t("name", "string", _NameArgs, _name, lambda a, _: f"name, escapes decoded, case {a.case}"),
        _t("person_name", "string", _PersonArgs, _person_name,
           lambda a, _: f"{a.type} rendered as a name ({a.order}), case {a.case}"),
        _t("integer", "integer", _IntegerArgs, _integer, lambda a, _: "integer"),
        _t("date", "date", _NoArgs, _date,
           lambda a, _: "YYYY-MM-DD from the first 8 characters; never timezone-converted"),
        _t("datetime", "datetime", _DatetimeArgs, _datetime,
           lambda a, _: "ISO 8601 with offset: the value's own, else the facility time zone's (DST-aware)"
           + ("; converted to UTC" if a.output == "utc" else "")),
        _t("duration", "integer", _DurationArgs, _duration,
           lambda a, _: "minutes; units from " + (", ".join(f"{k}→{v}" for k, v in a.units.items()) or "none")
           + (f"; else end − start ({a.end} − {a.start})" if a.start and a.end else ""), reads_absent=True),
        _t("phone", "string", _PhoneArgs, _phone,
           lambda a, _: "E.164 from the first voice repetition: XTN-5/6/7, else XTN-1 text; extension dropped"
           + (f"; region {a.region}" if a.region else "")),
        _t("email", "string", _EmailArgs, _email, lambda a, _: "e-mail address, domain lower-cased"),
        _t("code", "string", _CodeArgs, _code, lambda a, tables: _describe_table(a.table, tables)),
        _t("sex", "string", _NoArgs, _sex, lambda a, _: "F, M, O, U (A → O, N → U)"),
    )
}
