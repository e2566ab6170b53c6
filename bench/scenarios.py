"""The benchmark's longer scenarios: end to end (received → applied), replay, 1,000 idle connections.

Receive-to-applied latency is read from the journal itself after the run: `received_at` is stamped at
intake, `updated_at` when the worker marks the entry done (after the CRM commit), so every message has
its own exact latency. Entries still pending when the run ends count with their age so far (a lower
bound), so a bridge that falls behind cannot look fast by leaving the slow ones out.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, percentile, run_load
from bench.messages import messages
from bench.servers import Server, rss_mb

__all__ = [
    "E2eResult",
    "IdleResult",
    "ReplayResult",
    "end_to_end",
    "idle_connections",
    "journal_rows",
    "replay",
]

_ROOT = Path(__file__).resolve().parent.parent


# --- reading the journal ----------------------------------------------------------------------------


def _parse_ts(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC).timestamp()


def _query(location: str, sql: str) -> list[Any]:
    """All rows of one read-only query on the journal at `location` (a PostgreSQL URL or a SQLite file)."""
    if location.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(location) as conn:
            return conn.execute(sql).fetchall()
    conn = sqlite3.connect(f"file:{location}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def journal_rows(location: str) -> list[tuple[float, float, str]]:
    """(received_at, updated_at, state) of every journal entry, as Unix seconds."""
    rows = _query(location, "SELECT received_at, updated_at, state FROM journal")
    return [(_parse_ts(r), _parse_ts(u), s) for r, u, s in rows]


def journal_counts(location: str) -> dict[str, int]:
    try:
        rows = _query(location, "SELECT state, COUNT(*) FROM journal GROUP BY state")
    except Exception:  # the file or schema may not exist yet while the process starts
        return {}
    return {str(s): int(n) for s, n in rows}


# --- end to end -------------------------------------------------------------------------------------


@dataclass
class E2eResult:
    offered_rate: float
    load: LoadResult
    seconds: float
    stopped_early: bool
    applied: int = 0
    applied_rate: float = 0.0
    pending_at_end: int = 0
    p50: float = float("nan")
    p99: float = float("nan")
    notes: list[str] = field(default_factory=list)


async def end_to_end(server: Server, journal: str, *, rate: float, duration: float, connections: int,
                     prefix: str, early_after: float, drain: float) -> E2eResult:
    """Offer `rate` msg/s for up to `duration` s and measure received → applied. If after `early_after`
    seconds the workers apply less than 90 % of the offered rate, stop: the target is already missed,
    and a growing backlog only makes the rest of the run longer."""
    stop = asyncio.Event()
    started = time.time()
    load_task = asyncio.create_task(run_load(
        "127.0.0.1", server.port, connections=connections, max_messages=int(rate * duration) + 1,
        duration=duration, prefix=prefix, rate=rate, stop=stop))
    stopped_early = False
    last_done, last_t = 0, started
    while not load_task.done():
        await asyncio.wait({load_task}, timeout=5.0)
        now = time.time()
        done = (await asyncio.to_thread(journal_counts, journal)).get("done", 0)
        window_rate = (done - last_done) / max(now - last_t, 1e-6)
        last_done, last_t = done, now
        if not load_task.done() and now - started >= early_after and window_rate < 0.9 * rate:
            stopped_early = True
            stop.set()
    load = await load_task
    load_end = time.time()
    deadline = load_end + drain
    while time.time() < deadline:
        if (await asyncio.to_thread(journal_counts, journal)).get("pending", 0) == 0:
            break
        await asyncio.sleep(0.25)
    end = time.time()
    rows = await asyncio.to_thread(journal_rows, journal)
    mine = [r for r in rows if r[0] >= started]
    latencies = [u - r if s == "done" else end - r for r, u, s in mine if s in ("done", "pending")]
    applied_in_window = sum(1 for r, u, s in mine if s == "done" and u <= load_end)
    res = E2eResult(rate, load, load_end - started, stopped_early)
    res.applied = sum(1 for _, _, s in mine if s == "done")
    res.applied_rate = applied_in_window / max(load_end - started, 1e-6)
    res.pending_at_end = sum(1 for _, _, s in mine if s == "pending")
    res.p50, res.p99 = percentile(latencies, 50), percentile(latencies, 99)
    return res


# --- replay -----------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    messages: int
    seconds: float
    finished: bool
    applied: int = 0
    projected_seconds: float = float("nan")
    journaled: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def write_replay_file(path: Path, count: int, prefix: str) -> None:
    with path.open("wb") as f:
        for raw in messages(prefix, count):
            f.write(raw)
            f.write(b"\n")


def replay(file: Path, count: int, data_dir: Path, *, store: str | None, journal: str, limit: float,
           early_after: float) -> ReplayResult:
    """`hl7bridge replay FILE --json` in its own process, bounded by `limit` seconds. After `early_after`
    seconds, a run whose progress projects past 1.5x the limit is stopped and its projection reported."""
    cmd = [sys.executable, "-m", "hl7bridge.cli", "replay", str(file), "--data-dir", str(data_dir), "--json"]
    if store:
        cmd += ["--store", store]
    out_path = data_dir.parent / f"{data_dir.name}-replay.json"
    err_path = data_dir.parent / f"{data_dir.name}-replay.log"
    started = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=out, stderr=err)
        done = 0
        while proc.poll() is None:
            time.sleep(1.0)
            elapsed = time.monotonic() - started
            counts = journal_counts(journal)
            done = counts.get("done", 0)
            projected = elapsed * count / done if done else float("inf")
            if elapsed > limit or (elapsed > early_after and projected > 1.5 * limit):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                res = ReplayResult(count, elapsed, False, done, projected, sum(counts.values()))
                res.error = f"stopped after {elapsed:.0f} s"
                return res
    elapsed = time.monotonic() - started
    counts = journal_counts(journal)
    res = ReplayResult(count, elapsed, proc.returncode in (0, 1), counts.get("done", 0),
                       journaled=sum(counts.values()))
    try:
        res.summary = json.loads(out_path.read_text())
        res.applied = int(res.summary.get("applied", res.applied))
    except (OSError, ValueError):
        res.error = f"exit {proc.returncode}: {err_path.read_text(errors='replace')[-300:]}"
        res.finished = False
    res.projected_seconds = elapsed
    return res


# --- idle connections -------------------------------------------------------------------------------


@dataclass
class IdleResult:
    idle: int
    opened: int
    rss_before_mb: float
    rss_idle_mb: float
    active_before: LoadResult
    active_with_idle: LoadResult
    server_saw: float = float("nan")


def _gauge(http_port: int | None, name: str) -> float:
    if http_port is None:
        return float("nan")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


async def drained(journal: str, timeout: float) -> bool:
    """Wait (bounded) until the workers have no pending entry left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await asyncio.to_thread(journal_counts, journal)).get("pending", 0) == 0:
            return True
        await asyncio.sleep(0.2)
    return False


