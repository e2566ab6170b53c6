"""The delivery worker process: it applies what the listener journals, answers after_apply waiters, is
restarted when it dies, never outlives its bridge, and logs no PHI."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from hl7bridge.delivery_process import DeliveryWorker
from tests.bridge import BridgeProcess, running_bridge, send_all, wait_for, wait_for_sync
from tests.messages import adt


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _done(data: Path) -> int:
    with closing(sqlite3.connect(data / "journal.sqlite3")) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM journal WHERE state = 'done'").fetchone()[0])


@pytest.mark.asyncio
async def test_a_killed_worker_is_restarted_and_delivery_goes_on(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        worker = app.delivery
        assert isinstance(worker, DeliveryWorker) and worker.alive
        await send_all(app.mllp.port, [adt("A04", mrn=f"K{i}", cid=f"K-{i}") for i in range(5)])
        await wait_for(lambda: app.journal.counts().get("done", 0) == 5, timeout=30)
        assert worker._proc is not None
        os.kill(worker._proc.pid, signal.SIGKILL)
        await wait_for(lambda: worker.restarts == 1 and worker.alive, timeout=30)
        # Messages journaled after the restart are applied by the new worker, in order per patient.
        acks = await send_all(app.mllp.port, [adt("A08", mrn=f"K{i}", cid=f"K-{i}-2", phone="^PRN^PH^^1^217^5550199",
                                                  when="20261115100000-0500") for i in range(5)])
        assert [a[0] for a in acks] == ["AA"] * 5
        await wait_for(lambda: app.journal.counts().get("done", 0) == 10, timeout=30)
        assert all(c.phone == "+12175550199" for c in app.sink.contacts())
        assert worker.settled == 0  # after_commit mode: the worker reports no settlements, only metrics
        text = app.metrics.render().decode()
        assert 'hl7bridge_messages_applied_total{trigger="A08",type="ADT"} 5.0' in text


@pytest.mark.asyncio
async def test_after_apply_waits_for_the_worker(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data", intake={"ack_mode": "after_apply"}) as app:
        acks = await send_all(app.mllp.port, [adt("A04", mrn="W1", cid="W-1"), adt("A04", mrn="W2", cid="W-2",
                                                                                 sex="X")])
        assert acks[0][0] == "AA" and app.sink.contacts("W1")  # applied (by the other process) before the AA
        assert acks[1][0] == "AE" and acks[1][2] == "103"  # its dead letter's error, carried back over the pipe
        assert isinstance(app.delivery, DeliveryWorker) and app.delivery.settled == 2


def test_worker_logs_no_phi_and_never_outlives_its_bridge(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bridge = BridgeProcess(data, "--log-level", "DEBUG").start()
    try:
        children = wait_for_sync(lambda: _children(bridge.proc.pid), timeout=30)  # type: ignore[union-attr]
        assert len(children) == 1
        asyncio.run(send_all(bridge.port, [adt("A04", mrn="PHI987", cid="PLOG-1", family="Qwertzu",
                                               given="Asdfgh")]))
        wait_for_sync(lambda: _done(data) == 1, timeout=30)
        bridge.kill()  # SIGKILL: no chance to stop the worker in order
        deadline = time.monotonic() + 30
        while _alive(children[0]):
            assert time.monotonic() < deadline, "the worker outlived its bridge"
            time.sleep(0.05)
    finally:
        bridge.kill()
    text = bridge.log.read_text()
    assert "outcome=applied" in text  # the worker's DEBUG line, in the bridge's output
    assert "Qwertzu" not in text and "Asdfgh" not in text and "PHI987" not in text
