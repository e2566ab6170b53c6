"""The MLLP listener over real sockets on 127.0.0.1 (port 0): answers, order, timeouts, limits, shutdown."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import defaultdict
from typing import Any

import pytest

from hl7bridge.mllp.framer import encode_frame
from hl7bridge.mllp.server import ConnectionInfo, MllpServer
from tests.mllp_support import HOST, WAIT, Peer, Recorder, ServerFactory, echo, wait_until

# --- answers and order --------------------------------------------------------------------------------


async def test_echo_roundtrip(make_server: ServerFactory) -> None:
    server = await make_server()
    assert server.serving and server.port > 0
    peer = await Peer.open(server.port)
    assert await peer.roundtrip(b"MSH|one") == b"ACK:MSH|one"
    assert await peer.roundtrip(b"MSH|two") == b"ACK:MSH|two"
    await peer.close()


async def test_many_connections_each_get_their_own_answers_in_order(make_server: ServerFactory) -> None:
    server = await make_server()

    async def sender(n: int) -> list[bytes]:
        peer = await Peer.open(server.port)
        payloads = [f"conn{n}-msg{i}".encode() for i in range(25)]
        # Pipelined: every frame written at once; the server must still answer one by one, in order.
        await peer.send_raw(b"".join(encode_frame(p) for p in payloads))
        acks = [await peer.read_ack() for _ in payloads]
        await peer.close()
        assert acks == [b"ACK:" + p for p in payloads]
        return acks

    results = await asyncio.gather(*(sender(n) for n in range(20)))
    assert len(results) == 20


async def test_one_message_in_flight_per_connection(make_server: ServerFactory) -> None:
    active: dict[str, int] = defaultdict(int)
    worst: dict[str, int] = defaultdict(int)
    overall = {"now": 0, "max": 0}

    async def slow(payload: bytes, info: ConnectionInfo) -> bytes:
        active[info.peer] += 1
        overall["now"] += 1
        worst[info.peer] = max(worst[info.peer], active[info.peer])
        overall["max"] = max(overall["max"], overall["now"])
        await asyncio.sleep(0.01)  # lets other frames arrive while this one is handled
        active[info.peer] -= 1
        overall["now"] -= 1
        return b"ACK:" + payload

    server = await make_server(slow)

    async def sender(n: int) -> None:
        peer = await Peer.open(server.port)
        payloads = [f"{n}:{i}".encode() for i in range(10)]
        await peer.send_raw(b"".join(encode_frame(p) for p in payloads))
        assert [await peer.read_ack() for _ in payloads] == [b"ACK:" + p for p in payloads]
        await peer.close()

    await asyncio.gather(*(sender(n) for n in range(8)))
    assert len(worst) == 8
    assert max(worst.values()) == 1
    assert overall["max"] > 1  # connections do run concurrently


async def test_peer_in_connection_info_is_host_and_port(make_server: ServerFactory) -> None:
    seen: list[str] = []

    async def handler(payload: bytes, info: ConnectionInfo) -> bytes:
        seen.append(info.peer)
        return b"ok"

    server = await make_server(handler)
    peer = await Peer.open(server.port)
    await peer.roundtrip(b"x")
    local = peer.writer.get_extra_info("sockname")
    assert seen == [f"{local[0]}:{local[1]}"]
    await peer.close()


# --- timeouts ---------------------------------------------------------------------------------------


async def test_idle_timeout_closes_a_silent_connection(make_server: ServerFactory) -> None:
    events = Recorder()
    server = await make_server(idle_timeout=0.3, events=events)
    peer = await Peer.open(server.port)
    await peer.wait_closed_by_server()
    await wait_until(lambda: server.active_connections == 0)
    assert events.rejected == ["idle_timeout"]
    assert events.opened == events.closed == 1


async def test_idle_timeout_is_rearmed_by_each_frame(make_server: ServerFactory) -> None:
    server = await make_server(idle_timeout=0.6)
    peer = await Peer.open(server.port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(5):  # spans ~1 s in total, more than twice the idle timeout
        assert await peer.roundtrip(b"m%d" % i) == b"ACK:m%d" % i
        await asyncio.sleep(0.2)  # pacing the sender, not synchronisation
    assert loop.time() - start > 0.8
    await peer.wait_closed_by_server()


async def test_mid_frame_timeout_closes_a_stalled_frame(make_server: ServerFactory) -> None:
    events = Recorder()
    server = await make_server(idle_timeout=60.0, frame_timeout=0.3, events=events)
    peer = await Peer.open(server.port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await peer.send_raw(b"\x0bMSH|^~\\&|half a message")
    await peer.wait_closed_by_server()
    assert loop.time() - start < 5.0
    await wait_until(lambda: events.closed == 1)
    assert events.rejected == ["timeout_mid_frame"]


# --- framing violations ------------------------------------------------------------------------------


async def test_oversize_frame_closes_the_connection_and_the_server_keeps_serving(
    make_server: ServerFactory,
) -> None:
    events = Recorder()
    server = await make_server(events=events)  # default limit: 10 MiB
    peer = await Peer.open(server.port)

    async def blast() -> None:
        try:
            await peer.send_raw(b"\x0b" + b"A" * (20 * 1024 * 1024) + b"\x1c\x0d")
        except ConnectionError:
            pass  # the server may reset us mid-write; that is the point

    writer_task = asyncio.create_task(blast())
    await peer.wait_closed_by_server()
    async with asyncio.timeout(WAIT):
        await writer_task
    await wait_until(lambda: events.closed == 1)
    assert events.rejected == ["too_large"]

    other = await Peer.open(server.port)
    assert await other.roundtrip(b"next") == b"ACK:next"
    await other.close()
    await peer.close()


async def test_junk_before_a_frame_is_discarded_and_the_frame_answered(make_server: ServerFactory) -> None:
    events = Recorder()
    server = await make_server(events=events)
    peer = await Peer.open(server.port)
    await peer.send_raw(b"GET / HTTP/1.0\r\n\r\n" + encode_frame(b"MSH|real"))
    assert await peer.read_ack() == b"ACK:MSH|real"
    assert await peer.roundtrip(b"MSH|again") == b"ACK:MSH|again"  # still open
    assert events.rejected == ["junk"]
    await peer.close()


async def test_truncated_frame_closes_the_connection(make_server: ServerFactory) -> None:
    events = Recorder()
    server = await make_server(events=events)
    peer = await Peer.open(server.port)
    await peer.send_raw(b"\x0bMSH|first, abandoned\x0bMSH|second\x1c\x0d")
    await peer.wait_closed_by_server()
    await wait_until(lambda: events.closed == 1)
    assert events.rejected == ["truncated"]


async def test_eof_mid_frame_is_reported_as_truncated(make_server: ServerFactory) -> None:
    events = Recorder()
    server = await make_server(events=events)
    peer = await Peer.open(server.port)
    await peer.send_raw(b"\x0bMSH|cut short")
    peer.writer.write_eof()
    await peer.wait_closed_by_server()
    await wait_until(lambda: events.closed == 1)
    assert events.rejected == ["truncated"]


async def test_strict_mode_closes_on_a_missing_trailing_cr(make_server: ServerFactory) -> None:
    events = Recorder()
    server = await make_server(require_trailing_cr=True, events=events)
    peer = await Peer.open(server.port)
    assert await peer.roundtrip(b"good") == b"ACK:good"
    await peer.send_raw(b"\x0bno cr\x1cX")
    await peer.wait_closed_by_server()
    await wait_until(lambda: events.closed == 1)
    assert events.rejected == ["missing_cr"]


async def test_tolerant_mode_answers_a_frame_without_trailing_cr(make_server: ServerFactory) -> None:
    server = await make_server()
    peer = await Peer.open(server.port)
    await peer.send_raw(b"\x0bno cr\x1c")
    assert await peer.read_ack() == b"ACK:no cr"
    await peer.close()


# --- limits ------------------------------------------------------------------------------------------


async def test_connections_beyond_the_limit_are_refused(make_server: ServerFactory) -> None:
    events = Recorder()
    server = await make_server(max_connections=2, events=events)
    first, second = await Peer.open(server.port), await Peer.open(server.port)
    assert await first.roundtrip(b"1") == b"ACK:1"
    assert await second.roundtrip(b"2") == b"ACK:2"
    assert server.active_connections == 2

    third = await Peer.open(server.port)
    await third.wait_closed_by_server()
    assert events.refused == 1

    await first.close()
    await wait_until(lambda: server.active_connections == 1)
    fourth = await Peer.open(server.port)
    assert await fourth.roundtrip(b"4") == b"ACK:4"
    for peer in (second, third, fourth):
        await peer.close()


async def test_a_thousand_idle_connections_are_held_and_served(make_server: ServerFactory) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(1000, (soft - 100) // 2)
    if count < 100:
        pytest.skip("too few file descriptors")
    server = await make_server(max_connections=count)
    peers = []
    for _ in range(count):
        peers.append(await Peer.open(server.port))
    await wait_until(lambda: server.active_connections == count)
    answers = await asyncio.gather(*(p.roundtrip(b"%d" % i) for i, p in enumerate(peers)))
    assert answers == [b"ACK:%d" % i for i in range(count)]
    for peer in peers:
        await peer.close()
    await wait_until(lambda: server.active_connections == 0)


# --- handler failures -------------------------------------------------------------------------------


async def test_handler_exception_is_answered_by_the_error_responder(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def picky(payload: bytes, info: ConnectionInfo) -> bytes:
        if payload.startswith(b"BAD"):
            raise ValueError(f"cannot handle {payload!r}")
        return b"ACK:" + payload

    def responder(payload: bytes, exc: BaseException) -> bytes:
        return b"AE:" + type(exc).__name__.encode()

    server = await make_server(picky, error_responder=responder)
    peer = await Peer.open(server.port)
    with caplog.at_level(logging.DEBUG, logger="hl7bridge.mllp"):
        assert await peer.roundtrip(b"BAD|Smith^John|MRN123") == b"AE:ValueError"
    assert await peer.roundtrip(b"fine") == b"ACK:fine"  # same connection, next message
    assert "ValueError" in caplog.text
    assert "Smith" not in caplog.text and "MRN123" not in caplog.text
    await peer.close()


async def test_handler_exception_without_responder_closes_only_that_connection(
    make_server: ServerFactory,
) -> None:
    async def boom(payload: bytes, info: ConnectionInfo) -> bytes:
        if payload == b"boom":
            raise RuntimeError("x")
        return b"ACK:" + payload

    server = await make_server(boom)
    peer = await Peer.open(server.port)
    await peer.send_raw(encode_frame(b"boom"))
    await peer.wait_closed_by_server()
    other = await Peer.open(server.port)
    assert await other.roundtrip(b"ok") == b"ACK:ok"
    assert server.serving
    await other.close()


async def test_an_ack_the_peer_never_reads_is_abandoned_after_the_write_timeout(
    make_server: ServerFactory,
) -> None:
    async def huge(payload: bytes, info: ConnectionInfo) -> bytes:
        return b"A" * (64 * 1024 * 1024)  # far more than the socket buffers hold

    server = await make_server(huge, ack_write_timeout=0.3)
    peer = await Peer.open(server.port)
    await peer.send_raw(encode_frame(b"m"))  # ... and never read
    await wait_until(lambda: server.active_connections == 0)
    await peer.close()


async def test_a_handler_returning_garbage_ends_only_its_connection(make_server: ServerFactory) -> None:
    async def wrong(payload: bytes, info: ConnectionInfo) -> Any:
        return "not bytes" if payload == b"bad" else b"ACK:" + payload

    server = await make_server(wrong)
    peer = await Peer.open(server.port)
    await peer.send_raw(encode_frame(b"bad"))
    await peer.wait_closed_by_server()
    other = await Peer.open(server.port)
    assert await other.roundtrip(b"ok") == b"ACK:ok"
    await other.close()


# --- shutdown -------------------------------------------------------------------------------------------


async def test_stop_lets_the_in_flight_message_finish_then_refuses_new_connections(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(payload: bytes, info: ConnectionInfo) -> bytes:
        if payload == b"slow":
            entered.set()
            await release.wait()
        return b"ACK:" + payload

    server = await make_server(slow)
    busy = await Peer.open(server.port)
    idle = await Peer.open(server.port)
    assert await idle.roundtrip(b"hello") == b"ACK:hello"
    # A second frame is queued behind the slow one; it must not be handled after stop.
    await busy.send_raw(encode_frame(b"slow") + encode_frame(b"queued"))
    async with asyncio.timeout(WAIT):
        await entered.wait()

    stopping = asyncio.create_task(server.stop(grace=WAIT))
    await wait_until(lambda: not server.serving)
    await idle.wait_closed_by_server()  # idle connections close at once
    with pytest.raises(ConnectionError):
        await Peer.open(server.port)
    assert not stopping.done()

    release.set()
    assert await busy.read_ack() == b"ACK:slow"
    await busy.wait_closed_by_server()
    assert busy.acks == []  # "queued" was never answered: the sender will resend it
    async with asyncio.timeout(WAIT):
        await stopping
    assert server.active_connections == 0
    assert not [r for r in caplog.records if r.name == "asyncio"]  # no stray task errors from shutdown


async def test_stop_gives_up_after_the_grace_period(make_server: ServerFactory) -> None:
    entered = asyncio.Event()

    async def stuck(payload: bytes, info: ConnectionInfo) -> bytes:
        entered.set()
        await asyncio.Event().wait()
        return b"never"

    server = await make_server(stuck)
    peer = await Peer.open(server.port)
    await peer.send_raw(encode_frame(b"m"))
    async with asyncio.timeout(WAIT):
        await entered.wait()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await server.stop(grace=0.3)
    assert loop.time() - start < 5.0
    await peer.wait_closed_by_server()
    assert peer.acks == []


async def test_stop_twice_at_once_both_return_after_shutdown(make_server: ServerFactory) -> None:
    server = await make_server()
    peer = await Peer.open(server.port)
    assert await peer.roundtrip(b"m") == b"ACK:m"
    async with asyncio.timeout(WAIT):
        await asyncio.gather(server.stop(), server.stop())
    assert not server.serving and server.active_connections == 0
    await peer.wait_closed_by_server()


def test_constructor_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        MllpServer(echo, max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        MllpServer(echo, idle_timeout=0)


def test_runs_on_uvloop_when_the_caller_installs_it() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        server = MllpServer(echo, host=HOST, port=0, idle_timeout=0.3)
        await server.start()
        try:
            peer = await Peer.open(server.port)
            await peer.send_raw(b"".join(encode_frame(b"%d" % i) for i in range(50)))
            assert [await peer.read_ack() for _ in range(50)] == [b"ACK:%d" % i for i in range(50)]
            await peer.wait_closed_by_server()  # idle timeout
        finally:
            await server.stop(grace=1.0)
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
