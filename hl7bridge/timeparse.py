"""Parsing of the CLI's time arguments: `--since 2026-11-01`, `--since 2h`, `--older-than 30d`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["parse_duration", "parse_instant"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '2h', '30d', '1w'."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 30d, 1w)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def parse_instant(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or datetime (naive = UTC), or a duration meaning that long ago."""
    now = now or datetime.now(UTC)
    if _DURATION.match(text):
        return now - parse_duration(text)
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"not a time: {text!r} (use ISO 8601 like 2026-11-01T08:00 or a duration like 2h)") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)
