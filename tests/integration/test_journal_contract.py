"""The Journal contract (store/base.py), run against SQLite and a real PostgreSQL alike."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hl7bridge.errors import JournalUnavailable
from hl7bridge.records import AppendResult, Mark
from hl7bridge.store.postgres import PostgresJournal
from hl7bridge.store.sqlite import SqliteJournal
from tests.integration.test_journal_support import BACKENDS, T0, WINDOW, entry, journal_for

Journal = SqliteJournal | PostgresJournal
LATER = T0 + timedelta(days=365)  # "now" for next_ready: everything received at T0 is due


@pytest.fixture(params=BACKENDS)
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Journal]:
    yield from journal_for(request.param, request, tmp_path)


def ids(entries: list) -> list[int]:
    return [e.id for e in entries]


# --- append and dedup ------------------------------------------------------------------------------


def test_append_stores_every_field_and_a_received_line(journal: Journal) -> None:
    new = entry("C1", patient="MRN9")
    [res] = journal.append_batch([new], WINDOW)
    assert res.duplicate is False and res.ack_code == "AA"
    got = journal.get(res.journal_id)
    assert got is not None
    assert (got.sending_application, got.sending_facility, got.control_id) == ("EPIC", "MAIN", "C1")
    assert (got.message_type, got.trigger, got.version, got.patient_key) == ("ADT", "A04", "2.5.1", "MRN9")
    assert got.raw == new.raw and got.peer == new.peer
    assert got.state == "pending" and got.attempts == 0 and got.next_attempt_at is None
    assert got.received_at == T0 and got.received_at.tzinfo is not None
    assert got.updated_at.utcoffset() == timedelta(0)
    assert got.message_key == "EPIC|MAIN|C1"
    assert [h.event for h in journal.history(res.journal_id)] == ["received"]
    assert journal.get(res.journal_id + 1000) is None


def test_migrate_is_idempotent(journal: Journal) -> None:
    [res] = journal.append_batch([entry("C1")], WINDOW)
    journal.migrate()
    journal.migrate()
    assert journal.get(res.journal_id) is not None


def test_resend_of_accepted_message_is_not_stored_again(journal: Journal) -> None:
    [first] = journal.append_batch([entry("C1", ack="CA")], WINDOW)
    [again] = journal.append_batch([entry("C1", at=T0 + timedelta(minutes=5), ack="AA")], WINDOW)
    assert again == AppendResult(first.journal_id, True, "CA")  # the *stored* ACK code
    assert len(journal.query()) == 1
    original = journal.get(first.journal_id)
    assert original is not None and original.resend_count == 1
    assert [h.event for h in journal.history(first.journal_id)] == ["received", "resent"]


def test_dedup_key_is_application_facility_and_control_id(journal: Journal) -> None:
    results = journal.append_batch(
        [entry("C1"), entry("C1", app="LAB"), entry("C1", facility="WEST"), entry("C2")], WINDOW
    )
    assert [r.duplicate for r in results] == [False] * 4
    assert len({r.journal_id for r in results}) == 4


def test_rejected_message_is_not_a_dedup_target(journal: Journal) -> None:
    [bad] = journal.append_batch(
        [entry("C1", state="rejected", ack="AE", reason="PID-3 missing", error_kind="missing_required",
               err_code="101")], WINDOW)
    [fixed] = journal.append_batch([entry("C1", at=T0 + timedelta(minutes=1))], WINDOW)
    assert not fixed.duplicate and fixed.journal_id != bad.journal_id and fixed.ack_code == "AA"
    [again] = journal.append_batch([entry("C1", at=T0 + timedelta(minutes=2))], WINDOW)
    assert again == AppendResult(fixed.journal_id, True, "AA")
    rejected = journal.get(bad.journal_id)
    assert rejected is not None and rejected.state == "rejected" and rejected.resend_count == 0
    assert rejected.reason == "PID-3 missing" and rejected.error_kind == "missing_required"
    assert [(h.event, h.detail) for h in journal.history(bad.journal_id)] == [
        ("received", "127.0.0.1:40000"), ("rejected", "PID-3 missing")]


def test_dead_and_done_entries_remain_dedup_targets(journal: Journal) -> None:
    a, b = journal.append_batch([entry("C1"), entry("C2", patient="MRN2")], WINDOW)
    journal.mark(a.journal_id, "dead", event="dead-lettered", reason="mapping", error_kind="mapping_error")
    journal.mark(b.journal_id, "done", event="applied")
    results = journal.append_batch([entry("C1"), entry("C2", patient="MRN2")], WINDOW)
    assert [(r.journal_id, r.duplicate) for r in results] == [(a.journal_id, True), (b.journal_id, True)]


def test_dedup_window_expires(journal: Journal) -> None:
    window = timedelta(hours=1)
    [first] = journal.append_batch([entry("C1")], window)
    [inside] = journal.append_batch([entry("C1", at=T0 + window - timedelta(seconds=1))], window)
    assert inside.duplicate and inside.journal_id == first.journal_id
    [outside] = journal.append_batch([entry("C1", at=T0 + window + timedelta(seconds=1))], window)
    assert not outside.duplicate and outside.journal_id != first.journal_id
    # The newest stored entry is now the target.
    [latest] = journal.append_batch([entry("C1", at=T0 + window + timedelta(minutes=2))], window)
    assert latest.duplicate and latest.journal_id == outside.journal_id


def test_duplicates_within_one_batch(journal: Journal) -> None:
    results = journal.append_batch(
        [
            entry("C1", ack="AA"),
            entry("C2", state="rejected", ack="AR", reason="unsupported"),
            entry("C1", ack="AA"),
            entry("C2", ack="AA"),  # the fixed resend of a rejected one: stored
            entry("C2", ack="AA"),  # ... and its own resend: a duplicate of it
            entry("C1", ack="AA"),
        ],
        WINDOW,
    )
    assert [r.duplicate for r in results] == [False, False, True, False, True, True]
    assert results[2].journal_id == results[0].journal_id == results[5].journal_id
    assert results[4].journal_id == results[3].journal_id != results[1].journal_id
    assert len(journal.query()) == 3
    c1 = journal.get(results[0].journal_id)
    assert c1 is not None and c1.resend_count == 2


def test_messages_without_control_id_are_never_deduplicated(journal: Journal) -> None:
    results = journal.append_batch(
        [entry(None, state="rejected", ack="AR", patient=None), entry(None, state="rejected", ack="AR",
                                                                       patient=None)], WINDOW)
    assert [r.duplicate for r in results] == [False, False]
    stored = journal.get(results[0].journal_id)
    assert stored is not None and stored.control_id == "" and stored.patient_key is None


def test_empty_batch(journal: Journal) -> None:
    assert journal.append_batch([], WINDOW) == []


def test_naive_datetimes_are_refused(journal: Journal) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        journal.next_ready(10, datetime(2024, 1, 1), (), False)  # naive: the point of the test


# --- next_ready --------------------------------------------------------------------------------------


def test_next_ready_returns_only_each_patients_earliest_pending(journal: Journal) -> None:
    a1, a2, b1, a3 = journal.append_batch(
        [entry("1", patient="A"), entry("2", patient="A"), entry("3", patient="B"), entry("4", patient="A")],
        WINDOW,
    )
    assert ids(journal.next_ready(10, LATER, (), False)) == [a1.journal_id, b1.journal_id]
    journal.mark(a1.journal_id, "done", event="applied")
    journal.mark(b1.journal_id, "done", event="applied")
    assert ids(journal.next_ready(10, LATER, (), False)) == [a2.journal_id]
    journal.mark(a2.journal_id, "filtered", event="filtered", reason="rule")
    assert ids(journal.next_ready(10, LATER, (), False)) == [a3.journal_id]


def test_next_ready_oldest_first_and_limit(journal: Journal) -> None:
    results = journal.append_batch([entry(str(i), patient=f"P{i}") for i in range(10)], WINDOW)
    assert ids(journal.next_ready(3, LATER, (), False)) == [r.journal_id for r in results[:3]]
    assert journal.next_ready(0, LATER, (), False) == []


def test_next_ready_waits_for_the_head_to_be_due(journal: Journal) -> None:
    a1, a2, b1 = journal.append_batch(
        [entry("1", patient="A"), entry("2", patient="A"), entry("3", patient="B")], WINDOW)
    retry_at = T0 + timedelta(minutes=10)
    journal.mark(a1.journal_id, "pending", event="retry scheduled", reason="timeout",
                 error_kind="transient_sink_error", attempts=1, next_attempt_at=retry_at)
    # The lane is blocked: a2 must not overtake a1.
    before = journal.next_ready(10, retry_at - timedelta(seconds=1), (), False)
    assert ids(before) == [b1.journal_id]
    due = journal.next_ready(10, retry_at, (), False)
    assert ids(due) == [a1.journal_id, b1.journal_id]
    assert due[0].attempts == 1 and due[0].next_attempt_at == retry_at
    assert a2.journal_id not in ids(due)


def test_next_ready_skips_excluded_keys(journal: Journal) -> None:
    a1, b1, c1 = journal.append_batch(
        [entry("1", patient="A"), entry("2", patient="B"), entry("3", patient="C")], WINDOW)
    assert ids(journal.next_ready(10, LATER, {"A", "C"}, False)) == [b1.journal_id]
    assert ids(journal.next_ready(10, LATER, ["B"], False)) == [a1.journal_id, c1.journal_id]


def test_next_ready_hold_skips_patients_with_a_dead_letter(journal: Journal) -> None:
    a1, a2, b1 = journal.append_batch(
        [entry("1", patient="A"), entry("2", patient="A"), entry("3", patient="B")], WINDOW)
    journal.mark(a1.journal_id, "dead", event="dead-lettered", reason="bad code", error_kind="bad_field_value")
    assert ids(journal.next_ready(10, LATER, (), True)) == [b1.journal_id]
    assert ids(journal.next_ready(10, LATER, (), False)) == [a2.journal_id, b1.journal_id]
    journal.discard([a1.journal_id], "sender confirmed obsolete")
    assert ids(journal.next_ready(10, LATER, (), True)) == [a2.journal_id, b1.journal_id]


def test_entries_without_patient_key_are_each_their_own_lane(journal: Journal) -> None:
    n1, n2, a1 = journal.append_batch(
        [entry("1", patient=None), entry("2", patient=None), entry("3", patient="A")], WINDOW)
    assert ids(journal.next_ready(10, LATER, (), True)) == [n1.journal_id, n2.journal_id, a1.journal_id]
    journal.mark(n1.journal_id, "pending", event="retry scheduled", attempts=1,
                 next_attempt_at=LATER + timedelta(hours=1))
    assert ids(journal.next_ready(10, LATER, (), False)) == [n2.journal_id, a1.journal_id]


def test_rejected_and_settled_entries_are_never_ready(journal: Journal) -> None:
    journal.append_batch(
        [entry("1", state="rejected", ack="AE"), entry("2", state="filtered", patient="B")], WINDOW)
    assert journal.next_ready(10, LATER, (), False) == []


# --- mark, history, query ----------------------------------------------------------------------------


def test_mark_updates_state_and_appends_history(journal: Journal) -> None:
    [res] = journal.append_batch([entry("C1")], WINDOW)
    eid = res.journal_id
    retry_at = T0 + timedelta(seconds=30)
    journal.mark(eid, "pending", event="retry scheduled", reason="CRM timeout",
                 error_kind="transient_sink_error", attempts=1, next_attempt_at=retry_at)
    got = journal.get(eid)
    assert got is not None
    assert (got.state, got.attempts, got.next_attempt_at, got.reason) == ("pending", 1, retry_at, "CRM timeout")
    journal.mark(eid, "dead", event="dead-lettered", reason="retries exhausted", error_kind="transient_sink_error")
    got = journal.get(eid)
    assert got is not None
    assert (got.state, got.attempts, got.next_attempt_at, got.error_kind) == (
        "dead", 1, None, "transient_sink_error")  # attempts kept when not given
    hist = journal.history(eid)
    assert [(h.event, h.detail) for h in hist] == [
        ("received", "127.0.0.1:40000"), ("retry scheduled", "CRM timeout"), ("dead-lettered", "retries exhausted")]
    assert all(h.at.utcoffset() == timedelta(0) for h in hist)
    journal.mark(eid + 1000, "done", event="applied")  # unknown id: nothing happens
    assert journal.history(eid + 1000) == []
    with pytest.raises(ValueError):
        journal.mark(eid, "bogus", event="x")  # type: ignore[arg-type]


def test_mark_many_settles_a_batch_in_one_call(journal: Journal) -> None:
    results = journal.append_batch([entry("C1", patient="P1"), entry("C2", patient="P2"),
                                    entry("C3", patient="P3")], WINDOW)
    a, b, c = (r.journal_id for r in results)
    retry_at = T0 + timedelta(seconds=5)
    journal.mark_many([
        Mark(a, "done", "applied: contact:created"),
        Mark(b, "pending", "retry 1 in 5.0s: CRM timeout", reason="CRM timeout",
             error_kind="transient_sink_error", attempts=1, next_attempt_at=retry_at),
        Mark(c + 1000, "done", "applied"),  # an id pruned meanwhile: ignored, no orphan history line
    ])
    got_a, got_b, got_c = journal.get(a), journal.get(b), journal.get(c)
    assert got_a is not None and got_b is not None and got_c is not None
    assert got_a.state == "done" and got_c.state == "pending"
    assert (got_b.state, got_b.attempts, got_b.next_attempt_at) == ("pending", 1, retry_at)
    assert [h.event for h in journal.history(a)] == ["received", "applied: contact:created"]
    assert [h.event for h in journal.history(b)] == ["received", "retry 1 in 5.0s: CRM timeout"]
    assert journal.history(c + 1000) == []
    journal.mark_many([])  # nothing to do is not an error
    with pytest.raises(ValueError):
        journal.mark_many([Mark(a, "bogus", "x")])  # type: ignore[arg-type]


def test_query_filters(journal: Journal) -> None:
    h = timedelta(hours=1)
    r = journal.append_batch(
        [
            entry("1", patient="A", at=T0),
            entry("2", patient="B", at=T0 + h, trigger="A08"),
            entry("3", patient="A", at=T0 + 2 * h, mtype="SIU", trigger="S12"),
            entry("4", patient="C", at=T0 + 3 * h, state="rejected", ack="AR", error_kind="unsupported_message"),
        ],
        WINDOW,
    )
    i1, i2, i3, i4 = (x.journal_id for x in r)
    journal.mark(i2, "dead", event="dead-lettered", reason="x", error_kind="mapping_error")
    assert ids(journal.query()) == [i1, i2, i3, i4]
    assert ids(journal.query(states=["pending"])) == [i1, i3]
    assert ids(journal.query(states={"dead", "rejected"})) == [i2, i4]
    assert journal.query(states=[]) == []
    assert ids(journal.query(since=T0 + h)) == [i2, i3, i4]
    assert ids(journal.query(until=T0 + 2 * h)) == [i1, i2]
    assert ids(journal.query(since=T0 + h, until=T0 + 3 * h)) == [i2, i3]
    assert ids(journal.query(message_type="ADT")) == [i1, i2, i4]
    assert ids(journal.query(message_type="ADT^A04")) == [i1, i4]
    assert ids(journal.query(message_type="SIU^S12")) == [i3]
    assert ids(journal.query(error_kind="mapping_error")) == [i2]
    assert ids(journal.query(patient_key="A")) == [i1, i3]
    assert ids(journal.query(after_id=i2)) == [i3, i4]
    assert ids(journal.query(limit=2)) == [i1, i2]
    assert ids(journal.query(after_id=i1, limit=1, states=["pending", "dead"])) == [i2]
    with pytest.raises(ValueError):
        journal.query(states=["nonsense"])


# --- operator commands -------------------------------------------------------------------------------


def test_requeue_and_discard(journal: Journal) -> None:
    r = journal.append_batch(
        [entry("1", patient="A"), entry("2", patient="B"), entry("3", patient="C", state="rejected", ack="AE"),
         entry("4", patient="D"), entry("5", patient="E")],
        WINDOW,
    )
    dead, done, rejected, pending, dead2 = (x.journal_id for x in r)
    journal.mark(dead, "dead", event="dead-lettered", reason="boom", error_kind="mapping_error", attempts=3,
                 next_attempt_at=T0)
    journal.mark(done, "done", event="applied")
    journal.mark(dead2, "dead", event="dead-lettered", reason="boom", error_kind="mapping_error")

    assert journal.discard([dead2, pending, done], "obsolete") == 1
    discarded = journal.get(dead2)
    assert discarded is not None and discarded.state == "discarded" and discarded.reason == "obsolete"
    assert discarded.error_kind == "mapping_error"  # what it died of stays on record

    assert journal.requeue([dead, done, rejected, pending, dead2, 999_999], "mapping fixed") == 3
    for eid in (dead, done, dead2):
        got = journal.get(eid)
        assert got is not None
        assert (got.state, got.attempts, got.next_attempt_at) == ("pending", 0, None)
        assert journal.history(eid)[-1].event == "requeued"
    still = journal.get(rejected)
    assert still is not None and still.state == "rejected"
    assert journal.requeue([], "nothing") == 0


def test_purge_deletes_old_entries_and_leaves_an_audit_trail(journal: Journal) -> None:
    day = timedelta(days=1)
    r = journal.append_batch(
        [
            entry("1", patient="A", at=T0),
            entry("2", patient="B", at=T0, state="rejected", ack="AE"),
            entry("3", patient="C", at=T0 + 10 * day),
            entry("4", patient="D", at=T0),
        ],
        WINDOW,
    )
    old_done, old_rejected, new_done, old_pending = (x.journal_id for x in r)
    journal.mark(old_done, "done", event="applied")
    journal.mark(new_done, "done", event="applied")

    assert journal.purge(T0 + 5 * day, ["done", "rejected"], "retention 5 days") == 2
    assert ids(journal.query()) == [new_done, old_pending]
    assert journal.get(old_done) is None and journal.history(old_done) == []
    assert journal.purge(T0 + 5 * day, ["done"], "again") == 0
    audit = journal.purge_audit()
    assert [(a["states"], a["purged"], a["reason"]) for a in audit] == [
        (["done", "rejected"], 2, "retention 5 days"), (["done"], 0, "again")]
    assert audit[0]["older_than"] == T0 + 5 * day and audit[0]["requested_by"]
    # ids are never reused after a purge
    [fresh] = journal.append_batch([entry("5", patient="E")], WINDOW)
    assert fresh.journal_id > max(old_done, old_rejected, new_done, old_pending)


def test_counts_and_oldest_pending(journal: Journal) -> None:
    assert journal.oldest_pending() is None
    assert journal.counts() == dict.fromkeys(["pending", "done", "filtered", "rejected", "dead", "discarded"], 0)
    r = journal.append_batch(
        [
            entry("1", patient="A", at=T0 + timedelta(minutes=5)),
            entry("2", patient="B", at=T0 + timedelta(minutes=1)),
            entry("3", patient="C", at=T0, state="rejected", ack="AR"),
            entry("4", patient="D", at=T0 + timedelta(minutes=9), state="filtered"),
        ],
        WINDOW,
    )
    journal.mark(r[0].journal_id, "dead", event="dead-lettered")
    counts = journal.counts()
    assert counts["pending"] == 1 and counts["dead"] == 1 and counts["rejected"] == 1 and counts["filtered"] == 1
    assert counts["done"] == 0 and counts["discarded"] == 0
    assert journal.oldest_pending() == T0 + timedelta(minutes=1)


def test_ping_and_close(journal: Journal) -> None:
    journal.ping()
    journal.close()
    with pytest.raises(JournalUnavailable):
        journal.append_batch([entry("C1")], WINDOW)


# --- concurrency -------------------------------------------------------------------------------------


def test_concurrent_appends_with_overlapping_duplicates_store_each_key_once(journal: Journal) -> None:
    keys = [f"K{i}" for i in range(60)]
    results: dict[str, list[AppendResult]] = {k: [] for k in keys}
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(order: list[str]) -> None:
        try:
            start.wait(timeout=10)
            for i in range(0, len(order), 6):
                chunk = order[i : i + 6]
                # each batch also carries an in-batch duplicate of its first key
                batch = [entry(k, patient=f"P{k}") for k in chunk] + [entry(chunk[0], patient=f"P{chunk[0]}")]
                out = journal.append_batch(batch, WINDOW)
                with lock:
                    for k, res in zip([*chunk, chunk[0]], out, strict=True):
                        results[k].append(res)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(keys,)), threading.Thread(target=worker, args=(keys[::-1],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and not errors
    stored = journal.query()
    assert sorted(e.control_id for e in stored) == sorted(keys)
    for k in keys:
        assert len({r.journal_id for r in results[k]}) == 1, k
        assert sum(not r.duplicate for r in results[k]) == 1, k
    assert sum(e.resend_count for e in stored) == sum(len(v) for v in results.values()) - len(keys)


def test_aware_results_whatever_the_input_zone(journal: Journal) -> None:
    from zoneinfo import ZoneInfo

    local = datetime(2024, 3, 1, 7, 0, tzinfo=ZoneInfo("America/New_York"))  # = T0
    [res] = journal.append_batch([entry("C1", at=local)], WINDOW)
    got = journal.get(res.journal_id)
    assert got is not None and got.received_at == T0 and got.received_at.tzinfo == UTC
