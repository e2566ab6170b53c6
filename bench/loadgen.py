"""The load generator: N MLLP connections, one message in flight on each, bounded by count and by time.

Every message has a unique MSH-10; every ACK is checked (MSA-1 must be AA or CA, MSA-2 must echo the
MSH-10 just sent), so a server that answers fast but wrong is counted as failing, not as fast.

Written on asyncio `Protocol`s rather than streams, and with a template message, so that the generator
costs a few microseconds per message: on a 2-core machine it shares the CPU with the server under test,
and the same generator measures every server of a run, so ratios between them stay fair.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from bench.messages import control_id, message

__all__ = ["LoadResult", "percentile", "run_load"]

_VT, _FS = b"\x0b", b"\x1c"
_POSITIVE = (b"AA", b"CA")

MessageFactory = Callable[[str, int], bytes]


@dataclass
class LoadResult:
    """What one load point measured. Latencies are seconds from write to complete ACK."""

    connections: int
    sent: int = 0
    ok: int = 0
    bad_code: int = 0
    bad_control_id: int = 0
    timeouts: int = 0
    conn_errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def errors(self) -> int:
        return self.bad_code + self.bad_control_id + self.timeouts + self.conn_errors


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _check_ack(ack: bytes, cid: bytes) -> tuple[bytes, bool]:
    """(MSA-1, whether MSA-2 equals `cid`) from an ACK payload, read by plain splitting."""
    start = ack.find(b"\rMSA")
    if start < 0:
        return b"", False
    end = ack.find(b"\r", start + 1)
    seg = ack[start + 1 : end if end >= 0 else len(ack)]
    fields = seg.split(seg[3:4])
    code = fields[1] if len(fields) > 1 else b""
    return code, len(fields) > 2 and fields[2] == cid


class _Shared:
    """Budget shared by all connections of one point: a message count and a deadline."""

    __slots__ = ("deadline", "remaining", "result", "timeout")

    def __init__(self, result: LoadResult, count: int, deadline: float, timeout: float) -> None:
        self.result = result
        self.remaining = count
        self.deadline = deadline
        self.timeout = timeout

    def take(self) -> bool:
        if self.remaining <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.remaining -= 1
        return True


class _Client(asyncio.Protocol):
    """One persistent connection; sends the next message as soon as the ACK of the previous one is in."""

    def __init__(self, shared: _Shared, prefix: str, index: int, make: MessageFactory,
                 interval: float, done: asyncio.Future[None]) -> None:
        self.shared = shared
        self.prefix = prefix
        self.index = index
        self.make = make
        self.interval = interval  # pacing for a fixed offered rate; 0 = as fast as ACKs come back
        self.done = done
        self.seq = 0
        self.buf = bytearray()
        self.cid = b""
        self.sent_at = 0.0
        self.next_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.ack_timer: asyncio.TimerHandle | None = None
        self.pace_timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.next_at = time.perf_counter()
        self._send_next()

    def _send_next(self) -> None:
        if self.interval:
            delay = self.next_at - time.perf_counter()
            if delay > 0:
                self.pace_timer = self.loop.call_later(delay, self._send_now)
                return
        self._send_now()

    def _send_now(self) -> None:
        self.pace_timer = None
        if not self.shared.take():
            self._finish()
            return
        n = self.seq * 1000 + self.index
        cid = control_id(self.prefix, self.index, self.seq)
        self.seq += 1
        payload = self.make(cid, n)
        self.cid = cid.encode("ascii")
        self.shared.result.sent += 1
        self.sent_at = now = time.perf_counter()
        # A late send does not make the next one early: pacing never bursts to catch up.
        self.next_at = max(self.next_at + self.interval, now)
        assert self.transport is not None
        self.transport.write(b"%s%s%s\r" % (_VT, payload, _FS))
        self.ack_timer = self.loop.call_later(self.shared.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(_FS)
        if end < 0:
            return
        now = time.perf_counter()
        start = self.buf.find(_VT)
        ack = bytes(self.buf[start + 1 : end])
        del self.buf[: end + 2 if len(self.buf) > end + 1 else end + 1]
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        res = self.shared.result
        code, same = _check_ack(ack, self.cid)
        key = code.decode("ascii", "replace") or "?"
        res.codes[key] = res.codes.get(key, 0) + 1
        if code not in _POSITIVE:
            res.bad_code += 1
        elif not same:
            res.bad_control_id += 1
        else:
            res.ok += 1
            res.latencies.append(now - self.sent_at)
        self._send_next()

    def _timed_out(self) -> None:
        self.shared.result.timeouts += 1
        self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.shared.result.conn_errors += 1
            self.done.set_result(None)

    def _finish(self) -> None:
        for timer in (self.ack_timer, self.pace_timer):
            if timer is not None:
                timer.cancel()
        self.ack_timer = self.pace_timer = None
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def _one_shot(host: str, port: int, shared: _Shared, prefix: str, index: int,
                    make: MessageFactory) -> None:
    """For servers that close after each ACK (hl7apy's MLLPServer): connect, send, read, close; repeat."""
    res = shared.result
    seq = 0
    while shared.take():
        cid = control_id(prefix, index, seq)
        payload = make(cid, seq * 1000 + index)
        seq += 1
        res.sent += 1
        started = time.perf_counter()
        writer = None
        try:
            async with asyncio.timeout(shared.timeout):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"%s%s%s\r" % (_VT, payload, _FS))
                await writer.drain()
                data = await reader.readuntil(_FS)
        except TimeoutError:
            res.timeouts += 1
            continue
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            res.conn_errors += 1
            continue
        finally:
            if writer is not None:
                writer.close()
        elapsed = time.perf_counter() - started
        code, same = _check_ack(data[data.find(_VT) + 1 : -1], cid.encode("ascii"))
        key = code.decode("ascii", "replace") or "?"
        res.codes[key] = res.codes.get(key, 0) + 1
        if code not in _POSITIVE:
            res.bad_code += 1
        elif not same:
            res.bad_control_id += 1
        else:
            res.ok += 1
            res.latencies.append(elapsed)


