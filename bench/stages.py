"""Per-stage cost of one message through hl7bridge, each stage timed alone on the benchmark message.

    python -m bench.stages [--json]

Run as its own process (the parent benchmark keeps its event loop free). Each stage is the library call
the server makes, fed the benchmark ADT^A04, repeated for a bounded time; the result is µs per message.
The journal and sink stages write to throwaway SQLite files with the product's own durability settings
(synchronous=FULL, one fsync per commit), so they include the fsync. `gil_contention` shows what one
CPU-bound thread (the workers' parse) does to a journal commit in the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.messages import control_id, message

__all__ = ["measure_stages"]

_BUDGET = 0.6  # seconds per stage: enough for a stable mean, small enough for `make bench`


def _per_call(fn: Callable[[int], Any], budget: float = _BUDGET, max_calls: int = 200_000) -> float:
    """Mean seconds per call of fn(i), over `budget` seconds or `max_calls` calls."""
    fn(0)  # warm caches (lru_caches, compiled rules)
    n = 0
    started = time.perf_counter()
    deadline = started + budget
    while n < max_calls:
        fn(n + 1)
        n += 1
        if n % 16 == 0 and time.perf_counter() >= deadline:
            break
    return (time.perf_counter() - started) / n


def _entry(i: int, prefix: str = "STG001") -> Any:
    from hl7bridge.hl7.envelope import scan_bytes
    from hl7bridge.records import NewEntry

    raw = message(control_id(prefix, 0, i), i)
    scanned, _ = scan_bytes(raw)
    return NewEntry(received_at=datetime.now(UTC), peer="127.0.0.1:40000", raw=raw, envelope=scanned.envelope,
                    patient_key=scanned.patient_key, state="pending", ack_code="AA", reason="", error_kind="",
                    err_code="")


def _strict_validation(raws: list[bytes]) -> dict[str, float]:
    """Seconds per message of the opt-in strict validation (hl7apy), which the intake runs off the event loop.

    The benchmark ADT^A04 is not conformant to HL7 2.5.1: PID-29 (a timestamp) holds the death indicator
    that belongs in PID-30, and IN1-15 the insured's name that belongs in IN1-16. Strict validation would
    stop at PID-29, so the stage moves both to time a whole validation.
    """
    try:
        from hl7bridge.hl7.strict import validate_strict
    except ImportError:  # an hl7bridge without strict validation
        return {}
    from hl7bridge.errors import Hl7BridgeError
    from hl7bridge.hl7.parse import normalise_segments

    texts = [normalise_segments(r.decode()).replace("|||N||||||||N", "|||N|||||||||N")
             .replace("|||||||Doe", "||||||||Doe") for r in raws]
    label = "strict validation, hl7apy (opt-in)"
    try:
        validate_strict(texts[0], "2.5.1")
    except Hl7BridgeError:  # the benchmark message changed: time it anyway, and say it is rejected
        label += ", message rejected"

    def one(i: int) -> None:
        try:
            validate_strict(texts[i % 64], "2.5.1")
        except Hl7BridgeError:
            pass

    return {label: _per_call(one)}


def measure_stages() -> dict[str, float]:
    """µs per message for each stage of the pipeline (see the module docstring)."""
    from hl7bridge.app import build_mapper
    from hl7bridge.config import load_config
    from hl7bridge.crm.sqlite import SqliteSink
    from hl7bridge.errors import AckCode
    from hl7bridge.hl7.ack import build_ack
    from hl7bridge.hl7.envelope import DEFAULT_POLICY, scan_bytes, validate
    from hl7bridge.hl7.parse import encode, parse_message
    from hl7bridge.mllp.framer import MllpFramer, encode_frame
    from hl7bridge.store.sqlite import SqliteJournal

    out: dict[str, float] = {}
    framed = [encode_frame(message(control_id("STG000", 0, i), i)) for i in range(64)]
    raws = [message(control_id("STG000", 0, i), i) for i in range(64)]
    framer = MllpFramer()
    out["framing (MllpFramer.feed)"] = _per_call(lambda i: framer.feed(framed[i % 64]))
    out["envelope (scan_bytes + validate)"] = _per_call(
        lambda i: validate(scan_bytes(raws[i % 64], DEFAULT_POLICY)[0]))
    env = scan_bytes(raws[0])[0].envelope
    out["ack (build_ack + encode)"] = _per_call(lambda i: encode(build_ack(env, AckCode.AA), env.charset))
    out["log line (one INFO record, formatted)"] = _log_line()
    log = logging.getLogger("bench.stages.null")
    log.handlers[:] = [logging.StreamHandler(io.StringIO())]
    log.handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.propagate = False
    log.setLevel(logging.INFO)
    out["log line, stdlib Logger.info + StreamHandler (reference)"] = _per_call(lambda i: log.info(
        "message journal_id=%s control_id=%s type=%s outcome=%s ack=%s", i, "X", "ADT^A04", "accepted", "CA",
        extra={"journal_id": i, "outcome": "accepted", "ack": "CA"}))
    out["parse, python-hl7 (reference parser)"] = _per_call(lambda i: parse_message(raws[i % 64]))
    mapper = build_mapper(load_config(None, {}))
    parsed = [parse_message(r) for r in raws]
    out["mapping of a python-hl7 parse"] = _per_call(lambda i: mapper.map(parsed[i % 64]))
    try:
        from hl7bridge.hl7.lean import lean_view
    except ImportError:  # an hl7bridge without the lean reader: its workers map python-hl7 parses
        pass
    else:
        out["read + mapping, lean reader (what the workers run)"] = _per_call(
            lambda i: mapper.map(lean_view(raws[i % 64])))
    out.update(_strict_validation(raws))
    with tempfile.TemporaryDirectory(prefix="hl7bridge-stages-") as tmp:
        journal = SqliteJournal(Path(tmp) / "journal.sqlite3")
        journal.migrate()
        window = timedelta(hours=72)
        counter = iter(range(10**9))
        out["journal append, batch of 1 (fsync)"] = _per_call(
            lambda i: journal.append_batch([_entry(next(counter))], window))
        batch16 = _per_call(lambda i: journal.append_batch([_entry(next(counter)) for _ in range(16)], window),
                            max_calls=2_000)
        out["journal append, batch of 16, per message"] = batch16 / 16
        out.update(_logged_append(Path(tmp), window))
        ids = iter(range(1, 10**9))
        out["journal mark done (worker)"] = _per_call(lambda i: journal.mark(next(ids), "done", event="applied"))
        sink = SqliteSink(Path(tmp) / "crm.sqlite3")
        sink.migrate()
        ops = [mapper.map(p) for p in parsed]
        out["sink apply, SQLite CRM (fsync)"] = _per_call(
            lambda i: sink.apply(ops[i % 64], message_key=f"EPIC|NORTHCLINIC|K{i}"))
        out["journal append, batch of 1, one parse thread running (median)"] = _gil_contended(
            journal, window, counter)
        default_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)  # what `hl7bridge serve` sets (App.start)
        try:
            out["the same, 0.5 ms GIL switch interval (median)"] = _gil_contended(journal, window, counter)
        finally:
            sys.setswitchinterval(default_interval)
        sink.close()
        journal.close()
    return {k: v * 1e6 for k, v in out.items()}


def _logged_append(tmp: Path, window: timedelta) -> dict[str, float]:
    """The same appends through the log-backed journal (store/logged.py): the ACK path pays one write and
    one fdatasync of the intake log; SQLite is written by its indexer thread (running meanwhile)."""
    try:
        from hl7bridge.store.logged import LoggedJournal
    except ImportError:  # an hl7bridge without the intake log
        return {}
    journal = LoggedJournal(tmp / "logged.sqlite3")
    journal.migrate()
    counter = iter(range(10**9))
    try:
        one = _per_call(lambda i: journal.append_batch([_entry(next(counter), "STGLOG")], window))
        sixteen = _per_call(lambda i: journal.append_batch([_entry(next(counter), "STGLOG") for _ in range(16)],
                                                           window), max_calls=2_000)
    finally:
        journal.close()
    return {"journal append, log-backed, batch of 1 (fdatasync)": one,
            "journal append, log-backed, batch of 16, per message": sixteen / 16}


def _product_logging() -> Callable[[], None]:
    """Install the bridge's own log handler (`setup_logging`) writing to a discarded stream, as
    `hl7bridge serve` writes to a file; returns the undo."""
    from hl7bridge.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("INFO")
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(io.StringIO())

    def undo() -> None:
        root.handlers[:], level = saved
        root.setLevel(level)

    return undo


def _log_line() -> float:
    """One intake INFO line the way the bridge logs it: its record path and its handler, on a running
    event loop (where intake runs; the handler may batch writes there)."""
    log = logging.getLogger("hl7bridge.intake")
    args = ("X", "ADT^A04", "accepted", "CA", "")
    fmt = "message journal_id=%s control_id=%s type=%s outcome=%s ack=%s%s"
    try:
        from hl7bridge.logs import RecordEmitter
    except ImportError:  # an hl7bridge that logs the line with Logger.info
        def call(i: int) -> None:
            log.info(fmt, i, *args, extra={"journal_id": i, "outcome": "accepted", "ack": "CA"})
    else:
        emit = RecordEmitter(log, logging.INFO)

        def call(i: int) -> None:
            emit(fmt, (i, *args), {"journal_id": i, "outcome": "accepted", "ack": "CA"})

    undo = _product_logging()

    async def on_loop() -> float:
        return _per_call(call)

    try:
        return asyncio.run(on_loop())
    finally:
        undo()


def _gil_contended(journal: Any, window: timedelta, counter: Any) -> float:
    """A journal commit while another thread parses messages (what the workers do to intake)."""
    from hl7bridge.hl7.parse import parse_message

    stop = threading.Event()
    raw = message("STGCPU", 1)

    def burn() -> None:
        while not stop.is_set():
            parse_message(raw)

    thread = threading.Thread(target=burn, daemon=True)
    thread.start()
    times: list[float] = []
    try:
        deadline = time.perf_counter() + 1.5
        while len(times) < 300 and time.perf_counter() < deadline:
            batch = [_entry(next(counter))]
            started = time.perf_counter()
            journal.append_batch(batch, window)
            times.append(time.perf_counter() - started)
    finally:
        stop.set()
        thread.join(5)
    return sorted(times)[len(times) // 2]  # the median: the convoy makes the mean swing run to run


def measure_intake_loop(count: int = 3000) -> float:
    """µs per message of the whole intake handler (scan, journal entry, ACK, log, metrics) with the
    journal replaced by an instant one: the event-loop CPU cost per message, without the fsync."""
    from hl7bridge.hl7.envelope import DEFAULT_POLICY, DEFAULT_SUPPORTED
    from hl7bridge.metrics import Metrics
    from hl7bridge.pipeline import Intake
    from hl7bridge.records import AppendResult

    class _Instant:
        def __init__(self) -> None:
            self.n = 0

        async def submit(self, entry: Any) -> AppendResult:
            self.n += 1
            return AppendResult(self.n, False, entry.ack_code)

    logging.getLogger("hl7bridge.intake").setLevel(logging.INFO)
    intake = Intake(_Instant(), Metrics(), policy=DEFAULT_POLICY, supported=DEFAULT_SUPPORTED)  # type: ignore[arg-type]
    raws = [message(control_id("STGINT", 0, i), i) for i in range(count)]

    async def go() -> float:
        started = time.perf_counter()
        for raw in raws:
            await intake.handle(raw, "127.0.0.1:40000")
        return (time.perf_counter() - started) / count

    return asyncio.run(go()) * 1e6


class _InstantCommitter:
    """A GroupCommitter stand-in that stores nothing and answers at once (no fsync, no thread)."""

    def __init__(self) -> None:
        self.n = 0

    async def submit(self, entry: Any) -> Any:
        from hl7bridge.records import AppendResult

        self.n += 1
        return AppendResult(self.n, False, entry.ack_code)


def measure_mllp_loop(count: int = 20_000, connections: int = 16) -> float:
    """Event-loop CPU µs per message of the MLLP listener plus intake, the journal replaced by an instant
    one, driven over loopback by the load generator in its own process: what the bridge's loop thread
    spends per message on everything but the journal. CPU time of this thread, not wall time, so the
    load generator sharing the machine moves it less. Runs on uvloop when installed, as the bridge does."""
    from hl7bridge.hl7.envelope import DEFAULT_POLICY, DEFAULT_SUPPORTED
    from hl7bridge.metrics import Metrics
    from hl7bridge.mllp.server import ConnectionInfo, MllpServer
    from hl7bridge.pipeline import Intake

    logging.getLogger("hl7bridge.intake").setLevel(logging.INFO)
    intake = Intake(_InstantCommitter(), Metrics(), policy=DEFAULT_POLICY,  # type: ignore[arg-type]
                    supported=DEFAULT_SUPPORTED)

    async def handle(payload: bytes, info: ConnectionInfo) -> bytes:
        return (await intake.handle(payload, info.peer)).payload

    root = str(Path(__file__).resolve().parent.parent)

    async def go() -> float:
        server = MllpServer(handle, host="127.0.0.1", port=0)
        await server.start()
        try:
            load = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.stages", "--load", str(server.port), str(count), str(connections),
                cwd=root, stdout=asyncio.subprocess.PIPE)
            started = time.thread_time()
            out, _ = await asyncio.wait_for(load.communicate(), 300)
            spent = time.thread_time() - started
        finally:
            await server.stop(grace=1.0)
        acked = int(out.split()[-1]) if out.split() else 0
        if load.returncode != 0 or acked < count:
            raise RuntimeError(f"load generator answered {acked} of {count} (exit {load.returncode})")
        return spent / acked * 1e6

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.run(go())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(go())


def _load(port: int, count: int, connections: int) -> None:
    """The other side of `measure_mllp_loop`: prints how many messages were ACKed (AA/CA, right MSH-10)."""
    from bench.loadgen import run_load

    result = asyncio.run(run_load("127.0.0.1", port, connections=connections, max_messages=count, duration=120.0,
                                  prefix="STGMLLP"))
    print(result.ok)


def main() -> None:
    parser = argparse.ArgumentParser(description="per-stage cost of one message through hl7bridge")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--load", nargs=3, type=int, metavar=("PORT", "COUNT", "CONNECTIONS"),
                        help=argparse.SUPPRESS)  # the load side of measure_mllp_loop
    args = parser.parse_args()
    if args.load:
        _load(*args.load)
        return
    stages = measure_stages()
    # The intake's INFO lines go through the bridge's own handler to a discarded stream, as they would go
    # to a file in production.
    undo = _product_logging()
    try:
        stages["intake handler total, journal excluded (event loop)"] = measure_intake_loop()
        stages["intake over MLLP, 16 connections, journal excluded (event-loop CPU)"] = measure_mllp_loop()
    finally:
        undo()
    if args.json:
        print(json.dumps(stages))
    else:
        for name, us in stages.items():
            print(f"{us:10.1f} µs  {name}")


if __name__ == "__main__":
    main()
