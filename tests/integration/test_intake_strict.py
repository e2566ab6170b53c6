"""`intake.validation: strict`: hl7apy checks each message against its HL7 structure before the ACK."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bridge import running_bridge, send_all, wait_for

pytestmark = pytest.mark.asyncio

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


async def test_strict_mode_rejects_what_lenient_mode_accepts(tmp_path: Path) -> None:
    conforming, deviating = fixture("adt_a08.hl7"), fixture("adt_a04.hl7")  # adt_a04: "N" in PID-29 (a DTM)
    async with running_bridge(tmp_path / "strict", intake={"validation": "strict"}) as app:
        acks = await send_all(app.mllp.port, [conforming, deviating])
        assert acks[0][0] == "AA"
        assert acks[1][0] == "AE" and acks[1][2] == "102"  # data type error, named by location
        [rejected] = app.journal.query(states=["rejected"])
        assert "PID-29" in rejected.reason and "strict validation" in rejected.reason
        assert "Doe" not in rejected.reason and "Jane" not in rejected.reason
        await wait_for(lambda: app.journal.counts().get("done", 0) == 1, timeout=30)
        # Fixed and resent with the same MSH-10: a rejected message is never a dedup target.
        fixed = deviating.replace(b"|||N||||||||N\r", b"||||||||||N\r")
        assert (await send_all(app.mllp.port, [fixed]))[0][0] == "AA"
    async with running_bridge(tmp_path / "lenient") as app:
        acks = await send_all(app.mllp.port, [conforming, deviating])
        assert [a[0] for a in acks] == ["AA", "AA"]
