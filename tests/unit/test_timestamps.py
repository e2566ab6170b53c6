"""HL7 timestamps: own offsets win, facility zones otherwise, DST gaps and folds, birth dates untouched."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from hl7bridge.errors import BadFieldValue, ErrCode
from hl7bridge.hl7.timestamps import format_iso, get_zone, localize, parse_date, parse_dtm

NY = ZoneInfo("America/New_York")
CHICAGO = ZoneInfo("America/Chicago")


def test_explicit_offset_is_honoured_whatever_the_facility_zone() -> None:
    dt = parse_dtm("20261120143000-0500", CHICAGO)
    assert dt.utcoffset() == timedelta(hours=-5)
    assert dt.astimezone(UTC) == datetime(2026, 11, 20, 19, 30, tzinfo=UTC)
    assert format_iso(dt) == "2026-11-20T14:30:00-05:00"


def test_positive_offset_and_fractional_seconds() -> None:
    dt = parse_dtm("20260315081500.25+0530", NY)
    assert format_iso(dt) == "2026-03-15T08:15:00.250000+05:30"


def test_no_offset_uses_the_zone_on_the_evening_before_dst_ends() -> None:
    # 23:30 local on Oct 31, DST ends Nov 1 at 02:00: still EDT (-04:00).
    dt = parse_dtm("20261031233000", NY)
    assert dt.astimezone(UTC) == datetime(2026, 11, 1, 3, 30, tzinfo=UTC)
    assert dt.date() == date(2026, 10, 31)
    assert format_iso(dt) == "2026-10-31T23:30:00-04:00"


def test_nonexistent_spring_forward_time_moves_forward_by_the_gap() -> None:
    dt = parse_dtm("202603080230", NY)  # 02:30 does not exist on 2026-03-08 in New York
    assert format_iso(dt) == "2026-03-08T03:30:00-04:00"
    assert dt.astimezone(UTC) == datetime(2026, 3, 8, 7, 30, tzinfo=UTC)


def test_ambiguous_fall_back_time_is_the_first_occurrence() -> None:
    dt = parse_dtm("202611010130", NY)  # 01:30 happens twice; fold=0 is the EDT one
    assert format_iso(dt) == "2026-11-01T01:30:00-04:00"
    assert localize(datetime(2026, 11, 1, 1, 30), NY).fold == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2026", "2026-01-01T00:00:00-05:00"), ("202607", "2026-07-01T00:00:00-04:00"),
     ("2026071209", "2026-07-12T09:00:00-04:00"), (" 20260712091500 ", "2026-07-12T09:15:00-04:00")],
)
def test_reduced_precision(text: str, expected: str) -> None:
    assert format_iso(parse_dtm(text, NY)) == expected


@pytest.mark.parametrize("text", ["", "2026-07-12", "20261332", "202607120960", "2026071209.5", "20260712+2500",
                                  "abc", "2026071"])
def test_bad_values_are_data_type_errors_without_the_value(text: str) -> None:
    with pytest.raises(BadFieldValue) as info:
        parse_dtm(text, NY, location="SCH-11.4")
    assert info.value.err_code == ErrCode.DATA_TYPE
    assert info.value.location == "SCH-11.4"
    assert "SCH-11.4" in str(info.value)
    if text.strip():
        assert text.strip() not in str(info.value)


def test_birth_date_ignores_time_and_offset() -> None:
    assert parse_date("19800214") == date(1980, 2, 14)
    # Late evening with an offset that would roll into the next UTC day: still the 14th.
    assert parse_date("198002142330-0800") == date(1980, 2, 14)


@pytest.mark.parametrize("text", ["1980", "198002", "19800230", "x9800214"])
def test_bad_birth_dates(text: str) -> None:
    with pytest.raises(BadFieldValue) as info:
        parse_date(text, location="PID-7")
    assert info.value.location == "PID-7"


def test_format_iso_refuses_naive() -> None:
    with pytest.raises(ValueError):
        format_iso(datetime(2026, 1, 1))


def test_unknown_zone() -> None:
    with pytest.raises(ValueError, match="Mars/Olympus"):
        get_zone("Mars/Olympus")
