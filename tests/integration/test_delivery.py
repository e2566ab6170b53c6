"""Delivery guarantees: per-patient order across lanes, retries through a CRM outage, dead letters and the
head-of-line policy, crash recovery without double application."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from hl7bridge import dlq
from hl7bridge.crm import open_sink
from hl7bridge.delivery import Delivery, DeliveryPolicy
from hl7bridge.errors import SinkError
from hl7bridge.hl7.envelope import DEFAULT_SUPPORTED
from hl7bridge.mapping import compile_rules, load_rules
from hl7bridge.pipeline import GroupCommitter, Intake
from hl7bridge.records import ApplyRequest, OpResult
from hl7bridge.replay import _NullMetrics
from hl7bridge.store import open_journal
from tests.bridge import BridgeProcess, running_bridge, send_all, wait_for, wait_for_sync
from tests.messages import adt
from tests.pgserver import PgServer

pytestmark = pytest.mark.asyncio


def phone(n: int) -> str:
    return f"^PRN^PH^^1^217^555{n:04d}"


class ConcurrencyRecordingSink:
    """A real SQLite sink that records how many patients' messages are applied at once (in one batch or in
    overlapping ones), to prove delivery does not serialise patients."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.max_batch = 3  # small batches, so that 20 patients need several batches side by side
        self.active = 0
        self.max_active = 0

    def apply_many(self, requests: Sequence[ApplyRequest]) -> list[list[OpResult] | SinkError]:
        with self._lock:
            self.active += len(requests)
            self.max_active = max(self.max_active, self.active)
        try:
            threading.Event().wait(0.002)  # CRM round-trip latency, so batches overlap as they do in production
            return self._inner.apply_many(requests)
        finally:
            with self._lock:
                self.active -= len(requests)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_interleaved_updates_for_20_patients_last_update_wins_with_several_lanes(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "journal.sqlite3")
    sink = ConcurrencyRecordingSink(open_sink(tmp_path / "crm.sqlite3"))
    mapper = compile_rules(load_rules(None), default_timezone="America/Chicago")
    metrics = _NullMetrics()
    delivery = Delivery(journal, sink, mapper, metrics, DeliveryPolicy(lanes=4, poll_interval=0.1))
    intake = Intake(GroupCommitter(journal, timedelta(hours=1)), metrics, policy=mapper.patient_policy,
                    supported=DEFAULT_SUPPORTED, on_pending=delivery.wake)
    delivery.start()
    try:
        # 20 patients x 6 updates; update k of every patient is sent before update k+1 of any patient, over
        # 4 concurrent "connections" (tasks), each keeping its own order.
        async def conn(c: int) -> None:
            for k in range(6):
                for p in range(c, 20, 4):
                    trig = "A04" if k == 0 else "A08"
                    when = f"2026111509{k:02d}00-0500"
                    msg = adt(trig, mrn=f"ORD{p:03d}", cid=f"O{p:03d}-{k}", phone=phone(p * 10 + k), when=when)
                    outcome = await intake.handle(msg, f"test:{c}")
                    assert outcome.code == "AA"

        await asyncio.gather(*(conn(c) for c in range(4)))
        await wait_for(lambda: journal.counts().get("pending", 0) == 0 and delivery.idle, timeout=60)
        contacts = {c.mrn: c for c in sink.contacts()}
        assert len(contacts) == 20
        for p in range(20):
            assert contacts[f"ORD{p:03d}"].phone == f"+1217555{p * 10 + 5:04d}"
        assert journal.counts().get("done", 0) == 120
        assert sink.max_active > 3, "patients were never applied in more than one batch at once"
    finally:
        await delivery.stop()
        journal.close()
        sink.close()


