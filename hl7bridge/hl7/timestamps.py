"""HL7 DTM/TS values as timezone-aware datetimes, and birth dates that are never timezone-converted.

An HL7 timestamp is `YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`. When the value carries its own offset
that offset is the truth. When it does not, the wall-clock time is read in the sending facility's zone
(`zoneinfo`, so DST rules come from the tz database that the `tzdata` package ships):

- a wall time that does not exist (the spring-forward gap, e.g. 02:30 on the day clocks jump 02:00 -> 03:00)
  is shifted forward by the length of the gap (02:30 -> 03:30 daylight time): the sender's clock could not
  have shown it, and forward is what a clock that missed the jump would mean;
- a wall time that happens twice (the autumn fall-back hour) is read as the first occurrence (`fold=0`,
  daylight time), the PEP 495 default. HL7 feeds without offsets cannot say which one they meant.

Errors are `BadFieldValue` (ERR-3 102) naming the HL7 location, never the value (PHI hygiene).
"""

from __future__ import annotations

import os
import re
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hl7bridge.errors import BadFieldValue, ErrCode

__all__ = [
    "format_date",
    "format_iso",
    "get_zone",
    "localize",
    "parse_date",
    "parse_dtm",
    "system_timezone",
]

_DTM = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<frac>\d{1,4}))?(?P<off>[+-]\d{4})?$"
)
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


def _bad(what: str, location: str) -> BadFieldValue:
    where = f" in {location}" if location else ""
    return BadFieldValue(f"invalid {what}{where}", err_code=ErrCode.DATA_TYPE, location=location or None)


def get_zone(name: str) -> ZoneInfo:
    """The IANA zone `name`; ValueError (naming the zone, which is configuration, not PHI) when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def system_timezone() -> tzinfo:
    """The host's zone with its DST rules (not a fixed offset): $TZ, else /etc/localtime, else UTC.

    Called once at start-up when neither the rules nor `--timezone` name a default zone.
    """
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return get_zone(name)
        except ValueError:
            pass
    localtime = Path("/etc/localtime")
    try:
        target = str(localtime.resolve())
        if "zoneinfo/" in target:
            return get_zone(target.split("zoneinfo/", 1)[1])
        with localtime.open("rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    except (OSError, ValueError):
        return UTC


def localize(naive: datetime, zone: tzinfo) -> datetime:
    """Attach `zone` to a wall-clock time, DST-correct (see the module docstring for gaps and folds)."""
    aware = naive.replace(tzinfo=zone, fold=0)
    # The round trip through UTC turns a nonexistent wall time into the real one after the gap and
    # leaves every existing wall time (including the first occurrence of an ambiguous one) unchanged.
    return aware.astimezone(UTC).astimezone(zone)


def parse_dtm(text: str, zone: tzinfo, *, location: str = "") -> datetime:
    """Parse an HL7 DTM (or the first component of a TS) into an aware datetime.

    Missing month/day default to 1 and missing time parts to 0. The value's own offset wins; without
    one, the wall time is read in `zone`.
    """
    m = _DTM.match(text.strip())
    if m is None:
        raise _bad("date/time", location)
    parts = m.groupdict()
    if parts["frac"] and not parts["s"]:
        raise _bad("date/time", location)
    frac = parts["frac"] or ""
    micro = int(frac.ljust(6, "0")) if frac else 0
    try:
        naive = datetime(
            int(parts["y"]),
            int(parts["mo"] or 1),
            int(parts["d"] or 1),
            int(parts["h"] or 0),
            int(parts["mi"] or 0),
            int(parts["s"] or 0),
            micro,
        )
    except ValueError:
        raise _bad("date/time", location) from None
    off = parts["off"]
    if off:
        hours, minutes = int(off[1:3]), int(off[3:5])
        if hours > 14 or minutes > 59:
            raise _bad("UTC offset", location)
        delta = timedelta(hours=hours, minutes=minutes)
        return naive.replace(tzinfo=timezone(-delta if off[0] == "-" else delta))
    return localize(naive, zone)


def parse_date(text: str, *, location: str = "") -> date:
    """The calendar date in the first 8 characters (YYYYMMDD) of a DT/DTM/TS value.

    Used for birth dates: any time or offset after the date is ignored and the date is never shifted
    between zones (a person born on the 14th was born on the 14th everywhere).
    """
    m = _DATE.match(text.strip()[:8])
    if m is None:
        raise _bad("date", location)
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        raise _bad("date", location) from None


def format_iso(dt: datetime) -> str:
    """ISO 8601 with its UTC offset, e.g. `2026-10-31T23:30:00-04:00` (fractions only when present)."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("refusing to format a naive datetime")
    return dt.isoformat(timespec="seconds" if dt.microsecond == 0 else "microseconds")


def format_date(d: date) -> str:
    """YYYY-MM-DD."""
    return d.isoformat()
