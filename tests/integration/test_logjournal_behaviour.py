"""LoggedJournal specifics: dedup across the log/index boundary, the same answers as SqliteJournal, a locked
SQLite file, a second (passive) instance, the indexer callback, close and layout."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from hl7bridge.errors import JournalUnavailable
from hl7bridge.records import NewEntry
from hl7bridge.store.logged import LoggedJournal, log_dir_for
from hl7bridge.store.sqlite import SqliteJournal
from tests.integration.test_journal_support import T0, WINDOW, entry


def _rows(db: Path) -> int:
    """What another process sees in the SQLite file."""
    with sqlite3.connect(db) as conn:
        count = int(conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0])
    conn.close()
    return count


@pytest.fixture
def slow_indexer(tmp_path: Path) -> Iterator[LoggedJournal]:
    """An indexer that gathers for an hour unless a read waits for it: appends stay log-only."""
    journal = LoggedJournal(tmp_path / "journal.sqlite3", index_delay=3600)
    journal.migrate()
    try:
        yield journal
    finally:
        journal.close()


def test_resend_of_an_unindexed_original_is_a_duplicate(slow_indexer: LoggedJournal) -> None:
    journal = slow_indexer
    [first] = journal.append_batch([entry("C1", ack="CA")], WINDOW)
    [other] = journal.append_batch([entry("C2", state="rejected", ack="AE", reason="bad")], WINDOW)
    assert _rows(journal.path) == 0  # logged, not indexed yet
    [again] = journal.append_batch([entry("C1", at=T0 + timedelta(minutes=1))], WINDOW)
    [fixed] = journal.append_batch([entry("C2", at=T0 + timedelta(minutes=1))], WINDOW)  # rejected: no target
    [fixed_again] = journal.append_batch([entry("C2", at=T0 + timedelta(minutes=2))], WINDOW)
    assert _rows(journal.path) == 0
    assert (again.journal_id, again.duplicate, again.ack_code) == (first.journal_id, True, "CA")
    assert not fixed.duplicate and fixed.journal_id not in (first.journal_id, other.journal_id)
    assert (fixed_again.journal_id, fixed_again.duplicate) == (fixed.journal_id, True)

    original = journal.get(first.journal_id)  # a read waits for the index
    assert original is not None and original.resend_count == 1
    assert [(h.event, h.detail) for h in journal.history(first.journal_id)] == [
        ("received", "127.0.0.1:40000"), ("resent", "127.0.0.1:40000")]
    assert _rows(journal.path) == 3
    # Once indexed, the dedup answer comes from SQLite, and is the same.
    [third] = journal.append_batch([entry("C1", at=T0 + timedelta(minutes=3))], WINDOW)
    assert (third.journal_id, third.duplicate, third.ack_code) == (first.journal_id, True, "CA")
    got = journal.get(first.journal_id)
    assert got is not None and got.resend_count == 2


def _random_batches(rnd: random.Random, count: int) -> list[list[NewEntry]]:
    batches = []
    for b in range(count):
        batch = []
        for _ in range(rnd.choice([1, 1, 2, 5, 16])):
            state = rnd.choice(["pending"] * 6 + ["rejected", "filtered"])
            batch.append(entry(
                rnd.choice([None, *(f"K{k}" for k in range(12))]) if rnd.random() < 0.9 else None,
                state=state, ack={"pending": "AA", "rejected": "AE", "filtered": "AA"}[state],
                reason="why" if state != "pending" else "", patient=rnd.choice([None, "A", "B", "C"]),
                app=rnd.choice(["EPIC", "LAB"]), at=T0 + timedelta(minutes=b * rnd.choice([1, 10])),
                peer=f"127.0.0.1:{40000 + b}",
            ))
        batches.append(batch)
    return batches


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_answers_rows_and_history_as_sqlite_journal(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    batches = _random_batches(rnd, 60)
    window = timedelta(hours=2)
    plain = SqliteJournal(tmp_path / "plain.sqlite3")
    plain.migrate()
    logged = LoggedJournal(tmp_path / "logged.sqlite3", index_delay=rnd.choice([0.0, 0.002, 3600]))
    logged.migrate()
    try:
        for batch in batches:
            assert logged.append_batch(batch, window) == plain.append_batch(batch, window)
            if rnd.random() < 0.2:
                logged.counts()  # sometimes the index catches up in between
        ignore = {"updated_at"}
        want, got = plain.query(), logged.query()
        assert len(want) == len(got)
        for w, g in zip(want, got, strict=True):
            assert {k: v for k, v in vars_of(w).items() if k not in ignore} == {
                k: v for k, v in vars_of(g).items() if k not in ignore}
            assert [(h.event, h.detail) for h in plain.history(w.id)] == [
                (h.event, h.detail) for h in logged.history(g.id)]
        assert logged.counts() == plain.counts()
    finally:
        plain.close()
        logged.close()


def vars_of(obj: object) -> dict[str, object]:
    return {name: getattr(obj, name) for name in obj.__slots__}  # type: ignore[attr-defined]


def test_locked_sqlite_keeps_accepting_into_the_log_then_catches_up(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite3"
    journal = LoggedJournal(db, busy_timeout=0.05, catch_up_timeout=0.3, max_lag_entries=5, index_delay=0)
    journal.migrate()
    [first] = journal.append_batch([entry("C1")], WINDOW)
    assert journal.get(first.journal_id) is not None
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock
        accepted = journal.append_batch([entry(f"L{i}") for i in range(4)], WINDOW)  # still durable: the log
        assert [r.duplicate for r in accepted] == [False] * 4
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the indexer fails and retries; readiness says so
            try:
                journal.ping()
            except JournalUnavailable as e:
                assert "SQLITE_BUSY" in e.reason
                break
            time.sleep(0.01)
        else:
            pytest.fail("ping kept succeeding while the index could not be written")
        with pytest.raises(JournalUnavailable, match="behind"):
            journal.get(accepted[0].journal_id)  # a read cannot see it within its bound
        journal.append_batch([entry("L4"), entry("L5")], WINDOW)
        with pytest.raises(JournalUnavailable, match="behind"):  # too far behind: intake answers AR
            journal.append_batch([entry("L6")], WINDOW)
    finally:
        other.execute("ROLLBACK")
        other.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            journal.ping()
            break
        except JournalUnavailable:
            time.sleep(0.02)
    journal.ping()
    try:
        assert sorted(e.control_id for e in journal.query()) == ["C1", "L0", "L1", "L2", "L3", "L4", "L5"]
        [res] = journal.append_batch([entry("L6")], WINDOW)
        assert not res.duplicate
    finally:
        journal.close()


def test_second_instance_is_passive_and_sees_indexed_entries(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite3"
    owner = LoggedJournal(db)
    owner.migrate()
    cli = LoggedJournal(db)  # e.g. `hl7bridge journal list` while serve runs
    cli.migrate()
    try:
        assert cli.passive and not owner.passive
        with pytest.raises(JournalUnavailable, match="owned by another process"):
            cli.append_batch([entry("C9")], WINDOW)
        with pytest.raises(JournalUnavailable):
            cli.ping()
        [res] = owner.append_batch([entry("C1")], WINDOW)
        deadline = time.monotonic() + 10
        while not cli.query(states=["pending"]) and time.monotonic() < deadline:
            time.sleep(0.005)  # indexed within milliseconds
        assert [e.id for e in cli.query(states=["pending"])] == [res.journal_id]
        owner.mark(res.journal_id, "dead", event="dead-lettered", reason="x")
        assert cli.requeue([res.journal_id], "fixed") == 1  # operator commands work on SQLite directly
        got = owner.get(res.journal_id)
        assert got is not None and got.state == "pending"
    finally:
        cli.close()
        owner.close()


def test_on_indexed_is_called_after_each_commit_and_may_fail(tmp_path: Path) -> None:
    calls: list[int] = []
    seen = threading.Event()
    db = tmp_path / "journal.sqlite3"
    journal = LoggedJournal(db, index_delay=0)

    def woken() -> None:
        calls.append(_rows(db))  # the rows are committed when the callback runs
        seen.set()
        if len(calls) == 1:
            raise RuntimeError("a buggy callback must not stop the indexer")

    journal.on_indexed = woken
    journal.migrate()
    try:
        journal.append_batch([entry("C1")], WINDOW)
        assert seen.wait(10) and calls[0] == 1
        seen.clear()
        journal.append_batch([entry("C2")], WINDOW)
        assert seen.wait(10) and calls[-1] == 2
    finally:
        journal.close()


def test_close_flushes_the_index_and_refuses_more(tmp_path: Path) -> None:
    db = tmp_path / "data" / "journal.sqlite3"
    journal = LoggedJournal(db, index_delay=3600)
    journal.migrate()
    assert log_dir_for(db) == tmp_path / "data" / "journal.sqlite3.log" and log_dir_for(db).is_dir()
    journal.append_batch([entry(f"C{i}") for i in range(10)], WINDOW)
    assert _rows(db) == 0
    journal.close()
    assert _rows(db) == 10
    with pytest.raises(JournalUnavailable):
        journal.append_batch([entry("C11")], WINDOW)
    with pytest.raises(JournalUnavailable):
        journal.ping()
    with pytest.raises(JournalUnavailable):
        journal.query()
    journal.close()  # twice is fine


def test_not_migrated_refuses_appends(tmp_path: Path) -> None:
    journal = LoggedJournal(tmp_path / "journal.sqlite3")
    try:
        with pytest.raises(JournalUnavailable, match="not migrated"):
            journal.append_batch([entry("C1")], WINDOW)
    finally:
        journal.close()


def test_roles_owner_waits_for_the_log_passive_never_takes_it(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite3"
    reader = LoggedJournal(db, role="passive")
    reader.migrate()
    owner = LoggedJournal(db, role="owner")  # a passive instance does not hold the log
    owner.migrate()
    assert reader.passive and not owner.passive
    with pytest.raises(JournalUnavailable, match="another process appends to this journal"):
        LoggedJournal(db, role="owner", lock_timeout=0.1)
    closer = threading.Timer(0.2, owner.close)  # e.g. a short CLI command finishing
    closer.start()
    try:
        waiting = LoggedJournal(db, role="owner", lock_timeout=10)
        waiting.migrate()
        assert not waiting.passive
        waiting.close()
    finally:
        closer.join()
        reader.close()
