"""The phone transform's NANP shortcut gives exactly what the generic phonenumbers route gives.

`transforms._e164` skips `phonenumbers.parse` for "+1" and ten ASCII digits (first digit 2-9). These
tests hold it to the generic route (parse, is_valid_number, format_number E.164) on every area code,
on generated numbers of that shape, and on near misses that must take the generic route."""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7bridge.mapping import transforms


def _generic(text: str, region: str | None) -> str | None:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _fast(text: str, region: str | None) -> str | None:
    return transforms._e164.__wrapped__(text, region)


def test_every_area_code_agrees() -> None:
    for area in range(200, 1000):
        for local in ("2000000", "5550123", "8675309", "9999999", "1234567", "0123456"):
            text = f"+1{area}{local}"
            assert transforms._NANP_E164.fullmatch(text)
            assert _fast(text, None) == _generic(text, None), text


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=2_000_000_000, max_value=9_999_999_999))
def test_generated_nanp_numbers_agree(national: int) -> None:
    text = f"+1{national}"
    assert _fast(text, None) == _generic(text, None)


@pytest.mark.parametrize("text", [
    "+11234567890",  # first digit 1: a national prefix the generic parser may strip
    "+10234567890",  # leading zero
    "+1217555012",  # nine digits
    "+121755501234",  # eleven digits
    "+1２１７５５５０１２３",  # full-width digits
    "+44 20 7946 0958",
    "+12175550123",
])
def test_near_misses_and_other_shapes_agree(text: str) -> None:
    assert _fast(text, None) == _generic(text, None)
    assert _fast(text, "US") == _generic(text, "US")
