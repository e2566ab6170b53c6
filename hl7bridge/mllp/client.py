"""An asyncio MLLP client: one connection, one message in flight (MLLP is strict request/reply).

`MllpClient.send` writes a frame and waits for the next frame back, the ACK. Any failure (timeout, the
peer closing, a framing error) closes the connection: after a timeout a late ACK could otherwise be taken
as the answer to the *next* message. `send_sync` wraps it for scripts and the CLI.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections import deque
from collections.abc import Sequence
from types import TracebackType

from hl7bridge.mllp.framer import (
    DEFAULT_MAX_FRAME_BYTES,
    Frame,
    FrameTooLarge,
    MissingTrailingCr,
    MllpFramer,
    TruncatedFrame,
    encode_frame,
)

__all__ = ["MllpClient", "MllpClientError", "send_sync"]

_READ_SIZE = 256 * 1024


class MllpClientError(Exception):
    """The message may not have been delivered: no ACK came back (timeout, closed, bad framing)."""


class MllpClient:
    """Use `await MllpClient.connect(host, port)`, or ``async with await MllpClient.connect(...)``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framer: MllpFramer
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._framer = framer
        self._acks: deque[bytes] = deque()
        self._lock = asyncio.Lock()  # concurrent send() calls queue up: one message in flight
        self._closed = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        ssl: _ssl.SSLContext | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> MllpClient:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, ssl=ssl, limit=_READ_SIZE)
        except TimeoutError:
            raise MllpClientError(f"connect to {host}:{port} timed out after {timeout}s") from None
        except OSError as exc:
            raise MllpClientError(f"connect to {host}:{port} failed: {exc.strerror or exc}") from exc
        return cls(reader, writer, MllpFramer(max_frame_bytes))

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, payload: bytes, timeout: float = 30.0) -> bytes:
        """Send one message and return its ACK payload (unframed).

        `timeout` is not just cancellation: on expiry the connection is closed, since a late ACK would
        otherwise be read as the answer to the next message.
        """
        async with self._lock:
            if self._closed:
                raise MllpClientError("connection is closed")
            try:
                async with asyncio.timeout(timeout):
                    self._writer.write(encode_frame(payload))
                    await self._writer.drain()
                    return await self._next_frame()
            except TimeoutError:
                await self.close()
                raise MllpClientError(f"no ACK within {timeout}s") from None
            except (ConnectionError, OSError) as exc:
                await self.close()
                raise MllpClientError(f"connection lost: {type(exc).__name__}") from exc
            except MllpClientError:
                await self.close()
                raise

    async def _next_frame(self) -> bytes:
        while not self._acks:
            data = await self._reader.read(_READ_SIZE)
            events = self._framer.feed(data) if data else self._framer.feed_eof()
            for event in events:
                if isinstance(event, Frame):
                    self._acks.append(event.payload)
                elif isinstance(event, FrameTooLarge | TruncatedFrame | MissingTrailingCr):
                    raise MllpClientError(f"bad ACK framing: {type(event).__name__}")
                # Junk between frames is ignored, as the server does.
            if not data and not self._acks:
                raise MllpClientError("connection closed by the peer before an ACK arrived")
        return self._acks.popleft()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            async with asyncio.timeout(5.0):
                await self._writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            self._writer.transport.abort()

    async def __aenter__(self) -> MllpClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def send_sync(host: str, port: int, payloads: Sequence[bytes], *, timeout: float = 30.0) -> list[bytes]:
    """Blocking: send `payloads` in order over one connection; return their ACK payloads.

    Runs its own event loop, so it cannot be called from inside a running one (use `MllpClient` there).
    `timeout` bounds the connect and each message's round trip.
    """

    async def run() -> list[bytes]:
        async with await MllpClient.connect(host, port, timeout=timeout) as client:
            return [await client.send(payload, timeout=timeout) for payload in payloads]

    return asyncio.run(run())
