"""A replay at a configured limit of 50 requests/second never exceeds it, as the test CRM measures it (the
most requests arriving within any one second), and loses nothing.

Duration is kept bounded with HubSpot batching, which coalesces concurrent messages into one request:
- the real replay (`replay_files`: intake, journal, delivery lanes) of 500 messages, batches of 10, so a
  hundred-odd requests queue behind the limiter (~3 s);
- 5,000 messages from 64 concurrent workers (what the lanes do), batches of 50: ~300 requests (~10 s);
- the real replay of 5,000 messages, batches of 100, under @pytest.mark.slow (~15-25 s: the journal, not
  the CRM, sets the pace there, so it checks the ceiling and that nothing is lost).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from hl7bridge.crm.http import open_http_sink
from hl7bridge.delivery import DeliveryPolicy
from hl7bridge.hl7.parse import parse_message
from hl7bridge.replay import replay_files
from hl7bridge.store import open_journal
from tests.crmserver import CrmServer, sink_config
from tests.integration.test_http_sink_golive import MAPPER
from tests.messages import adt

LIMIT = 50


@dataclass
class Run:
    requests: int
    peak: int  # most requests that arrived within any one second
    span: float  # first to last request, seconds
    contacts: list[str]


async def _replay(tmp_path: Path, n: int, batch_size: int) -> Run:
    """The real replay: intake, journal, delivery lanes, the HubSpot sink."""
    lanes = 64
    # Delivery applies through asyncio.to_thread: give it as many threads as lanes (the default pool has
    # min(32, cpus + 4)), so concurrent messages can share a batch.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(lanes + 4))
    path = tmp_path / "replay.hl7"
    path.write_bytes(b"".join(adt("A04", mrn=f"R{i:05d}", cid=f"R{i:05d}", family=f"Fam{i}") for i in range(n)))
    with CrmServer() as server:
        sink = open_http_sink(sink_config("hubspot", server.base_url, rate_limit_per_second=LIMIT,
                                          batch_size=batch_size))
        journal = open_journal(tmp_path / "journal.sqlite3")
        try:
            summary = await replay_files(
                [path], journal, sink, MAPPER, dedup_window=timedelta(hours=1),
                policy=DeliveryPolicy(lanes=lanes, poll_interval=0.05, backoff_initial=0.05, backoff_max=0.5))
        finally:
            journal.close()
            sink.close()
        assert (summary.applied, summary.dead, summary.still_pending) == (n, 0, 0)
        return _measure(server)


def _measure(server: CrmServer) -> Run:
    return Run(len(server.log), server.max_per_second(), server.log[-1].at - server.log[0].at,
               sorted(c["hl7_mrn"] for c in server.hs("contacts")))


def _limiter_set_the_pace(run: Run) -> None:
    assert run.peak <= LIMIT, f"{run.peak} requests within one second"
    assert run.span >= (run.requests - 1) / LIMIT  # spaced at >= 1/LIMIT s
    assert run.peak >= LIMIT - 5  # and some second was full: the limiter, not the test, was the bottleneck


async def test_replay_of_500_messages_stays_under_50_requests_per_second(tmp_path: Path) -> None:
    run = await _replay(tmp_path, 500, batch_size=10)
    assert run.contacts == [f"R{i:05d}" for i in range(500)]  # each exactly once
    assert 100 <= run.requests < 500  # batched, and enough requests to queue behind the limiter
    _limiter_set_the_pace(run)


def test_5000_messages_from_64_concurrent_workers_stay_under_50_requests_per_second() -> None:
    """What delivery's lanes do, without the journal in the way, so the limiter alone sets the pace."""
    n = 5000
    with CrmServer() as server:
        sink = open_http_sink(sink_config("hubspot", server.base_url, rate_limit_per_second=LIMIT, batch_size=50))
        try:
            with ThreadPoolExecutor(64) as pool:
                outcomes = list(pool.map(lambda i: sink.apply(MAPPER.map(parse_message(
                    adt("A04", mrn=f"R{i:05d}", family=f"Fam{i}"), "utf-8")))[0].outcome, range(n)))
        finally:
            sink.close()
        run = _measure(server)
    assert outcomes == ["created"] * n
    assert run.contacts == [f"R{i:05d}" for i in range(n)]
    _limiter_set_the_pace(run)


@pytest.mark.slow
async def test_replay_of_5000_messages_stays_under_50_requests_per_second(tmp_path: Path) -> None:
    run = await _replay(tmp_path, 5000, batch_size=100)
    assert run.contacts == [f"R{i:05d}" for i in range(5000)]
    assert run.peak <= LIMIT, f"{run.peak} requests within one second"
