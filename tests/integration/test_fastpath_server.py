"""The Protocol-based MLLP listener keeps the stream server's contract where it is easy to get wrong:
one message in flight with TCP back-pressure, order across chunks, half-closed peers, lost peers, TLS."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from hl7bridge.mllp.framer import encode_frame
from hl7bridge.mllp.server import ConnectionInfo
from tests.mllp_support import WAIT, Peer, Recorder, ServerFactory, wait_until


class Gate:
    """A handler that records the order of events and holds chosen payloads until released."""

    def __init__(self, hold: set[bytes]) -> None:
        self.hold = hold
        self.log: list[str] = []
        self.entered: dict[bytes, asyncio.Event] = {p: asyncio.Event() for p in hold}
        self.release: dict[bytes, asyncio.Event] = {p: asyncio.Event() for p in hold}
        self.finished: list[bytes] = []

    async def __call__(self, payload: bytes, info: ConnectionInfo) -> bytes:
        self.log.append(f"start {payload.decode()}")
        if payload in self.hold:
            self.entered[payload].set()
            await self.release[payload].wait()
        self.log.append(f"end {payload.decode()}")
        self.finished.append(payload)
        return b"ACK:" + payload[:24]


async def test_a_frame_sent_while_one_is_handled_waits_for_the_first_ack(make_server: ServerFactory) -> None:
    gate = Gate({b"first"})
    server = await make_server(gate)
    peer = await Peer.open(server.port)
    await peer.send_raw(encode_frame(b"first"))
    async with asyncio.timeout(WAIT):
        await gate.entered[b"first"].wait()
    # Separate chunks, sent while the first handler runs: held, not handled.
    await peer.send_raw(encode_frame(b"second"))
    await peer.send_raw(encode_frame(b"third"))
    for _ in range(20):  # give the server every chance to (wrongly) start the next message
        await asyncio.sleep(0)
    assert gate.log == ["start first"]
    gate.release[b"first"].set()
    assert [await peer.read_ack() for _ in range(3)] == [b"ACK:first", b"ACK:second", b"ACK:third"]
    assert gate.log == ["start first", "end first", "start second", "end second", "start third", "end third"]
    await peer.close()


async def _read_acks(peer: Peer, n: int) -> list[bytes]:
    return [await peer.read_ack() for _ in range(n)]


async def test_a_fast_sender_is_held_back_by_tcp_while_a_message_is_handled(make_server: ServerFactory) -> None:
    gate = Gate({b"slow"})
    server = await make_server(gate)
    peer = await Peer.open(server.port)
    await peer.send_raw(encode_frame(b"slow"))
    async with asyncio.timeout(WAIT):
        await gate.entered[b"slow"].wait()
    # 32 MiB of frames: far more than the kernel buffers hold. If the server kept reading while busy,
    # all of it would go into its memory and our write buffer would stay empty.
    filler = b"x" * 4000
    blob = b"".join(encode_frame(b"%d:" % i + filler) for i in range(8000))
    peer.writer.write(blob)
    transport = peer.writer.transport
    await wait_until(lambda: transport.get_write_buffer_size() > 0)
    await asyncio.sleep(0.05)  # pacing, not synchronisation: the sender stays blocked while the handler runs
    assert transport.get_write_buffer_size() > 0
    assert gate.log == ["start slow"]
    gate.release[b"slow"].set()
    reading = asyncio.create_task(_read_acks(peer, 8001))
    async with asyncio.timeout(WAIT):
        await peer.writer.drain()
    acks = await reading
    assert acks[0] == b"ACK:slow"
    assert [a.split(b":", 2)[1] for a in acks[1:]] == [b"%d" % i for i in range(8000)]
    await peer.close()


async def test_a_half_closed_peer_gets_every_ack_then_eof(make_server: ServerFactory) -> None:
    gate = Gate({b"one"})
    events = Recorder()
    server = await make_server(gate, events=events)
    peer = await Peer.open(server.port)
    await peer.send_raw(encode_frame(b"one"))
    async with asyncio.timeout(WAIT):
        await gate.entered[b"one"].wait()
    await peer.send_raw(encode_frame(b"two") + encode_frame(b"three"))
    peer.writer.write_eof()  # done sending; still reading
    gate.release[b"one"].set()
    await peer.read_to_eof()
    assert peer.acks == [b"ACK:one", b"ACK:two", b"ACK:three"]
    await wait_until(lambda: events.closed == 1)
    assert events.rejected == []
    await peer.close()


async def test_a_peer_that_disconnects_mid_handler_does_not_cancel_the_handler(make_server: ServerFactory) -> None:
    gate = Gate({b"m"})
    events = Recorder()
    server = await make_server(gate, events=events)
    peer = await Peer.open(server.port)
    await peer.send_raw(encode_frame(b"m"))
    async with asyncio.timeout(WAIT):
        await gate.entered[b"m"].wait()
    peer.writer.transport.abort()
    for _ in range(20):
        await asyncio.sleep(0)
    assert server.active_connections == 1 and events.closed == 0  # the handler still owns the connection
    gate.release[b"m"].set()
    await wait_until(lambda: events.closed == 1)
    assert gate.finished == [b"m"]  # ran to the end (the message was journaled), the ACK just had nowhere to go
    assert server.active_connections == 0


async def test_stop_closes_a_connection_in_the_middle_of_a_frame_at_once(make_server: ServerFactory) -> None:
    gate = Gate(set())
    events = Recorder()
    server = await make_server(gate, events=events)
    peer = await Peer.open(server.port)
    await peer.send_raw(b"\x0bMSH|half")
    await wait_until(lambda: server.active_connections == 1)
    async with asyncio.timeout(WAIT):
        await server.stop(grace=WAIT)
    await peer.read_to_eof()
    assert events.opened == events.closed == 1
    assert gate.log == []


async def test_the_mid_frame_timeout_of_a_frame_after_an_answered_one_counts_from_the_answer(
    make_server: ServerFactory,
) -> None:
    gate = Gate({b"slow"})
    events = Recorder()
    server = await make_server(gate, frame_timeout=0.3, idle_timeout=60.0, events=events)
    peer = await Peer.open(server.port)
    loop = asyncio.get_running_loop()
    # One chunk: a complete frame, then the start of another that never ends.
    await peer.send_raw(encode_frame(b"slow") + b"\x0bpartial")
    async with asyncio.timeout(WAIT):
        await gate.entered[b"slow"].wait()
    await asyncio.sleep(0.5)  # longer than frame_timeout, spent in our handler: must not count
    released = loop.time()
    gate.release[b"slow"].set()
    assert await peer.read_ack() == b"ACK:slow"
    await peer.read_to_eof()
    assert loop.time() - released >= 0.25
    await wait_until(lambda: events.closed == 1)
    assert events.rejected == ["timeout_mid_frame"]


async def test_tls_pipelined_frames_are_answered_in_order(
    make_server: ServerFactory, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    gate = Gate(set())
    server = await make_server(gate, ssl=server_ctx)
    peer = await Peer.open(server.port, ssl=ssl.create_default_context(cafile=str(cert)))
    payloads = [b"tls-%d" % i for i in range(50)]
    await peer.send_raw(b"".join(encode_frame(p) for p in payloads))
    assert [await peer.read_ack() for _ in payloads] == [b"ACK:" + p for p in payloads]
    await peer.close()
    await wait_until(lambda: server.active_connections == 0)
