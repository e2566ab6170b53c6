"""What the MLLP listener and client tests share: limits, an events recorder, an echo handler, polling, and
a raw MLLP peer on plain streams (independent of MllpClient). The fixtures are in tests/integration/conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from hl7bridge.mllp.framer import Frame, MllpFramer, encode_frame
from hl7bridge.mllp.server import ConnectionInfo, MllpServer

HOST = "127.0.0.1"
WAIT = 10.0  # upper bound for anything that should happen "promptly"; never a sleep

ServerFactory = Callable[..., Awaitable[MllpServer]]


class Recorder:
    """A ServerEvents implementation that remembers every call."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.refused = 0
        self.rejected: list[str] = []

    def connection_opened(self) -> None:
        self.opened += 1

    def connection_closed(self) -> None:
        self.closed += 1

    def connection_refused(self) -> None:
        self.refused += 1

    def frame_rejected(self, reason: str) -> None:
        self.rejected.append(reason)


async def echo(payload: bytes, info: ConnectionInfo) -> bytes:
    return b"ACK:" + payload


async def wait_until(predicate: Callable[[], bool], within: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


class Peer:
    """A raw MLLP sender built on plain streams (independent of MllpClient)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = MllpFramer()
        self.acks: list[bytes] = []

    @classmethod
    async def open(cls, port: int, **kwargs: Any) -> Peer:
        reader, writer = await asyncio.open_connection(HOST, port, **kwargs)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_ack(self) -> bytes:
        async with asyncio.timeout(WAIT):
            while not self.acks:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("closed before an ACK")
                self.acks += [e.payload for e in self.framer.feed(data) if isinstance(e, Frame)]
        return self.acks.pop(0)

    async def roundtrip(self, payload: bytes) -> bytes:
        await self.send_raw(encode_frame(payload))
        return await self.read_ack()

    async def wait_closed_by_server(self) -> None:
        """Read until the server closes (EOF or reset); fail if it does not within WAIT."""
        async with asyncio.timeout(WAIT):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass

    async def read_to_eof(self) -> None:
        """Like wait_closed_by_server, but keeps the ACKs that arrive before the close in `acks`."""
        async with asyncio.timeout(WAIT):
            try:
                while data := await self.reader.read(65536):
                    self.acks += [e.payload for e in self.framer.feed(data) if isinstance(e, Frame)]
            except ConnectionError:
                pass

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