async def test_a_bad_message_in_a_batch_dead_letters_alone(tmp_path: Path) -> None:
    """30 patients journaled before delivery starts, so they go out in batches: the one message with a bad
    birth date is dead-lettered, every other is applied, and each entry's history has exactly one outcome."""
    journal = open_journal(tmp_path / "journal.sqlite3")
    sink = open_sink(tmp_path / "crm.sqlite3")
    mapper = compile_rules(load_rules(None), default_timezone="America/Chicago")
    metrics = _NullMetrics()
    delivery = Delivery(journal, sink, mapper, metrics, DeliveryPolicy(lanes=2, poll_interval=0.1))
    intake = Intake(GroupCommitter(journal, timedelta(hours=1)), metrics, policy=mapper.patient_policy,
                    supported=DEFAULT_SUPPORTED)
    try:
        for p in range(30):
            msg = adt("A04", mrn=f"BAT{p:03d}", cid=f"BAT-{p}", dob="19801345" if p == 7 else "19800214")
            assert (await intake.handle(msg, "test")).code == "AA"
        delivery.start()
        await wait_for(lambda: journal.counts().get("pending", 0) == 0 and delivery.idle, timeout=60)
        assert {k: v for k, v in journal.counts().items() if v} == {"done": 29, "dead": 1}
        [dead] = journal.query(states=["dead"])
        assert dead.control_id == "BAT-7" and dead.error_kind == "bad_field_value"
        assert sorted(c.mrn for c in sink.contacts()) == [f"BAT{p:03d}" for p in range(30) if p != 7]
        for entry in journal.query():
            events = [h.event for h in journal.history(entry.id)]
            assert events[0] == "received" and len(events) == 2, events
    finally:
        await delivery.stop()
        journal.close()
        sink.close()


@pytest.mark.postgres
@pytest.mark.slow
async def test_crm_outage_everything_acked_then_applied_in_order_without_duplicates(
    tmp_path: Path, pg_server: PgServer
) -> None:
    crm_url = pg_server.create_database()
    store = {"data_dir": tmp_path / "data", "crm": crm_url}
    async with running_bridge(tmp_path / "data", store=store,
                              delivery={"backoff_initial": 0.1, "backoff_max": 0.5, "poll_interval": 0.1}) as app:
        first = await send_all(app.mllp.port, [adt("A04", mrn=f"OUT{p}", cid=f"OUT{p}-0", phone=phone(p * 10))
                                               for p in range(5)])
        assert all(a[0] == "AA" for a in first)
        await wait_for(lambda: len(app.sink.contacts()) == 5, timeout=30)
        pg_server.stop()
        try:
            during = []
            for k in range(1, 4):
                during += await send_all(app.mllp.port, [
                    adt("A08", mrn=f"OUT{p}", cid=f"OUT{p}-{k}", phone=phone(p * 10 + k),
                        when=f"2026111510{k:02d}00-0500") for p in range(5)])
            assert [a[0] for a in during] == ["AA"] * 15  # acknowledged although the CRM is down
            await wait_for(lambda: any(e.attempts > 0 for e in app.journal.query(states=["pending"])), timeout=30)
        finally:
            pg_server.start()
            pg_server.wait_ready()
        await wait_for(lambda: app.journal.counts().get("pending", 0) == 0, timeout=60, interval=0.2)
        contacts = app.sink.contacts()
        assert sorted(c.mrn for c in contacts) == [f"OUT{p}" for p in range(5)]  # no duplicates
        for c in contacts:
            p = int(c.mrn[3:])
            assert c.phone == f"+1217555{p * 10 + 3:04d}"  # the last update won: order held through retries
        assert app.journal.counts().get("dead", 0) == 0


def _strict_sex_rules(tmp_path: Path, allow_x: bool) -> Path:
    """The default rules, with an extra patient-sex code that only exists in the 'fixed' version."""
    from importlib import resources

    text = resources.files("hl7bridge.mapping").joinpath("default_rules.yaml").read_text()
    path = tmp_path / ("rules_fixed.yaml" if allow_x else "rules_broken.yaml")
    if allow_x:
        text = _add_sex_code(text)
    path.write_text(text)
    return path


