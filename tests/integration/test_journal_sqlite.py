"""SQLite journal specifics: durability across SIGKILL, locking, disk full, file layout, a large backlog."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hl7bridge.errors import JournalUnavailable
from hl7bridge.store import JOURNAL_FILENAME, open_journal, resolve_sqlite_path
from hl7bridge.store.sqlite import SqliteJournal
from tests.integration.test_journal_support import T0, WINDOW, entry

ROOT = Path(__file__).resolve().parents[2]

# The child appends batches and prints each batch's ids once append_batch has returned: the moment
# intake would send AA. The parent SIGKILLs it right after reading such a line.
CHILD = """
import json, sys
from datetime import UTC, datetime, timedelta
from hl7bridge.records import Envelope, NewEntry
from hl7bridge.store import open_journal

journal = open_journal(sys.argv[1])
for b in range(2000):
    batch = []
    for i in range(5):
        env = Envelope("|", "^~\\\\&", "EPIC", "MAIN", "HL7BRIDGE", "CRM", "20240301", "ADT", "A04", "",
                       f"B{b}-{i}", "P", "2.5.1", "", "", "")
        batch.append(NewEntry(datetime.now(UTC), "127.0.0.1:1", b"MSH|...", env, f"P{i}", "pending", "AA"))
    results = journal.append_batch(batch, timedelta(days=1))
    print(json.dumps([[r.journal_id, f"B{b}-{i}"] for i, r in enumerate(results)]), flush=True)
"""


def test_acknowledged_entries_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    acknowledged: list[tuple[int, str]] = []
    try:
        assert proc.stdout is not None
        kill_after = random.randint(3, 40)
        for _ in range(kill_after):
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged += [(int(i), str(c)) for i, c in json.loads(line)]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the child must have been killed mid-run"
    assert acknowledged

    journal = open_journal(db)
    try:
        for journal_id, control_id in acknowledged:
            got = journal.get(journal_id)
            assert got is not None and got.control_id == control_id
        # Dedup state survived as well: a resend of an acknowledged message is recognised.
        last_id, last_cid = acknowledged[-1]
        [again] = journal.append_batch([entry(last_cid, at=datetime.now(UTC))], WINDOW)
        assert again.duplicate and again.journal_id == last_id
    finally:
        journal.close()


def test_wal_mode_and_full_sync_for_appends(tmp_path: Path) -> None:
    journal = open_journal(tmp_path)
    assert isinstance(journal, SqliteJournal)
    try:
        journal.mark(1, "done", event="applied")  # marks use NORMAL ...
        journal.append_batch([entry("C1")], WINDOW)  # ... appends switch back to FULL
        conn = journal._conn  # white-box: the pragmas are the durability guarantee
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        journal.close()


def test_locked_database_raises_journal_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = SqliteJournal(path, busy_timeout=0.2)
    journal.migrate()
    [first] = journal.append_batch([entry("C1")], WINDOW)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        with pytest.raises(JournalUnavailable, match="SQLITE_BUSY"):
            journal.append_batch([entry("C2")], WINDOW)
        assert time.monotonic() - started < 3
        with pytest.raises(JournalUnavailable):
            journal.ping()
        # Readers are not blocked by a writer (WAL): workers and the CLI keep working.
        assert [e.id for e in journal.query()] == [first.journal_id]
        other.execute("ROLLBACK")
        [second] = journal.append_batch([entry("C2")], WINDOW)
        assert not second.duplicate
        journal.ping()
    finally:
        other.close()
        journal.close()


def test_disk_full_raises_journal_unavailable_without_phi(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    journal.migrate()
    try:
        conn = journal._conn  # white-box: cap the file at its current size to simulate a full disk
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        big = [entry(f"C{i}", patient="SMITH^JOHN") for i in range(50)]
        with pytest.raises(JournalUnavailable) as info:
            journal.append_batch(big, WINDOW)
        assert "SQLITE_FULL" in info.value.reason
        assert "SMITH" not in info.value.reason and "MSH" not in info.value.reason
        assert journal.query() == []  # all or nothing
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert len(journal.append_batch(big, WINDOW)) == 50
    finally:
        journal.close()


def test_second_process_view_sees_committed_entries(tmp_path: Path) -> None:
    server = open_journal(tmp_path)
    cli = open_journal(tmp_path)  # e.g. `hl7bridge journal list` while serve runs
    try:
        [res] = server.append_batch([entry("C1")], WINDOW)
        assert [e.id for e in cli.query(states=["pending"])] == [res.journal_id]
        assert cli.requeue([res.journal_id], "x") == 0
    finally:
        cli.close()
        server.close()


def test_open_journal_paths(tmp_path: Path) -> None:
    assert resolve_sqlite_path(tmp_path) == tmp_path / JOURNAL_FILENAME
    assert resolve_sqlite_path(tmp_path / "data") == tmp_path / "data" / JOURNAL_FILENAME
    assert resolve_sqlite_path(tmp_path / "my.db") == tmp_path / "my.db"
    assert resolve_sqlite_path(f"sqlite://{tmp_path}/x.sqlite3") == tmp_path / "x.sqlite3"

    fresh = tmp_path / "not-yet" / "data"
    journal = open_journal(fresh)  # a data directory that does not exist yet is created
    journal.append_batch([entry("C1")], WINDOW)
    journal.close()
    assert (fresh / JOURNAL_FILENAME).is_file()


def test_schema_newer_than_code_is_refused(tmp_path: Path) -> None:
    open_journal(tmp_path).close()
    with sqlite3.connect(tmp_path / JOURNAL_FILENAME) as conn:
        conn.execute("INSERT INTO journal_schema_version VALUES (999, '2030-01-01T00:00:00.000000Z')")
    conn.close()
    with pytest.raises(JournalUnavailable, match="newer"):
        open_journal(tmp_path)


def test_next_ready_with_a_large_backlog(tmp_path: Path) -> None:
    journal = open_journal(tmp_path)
    assert isinstance(journal, SqliteJournal)
    try:
        # 100k pending rows over 20k patients, written directly (the append path is tested elsewhere).
        with sqlite3.connect(journal.path) as conn:
            conn.execute(
                """
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
                INSERT INTO journal (received_at, control_id, message_type, trigger, patient_key, raw, state,
                                     ack_code, updated_at)
                SELECT '2024-03-01T12:00:00.000000Z', 'C' || i, 'ADT', 'A04', 'P' || (i % 20000), x'00',
                       'pending', 'AA', '2024-03-01T12:00:00.000000Z' FROM n
                """
            )
            plan = " ".join(
                str(r) for r in conn.execute(
                    "EXPLAIN QUERY PLAN SELECT MIN(id) FROM journal WHERE state = 'pending' "
                    "AND patient_key IS NOT NULL GROUP BY patient_key"
                )
            )
        conn.close()
        assert "COVERING INDEX journal_lane" in plan
        now = T0.replace(year=2030)
        started = time.monotonic()
        ready = journal.next_ready(64, now, [f"P{i}" for i in range(1, 11)], hold=True)
        elapsed = time.monotonic() - started
        # heads are ids 1..20000 (P1..P19999, then P0 at id 20000); P1..P10 are excluded
        assert [e.id for e in ready] == list(range(11, 75))
        assert elapsed < 5, f"next_ready took {elapsed:.1f}s over 100k pending rows"
        assert journal.counts()["pending"] == 100_000
    finally:
        journal.close()
