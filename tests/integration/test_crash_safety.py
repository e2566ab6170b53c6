"""Store, then ACK: a bridge SIGKILLed at a random moment has journaled every message it acknowledged."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from hl7bridge.hl7.ack import parse_ack
from hl7bridge.mllp.client import MllpClient
from hl7bridge.store import open_journal
from tests.bridge import BridgeProcess
from tests.messages import adt
from tests.pgserver import PgServer


async def _sender(port: int, conn: int, acked: set[str], stop: asyncio.Event) -> None:
    try:
        async with await MllpClient.connect("127.0.0.1", port, timeout=5) as client:
            for i in range(5000):  # bounded; the kill ends it long before
                if stop.is_set():
                    return
                cid = f"K{conn:02d}{i:05d}"
                ack = await client.send(adt(cid=cid, mrn=f"P{conn}-{i % 7}"), timeout=5)
                code, acked_id, _ = parse_ack(ack.decode())
                if code == "AA" and acked_id == cid:
                    acked.add(cid)
    except Exception:
        return  # the kill drops the connection: everything acknowledged so far is in `acked`


async def _crash_run(bridge: BridgeProcess, seed: int) -> set[str]:
    acked: set[str] = set()
    stop = asyncio.Event()
    senders = [asyncio.create_task(_sender(bridge.port, c, acked, stop)) for c in range(4)]
    rnd = random.Random(seed)
    deadline = asyncio.get_running_loop().time() + 20
    target = rnd.randint(30, 300)
    while len(acked) < target and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    bridge.kill()  # SIGKILL while messages are in flight on every connection
    stop.set()
    await asyncio.wait_for(asyncio.gather(*senders), 15)
    return acked


@pytest.mark.slow
async def test_sqlite_every_acked_message_survives_sigkill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bridge = BridgeProcess(data).start()
    try:
        acked = await _crash_run(bridge, seed=random.randrange(1 << 30))
    finally:
        bridge.kill()
    assert acked, "no message was acknowledged before the kill"
    again = BridgeProcess(data, port=bridge.port).start()  # restart on the same data
    again.terminate()
    journal = open_journal(data / "journal.sqlite3")
    try:
        stored = {e.control_id for e in journal.query()}
    finally:
        journal.close()
    assert acked <= stored, f"{len(acked - stored)} acknowledged messages lost"


@pytest.mark.slow
@pytest.mark.postgres
async def test_postgres_every_acked_message_survives_sigkill(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.create_database()
    data = tmp_path / "data"
    data.mkdir()
    bridge = BridgeProcess(data, "--store", url).start()
    try:
        acked = await _crash_run(bridge, seed=random.randrange(1 << 30))
    finally:
        bridge.kill()
    assert acked
    journal = open_journal(url)
    try:
        stored = {e.control_id for e in journal.query()}
    finally:
        journal.close()
    assert acked <= stored, f"{len(acked - stored)} acknowledged messages lost"
