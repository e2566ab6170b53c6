"""MllpClient and send_sync against the real MllpServer on 127.0.0.1 (port 0), plain and TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from pathlib import Path

import pytest

from hl7bridge.mllp.client import MllpClient, MllpClientError, send_sync
from hl7bridge.mllp.server import ConnectionInfo, MllpServer
from tests.mllp_support import HOST, WAIT, ServerFactory, echo


async def test_send_returns_each_ack_in_order(make_server: ServerFactory) -> None:
    server = await make_server()
    async with await MllpClient.connect(HOST, server.port) as client:
        for i in range(10):
            assert await client.send(b"MSH|%d" % i) == b"ACK:MSH|%d" % i
    assert client.closed


async def test_concurrent_sends_on_one_client_go_one_at_a_time(make_server: ServerFactory) -> None:
    in_flight = {"now": 0, "max": 0}

    async def slow(payload: bytes, info: ConnectionInfo) -> bytes:
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        await asyncio.sleep(0.005)
        in_flight["now"] -= 1
        return b"ACK:" + payload

    server = await make_server(slow)
    async with await MllpClient.connect(HOST, server.port) as client:
        acks = await asyncio.gather(*(client.send(b"%d" % i) for i in range(10)))
    assert acks == [b"ACK:%d" % i for i in range(10)]
    assert in_flight["max"] == 1


async def test_timeout_raises_and_closes_the_connection(make_server: ServerFactory) -> None:
    release = asyncio.Event()

    async def stuck(payload: bytes, info: ConnectionInfo) -> bytes:
        await release.wait()
        return b"late"

    server = await make_server(stuck)
    client = await MllpClient.connect(HOST, server.port)
    with pytest.raises(MllpClientError, match="no ACK"):
        await client.send(b"m", timeout=0.3)
    assert client.closed
    with pytest.raises(MllpClientError, match="closed"):
        await client.send(b"again")
    release.set()


async def test_server_closing_without_an_ack_raises(make_server: ServerFactory) -> None:
    async def boom(payload: bytes, info: ConnectionInfo) -> bytes:
        raise RuntimeError("no responder configured, so the server closes")

    server = await make_server(boom)
    async with await MllpClient.connect(HOST, server.port) as client:
        with pytest.raises(MllpClientError, match="closed by the peer"):
            await client.send(b"m")


async def test_an_ack_larger_than_the_limit_raises(make_server: ServerFactory) -> None:
    async def big(payload: bytes, info: ConnectionInfo) -> bytes:
        return b"A" * 5000

    server = await make_server(big)
    async with await MllpClient.connect(HOST, server.port, max_frame_bytes=1000) as client:
        with pytest.raises(MllpClientError, match="FrameTooLarge"):
            await client.send(b"m")


async def test_connect_to_a_closed_port_raises() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    with pytest.raises(MllpClientError, match="connect to"):
        await MllpClient.connect(HOST, port, timeout=2.0)


# --- send_sync: a blocking caller with the server on another thread's loop --------------------------


class ThreadedServer:
    """An MllpServer running on its own event loop in a background thread."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = MllpServer(echo, host=HOST, port=0)
        await server.start()
        self.port = server.port
        self._ready.set()
        await self._stop.wait()
        await server.stop(grace=1.0)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        assert self._ready.wait(WAIT), "server thread did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


def test_send_sync_sends_all_payloads_over_one_connection() -> None:
    with ThreadedServer() as server:
        acks = send_sync(HOST, server.port, [b"one", b"two", b"three"], timeout=5.0)
    assert acks == [b"ACK:one", b"ACK:two", b"ACK:three"]


def test_send_sync_raises_on_a_refused_connection() -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    with pytest.raises(MllpClientError):
        send_sync(HOST, port, [b"x"], timeout=2.0)


# --- TLS ---------------------------------------------------------------------------------------------


async def test_tls_roundtrip(make_server: ServerFactory, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    server = await make_server(ssl=server_ctx)
    async with await MllpClient.connect(HOST, server.port, ssl=client_ctx) as client:
        assert await client.send(b"MSH|secret") == b"ACK:MSH|secret"
        assert await client.send(b"MSH|two") == b"ACK:MSH|two"


async def test_tls_client_refuses_an_untrusted_server(
    make_server: ServerFactory, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server = await make_server(ssl=server_ctx)
    with pytest.raises(MllpClientError):
        await MllpClient.connect(HOST, server.port, ssl=ssl.create_default_context())
