"""The benchmark's load generator counts only correct ACKs: MSA-1 AA/CA and MSA-2 echoing the MSH-10 sent.

Loopback servers on ephemeral ports; every run bounded by a message count (and a duration as a backstop).
No timing assertions: speed is measured in bench/, never asserted here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from bench.loadgen import percentile, run_load
from bench.messages import SIZE, control_id, message
from bench.peers import _Echo

Answer = Callable[[bytes], bytes]


class _Recording(asyncio.Protocol):
    """Answers each frame with `answer(payload)` and records the MSH-10 of every message it got."""

    def __init__(self, answer: Answer, seen: list[bytes], close_after_ack: bool = False) -> None:
        self.answer = answer
        self.seen = seen
        self.close_after_ack = close_after_ack
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\x1c")) >= 0:
            payload = self.buf[self.buf.find(b"\x0b") + 1 : end]
            self.buf = self.buf[end + 2 :]
            self.seen.append(payload.split(b"\r", 1)[0].split(b"|")[9])
            self.transport.write(b"\x0b" + self.answer(payload) + b"\x1c\r")  # type: ignore[attr-defined]
            if self.close_after_ack:
                self.transport.close()


def _ack(code: bytes, cid_of: Callable[[bytes], bytes] = lambda cid: cid) -> Answer:
    def answer(payload: bytes) -> bytes:
        cid = payload.split(b"\r", 1)[0].split(b"|")[9]
        return b"MSH|^~\\&|T||||20260101||ACK^A04^ACK|1|P|2.5.1\rMSA|%s|%s\r" % (code, cid_of(cid))

    return answer


@asynccontextmanager
async def _server(factory: Callable[[], asyncio.Protocol]) -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_every_message_against_the_echo_ceiling_is_acknowledged_correctly() -> None:
    async with _server(_Echo) as port:
        result = await run_load("127.0.0.1", port, connections=4, max_messages=200, duration=30.0, prefix="TST001")
    assert (result.sent, result.ok, result.errors) == (200, 200, 0)
    assert result.codes == {"AA": 200}
    assert len(result.latencies) == 200


async def test_control_ids_are_unique_across_connections() -> None:
    seen: list[bytes] = []
    async with _server(lambda: _Recording(_ack(b"AA"), seen)) as port:
        result = await run_load("127.0.0.1", port, connections=8, max_messages=160, duration=30.0, prefix="TST002")
    assert result.ok == 160
    assert len(seen) == 160 and len(set(seen)) == 160


async def test_a_negative_ack_is_counted_as_an_error_not_a_success() -> None:
    async with _server(lambda: _Recording(_ack(b"AE"), [])) as port:
        result = await run_load("127.0.0.1", port, connections=2, max_messages=20, duration=30.0, prefix="TST003")
    assert result.ok == 0
    assert result.bad_code == 20
    assert result.codes == {"AE": 20}


async def test_an_ack_for_another_message_is_counted_as_an_error() -> None:
    async with _server(lambda: _Recording(_ack(b"AA", lambda cid: cid + b"X"), [])) as port:
        result = await run_load("127.0.0.1", port, connections=2, max_messages=20, duration=30.0, prefix="TST004")
    assert result.ok == 0
    assert result.bad_control_id == 20


async def test_enhanced_mode_commit_accept_counts_as_success() -> None:
    async with _server(lambda: _Recording(_ack(b"CA"), [])) as port:
        result = await run_load("127.0.0.1", port, connections=1, max_messages=10, duration=30.0, prefix="TST005")
    assert result.ok == 10


async def test_the_duration_bounds_a_run_with_an_unreachable_count() -> None:
    async with _server(_Echo) as port:
        result = await run_load("127.0.0.1", port, connections=2, max_messages=10**9, duration=0.2, prefix="TST006")
    assert 0 < result.ok < 10**9
    assert result.errors == 0


async def test_a_server_that_never_answers_ends_in_timeouts() -> None:
    class Silent(asyncio.Protocol):
        pass

    async with _server(Silent) as port:
        result = await run_load("127.0.0.1", port, connections=2, max_messages=10, duration=5.0, prefix="TST007",
                                ack_timeout=0.2)
    assert result.ok == 0
    assert result.timeouts == 2


async def test_reconnect_mode_serves_a_server_that_closes_after_each_ack() -> None:
    seen: list[bytes] = []
    async with _server(lambda: _Recording(_ack(b"AA"), seen, close_after_ack=True)) as port:
        result = await run_load("127.0.0.1", port, connections=3, max_messages=15, duration=30.0, prefix="TST008",
                                reconnect_per_message=True)
    assert (result.ok, result.errors) == (15, 0)
    assert len(set(seen)) == 15


async def test_a_paced_run_sends_at_most_its_count() -> None:
    async with _server(_Echo) as port:
        result = await run_load("127.0.0.1", port, connections=2, max_messages=30, duration=30.0, prefix="TST009",
                                rate=2000.0)
    assert (result.sent, result.ok) == (30, 30)


def test_the_benchmark_message_is_a_valid_adt_a04_of_about_1_6_kb() -> None:
    from hl7bridge.hl7.envelope import scan_bytes, validate

    raw = message(control_id("TST010", 1, 2), 7)
    scanned, _ = scan_bytes(raw)
    validate(scanned)
    assert scanned.envelope.control_id == "TST01000100000002"
    assert scanned.patient_key == "100007"
    assert 1500 <= SIZE <= 1700


def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
