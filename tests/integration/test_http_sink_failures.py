"""Politeness and failure classes of the HTTP sink, over real HTTP on loopback: Retry-After, permanent
errors with the CRM's message PHI-redacted, transient statuses, a CRM that drops connections, secrets.

The end-to-end tests run the real delivery pipeline (Intake + Delivery) with a SQLite journal. The
"drops connections" outage lasts 3 s here, not the issue's 30 s: the behaviour (transient errors, backoff,
nothing lost) is the same, and the suite stays fast."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from hl7bridge import dlq
from hl7bridge.crm.http import HttpSink, HttpSinkConfig, open_http_sink, rules_problems, unsupported_conflicts
from hl7bridge.crm.http_auth import CrmConfigError
from hl7bridge.crm.http_client import redact
from hl7bridge.delivery import Delivery, DeliveryPolicy
from hl7bridge.errors import PermanentSinkError, TransientSinkError
from hl7bridge.hl7.envelope import DEFAULT_SUPPORTED
from hl7bridge.mapping import load_rules
from hl7bridge.pipeline import GroupCommitter, Intake
from hl7bridge.replay import _NullMetrics
from hl7bridge.store import open_journal
from hl7bridge.store.base import Journal
from tests.bridge import wait_for
from tests.crmserver import GENERIC, CrmServer, sink_config
from tests.integration.test_http_sink_golive import MAPPER, PRESETS, mapped
from tests.messages import adt, siu

PHI = ("jane.doe@example.com", "Jane", "Doe", "123456", "5550123")


@pytest.fixture
def server() -> Iterator[CrmServer]:
    with CrmServer() as crm:
        yield crm


@pytest.fixture(params=PRESETS)
def preset(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _sink(server: CrmServer, preset: str = "salesforce", **kw: Any) -> HttpSink:
    return open_http_sink(sink_config(preset, server.base_url, **kw))


A04 = adt("A04", mrn="123456", given="Jane", family="Doe", phone="^PRN^PH^^1^217^5550123")


# --- direct: the error classes ---------------------------------------------------------------------------


def test_429_retry_after_is_carried_and_holds_every_request(server: CrmServer, preset: str) -> None:
    sink = _sink(server, preset)
    server.fail_next(1, 429, headers={"Retry-After": "2"})
    with pytest.raises(TransientSinkError) as err:
        sink.apply(mapped(A04))
    assert err.value.retry_after == pytest.approx(2.0)
    sent = len(server.log)
    # The quota is the account's: until the CRM's time is up, nothing else is sent either.
    with pytest.raises(TransientSinkError) as held:
        sink.apply(mapped(adt("A04", mrn="OTHER")))
    assert 1.0 < (held.value.retry_after or 0) <= 2.0
    assert len(server.log) == sent
    sink.close()


def test_503_with_an_http_date_retry_after(server: CrmServer) -> None:
    sink = _sink(server)
    server.fail_next(1, 503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # in the past: 0
    with pytest.raises(TransientSinkError) as err:
        sink.apply(mapped(A04))
    assert err.value.retry_after == 0.0
    sink.apply(mapped(A04))  # nothing held: the next attempt goes out at once
    sink.close()


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409])
def test_server_errors_timeouts_and_conflicts_are_transient(server: CrmServer, status: int) -> None:
    sink = _sink(server)
    server.fail_next(1, status, body={"error": "busy"})
    with pytest.raises(TransientSinkError, match=f"HTTP {status}"):
        sink.apply(mapped(A04))
    assert sink.apply(mapped(A04))[0].outcome == "created"  # the retry succeeds, once
    sink.close()


def test_network_errors_are_transient() -> None:
    with CrmServer() as gone:
        url = gone.base_url
    sink = open_http_sink(sink_config("salesforce", url, timeout=2))
    with pytest.raises(TransientSinkError, match="ConnectError"):
        sink.apply(mapped(A04))
    with pytest.raises(TransientSinkError):
        sink.ping()
    sink.close()


SALESFORCE_400 = [{"errorCode": "INVALID_EMAIL_ADDRESS", "fields": ["Email"],
                   "message": "Email: invalid email address: jane.doe@example.com (Jane Doe, MRN 123456)"}]
HUBSPOT_400 = {"status": "error", "category": "VALIDATION_ERROR", "correlationId": "a4a3c9b1-9d1e-4d3f",
               "message": "Property values were not valid: [{\"isValid\":false,\"message\":\"+12175550123 is not a "
                          "valid phone number\",\"error\":\"INVALID_PHONE\",\"name\":\"phone\"}]"}


@pytest.mark.parametrize(("preset", "body", "kept"), [
    ("salesforce", SALESFORCE_400, ["INVALID_EMAIL_ADDRESS", "invalid email address"]),
    ("hubspot", HUBSPOT_400, ["VALIDATION_ERROR", "Property values were not valid", "is not a valid phone number"]),
    ("generic", {"error": "bad_request", "detail": "patient Jane Doe born 1980-02-14 already exists"},
     ["bad_request", "already exists"]),
])
def test_400_is_permanent_with_the_crms_message_redacted(server: CrmServer, preset: str, body: Any,
                                                         kept: list[str]) -> None:
    sink = _sink(server, preset)
    server.fail_next(1, 400, body=body, match="PUT" if preset == "generic" else
                     ("PATCH" if preset == "salesforce" else "upsert"))
    with pytest.raises(PermanentSinkError) as err:
        sink.apply(mapped(A04))
    reason = err.value.reason
    assert "HTTP 400" in reason
    for text in kept:
        assert text in reason
    for value in (*PHI, "1980-02-14", "a4a3c9b1"):
        assert value not in reason
    sink.close()


def test_a_foreign_key_error_from_the_crm_names_the_field_not_the_value() -> None:
    # Salesforce's own wording for a missing parent (here: a contact deleted between our read and write).
    body = [{"errorCode": "INVALID_FIELD", "fields": [], "message":
             "Foreign key external ID: 123456 not found for field HL7_MRN__c in entity Contact"}]
    with CrmServer() as server:
        sink = _sink(server)
        server.fail_next(1, 400, body=body, match="PATCH /services/data/v60.0/sobjects/HL7_Appointment__c")
        with pytest.raises(PermanentSinkError) as err:
            sink.apply(mapped(siu("S12", appt="FK-1", mrn="123456")))
        sink.close()
    assert "INVALID_FIELD: Foreign key external ID: [redacted] not found for field HL7_MRN__c" in err.value.reason


def test_other_4xx_are_permanent_and_401_is_transient(server: CrmServer) -> None:
    sink = _sink(server)
    server.fail_next(1, 404, body=[{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}],
                     match="PATCH")
    with pytest.raises(PermanentSinkError, match="NOT_FOUND"):
        sink.apply(mapped(A04))
    server.fail_next(1, 401, body=[{"errorCode": "INVALID_SESSION_ID", "message": "Session expired or invalid"}])
    with pytest.raises(TransientSinkError, match="credentials"):
        sink.apply(mapped(A04))
    sink.close()


def test_a_batch_with_one_bad_message_fails_only_that_message(server: CrmServer) -> None:
    """HubSpot batches concurrent messages; a permanent error re-applies them one by one."""
    import threading

    sink = _sink(server, "hubspot", batch_linger=0.5)
    # A 400 for the batch holding all three, then once more for the bad one alone.
    server.fail_next(2, 400, body=HUBSPOT_400, match="contacts/batch/upsert")
    results: dict[str, Any] = {}

    def apply(mrn: str) -> None:
        try:
            results[mrn] = sink.apply(mapped(adt("A04", mrn=mrn)))[0].outcome
        except PermanentSinkError as exc:
            results[mrn] = exc

    threads = [threading.Thread(target=apply, args=(m,)) for m in ("B1", "B2", "B3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    upserts = [e for e in server.log if e.path.endswith("contacts/batch/upsert")]
    assert len(upserts[0].body["inputs"]) == 3  # one batch
    failed = [m for m, r in results.items() if isinstance(r, PermanentSinkError)]
    assert len(failed) == 1 and sorted(c.mrn for c in sink.contacts()) == sorted({"B1", "B2", "B3"} - set(failed))
    sink.close()


def test_redact_keeps_codes_and_field_names() -> None:
    text = "Phone: value not valid: (217) 555-0123 for 'Jane Doe' MRN A123456 <jane@x.org> on HL7_MRN__c"
    out = redact(text, sensitive=["Jane"], keep=["HL7_MRN__c"])
    assert "HL7_MRN__c" in out and "Phone" in out
    for value in ("555", "Jane", "Doe", "A123456", "jane@x.org"):
        assert value not in out


# --- secrets and configuration --------------------------------------------------------------------------


def test_secrets_come_from_the_environment_and_are_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    token = "sk-live-Zq9w8e7r6t5y4u3i2o1p"
    monkeypatch.setenv("HL7_TEST_CRM_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    with CrmServer(auth=("bearer", token)) as server:
        sink = _sink(server, auth={"kind": "bearer", "secret_env": "HL7_TEST_CRM_TOKEN"})
        sink.apply(mapped(A04))
        server.fail_next(1, 401, body=[{"errorCode": "INVALID_SESSION_ID", "message": "Session expired"}])
        with pytest.raises(TransientSinkError) as err:
            sink.apply(mapped(A04))
        assert token not in repr(sink.client.auth.__dict__) and token not in str(err.value)
        sink.close()
        (tmp_path / "key").write_text("k-123456789\n")
    with CrmServer(auth=("api_key", "X-API-Key", "k-123456789")) as server:
        sink = _sink(server, "generic", auth={"kind": "api_key", "secret_file": str(tmp_path / "key")})
        assert sink.apply(mapped(A04))[0].outcome == "created"
        sink.close()
    assert token not in caplog.text and "k-123456789" not in caplog.text
    assert "123456" not in caplog.text  # httpx's request log would carry the MRN in Salesforce URLs


def test_config_rejects_secrets_in_place_of_names_and_unknown_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"preset": "salesforce", "base_url": "https://example.my.salesforce.com"}
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        HttpSinkConfig.model_validate({**base, "auth": {"kind": "bearer", "secret_env": "00Dx0000000.abcd!efg"}})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        HttpSinkConfig.model_validate({**base, "auth": {"kind": "bearer", "token": "abc"}})
    with pytest.raises(ValueError, match="token_url"):
        HttpSinkConfig.model_validate({**base, "auth": {"kind": "oauth2_client_credentials", "secret_env": "S",
                                                         "client_id": "c"}})
    with pytest.raises(ValueError, match="not record-model fields"):
        HttpSinkConfig.model_validate({**base, "contact": {"fields": {"nickname": "Nick__c"}}})
    with pytest.raises(ValueError, match="generic"):
        HttpSinkConfig.model_validate({"preset": "generic", "base_url": "http://crm.local"})
    with pytest.raises(ValueError, match="http"):
        HttpSinkConfig.model_validate({**base, "base_url": "ftp://x"})
    monkeypatch.delenv("HL7_TEST_MISSING", raising=False)
    cfg = HttpSinkConfig.model_validate({**base, "auth": {"kind": "bearer", "secret_env": "HL7_TEST_MISSING"}})
    with pytest.raises(CrmConfigError, match="HL7_TEST_MISSING is not set"):
        open_http_sink(cfg)


def test_mapping_check_hook_names_unsupported_conflict_rules_and_unmapped_fields() -> None:
    rules = load_rules(None)  # phone, email, address: `newest`
    assert unsupported_conflicts("salesforce") == set() and unsupported_conflicts("hubspot") == set()
    assert unsupported_conflicts("generic") == {"crm", "newest"}
    full = sink_config("generic", "http://crm.local")
    assert unsupported_conflicts(full) == set() and rules_problems(full, rules) == []
    write_only = {e: {k: v for k, v in GENERIC[e].items() if k not in ("read", "modified_field")}
                  for e in ("contact", "appointment")}
    bare = sink_config("generic", "http://crm.local", generic=write_only)
    problems = rules_problems(bare, rules)
    assert "entities.contact.fields.phone: conflict rule `newest` needs the CRM's current value and change " \
           "time, which the generic HTTP preset cannot read as configured (see docs/http-sink.md)" in problems
    assert {p.split(":")[0] for p in problems} == {f"entities.contact.fields.{f}" for f in (
        "phone", "email", "address_line1", "city", "state", "postal_code")}  # `ehr` fields need no read
    no_sex = sink_config("salesforce", "http://crm.local", contact={"fields": {"sex": None}})
    assert rules_problems(no_sex, rules) == [
        "entities.contact.fields.sex: the salesforce HTTP preset has no CRM field for `sex` "
        "(map it in the sink's contact field names)"]


# --- end to end through the delivery pipeline -------------------------------------------------------------


@dataclass
class Pipeline:
    journal: Journal
    delivery: Delivery
    intake: Intake
    sink: HttpSink

    async def send(self, *msgs: bytes) -> None:
        for m in msgs:
            assert (await self.intake.handle(m, "test")).code == "AA"

    def settled(self) -> bool:
        return self.journal.counts().get("pending", 0) == 0 and self.delivery.idle


@pytest.fixture
async def pipeline(server: CrmServer, tmp_path: Path) -> AsyncIterator[Pipeline]:
    journal = open_journal(tmp_path / "journal.sqlite3")
    sink = _sink(server)
    metrics = _NullMetrics()
    delivery = Delivery(journal, sink, MAPPER, metrics,
                        DeliveryPolicy(lanes=4, poll_interval=0.05, backoff_initial=0.05, backoff_max=0.5))
    intake = Intake(GroupCommitter(journal, timedelta(hours=1)), metrics, policy=MAPPER.patient_policy,
                    supported=DEFAULT_SUPPORTED, on_pending=delivery.wake)
    delivery.start()
    try:
        yield Pipeline(journal, delivery, intake, sink)
    finally:
        await delivery.stop()
        journal.close()
        sink.close()


async def test_429_delays_the_next_attempt_by_retry_after_then_succeeds(server: CrmServer, pipeline: Pipeline) -> None:
    server.fail_next(1, 429, headers={"Retry-After": "2"}, match="PATCH")
    await pipeline.send(A04)
    await wait_for(pipeline.settled, timeout=15)
    throttled = next(i for i, e in enumerate(server.log) if e.status == 429)
    gap = server.log[throttled + 1].at - server.log[throttled].at
    assert 1.9 <= gap <= 4.0, gap
    (entry,) = pipeline.journal.query()
    assert (entry.state, entry.attempts) == ("done", 1)
    assert len(pipeline.sink.contacts("123456")) == 1


async def test_400_lands_in_the_dlq_with_the_crms_message(server: CrmServer, pipeline: Pipeline) -> None:
    server.fail_next(1, 400, body=SALESFORCE_400, match="PATCH")
    await pipeline.send(A04)
    (dead,) = await wait_for(lambda: dlq.dead_letters(pipeline.journal), timeout=15)
    assert dead.attempts == 1 and dead.error_kind == "permanent_sink_error"
    assert "INVALID_EMAIL_ADDRESS: Email: invalid email address" in dead.reason
    assert not any(v in dead.reason for v in PHI)


async def test_a_crm_dropping_connections_loses_nothing(server: CrmServer, pipeline: Pipeline) -> None:
    server.drop_for(3.0)
    msgs = [adt("A04", mrn=f"DROP{p}", phone=f"^PRN^PH^^1^217^555{p}000") for p in range(5)]
    msgs += [adt("A08", mrn=f"DROP{p}", phone=f"^PRN^PH^^1^217^555{p}001", when="20261115100000-0500")
             for p in range(5)]
    await pipeline.send(*msgs)
    await wait_for(lambda: any(e.status == 0 for e in server.log), timeout=5)
    await wait_for(pipeline.settled, timeout=30, interval=0.1)
    assert sum(e.status == 0 for e in server.log) >= 5  # the outage was real and retried through
    counts = pipeline.journal.counts()
    assert (counts.get("done"), counts.get("dead", 0)) == (10, 0)
    contacts = pipeline.sink.contacts()
    assert sorted(c.mrn for c in contacts) == [f"DROP{p}" for p in range(5)]
    assert all(c.phone == f"+1217555{c.mrn[-1]}001" for c in contacts)  # order held: the A08 won
