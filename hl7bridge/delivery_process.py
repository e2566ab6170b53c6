"""Delivery in its own process: the workers run beside the listener instead of under its GIL.

Why: intake (event loop: framing, envelope scan, journal append, ACK) and delivery (mapping, CRM upserts,
journal marks) are both CPU-bound Python. In one process they take turns on one GIL, so a busy worker
delays ACKs and the two together use about one core. As two processes they use two cores, and a CRM
client that hangs, leaks or crashes cannot stall the listener: `serve` restarts a worker that dies.

`DeliveryWorker` (in `serve`) is a drop-in for `Delivery` as the App uses it: `start`, `wake`, `wait_for`
(after_apply), `idle`, `settled`, `stop`. The child (`python -m hl7bridge.delivery_process`) runs the
same `Delivery` over its own connections to the journal and the CRM, so every guarantee in delivery.py
holds unchanged (at-least-once with idempotent sinks, per-patient order, dead letters). One worker per
journal: the child holds an exclusive lock on `<data_dir>/delivery.lock`, so a restarted bridge's worker
waits for the old one to finish its last batch instead of running beside it.

The pipes carry no message content. Parent -> child stdin: b"w" (new entries journaled: look now), b"s"
(stop: finish the batches in flight within the grace, leave the rest pending); EOF (the parent died)
also means stop. Child -> parent stdout: JSON lines, each a list of events: ["m", method, *args] a
DeliveryMetrics call, ["s", journal_id, error] an entry settled (after_apply mode only), ["i", idle],
["r"] ready. The configuration goes to the child as JSON in an environment variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from hl7bridge import errors
from hl7bridge.config import Config
from hl7bridge.delivery import DeliveryMetrics, Settlements
from hl7bridge.errors import ErrCode, Hl7BridgeError, MappingError

__all__ = ["DeliveryWorker", "main"]

log = logging.getLogger("hl7bridge.delivery")

_CONFIG_ENV = "HL7BRIDGE_WORKER_CONFIG"
_SETTLED_ENV = "HL7BRIDGE_WORKER_REPORT_SETTLED"
#: Restart backoff for a worker that died: doubles from the first to the last, then stays.
_RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_METRIC_METHODS = frozenset(
    ("applied", "filtered", "contact_created", "dead_lettered", "retry_scheduled", "sink_error", "set_backlog",
     "set_dlq_size"))


def _error_to_json(error: Hl7BridgeError | None) -> list[Any] | None:
    if error is None:
        return None
    return [type(error).__name__, error.reason, error.err_code.value, error.location]


def _error_from_json(obj: list[Any] | None) -> Hl7BridgeError | None:
    if obj is None:
        return None
    name, reason, code, location = obj
    cls = getattr(errors, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, Hl7BridgeError)):
        cls = MappingError
    try:
        return cls(str(reason), err_code=ErrCode(code), location=location)
    except ValueError:
        return cls(str(reason), location=location)


class DeliveryWorker:
    """The parent's handle on the delivery process; supervises it (restart with backoff if it dies)."""

    def __init__(self, config: Config, metrics: DeliveryMetrics, *, report_settled: bool,
                 grace: float = 10.0, start_timeout: float = 60.0) -> None:
        self._config = config
        self._metrics = metrics
        self._report_settled = report_settled
        self._grace = grace
        self._start_timeout = start_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake_scheduled = False
        self._ready = asyncio.Event()
        self._settlements = Settlements()
        self._idle = True
        #: How many times the worker had to be restarted.
        self.restarts = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker and wait until it has opened the journal and the CRM (raises if it cannot)."""
        await self._spawn()
        ready = asyncio.create_task(self._ready.wait())
        first = asyncio.create_task(self._pump(self._proc))  # type: ignore[arg-type]
        done, _ = await asyncio.wait({ready, first}, timeout=self._start_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            await self._kill()
            first.cancel()
            raise RuntimeError("the delivery worker did not start (see its log lines above)")
        self._supervisor = asyncio.create_task(self._supervise(first), name="delivery-worker")

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._ready.is_set()

    @property
    def idle(self) -> bool:
        return self._idle

    def wake(self) -> None:
        """New pending entries: tell the worker (at most one signal per event-loop iteration)."""
        if self._wake_scheduled:
            return
        self._wake_scheduled = True
        asyncio.get_running_loop().call_soon(self._send_wake)

    def wake_threadsafe(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """A callback for other threads (the journal's indexer) that wakes the worker via `loop`."""
        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                loop.call_soon_threadsafe(self.wake)
        return wake

    def wait_for(self, journal_id: int) -> asyncio.Future[Hl7BridgeError | None]:
        """after_apply mode: resolves with None when applied/filtered, or the error when dead-lettered."""
        fut = self._settlements.wait_for(journal_id)
        if not fut.done():
            self.wake()
        return fut

    @property
    def settled(self) -> int:
        """Entries the worker settled since this bridge started (applied, filtered or dead-lettered)."""
        return self._settlements.count

    async def stop(self, grace: float | None = None) -> None:
        """Let the worker finish its batches in flight (bounded by grace), then end it."""
        self._stopping = True
        grace = self._grace if grace is None else grace
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(b"s")
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), grace + 5.0)
            except TimeoutError:
                log.warning("delivery worker did not stop within %.0fs; killing it", grace + 5.0)
                await self._kill()
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._supervisor, 5.0)

    # --- the child process -------------------------------------------------------------------------

    async def _spawn(self) -> None:
        env = {**os.environ, _CONFIG_ENV: self._config.model_dump_json(by_alias=True),
               _SETTLED_ENV: "1" if self._report_settled else ""}
        self._ready.clear()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hl7bridge.delivery_process", env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024,
            start_new_session=True,  # Ctrl-C reaches the parent only; the parent stops the worker in order
        )

    async def _kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._proc.wait(), 5.0)

    async def _supervise(self, pump: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        started = loop.time()
        while True:
            await pump
            proc = self._proc
            code = await proc.wait() if proc is not None else None
            self._idle = True
            if self._stopping:
                return
            if loop.time() - started > 60.0:
                attempt = 0  # it ran fine for a while: this is a new failure, not a crash loop
            delay = _RESTART_DELAYS[min(attempt, len(_RESTART_DELAYS) - 1)]
            attempt += 1
            self.restarts += 1
            log.error("delivery worker exited unexpectedly (exit code %s); restarting in %.1fs", code, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            started = loop.time()
            try:
                await self._spawn()
            except OSError as exc:
                log.error("cannot start the delivery worker (%s)", type(exc).__name__)
                pump = asyncio.create_task(asyncio.sleep(0))
                continue
            pump = asyncio.create_task(self._pump(self._proc))  # type: ignore[arg-type]

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """Read the worker's events until it exits."""
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            try:
                events = json.loads(line)
            except ValueError:
                log.error("delivery worker sent an unreadable event line; ignored")
                continue
            for event in events:
                self._dispatch(event)

    def _dispatch(self, event: list[Any]) -> None:
        kind = event[0]
        if kind == "m" and event[1] in _METRIC_METHODS:
            getattr(self._metrics, event[1])(*event[2:])
        elif kind == "s":
            self._settlements.resolve(int(event[1]), _error_from_json(event[2]))
        elif kind == "i":
            self._idle = bool(event[1])
        elif kind == "r":
            self._ready.set()
            self.wake()  # anything journaled while it was starting

    def _send_wake(self) -> None:
        self._wake_scheduled = False
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None or proc.stdin.is_closing():
            return
        # A wake the worker has not read yet makes another one redundant: skip it when the pipe is backed up.
        if proc.stdin.transport.get_write_buffer_size() == 0:
            with contextlib.suppress(Exception):
                proc.stdin.write(b"w")


# --- the child ------------------------------------------------------------------------------------


class _Events:
    """Buffers events and writes them as one JSON line per event-loop iteration."""

    def __init__(self, out: IO[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._out = out
        self._loop = loop
        self._buf: list[list[Any]] = []

    def add(self, event: list[Any]) -> None:
        if not self._buf:
            self._loop.call_soon(self.flush)
        self._buf.append(event)

    def flush(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, []
            self._out.write(json.dumps(buf, separators=(",", ":")).encode() + b"\n")
            self._out.flush()


class _MetricsRelay:
    """The DeliveryMetrics the child's Delivery sees: every call becomes an event for the parent."""

    def __init__(self, events: _Events) -> None:
        self._events = events

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name not in _METRIC_METHODS:
            raise AttributeError(name)
        return lambda *args: self._events.add(["m", name, *args])


def _take_lock(path: Path) -> IO[bytes] | None:
    """The one-worker-per-journal lock; waits (logging once) while a previous worker finishes."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("ab")
    except OSError as exc:
        log.warning("delivery worker: cannot create %s (%s); running without the lock", path, type(exc).__name__)
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("delivery worker: another worker holds %s; waiting for it to finish", path)
        fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


async def _run_child(config: Config, report_settled: bool, out: IO[bytes]) -> None:
    from hl7bridge.app import build_mapper, delivery_policy, open_stores
    from hl7bridge.delivery import Delivery

    loop = asyncio.get_running_loop()
    lock = await asyncio.to_thread(_take_lock, config.store.data_dir / "delivery.lock")
    journal, sink = await asyncio.to_thread(open_stores, config)
    events = _Events(out, loop)
    loop.set_default_executor(ThreadPoolExecutor(max_workers=config.delivery.lanes + 4,
                                                  thread_name_prefix="hl7bridge-worker"))
    delivery = Delivery(
        journal, sink, build_mapper(config), _MetricsRelay(events), delivery_policy(config),  # type: ignore[arg-type]
        on_settled=(lambda jid, err: events.add(["s", jid, _error_to_json(err)])) if report_settled else None,
    )
    stop = asyncio.Event()

    class _Commands(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            if b"w" in data:
                delivery.wake()
            if b"s" in data:
                stop.set()

        def connection_lost(self, exc: Exception | None) -> None:
            stop.set()  # the parent is gone (or closed our stdin to stop us)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await loop.connect_read_pipe(_Commands, os.fdopen(0, "rb", buffering=0))
    delivery.start()
    events.add(["r"])
    log.debug("delivery worker ready (pid %d)", os.getpid())
    idle = True
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
            if delivery.idle != idle:
                idle = delivery.idle
                events.add(["i", idle])
    finally:
        await delivery.stop(10.0)
        events.add(["i", True])
        events.flush()
        for closer in (journal, sink):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(closer.close)
        if lock is not None:
            lock.close()


def main() -> None:
    """Entry point of the worker process (started by `DeliveryWorker`, not by hand)."""
    from hl7bridge.logs import setup_logging

    # The event stream gets its own descriptor; whatever else writes to stdout lands on stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    config = Config.model_validate_json(os.environ[_CONFIG_ENV])
    setup_logging(config.logging.level, config.logging.json_format, config.logging.log_phi)
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is optional
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_run_child(config, bool(os.environ.get(_SETTLED_ENV)), out))
    except Exception as exc:
        log.error("delivery worker failed: %s: %s", type(exc).__name__, getattr(exc, "reason", None) or exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
