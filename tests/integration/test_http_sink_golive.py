"""The go-live protocol's five steps against the HTTP sink, for each preset, over real HTTP on loopback:
the exact requests each step sends, and an end state in the test CRM that matches the record model.
Operations come from the real mapper and the fixtures, as the pipeline would produce them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hl7bridge.crm.http import HttpSink, open_http_sink
from hl7bridge.hl7.parse import parse_message
from hl7bridge.mapping import compile_rules, load_rules
from hl7bridge.records import CrmOp
from tests.crmserver import CrmServer, Logged, sink_config
from tests.messages import adt, siu

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
MAPPER = compile_rules(load_rules(None), default_timezone="America/Chicago")
SF = "/services/data/v60.0/sobjects"
SF_C, SF_A = f"{SF}/Contact/HL7_MRN__c", f"{SF}/HL7_Appointment__c/HL7_Appointment_ID__c"
HS = "/crm/v3/objects"
HS_ASSOC = "POST /crm/v4/associations/appointments/contacts/batch/associate/default"
PRESETS = ["salesforce", "hubspot", "generic"]


def fixture_ops(name: str) -> list[CrmOp]:
    raw = (FIXTURES / name).read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    return mapped(raw)


def mapped(raw: bytes, mapper: Any = MAPPER) -> list[CrmOp]:
    ops = mapper.map(parse_message(raw, "utf-8"))
    assert isinstance(ops, list)
    return ops


def hl7_time(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def sync_of(preset: str, body: Any) -> dict[str, Any]:
    if preset == "hubspot":
        body = body["inputs"][0]["properties"]
    raw = body[{"salesforce": "HL7_Sync__c", "hubspot": "hl7_sync_state", "generic": "hl7"}[preset]]
    return json.loads(raw) if isinstance(raw, str) else raw


def written(preset: str, body: Any) -> dict[str, Any]:
    """The fields a write sent, without the sync state (whose fingerprints are not worth spelling out)."""
    if preset == "hubspot":
        body = body["inputs"][0]["properties"]
    return {k: v for k, v in body.items() if k not in ("HL7_Sync__c", "hl7_sync_state", "hl7")}


class Crm:
    def __init__(self, server: CrmServer, sink: HttpSink, preset: str) -> None:
        self.server, self.sink, self.preset = server, sink, preset
        self._mark = 0

    def step(self) -> list[Logged]:
        """The requests sent since the previous call."""
        out = self.server.log[self._mark :]
        self._mark = len(self.server.log)
        return out


@pytest.fixture(params=PRESETS)
def crm(request: pytest.FixtureRequest) -> Iterator[Crm]:
    with CrmServer() as server:
        sink = open_http_sink(sink_config(request.param, server.base_url))
        try:
            yield Crm(server, sink, request.param)
        finally:
            sink.close()


EXPECTED_LINES: dict[str, dict[str, list[str]]] = {
    "salesforce": {
        "new": [f"GET {SF_C}/123456", f"PATCH {SF_C}/123456"],
        "resend": [f"GET {SF_C}/123456"],
        "book": [f"GET {SF_C}/123456", f"GET {SF_A}/FL-99001", f"PATCH {SF_A}/FL-99001"],
        "cancel": [f"GET {SF_C}/123456", f"GET {SF_A}/FL-99001", f"PATCH {SF_A}/FL-99001"],
        "a08": [f"GET {SF_C}/123456", f"PATCH {SF_C}/123456"],
        "edit": [f"GET {SF_C}/123456", "PATCH {SF}/Contact/{id}"],
    },
    "hubspot": {
        "new": [f"POST {HS}/contacts/batch/read", f"POST {HS}/contacts/batch/upsert"],
        "resend": [f"POST {HS}/contacts/batch/read"],
        "book": [f"POST {HS}/contacts/batch/read", f"POST {HS}/appointments/batch/read",
                 f"POST {HS}/appointments/batch/upsert", HS_ASSOC],
        "cancel": [f"POST {HS}/contacts/batch/read", f"POST {HS}/appointments/batch/read",
                   f"POST {HS}/appointments/batch/upsert"],
        "a08": [f"POST {HS}/contacts/batch/read", f"POST {HS}/contacts/batch/upsert"],
        "edit": [f"POST {HS}/contacts/batch/read", "PATCH {HS}/contacts/{id}"],
    },
    "generic": {
        "new": ["GET /api/patients/123456", "PUT /api/patients/123456"],
        "resend": ["GET /api/patients/123456"],
        "book": ["GET /api/patients/123456", "GET /api/appointments/FL-99001", "PUT /api/appointments/FL-99001"],
        "cancel": ["GET /api/patients/123456", "GET /api/appointments/FL-99001", "PUT /api/appointments/FL-99001"],
        "a08": ["GET /api/patients/123456", "PUT /api/patients/123456"],
        "edit": ["GET /api/patients/123456", "PUT /api/patients/123456"],
    },
}

NEW_PATIENT_BODY = {
    "salesforce": {"FirstName": "Jane", "LastName": "Doe", "Birthdate": "1980-02-14", "HL7_Sex__c": "F",
                   "Phone": "+12175550123", "Email": "jane.doe@example.com", "MailingStreet": "123 Main St",
                   "MailingCity": "Springfield", "MailingState": "IL", "MailingPostalCode": "62704"},
    "hubspot": {"firstname": "Jane", "lastname": "Doe", "date_of_birth": "1980-02-14", "hl7_sex": "F",
                "phone": "+12175550123", "email": "jane.doe@example.com", "address": "123 Main St",
                "city": "Springfield", "state": "IL", "zip": "62704"},
    "generic": {"mrn": "123456", "name": {"given": "Jane", "family": "Doe"}, "birth_date": "1980-02-14", "sex": "F",
                "phone": "+12175550123", "email": "jane.doe@example.com",
                "address": {"line1": "123 Main St", "city": "Springfield", "state": "IL", "zip": "62704"}},
}
BOOKING_BODY = {
    "salesforce": {"Start__c": "2026-11-20T19:30:00+00:00", "Duration_Minutes__c": 30, "Status__c": "scheduled",
                   "Type__c": "Office visit", "Provider__c": "1234", "Location__c": "NC-CLINIC",
                   "HL7_Patient_MRN__c": "123456", "Contact__r": {"HL7_MRN__c": "123456"}},
    "hubspot": {"hl7_start": "2026-11-20T19:30:00+00:00", "hl7_duration_minutes": "30", "hl7_status": "scheduled",
                "hl7_type": "Office visit", "hl7_provider": "1234", "hl7_location": "NC-CLINIC",
                "hl7_patient_mrn": "123456"},
    "generic": {"appointment_id": "FL-99001", "patient_mrn": "123456", "start": "2026-11-20T19:30:00+00:00",
                "minutes": 30, "status": "scheduled", "type": "Office visit", "provider": "1234",
                "location": "NC-CLINIC"},
}


def _lines(crm: Crm, got: list[Logged], key: str, rid: str = "") -> None:
    want = [w.format(SF=SF, HS=HS, id=rid) for w in EXPECTED_LINES[crm.preset][key]]
    assert [e.line for e in got] == want
    assert all(200 <= e.status < 300 or (e.method in ("GET", "POST") and e.status in (404, 207)) for e in got)


def test_go_live_protocol_exact_requests_and_end_state(crm: Crm) -> None:
    sink, preset = crm.sink, crm.preset
    # 1. New patient: read by MRN (absent), one upsert with every mapped field and the sync state.
    assert [r.outcome for r in sink.apply(fixture_ops("adt_a04.hl7"))] == ["created"]
    got = crm.step()
    _lines(crm, got, "new")
    assert written(preset, got[1].body) == NEW_PATIENT_BODY[preset]
    event = datetime(2026, 11, 15, 14, 29, 55, tzinfo=UTC)  # EVN-2, 09:29:55-05:00
    assert sync_of(preset, got[1].body)["e"] == event.timestamp() * 1_000_000
    (c,) = sink.contacts("123456")
    assert (c.mrn, c.first_name, c.last_name, c.birth_date, c.sex) == ("123456", "Jane", "Doe", "1980-02-14", "F")
    assert (c.phone, c.email) == ("+12175550123", "jane.doe@example.com")
    assert (c.address_line1, c.city, c.state, c.postal_code) == ("123 Main St", "Springfield", "IL", "62704")
    assert c.contact_id and datetime.fromisoformat(c.updated_at or "").utcoffset() is not None
    crm.step()
    # ...and the EHR resending it has no second effect: one read, no write, still one contact.
    assert [r.outcome for r in sink.apply(fixture_ops("adt_a04.hl7"))] == ["unchanged"]
    _lines(crm, crm.step(), "resend")
    assert len(sink.contacts()) == 1
    crm.step()

    # 2. Book an appointment: linked to the contact by its MRN external ID.
    assert [r.outcome for r in sink.apply(fixture_ops("siu_s12.hl7"))] == ["created"]
    got = crm.step()
    _lines(crm, got, "book")
    assert written(preset, got[2].body) == BOOKING_BODY[preset]
    (a,) = sink.appointments("123456")
    assert (a.appointment_id, a.mrn, a.contact_id) == ("FL-99001", "123456", c.contact_id)
    assert datetime.fromisoformat(a.start or "") == datetime(2026, 11, 20, 19, 30, tzinfo=UTC)
    assert (a.duration_minutes, a.status, a.type, a.provider, a.location) == (
        30, "scheduled", "Office visit", "1234", "NC-CLINIC")
    if preset == "hubspot":
        assert crm.server.associations == {("appointments", crm.server.hs("appointments")[0]["id"], "contacts",
                                            c.contact_id)}
    crm.step()

    # 3. Cancel: only the status (and the sync state) is written.
    assert [r.outcome for r in sink.apply(fixture_ops("siu_s15.hl7"))] == ["updated"]
    got = crm.step()
    _lines(crm, got, "cancel")
    sent = written(preset, got[2].body)
    if preset == "generic":
        assert sent == {**BOOKING_BODY["generic"], "status": "cancelled"}  # PUT: the whole record
    else:
        assert sent == {"salesforce": {"Status__c": "cancelled"}, "hubspot": {"hl7_status": "cancelled"}}[preset]
    assert sink.appointments("123456")[0].status == "cancelled"
    crm.step()

    # 4. Phone change in the EHR...
    sink.apply(fixture_ops("adt_a08.hl7"))
    _lines(crm, crm.step(), "a08")
    assert sink.contacts("123456")[0].phone == "+12175550199"
    crm.step()
    # ...a CRM user edits it (a plain PATCH/PUT, our sync state untouched)...
    now = datetime.now(UTC).replace(microsecond=0)
    sink.edit("contact", "123456", {"phone": "+12175550777"})
    _lines(crm, crm.step(), "edit", c.contact_id)
    assert sink.contacts("123456")[0].phone == "+12175550777"
    crm.step()
    # ...an EHR change made before that edit keeps the CRM's value (`newest`)...
    older = adt("A08", mrn="123456", phone="^PRN^PH^^1^217^5550001", when=hl7_time(now - timedelta(seconds=60)))
    assert sink.apply(mapped(older))[0].outcome == "updated"  # the address of this message differs
    sent = written(preset, crm.step()[-1].body)
    assert sent.get("Phone", sent.get("phone")) in (None, "+12175550777")  # generic PUTs the whole record
    assert sink.contacts("123456")[0].phone == "+12175550777"
    # ...and one made after it wins.
    newer = adt("A08", mrn="123456", phone="^PRN^PH^^1^217^5550002", when=hl7_time(now + timedelta(seconds=60)))
    assert "phone" in sink.apply(mapped(newer))[0].changed_fields
    assert sink.contacts("123456")[0].phone == "+12175550002"
    crm.step()

    # 5. Volume: 50 patients and 50 appointments at once (each patient's messages in order, as lanes do).
    def patient(i: int) -> None:
        sink.apply(mapped(adt("A04", mrn=f"VOL{i:03d}", family=f"Family{i}", given="Pat",
                              phone=f"^PRN^PH^^1^312^555{i:04d}")))
        sink.apply(mapped(siu("S12", appt=f"VA{i:03d}", mrn=f"VOL{i:03d}",
                              start=f"202612{1 + i % 28:02d}0900-0600")))

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(patient, range(50)))
    got = crm.step()
    assert all(200 <= e.status < 300 or e.status in (404, 207) for e in got)
    by_mrn = {x.mrn: x for x in sink.contacts() if x.mrn.startswith("VOL")}
    assert len(by_mrn) == 50
    for i in range(50):
        assert (by_mrn[f"VOL{i:03d}"].last_name, by_mrn[f"VOL{i:03d}"].phone) == (f"Family{i}", f"+1312555{i:04d}")
    appts = [x for x in sink.appointments() if x.appointment_id.startswith("VA")]
    assert len(appts) == 50
    for ap in appts:
        i = int(ap.appointment_id[2:])
        assert ap.contact_id == by_mrn[f"VOL{i:03d}"].contact_id
        assert datetime.fromisoformat(ap.start or "") == datetime(2026, 12, 1 + i % 28, 15, 0, tzinfo=UTC)
    writes = [e for e in got if e.method in ("PATCH", "PUT") or e.path.endswith("/batch/upsert")]
    if preset == "hubspot":
        # Concurrent applies are coalesced: far fewer requests than the 100 messages' 5 each would need.
        assert len(got) < 250
        upserted = [i["id"] for e in writes for i in e.body["inputs"]]
        assert sorted(upserted) == sorted([f"VOL{i:03d}" for i in range(50)] + [f"VA{i:03d}" for i in range(50)])
    else:
        # Each A04: read + upsert; each S12: read contact + read appointment + upsert. Nothing else.
        assert len(got) == 250 and len(writes) == 100


def test_stale_message_writes_nothing_and_idempotent_replay(crm: Crm) -> None:
    newer = adt("A08", mrn="ST1", phone="^PRN^PH^^1^217^5552222", family="Newname", when="20261116120000-0500")
    older = adt("A08", mrn="ST1", phone="^PRN^PH^^1^217^5551111", family="Oldname", when="20261115120000-0500")
    crm.sink.apply(mapped(newer))
    crm.step()
    assert [r.outcome for r in crm.sink.apply(mapped(older))] == ["stale"]
    assert len(crm.step()) == 1  # the read, and nothing written
    c = crm.sink.contacts("ST1")[0]
    assert (c.last_name, c.phone) == ("Newname", "+12175552222")
    crm.step()
    # A replay of the same message (forced, as `replay` does) changes nothing and writes nothing.
    assert [r.outcome for r in crm.sink.apply(mapped(newer), message_key="EPIC|X|1", force=True)] == ["unchanged"]
    assert len(crm.step()) == 1


@pytest.mark.parametrize("rule", ["crm", "ehr"])
def test_phone_conflict_rules_after_a_crm_edit(crm: Crm, rule: str) -> None:
    text = (Path(__file__).resolve().parents[2] / "hl7bridge/mapping/default_rules.yaml").read_text()
    head, _, tail = text.partition("      phone:")
    tail = tail.replace("conflict: newest", f"conflict: {rule}", 1)
    from hl7bridge.mapping import parse_rules

    mapper = compile_rules(parse_rules(head + "      phone:" + tail), default_timezone="UTC")
    now = datetime.now(UTC).replace(microsecond=0)
    crm.sink.apply(mapped(adt("A04", mrn="CR1", when=hl7_time(now - timedelta(seconds=120))), mapper))
    crm.sink.edit("contact", "CR1", {"phone": "+12175550777"})
    later = adt("A08", mrn="CR1", phone="^PRN^PH^^1^217^5550002", when=hl7_time(now + timedelta(seconds=60)))
    crm.sink.apply(mapped(later, mapper))
    # `crm`: the CRM owns the field once set; `ehr`: the EHR always wins.
    assert crm.sink.contacts("CR1")[0].phone == ("+12175550777" if rule == "crm" else "+12175550002")


def test_merge_a40_leaves_one_contact_with_every_appointment(crm: Crm) -> None:
    sink = crm.sink
    sink.apply(mapped(adt("A04", mrn="654321", when="20261115080000-0500")))
    sink.apply(mapped(siu("S12", appt="OLD-APPT", mrn="654321", when="20261115090000-0500")))
    sink.apply(mapped(adt("A04", mrn="123456", family="Survivor", when="20261115100000-0500")))
    sink.apply(mapped(siu("S12", appt="NEW-APPT", mrn="123456", when="20261115110000-0500")))
    assert [r.outcome for r in sink.apply(fixture_ops("adt_a40.hl7"))] == ["merged"]
    (survivor,) = sink.contacts()
    assert (survivor.mrn, survivor.last_name) == ("123456", "Doe")  # the A40's PID is applied after the merge
    appts = sink.appointments()
    assert {a.appointment_id for a in appts} == {"OLD-APPT", "NEW-APPT"}
    assert {(a.mrn, a.contact_id) for a in appts} == {("123456", survivor.contact_id)}
    # Replaying the merge finds no prior contact and changes nothing.
    assert [r.outcome for r in sink.apply(fixture_ops("adt_a40.hl7"))] == ["unchanged"]
    assert len(sink.contacts()) == 1


def test_change_id_a47_renames_the_contact_and_moves_its_appointments(crm: Crm) -> None:
    sink = crm.sink
    sink.apply(mapped(adt("A04", mrn="OLD47", when="20261115080000-0500")))
    before = sink.contacts("OLD47")[0]
    sink.apply(mapped(siu("S12", appt="A47-APPT", mrn="OLD47", when="20261115090000-0500")))
    a47 = adt("A47", mrn="NEW47", when="20261115100000-0500", extra="MRG|OLD47^^^NORTHCLINIC^MR")
    (res,) = sink.apply(mapped(a47))
    assert res.outcome == "updated" and res.changed_fields[0] == "mrn"
    assert sink.contacts("OLD47") == []
    (after,) = sink.contacts("NEW47")
    if crm.preset != "generic":  # generic keys live in the URL: a new record replaces the old one
        assert after.contact_id == before.contact_id
    (appt,) = sink.appointments("NEW47")
    assert (appt.appointment_id, appt.contact_id) == ("A47-APPT", after.contact_id)


def test_golive_cleanup_deletes_exactly_the_prefixed_patients(crm: Crm) -> None:
    for mrn in ("GLX-1", "GLX-2", "KEEP-1"):
        crm.sink.apply(mapped(adt("A04", mrn=mrn)))
        crm.sink.apply(mapped(siu("S12", appt=f"AP-{mrn}", mrn=mrn)))
    assert crm.sink.delete_where_mrn_prefix("GLX-") == 2
    assert [c.mrn for c in crm.sink.contacts()] == ["KEEP-1"]
    assert [a.appointment_id for a in crm.sink.appointments()] == ["AP-KEEP-1"]
    with pytest.raises(ValueError):
        crm.sink.delete_where_mrn_prefix("")


def test_ping_and_edit_of_an_unknown_record(crm: Crm) -> None:
    crm.sink.ping()
    from hl7bridge.errors import PermanentSinkError

    with pytest.raises(PermanentSinkError, match="no such contact"):
        crm.sink.edit("contact", "NOPE", {"phone": "+12175550000"})
