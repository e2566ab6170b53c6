"""The go-live protocol of product.md, end to end through the real listener, on the SQLite and the
PostgreSQL sink: what a clinic checks before it trusts the integration."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hl7bridge.app import App
from tests.bridge import running_bridge, send_all, wait_for
from tests.messages import adt, siu
from tests.pgserver import PgServer

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"data_dir": tmp_path / "data"}
    pg: PgServer = request.getfixturevalue("pg_server")
    return {"data_dir": tmp_path / "data", "url": pg.create_database()}


def _fixture(fixtures_dir: Path, name: str) -> bytes:
    return (fixtures_dir / name).read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


async def _send_ok(app: App, *payloads: bytes) -> None:
    acks = await send_all(app.mllp.port, list(payloads))
    assert all(a[0] in ("AA", "CA") for a in acks), acks


async def test_go_live_protocol(store: dict[str, Any], tmp_path: Path, fixtures_dir: Path) -> None:
    async with running_bridge(tmp_path / "data", store=store) as app:
        sink = app.sink
        # 1. New patient -> contact with all mapped fields, no duplicate.
        await _send_ok(app, _fixture(fixtures_dir, "adt_a04.hl7"))
        contacts = await wait_for(lambda: sink.contacts("123456"))
        assert len(contacts) == 1
        c = contacts[0]
        assert (c.first_name, c.last_name, c.birth_date, c.sex) == ("Jane", "Doe", "1980-02-14", "F")
        assert (c.phone, c.email) == ("+12175550123", "jane.doe@example.com")
        assert (c.address_line1, c.city, c.state, c.postal_code) == ("123 Main St", "Springfield", "IL", "62704")
        assert c.contact_id
        await _send_ok(app, _fixture(fixtures_dir, "adt_a04.hl7").replace(b"MSG00001", b"MSG00001R"))
        await wait_for(lambda: app.journal.counts().get("pending", 0) == 0)
        assert len(sink.contacts()) == 1  # a second A04 for the same MRN never duplicates

        # 2. Book an appointment -> linked to the right contact, fields right.
        await _send_ok(app, _fixture(fixtures_dir, "siu_s12.hl7"))
        appts = await wait_for(lambda: sink.appointments("123456"))
        a = appts[0]
        assert a.appointment_id == "FL-99001" and a.contact_id == c.contact_id and a.mrn == "123456"
        assert datetime.fromisoformat(a.start) == datetime(2026, 11, 20, 19, 30, tzinfo=UTC)
        assert (a.duration_minutes, a.status, a.type, a.provider, a.location) == (
            30, "scheduled", "Office visit", "1234", "NC-CLINIC")

        # 3. Cancel -> cancelled.
        await _send_ok(app, _fixture(fixtures_dir, "siu_s15.hl7"))
        await wait_for(lambda: sink.appointments("123456")[0].status == "cancelled")

        # 4. Phone change in the EHR propagates...
        await _send_ok(app, _fixture(fixtures_dir, "adt_a08.hl7"))
        await wait_for(lambda: sink.contacts("123456")[0].phone == "+12175550199")
        assert sink.contacts("123456")[0].address_line1 == "456 Oak Ave"
        # ...and a CRM-side edit is kept or overwritten exactly as the phone's rule (`newest`) says.
        sink.edit("contact", "123456", {"phone": "+12175550777"}, datetime(2026, 11, 17, 12, 0, tzinfo=UTC))
        older = adt("A08", mrn="123456", facility="NORTHCLINIC", cid="PH-OLD", phone="^PRN^PH^^1^217^5550001",
                    when="20261116120000-0500")  # an EHR change made before the CRM edit: CRM value stays
        await _send_ok(app, older)
        await wait_for(lambda: app.journal.counts().get("pending", 0) == 0)
        assert sink.contacts("123456")[0].phone == "+12175550777"
        newer = adt("A08", mrn="123456", facility="NORTHCLINIC", cid="PH-NEW", phone="^PRN^PH^^1^217^5550002",
                    when="20261118120000-0500")  # an EHR change after the CRM edit: EHR wins
        await _send_ok(app, newer)
        await wait_for(lambda: sink.contacts("123456")[0].phone == "+12175550002")

        # 5. Volume: 50 patients and 50 appointments at once over several connections.
        patients = [adt("A04", mrn=f"VOL{i:03d}", cid=f"VOLP{i:03d}", family=f"Family{i}", given="Pat",
                        phone=f"^PRN^PH^^1^312^555{i:04d}") for i in range(50)]
        appts_msgs = [siu("S12", appt=f"VA{i:03d}", mrn=f"VOL{i:03d}", cid=f"VOLA{i:03d}",
                          start=f"202612{1 + i % 28:02d}0900-0600") for i in range(50)]
        both = patients + appts_msgs
        acks = await asyncio.gather(*(send_all(app.mllp.port, both[i::5]) for i in range(5)))
        assert all(a[0] == "AA" for batch in acks for a in batch)
        await wait_for(lambda: len([x for x in sink.contacts() if x.mrn.startswith("VOL")]) == 50
                       and len([x for x in sink.appointments() if x.appointment_id.startswith("VA")]) == 50,
                       timeout=60)
        await wait_for(lambda: app.journal.counts().get("pending", 0) == 0, timeout=30)
        by_mrn = {x.mrn: x for x in sink.contacts() if x.mrn.startswith("VOL")}
        for i in range(50):
            assert by_mrn[f"VOL{i:03d}"].last_name == f"Family{i}"
            assert by_mrn[f"VOL{i:03d}"].phone == f"+1312555{i:04d}"
        for ap in (x for x in sink.appointments() if x.appointment_id.startswith("VA")):
            i = int(ap.appointment_id[2:])
            assert ap.contact_id == by_mrn[f"VOL{i:03d}"].contact_id
            assert datetime.fromisoformat(ap.start) == datetime(2026, 12, 1 + i % 28, 15, 0, tzinfo=UTC)
        assert app.journal.counts().get("dead", 0) == 0


async def test_dst_evening_before_change_lands_on_the_right_instant_and_day(
    store: dict[str, Any], tmp_path: Path, fixtures_dir: Path
) -> None:
    async with running_bridge(tmp_path / "data", store=store, timezone="America/New_York") as app:
        await _send_ok(app, _fixture(fixtures_dir, "siu_s12_no_offset.hl7"))
        appt = (await wait_for(lambda: app.sink.appointments()))[0]
        start = datetime.fromisoformat(appt.start)
        assert start == datetime(2026, 11, 1, 3, 30, tzinfo=UTC)  # 23:30 EDT (UTC-4), the day before DST ends
        from zoneinfo import ZoneInfo

        assert start.astimezone(ZoneInfo("America/New_York")).date().isoformat() == "2026-10-31"


async def test_merge_leaves_one_contact_with_all_appointments(
    store: dict[str, Any], tmp_path: Path, fixtures_dir: Path
) -> None:
    async with running_bridge(tmp_path / "data", store=store) as app:
        await _send_ok(
            app,
            adt("A04", mrn="654321", cid="MRG-0", when="20261115080000-0500"),
            siu("S12", appt="OLD-APPT", mrn="654321", cid="MRG-1", when="20261115090000-0500"),
            adt("A04", mrn="123456", cid="MRG-2", when="20261115100000-0500"),
            siu("S12", appt="NEW-APPT", mrn="123456", cid="MRG-3", when="20261115110000-0500"),
        )
        await wait_for(lambda: len(app.sink.appointments()) == 2)
        await _send_ok(app, _fixture(fixtures_dir, "adt_a40.hl7"))
        await wait_for(lambda: len(app.sink.contacts()) == 1)
        survivor = app.sink.contacts()[0]
        assert survivor.mrn == "123456"
        appts = app.sink.appointments()
        assert {a.appointment_id for a in appts} == {"OLD-APPT", "NEW-APPT"}
        assert {a.contact_id for a in appts} == {survivor.contact_id}
        assert {a.mrn for a in appts} == {"123456"}


async def test_stale_message_after_newer_one_does_not_regress(store: dict[str, Any], tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data", store=store) as app:
        newer = adt("A08", mrn="ST1", cid="ST-NEW", phone="^PRN^PH^^1^217^5552222", family="Newname",
                    when="20261116120000-0500")
        older = adt("A08", mrn="ST1", cid="ST-OLD", phone="^PRN^PH^^1^217^5551111", family="Oldname",
                    when="20261115120000-0500")
        await _send_ok(app, newer, older)
        await wait_for(lambda: app.journal.counts().get("pending", 0) == 0)
        c = app.sink.contacts("ST1")[0]
        assert (c.last_name, c.phone) == ("Newname", "+12175552222")


async def test_iso_8859_1_and_escapes_and_repeated_identifiers(
    store: dict[str, Any], tmp_path: Path, fixtures_dir: Path
) -> None:
    async with running_bridge(tmp_path / "data", store=store) as app:
        await _send_ok(app, _fixture(fixtures_dir, "adt_a28.hl7"))
        escaped = adt("A04", mrn="ESC1", cid="ESC-1", family="O\\S\\Brien", given="Zo\\XC3AB\\")
        escaped = escaped.replace(b"ESC1^^^NORTHCLINIC^MR", b"E9^^^EPIC^PI~ESC1^^^NORTHCLINIC^MR")
        await _send_ok(app, escaped)
        await wait_for(lambda: app.journal.counts().get("pending", 0) == 0)
        m = app.sink.contacts("77001")[0]
        assert (m.last_name, m.first_name) == ("Müller", "Jürgen")
        assert m.address_line1 == "Hauptstraße 5"
        assert m.phone == "+13125550144"
        e = app.sink.contacts("ESC1")[0]
        assert (e.last_name, e.first_name) == ("O^Brien", "Zoë")
