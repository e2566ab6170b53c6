"""The ACK fast paths produce what the general code would: MSH-10 suffixes across the cached part's
boundaries, and MSH-7 for "now" read from the clock rather than from a datetime."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hl7bridge.hl7 import ack
from hl7bridge.hl7.ack import _base36, _ControlIds, _timestamp, _utc_now_stamp


@pytest.mark.parametrize("start", [0, 1, 1295, 1296, 36**11 - 1300, 36**11 - 1, 123_456_789_012])
def test_control_id_suffix_is_the_counter_in_base36(start: int) -> None:
    ids = _ControlIds()
    ids._next = start
    for k in range(2600):  # crosses at least one 1,296 boundary
        value = (start + k) % 36**11
        assert ids()[9:] == _base36(value, 11)


@pytest.mark.parametrize("ns", [0, 1_763_950_000_000_000_000, 1_763_950_000_999_999_999, 1_763_950_001_000_050_000,
                                4_102_444_799_999_900_000])
def test_now_stamp_matches_the_datetime_path(ns: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ack.time, "time_ns", lambda: ns)
    expected = _timestamp(datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=ns // 1000 % 10**6))
    assert _utc_now_stamp() == expected
    monkeypatch.setattr(ack.time, "time_ns", lambda: ns + 2_000_000_000)  # a later second: cache refreshed
    later = _timestamp(datetime.fromtimestamp(ns // 10**9 + 2, UTC).replace(microsecond=ns // 1000 % 10**6))
    assert _utc_now_stamp() == later


def test_now_stamp_is_current() -> None:
    before = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    stamp = _utc_now_stamp()
    after = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    assert before <= stamp[:14] <= after and stamp.endswith("+0000")
