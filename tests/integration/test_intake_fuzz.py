"""Bad input gets a clear answer and loses nothing: for any bytes at all, intake answers with a well-formed
ACK (never raises), and every message it could store is in the journal with its raw bytes."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import timedelta
from pathlib import Path

import hl7
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl7bridge.hl7.envelope import DEFAULT_SUPPORTED, PatientIdPolicy
from hl7bridge.pipeline import GroupCommitter, Intake
from hl7bridge.replay import _NullMetrics
from hl7bridge.store import open_journal
from tests.messages import adt, siu

_BASE = [adt(cid="FZ1"), siu(cid="FZ2")]


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """Real messages with random damage: cut, spliced, bytes flipped, separators swapped, or pure noise."""
    kind = draw(st.sampled_from(["noise", "cut", "flip", "splice", "separators"]))
    base = draw(st.sampled_from(_BASE))
    if kind == "noise":
        return draw(st.binary(min_size=0, max_size=300))
    if kind == "cut":
        return base[: draw(st.integers(0, len(base)))]
    if kind == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "splice":
        at = draw(st.integers(0, len(base)))
        return base[:at] + draw(st.binary(max_size=40)) + base[at:]
    return base.replace(b"|", draw(st.sampled_from([b"#", b"^", b"\x00", b"||"])))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mangled(), min_size=1, max_size=4))
def test_intake_always_answers_and_journals(payloads: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        journal = open_journal(Path(tmp) / "journal.sqlite3")
        try:
            intake = Intake(GroupCommitter(journal, timedelta(hours=1)), _NullMetrics(), policy=PatientIdPolicy(),
                            supported=DEFAULT_SUPPORTED)

            async def run() -> list:
                return [await intake.handle(p, "fuzz") for p in payloads]

            outcomes = asyncio.run(run())
            for payload, outcome in zip(payloads, outcomes, strict=True):
                ack = hl7.parse(outcome.payload.decode("utf-8", "replace"))
                assert str(ack.segment("MSH")[9]).startswith("ACK")
                assert str(ack.segment("MSA")[1]) == outcome.code
                if outcome.code not in ("AA", "CA"):
                    assert ack.segment("ERR")  # every NACK says why
                assert outcome.journal_id is not None  # stored, even when rejected
                assert journal.get(outcome.journal_id).raw in (payload, *payloads)
        finally:
            journal.close()
