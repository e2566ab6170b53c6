"""`make bench`: hl7bridge and its peers in one run, on loopback, written to bench/RESULTS.md.

    python -m bench.run [--point-seconds 5] [--budget 540] [--quick] [--out bench/RESULTS.md]

Bounded: every load point by a message count and a duration, every scenario by a deadline, the whole
run by `--budget` seconds (sections that no longer fit are skipped and say so in the results). Servers
run one at a time, each in its own process; the load generator runs here, on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pstats
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import LoadResult, run_load
from bench.messages import SIZE, run_tag
from bench.scenarios import end_to_end, idle_connections, replay, write_replay_file
from bench.servers import Server, start_bridge, start_peer

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = (1, 4, 16, 64)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.seconds = seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def allows(self, estimate: float) -> bool:
        return self.left >= estimate


def _point(res: LoadResult) -> dict[str, Any]:
    return {"rate": res.rate, "p50": res.p(50), "p99": res.p(99), "ok": res.ok, "sent": res.sent,
            "errors": res.errors, "codes": res.codes, "seconds": res.seconds}


def _machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown memory"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kb / 1024 / 1024:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    from importlib.metadata import version

    pg = shutil.which("postgres") or ""
    try:
        from tests.pgserver import _find

        pg_bin = _find("postgres") or pg
        pg_version = subprocess.run([pg_bin, "--version"], capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"\d+(\.\d+)+", pg_version)
        pg_version = found.group(0) if found else "not found"
    except Exception:
        pg_version = "not found"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": memory,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "uvloop": version("uvloop"), "hl7": version("hl7"), "hl7apy": version("hl7apy"),
            "sqlite": sqlite3.sqlite_version, "postgres": pg_version}


async def _measure(server: Server, conns: int, seconds: float, prefix: str, *, reconnect: bool = False,
                   warmup: float = 0.5) -> LoadResult:
    if warmup > 0:
        await run_load("127.0.0.1", server.port, connections=conns, max_messages=400 if reconnect else 20_000,
                       duration=warmup, prefix=prefix[:5] + "W", reconnect_per_message=reconnect)
    return await run_load("127.0.0.1", server.port, connections=conns, max_messages=400_000,
                          duration=seconds, prefix=prefix, reconnect_per_message=reconnect)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.budget = Budget(args.budget)
        self.tmp = Path(tempfile.mkdtemp(prefix="hl7bridge-bench-"))
        self.tag = run_tag()
        self.seq = 0
        self.pg: Any = None
        self.results: dict[str, Any] = {
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
            "params": {"connections": list(args.connections), "point_seconds": args.point_seconds,
                       "hl7apy_seconds": args.hl7apy_seconds, "message_bytes": SIZE,
                       "replay_messages": args.replay_messages, "idle_rate": args.idle_rate},
            "throughput": {}, "notes": [],
        }

    def prefix(self) -> str:
        """Six characters: the run tag and a point number, so every MSH-10 of the run is unique."""
        self.seq += 1
        return f"{self.tag}{self.seq:02d}"[:6]

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        print(f"  note: {text}", flush=True)

    def record(self, server: str, conns: int, res: LoadResult) -> None:
        self.results["throughput"].setdefault(server, {})[str(conns)] = _point(res)
        print(f"  {server:45s} {conns:3d} conn: {res.rate:9,.0f} msg/s  p50 {res.p(50) * 1000:7.2f} ms  "
              f"p99 {res.p(99) * 1000:7.2f} ms  errors {res.errors}", flush=True)

    def pg_url(self) -> str | None:
        if self.pg is None:
            try:
                from tests.pgserver import PgServer

                self.pg = PgServer()
            except Exception as exc:
                self.pg = False
                self.note(f"PostgreSQL not available ({type(exc).__name__}: {str(exc)[:120]}); PG rows skipped")
        return self.pg.create_database() if self.pg else None

    # --- sections ---------------------------------------------------------------------------------

    def stages(self) -> None:
        print("per-stage costs", flush=True)
        out = subprocess.run([sys.executable, "-m", "bench.stages", "--json"], cwd=_ROOT, capture_output=True,
                             text=True, timeout=120)
        if out.returncode == 0:
            self.results["stages"] = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            self.note(f"stage profile failed: {out.stderr[-300:]}")

    async def peer(self, name: str, kind: str, seconds: float, reconnect: bool = False) -> None:
        print(name, flush=True)
        server = start_peer(kind)
        try:
            for conns in self.args.connections:
                res = await _measure(server, conns, seconds, self.prefix(), reconnect=reconnect,
                                     warmup=0.3 if not reconnect else 0.0)
                self.record(name, conns, res)
        finally:
            server.stop()

    async def bridge(self, name: str, *, pg: bool = False, launcher: tuple[str, ...] = (),
                     conns_list: tuple[int, ...] | None = None) -> None:
        print(name, flush=True)
        for conns in conns_list or self.args.connections:
            store = self.pg_url() if pg else None
            if pg and store is None:
                return
            data = self.tmp / f"bridge-{self.prefix()}"
            server = start_bridge(name, data, store=store, launcher=launcher)
            try:
                res = await _measure(server, conns, self.args.point_seconds, self.prefix())
                self.record(name, conns, res)
            finally:
                server.stop()

    async def idle(self, store_name: str, pg: bool) -> None:
        print(f"idle connections, {store_name}", flush=True)
        store = self.pg_url() if pg else None
        if pg and store is None:
            return
        data = self.tmp / f"idle-{self.prefix()}"
        server = start_bridge("idle", data, store=store)
        try:
            await run_load("127.0.0.1", server.port, connections=16, max_messages=300, duration=0.5,
                           prefix=self.prefix())
            res = await idle_connections(server, store or str(data / "journal.sqlite3"), idle=1000,
                                         connections=16, duration=4.0, rate=self.args.idle_rate,
                                         prefix=self.prefix()[:5])
        finally:
            server.stop()
        d = asdict(res)
        d["active_before"], d["active_with_idle"] = _point(res.active_before), _point(res.active_with_idle)
        self.results.setdefault("idle", {})[store_name] = d
        print(f"  RSS {res.rss_before_mb:.1f} → {res.rss_idle_mb:.1f} MB with {res.opened} idle; 16-conn p99 "
              f"{res.active_before.p(99) * 1000:.1f} → {res.active_with_idle.p(99) * 1000:.1f} ms", flush=True)

    async def e2e(self, store_name: str, pg: bool, duration: float) -> None:
        print(f"end to end, {store_name}", flush=True)
        store = self.pg_url() if pg else None
        if pg and store is None:
            return
        data = self.tmp / f"e2e-{self.prefix()}"
        server = start_bridge("e2e", data, store=store)
        journal = store or str(data / "journal.sqlite3")
        try:
            await run_load("127.0.0.1", server.port, connections=4, max_messages=200, duration=1.0,
                           prefix=self.prefix())
            res = await end_to_end(server, journal, rate=self.args.e2e_rate, duration=duration, connections=16,
                                   prefix=self.prefix(), early_after=self.args.e2e_early, drain=10.0)
        finally:
            server.stop()
        self.results.setdefault("e2e", {})[store_name] = {
            "offered_rate": res.offered_rate, "seconds": res.seconds, "stopped_early": res.stopped_early,
            "sent": res.load.sent, "ok": res.load.ok, "applied": res.applied, "applied_rate": res.applied_rate,
            "pending_at_end": res.pending_at_end, "p50": res.p50, "p99": res.p99}
        print(f"  applied {res.applied_rate:,.0f} msg/s over {res.seconds:.0f} s, p50 {res.p50:.3f} s "
              f"p99 {res.p99:.3f} s, pending {res.pending_at_end}", flush=True)

    def replay(self, store_name: str, pg: bool, file: Path) -> None:
        print(f"replay, {store_name}", flush=True)
        store = self.pg_url() if pg else None
        if pg and store is None:
            return
        data = self.tmp / f"replay-{self.prefix()}"
        data.mkdir()
        journal = store or str(data / "journal.sqlite3")
        res = replay(file, self.args.replay_messages, data, store=store, journal=journal,
                     limit=self.args.replay_limit, early_after=self.args.replay_early)
        self.results.setdefault("replay", {})[store_name] = asdict(res)
        print(f"  {res.applied:,} applied in {res.seconds:.1f} s (finished={res.finished}, projected "
              f"{res.projected_seconds:.0f} s) {res.error}", flush=True)

    async def profile(self) -> None:
        print("live profile (cProfile, event-loop thread)", flush=True)
        out = self.tmp / "bridge.prof"
        server = start_bridge("profiled", self.tmp / f"prof-{self.prefix()}",
                              launcher=("-m", "bench.variants", "profile", str(out)))
        try:
            res = await _measure(server, 16, self.args.point_seconds, self.prefix())
        finally:
            server.stop()
        if not out.exists():
            self.note("live profile: no stats written")
            return
        stats = pstats.Stats(str(out))
        total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
        rows = []
        for (file, line, func), (_cc, _nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            short = f"{Path(file).parent.name}/{Path(file).name}:{line} {func}" if line else func
            rows.append({"func": short, "own": tt / total * 100, "cum": ct / total * 100})
        rows.sort(key=lambda r: r["own"], reverse=True)
        self.results["profile"] = {"connections": 16, "seconds": res.seconds, "messages": res.ok,
                                   "rows": rows[:22]}

    # --- the run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        a, b = self.args, self.budget
        secs = a.point_seconds + 1.0
        n = len(a.connections)
        self.stages()
        await self.peer(report.CEILING, "echo", a.point_seconds)
        await self.bridge(report.BRIDGE)
        await self.peer(report.PYHL7, "pyhl7", a.point_seconds)
        await self.peer(report.HL7APY, "hl7apy", a.hl7apy_seconds, reconnect=True)
        if b.allows(n * (secs + 2) + 200):
            await self.bridge(report.BRIDGE_PG, pg=True)
        if b.allows(2 * secs + 180):
            await self.bridge(report.INTAKE_ONLY, launcher=("-m", "bench.variants", "intake-only"),
                              conns_list=(16, 64))
        for store, pg in (("SQLite", False), ("PostgreSQL", True)):
            if b.allows(25 + 150):
                await self.idle(store, pg)
        for store, pg in (("SQLite", False), ("PostgreSQL", True)):
            estimate = a.e2e_seconds + 15
            if b.allows(estimate + 60):
                await self.e2e(store, pg, a.e2e_seconds)
            elif b.allows(a.e2e_early + 30):
                self.note(f"end to end on {store} shortened to {a.e2e_early:.0f} s to fit the time budget")
                await self.e2e(store, pg, a.e2e_early + 1)
            else:
                self.note(f"end to end on {store} skipped: time budget")
        file = self.tmp / "replay.hl7"
        write_replay_file(file, a.replay_messages, self.prefix())
        for store, pg in (("SQLite", False), ("PostgreSQL", True)):
            if b.allows(min(a.replay_limit, a.replay_early * 1.5) + 20):
                self.replay(store, pg, file)
            else:
                self.note(f"replay on {store} skipped: time budget")
        if b.allows(a.point_seconds + 10):
            await self.profile()

    def close(self) -> None:
        if self.pg:
            self.pg.destroy()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="hl7bridge benchmarks against its peers (writes bench/RESULTS.md)")
    p.add_argument("--point-seconds", type=float, default=5.0)
    p.add_argument("--hl7apy-seconds", type=float, default=3.0)
    p.add_argument("--connections", type=int, nargs="+", default=list(CONNECTIONS))
    p.add_argument("--e2e-seconds", type=float, default=60.0)
    p.add_argument("--e2e-rate", type=float, default=2000.0)
    p.add_argument("--e2e-early", type=float, default=15.0, help="stop end to end after this if falling behind")
    p.add_argument("--idle-rate", type=float, default=150.0, help="paced load beside the idle connections")
    p.add_argument("--replay-messages", type=int, default=100_000)
    p.add_argument("--replay-limit", type=float, default=75.0)
    p.add_argument("--replay-early", type=float, default=20.0)
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    p.add_argument("--quick", action="store_true", help="a short smoke run (not for RESULTS.md)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.point_seconds, args.hl7apy_seconds, args.e2e_seconds = 1.0, 1.0, 6.0
        args.e2e_early, args.replay_messages, args.replay_limit, args.replay_early = 3.0, 2_000, 20.0, 5.0
    return args


def main(argv: list[str] | None = None) -> None:
    import uvloop

    args = _parse(argv)
    runner = Runner(args)
    started = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop:
            loop.run(runner.run())
    finally:
        runner.close()
    runner.results["seconds"] = time.monotonic() - started
    args.out.write_text(report.render(runner.results), encoding="utf-8")
    print(f"wrote {args.out} ({runner.results['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