async def idle_connections(server: Server, journal: str, *, idle: int, connections: int, duration: float,
                           rate: float, prefix: str) -> IdleResult:
    """RSS and active-connection latency before and while `idle` connections sit open, sending nothing.
    The active load is paced at `rate` (below what the workers apply) and starts with no backlog, so
    both measurements see the same worker activity and only the idle connections differ."""
    await drained(journal, 15.0)
    before = await run_load("127.0.0.1", server.port, connections=connections, max_messages=10**7,
                            duration=duration, prefix=prefix + "A", rate=rate)
    rss_before = rss_mb(server.pid)
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(idle):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            except OSError:
                break
            writers.append(writer)
        deadline = time.monotonic() + 10
        seen = float("nan")
        while time.monotonic() < deadline:  # until the bridge has accepted them all (its own gauge)
            seen = await asyncio.to_thread(_gauge, server.http_port, "hl7bridge_connections_active")
            if seen != seen or seen >= len(writers):
                break
            await asyncio.sleep(0.1)
        rss_idle = rss_mb(server.pid)
        await drained(journal, 15.0)
        during = await run_load("127.0.0.1", server.port, connections=connections, max_messages=10**7,
                                duration=duration, prefix=prefix + "B", rate=rate)
        rss_idle = max(rss_idle, rss_mb(server.pid))
    finally:
        for writer in writers:
            writer.close()
    return IdleResult(idle, len(writers), rss_before, rss_idle, before, during, seen)