def _add_sex_code(text: str) -> str:
    import yaml

    data = yaml.safe_load(text)
    data["code_tables"]["sex"]["map"]["X"] = "O"
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("head_of_line", ["hold", "continue"])
async def test_dead_letter_then_fixed_rules_and_retry_applies_it(tmp_path: Path, head_of_line: str) -> None:
    data = tmp_path / "data"
    broken = _strict_sex_rules(tmp_path, allow_x=False)
    bad = adt("A04", mrn="DLQ1", cid="DLQ1-0", sex="X")
    later = adt("A08", mrn="DLQ1", cid="DLQ1-1", phone=phone(42), when="20261115100000-0500")
    other = adt("A04", mrn="DLQ2", cid="DLQ2-0")
    async with running_bridge(data, rules=broken, delivery={"head_of_line": head_of_line}) as app:
        acks = await send_all(app.mllp.port, [bad, later, other])
        assert [a[0] for a in acks] == ["AA", "AA", "AA"]
        dead = await wait_for(lambda: dlq.dead_letters(app.journal), timeout=20)
        assert [e.control_id for e in dead] == ["DLQ1-0"]
        assert dead[0].error_kind and "X" not in dead[0].reason.split()  # reason names the field, not PHI
        await wait_for(lambda: app.sink.contacts("DLQ2"), timeout=20)  # other patients are never blocked
        if head_of_line == "hold":
            await wait_for(lambda: app.journal.counts().get("pending", 0) == 1 and app.delivery.idle, timeout=10)
            assert [e.control_id for e in app.journal.query(states=["pending"])] == ["DLQ1-1"]
        else:
            await wait_for(lambda: app.sink.contacts("DLQ1"), timeout=20)  # the later A08 created the contact
    fixed = _strict_sex_rules(tmp_path, allow_x=True)
    async with running_bridge(data, rules=fixed, delivery={"head_of_line": head_of_line}) as app:
        assert dlq.retry(app.journal, [dead[0].id]) == 1
        app.delivery.wake()
        await wait_for(lambda: app.journal.counts().get("pending", 0) == 0
                       and app.journal.counts().get("dead", 0) == 0, timeout=20)
        contact = app.sink.contacts("DLQ1")[0]
        assert contact.phone == "+12175550042"  # the later A08 is the newest data either way
        history = [h.event for h in app.journal.history(dead[0].id)]
        assert any("dead" in h for h in history) and any("requeue" in h or "retry" in h for h in history)
        later_entry = next(e for e in app.journal.query() if e.control_id == "DLQ1-1")

        def applied_at(entry_id: int) -> Any:
            return next(h.at for h in reversed(app.journal.history(entry_id)) if h.event.startswith("applied"))

        if head_of_line == "hold":
            # Strict order: the retried A04 (sex X, now mapped to O) first, then the A08 that waited for it.
            assert applied_at(dead[0].id) <= applied_at(later_entry.id)
            assert contact.sex == "F"  # the A08 came later and says F
        else:
            # The A08 went ahead; the retried, older A04 is recognised as stale and changes nothing.
            assert any("stale" in h for h in history)
            assert contact.sex == "F"


@pytest.mark.slow
async def test_kill_9_during_processing_loses_nothing_and_applies_nothing_twice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bridge = BridgeProcess(data).start()
    msgs = [adt("A04" if k == 0 else "A08", mrn=f"KP{p:03d}", cid=f"KP{p:03d}-{k}", phone=phone(p * 10 + k),
                when=f"2026111509{k:02d}00-0500") for k in range(3) for p in range(100)]
    try:
        acks = await asyncio.gather(*(send_all(bridge.port, msgs[i::6]) for i in range(6)))
        assert all(a[0] == "AA" for batch in acks for a in batch)
        journal = open_journal(data / "journal.sqlite3")
        try:
            # Kill while the workers are still applying (some done, some pending).
            wait_for_sync(lambda: journal.counts().get("done", 0) > 0, timeout=30, interval=0.005)
        finally:
            journal.close()
    finally:
        bridge.kill()
    again = BridgeProcess(data).start()
    try:
        journal = open_journal(data / "journal.sqlite3")
        try:
            wait_for_sync(lambda: journal.counts().get("pending", 0) == 0, timeout=60)
            assert journal.counts().get("done", 0) == 300
            for entry in journal.query():
                events = [h.event for h in journal.history(entry.id) if h.event.startswith("applied")]
                effective = [e for e in events if "already_applied" not in e]
                # A crash between the CRM commit and the journal update shows up as one "already_applied" on
                # restart (the sink remembered the message): never as a second effective application.
                assert events and len(effective) <= 1, (entry.control_id, events)
        finally:
            journal.close()
    finally:
        again.terminate()
    sink = open_sink(data / "crm.sqlite3")
    try:
        contacts = sink.contacts()
        assert len(contacts) == 100
        assert all(c.phone == f"+1217555{int(c.mrn[2:]) * 10 + 2:04d}" for c in contacts)
    finally:
        sink.close()
