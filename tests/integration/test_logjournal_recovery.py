"""LoggedJournal across crashes: SIGKILL at random moments and between the log fsync and the index commit,
torn log tails, segment release after indexing, idempotent re-indexing."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hl7bridge.store import intake_log as il
from hl7bridge.store.logged import LoggedJournal, log_dir_for
from tests.integration.test_journal_support import WINDOW, entry

ROOT = Path(__file__).resolve().parents[2]

# Each batch: four new messages, a rejected one, and a resend of the previous batch's first message. The
# child prints a batch's results once append_batch has returned: the moment intake would send the ACKs.
CHILD = r"""
import json, sys
from datetime import UTC, datetime, timedelta
from hl7bridge.records import Envelope, NewEntry
from hl7bridge.store.logged import LoggedJournal

journal = LoggedJournal(sys.argv[1], index_delay=float(sys.argv[2]), segment_bytes=int(sys.argv[3]),
                        prefill_bytes=4096)
journal.migrate()

def entry(cid, state="pending", ack="AA"):
    env = Envelope("|", "^~\\&", "EPIC", "MAIN", "HL7BRIDGE", "CRM", "20240301", "ADT", "A04", "", cid, "P",
                   "2.5.1", "", "", "")
    return NewEntry(datetime.now(UTC), "127.0.0.1:1", b"MSH|" + cid.encode() + b"|\xe9", env, "P" + cid[-1],
                    state, ack, "bad" if state == "rejected" else "")

for b in range(5000):
    batch = [entry(f"B{b}-{i}") for i in range(4)] + [entry(f"B{b}-R", "rejected", "AE")]
    if b:
        batch.append(entry(f"B{b - 1}-0"))
    results = journal.append_batch(batch, timedelta(days=1))
    print(json.dumps([[r.journal_id, r.duplicate, r.ack_code, e.envelope.control_id, e.received_at.isoformat(),
                       e.state] for e, r in zip(batch, results)]), flush=True)
"""


def _run_child(db: Path, *, index_delay: float, lines: int, segment_bytes: int = 64 << 20) -> list[list[Any]]:
    """Start the child, read `lines` acknowledged batches, SIGKILL it; returns the acknowledged results."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(index_delay), str(segment_bytes)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    acked: list[list[Any]] = []
    try:
        assert proc.stdout is not None
        for _ in range(lines):
            line = proc.stdout.readline()
            if not line:
                break
            acked += json.loads(line)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the child must have been killed mid-run"
    assert len(acked) >= 5 * lines, "the child stopped early"
    return acked


def _sqlite_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        count = int(conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0])
    conn.close()
    return count


def _check_recovered(journal: LoggedJournal, acked: list[list[Any]]) -> None:
    """Every acknowledged result is in SQLite with the fields the child sent, once."""
    first_id = {cid: jid for jid, dup, _ack, cid, _at, _state in acked if not dup}
    for jid, dup, ack, cid, at, state in acked:
        if dup:
            assert jid == first_id[cid] and ack == "AA", cid
            continue
        got = journal.get(jid)
        assert got is not None, f"acknowledged entry {jid} lost"
        assert (got.control_id, got.state, got.ack_code) == (cid, state, ack)
        assert got.received_at == datetime.fromisoformat(at)
        assert got.raw == b"MSH|" + cid.encode() + b"|\xe9" and got.patient_key == "P" + cid[-1]
        assert got.peer == "127.0.0.1:1" and (got.sending_application, got.sending_facility) == ("EPIC", "MAIN")
        events = [h.event for h in journal.history(jid)]
        expected = ["received", "rejected"] if state == "rejected" else ["received"]
        assert events[: len(expected)] == expected and set(events[len(expected):]) <= {"resent"}, events
    resent = {cid for _jid, dup, _ack, cid, _at, _state in acked if dup}
    for cid in resent:
        got = journal.get(first_id[cid])
        assert got is not None and got.resend_count == 1, cid
        assert [h.event for h in journal.history(first_id[cid])] == ["received", "resent"]
    stored = journal.query()
    keys = [(e.control_id, e.state == "rejected") for e in stored]
    assert len(keys) == len(set(keys)), "an entry was stored twice"
    assert [e.id for e in stored] == sorted({e.id for e in stored})


