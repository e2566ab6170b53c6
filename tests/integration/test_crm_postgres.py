"""PostgreSQL sink specifics: outages are transient and the pool recovers; writers on a contact serialise."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from hl7bridge.crm.postgres import PostgresSink
from hl7bridge.errors import TransientSinkError
from hl7bridge.records import CrmOp, FieldSet, OpResult
from tests.pgserver import PgServer

pytestmark = pytest.mark.postgres

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def contact(mrn: str, **fields: str) -> CrmOp:
    return CrmOp("contact", "upsert", mrn, T0, {k: FieldSet(v) for k, v in fields.items()})


@pytest.fixture
def sink(pg_url: str) -> Iterator[PostgresSink]:
    s = PostgresSink(pg_url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def test_server_down_is_transient_and_the_pool_recovers(pg_server: PgServer, sink: PostgresSink) -> None:
    # Several pooled connections exist before the outage, so recovery must replace all of them.
    with sink._pool.connection() as c1, sink._pool.connection() as c2, sink._pool.connection() as c3:
        assert c1 is not c2 is not c3
    for i in range(3):
        assert sink.apply([contact(f"PRE-{i}", first_name="Ann")])[0].outcome == "created"

    pg_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(TransientSinkError) as ping_err:
            sink.ping()
        assert time.monotonic() - started < 5.0, "ping must fail fast when the CRM is unreachable"
        with pytest.raises(TransientSinkError) as apply_err:
            sink.apply([contact("SECRET-MRN-1", first_name="Zed")], message_key="EHR|F|1")
        for err in (ping_err.value, apply_err.value):
            assert err.retryable
            assert "SECRET" not in str(err) and "Zed" not in str(err)
    finally:
        pg_server.start()

    deadline = time.monotonic() + 30
    while True:
        try:
            result = sink.apply([contact("SECRET-MRN-1", first_name="Zed")], message_key="EHR|F|1")
            break
        except TransientSinkError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # poll interval while the pool reconnects
    assert result == [OpResult("contact", "SECRET-MRN-1", "created", ("first_name",))]
    sink.ping()
    assert [c.mrn for c in sink.contacts()] == ["PRE-0", "PRE-1", "PRE-2", "SECRET-MRN-1"]


def test_two_writers_on_one_contact_serialise(pg_url: str, sink: PostgresSink) -> None:
    sink.apply([contact("M1", phone="+15551230001")])
    done: list[list[OpResult]] = []
    with psycopg.connect(pg_url) as other:
        # Another writer holds the contact row; the sink's apply must wait for it, not interleave.
        other.execute("SELECT 1 FROM contacts WHERE mrn = 'M1' FOR UPDATE")
        worker = threading.Thread(target=lambda: done.append(sink.apply([contact("M1", city="Springfield")])))
        worker.start()
        deadline = time.monotonic() + 10
        while True:
            waiting = other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hl7bridge-crm' "
                "AND wait_event_type = 'Lock'").fetchone()
            if waiting and waiting[0] == 1:
                break
            assert time.monotonic() < deadline, "the sink never waited for the row lock"
            time.sleep(0.05)
        assert done == []
        other.execute("UPDATE contacts SET phone = '+15551239999' WHERE mrn = 'M1'")
        other.commit()
        worker.join(timeout=10)
    assert done == [[OpResult("contact", "M1", "updated", ("city",))]]
    c = sink.contacts("M1")[0]
    assert (c.phone, c.city) == ("+15551239999", "Springfield")  # saw the other writer's commit


def test_a_resend_applied_concurrently_takes_effect_once(sink: PostgresSink) -> None:
    barrier = threading.Barrier(2, timeout=30)
    results: list[str] = []

    def resend() -> None:
        barrier.wait()
        results.append(sink.apply([contact("M1", first_name="Ann")], message_key="EHR|F|42")[0].outcome)

    threads = [threading.Thread(target=resend) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == ["already_applied", "created"]
