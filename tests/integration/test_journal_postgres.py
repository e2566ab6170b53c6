"""PostgreSQL journal specifics: server outage and recovery, two bridge processes on one database."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import psycopg
import pytest

from hl7bridge.errors import JournalUnavailable
from hl7bridge.records import AppendResult
from hl7bridge.store import open_journal
from hl7bridge.store.postgres import PostgresJournal
from tests.integration.test_journal_support import T0, WINDOW, entry
from tests.pgserver import PgServer

pytestmark = pytest.mark.postgres


def poll_until(check: Callable[[], None], deadline_s: float) -> None:
    """Call `check` until it stops raising JournalUnavailable, or re-raise after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            check()
            return
        except JournalUnavailable:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def test_server_outage_fails_fast_and_the_same_journal_recovers(pg_server: PgServer, pg_url: str) -> None:
    journal = PostgresJournal(pg_url, max_size=4, timeout=3.0)
    journal.migrate()
    try:
        [before] = journal.append_batch([entry("C1", patient="SMITH^JOHN")], WINDOW)
        try:
            pg_server.stop()
            started = time.monotonic()
            with pytest.raises(JournalUnavailable) as info:
                journal.append_batch([entry("C2", patient="SMITH^JOHN")], WINDOW)
            assert time.monotonic() - started < 8
            assert "SMITH" not in info.value.reason and info.value.ack_code == "AR"

            started = time.monotonic()
            with pytest.raises(JournalUnavailable):
                journal.ping()
            assert time.monotonic() - started < 4

            # A journal opened while the server is down fails too, within its timeout, rather than hanging.
            late = PostgresJournal(pg_url, timeout=1.0)
            try:
                with pytest.raises(JournalUnavailable):
                    late.migrate()
            finally:
                late.close()
        finally:
            pg_server.start()
            pg_server.wait_ready()
        poll_until(journal.ping, deadline_s=30)
        [after] = journal.append_batch([entry("C2")], WINDOW)
        assert not after.duplicate
        [resend] = journal.append_batch([entry("C1", at=T0 + timedelta(minutes=1))], WINDOW)
        assert resend == AppendResult(before.journal_id, True, "AA")
        assert [e.control_id for e in journal.query()] == ["C1", "C2"]
    finally:
        journal.close()


def test_two_bridge_processes_share_dedup(pg_url: str) -> None:
    """Two journals (two pools, as two bridge processes would have) racing on the same resends."""
    first, second = open_journal(pg_url), open_journal(pg_url)
    keys = [f"K{i}" for i in range(40)]
    results: list[list[AppendResult]] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(slot: int, journal: PostgresJournal | object, order: list[str]) -> None:
        assert isinstance(journal, PostgresJournal)
        try:
            barrier.wait(timeout=10)
            for i in range(0, len(order), 4):
                results[slot] += journal.append_batch([entry(k, patient=k) for k in order[i : i + 4]], WINDOW)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(0, first, keys)),
               threading.Thread(target=run, args=(1, second, keys[::-1]))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads) and not errors
        stored = first.query()
        assert sorted(e.control_id for e in stored) == sorted(keys)
        assert sum(not r.duplicate for r in results[0] + results[1]) == len(keys)
        by_key = {e.control_id: e.id for e in stored}
        for k, r in zip(keys, results[0], strict=True):
            assert r.journal_id == by_key[k]
        assert all(e.resend_count == 1 for e in stored)
    finally:
        first.close()
        second.close()


def test_schema_lives_in_the_default_schema_with_journal_prefix(pg_url: str) -> None:
    open_journal(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
        columns = dict(conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'journal'"
        ).fetchall())
    assert tables == {"journal", "journal_history", "journal_purge_audit", "journal_schema_version"}
    assert columns["raw"] == "bytea" and columns["received_at"] == "timestamp with time zone"
    assert columns["id"] == "bigint"


def test_next_ready_with_a_large_backlog(pg_url: str) -> None:
    journal = open_journal(pg_url)
    try:
        with psycopg.connect(pg_url) as conn:
            conn.execute(
                "INSERT INTO journal (received_at, control_id, message_type, trigger, patient_key, raw, state, "
                "ack_code, updated_at) SELECT %s, 'C' || i, 'ADT', 'A04', 'P' || (i %% 20000), '\\x00', "
                "'pending', 'AA', %s FROM generate_series(1, 100000) AS i",
                (T0, T0),
            )
            conn.execute("ANALYZE journal")
        started = time.monotonic()
        ready = journal.next_ready(64, T0.replace(year=2030), [f"P{i}" for i in range(1, 11)], hold=True)
        elapsed = time.monotonic() - started
        assert [e.id for e in ready] == list(range(11, 75))
        assert elapsed < 5, f"next_ready took {elapsed:.1f}s over 100k pending rows"
    finally:
        journal.close()