@pytest.mark.parametrize("index_delay", [0.0, 0.005], ids=["eager-indexer", "gathering-indexer"])
def test_acknowledged_entries_survive_sigkill_at_a_random_moment(tmp_path: Path, index_delay: float) -> None:
    db = tmp_path / "journal.sqlite3"
    acked = _run_child(db, index_delay=index_delay, lines=random.randint(3, 60), segment_bytes=16 * 1024)
    journal = LoggedJournal(db)
    journal.migrate()
    try:
        _check_recovered(journal, acked)
        # Dedup state survived as well: a resend of the last acknowledged message is recognised.
        jid, _dup, _ack, cid, _at, _state = next(r for r in reversed(acked) if not r[1] and r[5] == "pending")
        [again] = journal.append_batch([entry(cid, at=datetime.now(UTC))], WINDOW)
        assert again.duplicate and again.journal_id == jid
    finally:
        journal.close()


def test_kill_between_log_fsync_and_index_commit_recovers_everything(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite3"
    # An indexer that gathers for an hour: every acknowledged batch is in the log and none in SQLite.
    acked = _run_child(db, index_delay=3600, lines=random.randint(3, 30))
    assert _sqlite_rows(db) == 0
    journal = LoggedJournal(db)
    journal.migrate()  # indexes the log before accepting appends
    try:
        assert _sqlite_rows(db) >= len([r for r in acked if not r[1]])
        _check_recovered(journal, acked)
        fresh = journal.append_batch([entry("AFTER", at=datetime.now(UTC))], WINDOW)
        assert fresh[0].journal_id > max(r[0] for r in acked)  # ids continue after the logged ones
    finally:
        journal.close()


def test_torn_log_tail_is_cut_and_the_rest_recovered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "journal.sqlite3"
    acked = _run_child(db, index_delay=3600, lines=5)
    segment = sorted(log_dir_for(db).glob("*.log"))[-1]
    *_, (_offset, last_seq, end, _payload) = il._scan(segment, int(segment.name[:20]))
    with segment.open("r+b") as f:  # half a batch that was being written when the power went
        f.seek(end)
        f.write(struct.pack("<IIQ", 5000, 12345, last_seq + 1) + b"MSH|half a message")
    with caplog.at_level(logging.WARNING):
        journal = LoggedJournal(db)
        journal.migrate()
    try:
        assert "torn tail" in caplog.text and "MSH" not in caplog.text
        _check_recovered(journal, acked)
        [res] = journal.append_batch([entry("NEXT", at=datetime.now(UTC))], WINDOW)
        assert not res.duplicate and journal.get(res.journal_id) is not None
    finally:
        journal.close()
    reopened = LoggedJournal(db)
    reopened.migrate()
    try:
        _check_recovered(reopened, acked)
    finally:
        reopened.close()


def _meta_position(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT value FROM journal_meta WHERE name = 'intake_log_position'").fetchone()
    conn.close()
    return 0 if row is None else int(row[0])


def test_segments_are_released_once_indexed(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite3"
    journal = LoggedJournal(db, segment_bytes=8192, prefill_bytes=4096)
    journal.migrate()
    log_dir = log_dir_for(db)
    try:
        ids = []
        for b in range(40):
            ids += [r.journal_id for r in journal.append_batch(
                [entry(f"S{b}-{i}", patient=f"P{i}") for i in range(3)], WINDOW)]
        assert len(journal.query()) == 120  # waits for the index
        deadline = time.monotonic() + 10
        while len(list(log_dir.glob("*.log"))) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(list(log_dir.glob("*.log"))) == 1, "indexed segments were not released"
        last = int(sorted(log_dir.glob("*.log"))[-1].name[:20])
        assert _meta_position(db) >= last  # the position moved with the indexed rows
    finally:
        journal.close()
    assert _meta_position(db) == 40  # one record per batch; close flushed the indexer
    again = LoggedJournal(db, segment_bytes=8192)
    again.migrate()
    try:
        assert [e.id for e in again.query()] == ids
    finally:
        again.close()


def test_reindexing_skips_entries_already_in_sqlite(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "journal.sqlite3"
    journal = LoggedJournal(db)
    journal.migrate()
    results = journal.append_batch([entry("C1"), entry("C2", state="rejected", ack="AE", reason="x")], WINDOW)
    journal.close()
    with sqlite3.connect(db) as conn:  # as if the position update had been lost
        conn.execute("UPDATE journal_meta SET value = 0")
    conn.close()
    with caplog.at_level(logging.ERROR):
        again = LoggedJournal(db)
        again.migrate()
    try:
        assert "skipped" in caplog.text
        assert [e.id for e in again.query()] == [r.journal_id for r in results]
        assert [h.event for h in again.history(results[1].journal_id)] == ["received", "rejected"]
    finally:
        again.close()
    assert _meta_position(db) == 1