async def run_load(
    host: str,
    port: int,
    *,
    connections: int,
    max_messages: int,
    duration: float,
    prefix: str,
    make: MessageFactory = message,
    reconnect_per_message: bool = False,
    rate: float = 0.0,
    ack_timeout: float = 10.0,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """Drive `connections` connections until `max_messages` are sent or `duration` seconds pass, then wait
    for the last ACKs (bounded by `ack_timeout`). `rate` > 0 paces the total offered rate (msg/s).
    Setting `stop` ends the run early (no new messages; in-flight ones are still awaited)."""
    if connections < 1 or connections > 999:
        raise ValueError("connections must be 1..999")
    result = LoadResult(connections)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    shared = _Shared(result, max_messages, started + duration, ack_timeout)
    watcher: asyncio.Task[None] | None = None
    if stop is not None:
        async def _watch() -> None:
            await stop.wait()
            shared.deadline = 0.0
        watcher = asyncio.create_task(_watch())
    if reconnect_per_message:
        await asyncio.gather(*(_one_shot(host, port, shared, prefix, i, make) for i in range(connections)))
    else:
        interval = connections / rate if rate > 0 else 0.0
        dones: list[asyncio.Future[None]] = []
        for i in range(connections):
            done: asyncio.Future[None] = loop.create_future()
            dones.append(done)
            try:
                await loop.create_connection(
                    lambda i=i, done=done: _Client(shared, prefix, i, make, interval, done), host, port)
            except OSError:
                result.conn_errors += 1
                done.set_result(None)
        try:
            async with asyncio.timeout(duration + ack_timeout + 5.0):
                await asyncio.gather(*dones)
        except TimeoutError:  # a connection neither answered nor closed: count it, never hang
            result.timeouts += sum(1 for d in dones if not d.done())
    if watcher is not None:
        watcher.cancel()
    result.seconds = time.perf_counter() - started
    return result
