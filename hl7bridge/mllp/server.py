"""The asyncio MLLP listener: drives `MllpFramer` over TCP (or TLS) connections.

One task per connection, no threads, so thousands of idle connections cost a task, a stream pair and a
timer each. Per connection exactly one message is in flight: the read loop does not read or handle the
next frame until the previous ACK has been written, which keeps each sender's order (MLLP is strict
request/reply; Mirth's "max processing threads = 1"). While a handler runs, the stream's buffer fills and
asyncio pauses the socket, so a fast sender is held back by TCP rather than by our memory.

Timeouts (after Camel's MLLP component): `idle_timeout` closes a connection that sends no frame for that
long (re-armed after each frame is answered); `frame_timeout` closes one that starts a frame (``<VT>``) and
does not finish it; `ack_write_timeout` bounds writing an ACK to a peer that stopped reading.

Logs never quote payloads (PHI): peers, reasons and exception *types* only. uvloop is used only if the
caller installed it; this module sets no event-loop policy.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from hl7bridge.mllp.framer import (
    DEFAULT_MAX_FRAME_BYTES,
    Frame,
    FrameTooLarge,
    JunkDiscarded,
    MissingTrailingCr,
    MllpFramer,
    TruncatedFrame,
    encode_frame,
)

__all__ = ["ConnectionInfo", "ErrorResponder", "Handler", "MllpServer", "ServerEvents"]

logger = logging.getLogger("hl7bridge.mllp")

_READ_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Who sent a message. `peer` is ``"host:port"`` (IPv6 hosts in brackets)."""

    peer: str


#: Handles one message payload (unframed) and returns the ACK payload (unframed).
Handler = Callable[[bytes, ConnectionInfo], Awaitable[bytes]]
#: Builds an ACK payload (AE/AR) for a message whose handler raised.
ErrorResponder = Callable[[bytes, BaseException], bytes]


class ServerEvents(Protocol):
    """Hooks for metrics. `frame_rejected` reasons: "junk", "too_large", "truncated", "missing_cr",
    "timeout_mid_frame", "idle_timeout"."""

    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def connection_refused(self) -> None: ...
    def frame_rejected(self, reason: str) -> None: ...


class _NoEvents:
    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def connection_refused(self) -> None:
        pass

    def frame_rejected(self, reason: str) -> None:
        pass


class _CloseConnectionError(Exception):
    """Internal: end this connection (the reason was already logged and reported)."""


class _ReadDeadline:
    """The deadline of one connection's read, without a timer per read.

    `asyncio.timeout` around every read creates, reschedules and cancels a timer per message. Here one
    timer per connection is moved lazily: arming with a later deadline only records it, and when the
    timer fires early it re-arms itself for the recorded deadline; only an earlier deadline (a frame
    started: the mid-frame timeout is shorter) moves the timer at once. On expiry during a read the task
    is cancelled, exactly as `asyncio.timeout` does, and `expired()` tells the caller it was us.
    """

    __slots__ = ("_armed", "_deadline", "_fired", "_handle", "_loop", "_task", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
        self._loop = loop
        self._task = task
        self._deadline = 0.0
        self._when = 0.0
        self._armed = False
        self._fired = False
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, deadline: float) -> None:
        self._deadline = deadline
        self._armed = True
        if self._handle is None or deadline < self._when:
            if self._handle is not None:
                self._handle.cancel()
            self._when = deadline
            self._handle = self._loop.call_at(deadline, self._check)

    def disarm(self) -> None:
        self._armed = False

    def expired(self) -> bool:
        """After a CancelledError in the read: True if this deadline caused it and no other cancellation
        (stop()) is pending, in which case the cancellation is consumed."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() == 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        if not self._armed:
            return  # not reading (a handler runs): the next arm() starts a timer again
        if self._loop.time() >= self._deadline:
            self._fired = True
            self._task.cancel()
        else:
            self._when = self._deadline
            self._handle = self._loop.call_at(self._deadline, self._check)


class _Connection:
    """Per-connection state that `stop()` needs to see."""

    __slots__ = ("busy", "info", "stopping", "task", "writer")

    def __init__(self, info: ConnectionInfo, writer: asyncio.StreamWriter, task: asyncio.Task[None]) -> None:
        self.info = info
        self.writer = writer
        self.task = task
        #: A message is being handled or its ACK written: stop() must let it finish.
        self.busy = False
        self.stopping = False


def _format_peer(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername)


class MllpServer:
    """An MLLP listener. `await start()`, then `await stop()`; `port` is the bound port after start."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "0.0.0.0",
        port: int = 2575,
        max_connections: int = 256,
        idle_timeout: float = 600.0,
        frame_timeout: float = 30.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        require_trailing_cr: bool = False,
        ack_write_timeout: float = 30.0,
        ssl: _ssl.SSLContext | None = None,
        error_responder: ErrorResponder | None = None,
        events: ServerEvents | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        for name, value in (
            ("idle_timeout", idle_timeout),
            ("frame_timeout", frame_timeout),
            ("ack_write_timeout", ack_write_timeout),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be at least 1")
        self._handler = handler
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.max_frame_bytes = max_frame_bytes
        self.require_trailing_cr = require_trailing_cr
        self.ack_write_timeout = ack_write_timeout
        self._ssl = ssl
        self._error_responder = error_responder
        self._events: ServerEvents = events if events is not None else _NoEvents()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._stopping = False
        self._stopped = asyncio.Event()

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    @property
    def serving(self) -> bool:
        return self._server is not None and not self._stopping

    async def start(self) -> None:
        """Bind and start accepting. With ``port=0`` the chosen port is in `port` afterwards."""
        if self._server is not None:
            raise RuntimeError("server already started")
        self._stopping = False
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, ssl=self._ssl, limit=_READ_SIZE
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        logger.info("MLLP listening on %s:%d%s", self.host, self.port, " (TLS)" if self._ssl else "")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let each in-flight message finish and its ACK go out, then close everything.

        Idle connections (and ones mid-way through receiving a frame, which the sender will resend) close
        at once; a connection whose handler is running closes right after writing its ACK. Whatever is
        still running after `grace` seconds is cancelled.
        """
        server = self._server
        if server is None:
            return
        if self._stopping:  # a second caller waits for the first one's shutdown
            await self._stopped.wait()
            return
        self._stopping = True
        self._stopped.clear()
        try:
            server.close()  # the listening socket closes now: new connections are refused by the OS
            for conn in list(self._connections):
                conn.stopping = True
                if not conn.busy:
                    conn.task.cancel()
            tasks = [conn.task for conn in self._connections]
            if tasks:
                _done, pending = await asyncio.wait(tasks, timeout=grace)
                for task in pending:
                    task.cancel()
                if pending:
                    logger.warning("MLLP stop: %d connection(s) still busy after %.1fs", len(pending), grace)
                    await asyncio.wait(pending, timeout=1.0)
            await server.wait_closed()
        finally:
            self._server = None
            self._stopped.set()
        logger.info("MLLP listener on port %d stopped", self.port)

    # --- per connection -----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = ConnectionInfo(_format_peer(writer.get_extra_info("peername")))
        if self._stopping or len(self._connections) >= self.max_connections:
            self._events.connection_refused()
            logger.warning(
                "MLLP connection from %s refused: %d connections open", info.peer, len(self._connections)
            )
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(info, writer, task)
        self._connections.add(conn)
        self._events.connection_opened()
        logger.debug("MLLP connection from %s", info.peer)
        try:
            await self._serve(conn, reader)
        except _CloseConnectionError:
            pass
        except asyncio.CancelledError:
            # stop() ending an idle connection or a grace period running out. This task is the top of the
            # connection and nobody awaits its result, so it ends normally: on Python 3.11 a *cancelled*
            # client_connected_cb task makes asyncio log a spurious "Exception in callback".
            task.uncancel()
        except (ConnectionError, OSError) as exc:
            logger.info("MLLP connection from %s lost: %s", info.peer, type(exc).__name__)
        except Exception as exc:
            # A bug (a handler returning a non-bytes ACK, a failing events hook): end this connection only.
            logger.error("MLLP connection from %s failed: %s", info.peer, type(exc).__name__)
        finally:
            self._connections.discard(conn)
            try:
                await self._close(writer)
            finally:
                self._events.connection_closed()
                logger.debug("MLLP connection from %s closed", info.peer)

    async def _serve(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        framer = MllpFramer(self.max_frame_bytes, self.require_trailing_cr)
        deadline = _ReadDeadline(loop, conn.task)
        idle_deadline = loop.time() + self.idle_timeout
        frame_deadline = 0.0
        try:
            while True:
                in_frame = framer.in_frame
                deadline.arm(frame_deadline if in_frame else idle_deadline)
                try:
                    data = await reader.read(_READ_SIZE)
                except asyncio.CancelledError:
                    if not deadline.expired():
                        raise
                    self._reject(conn, "timeout_mid_frame" if in_frame else "idle_timeout")
                    return
                finally:
                    deadline.disarm()
                if not data:
                    for event in framer.feed_eof():
                        self._violation(conn, event)
                    return
                events = framer.feed(data)
                for event in events:
                    if isinstance(event, Frame):
                        await self._answer(conn, event.payload)
                        if conn.stopping:
                            return
                        idle_deadline = loop.time() + self.idle_timeout
                    else:
                        self._violation(conn, event)
                if framer.in_frame and (not in_frame or events):
                    # A frame started in this chunk. Count from now, not from the read: time spent
                    # answering earlier frames of the same chunk is ours, not the sender's.
                    frame_deadline = loop.time() + self.frame_timeout
        finally:
            deadline.close()

    def _violation(self, conn: _Connection, event: object) -> None:
        """Report a framing event; every one except junk ends the connection."""
        if isinstance(event, JunkDiscarded):
            self._events.frame_rejected("junk")
            logger.info("MLLP %s: discarded %d bytes outside a frame", conn.info.peer, event.nbytes)
            return
        if isinstance(event, FrameTooLarge):
            self._reject(conn, "too_large")
        elif isinstance(event, TruncatedFrame):
            self._reject(conn, "truncated")
        elif isinstance(event, MissingTrailingCr):
            self._reject(conn, "missing_cr")
        raise _CloseConnectionError

    def _reject(self, conn: _Connection, reason: str) -> None:
        self._events.frame_rejected(reason)
        logger.warning("MLLP %s: closing connection (%s)", conn.info.peer, reason)

    async def _answer(self, conn: _Connection, payload: bytes) -> None:
        """Run the handler for one message and write its ACK; the next frame waits for this."""
        conn.busy = True
        try:
            try:
                ack = await self._handler(payload, conn.info)
            except Exception as exc:
                # Never the payload or str(exc) here: either can carry PHI.
                logger.error("MLLP handler raised %s (message from %s)", type(exc).__name__, conn.info.peer)
                if self._error_responder is None:
                    raise _CloseConnectionError from None
                try:
                    ack = self._error_responder(payload, exc)
                except Exception as exc2:
                    logger.error("MLLP error responder raised %s", type(exc2).__name__)
                    raise _CloseConnectionError from None
            conn.writer.write(encode_frame(ack))
            if not conn.writer.transport.get_write_buffer_size():
                return  # the kernel took the whole ACK: nothing to drain, no timer needed
            try:
                async with asyncio.timeout(self.ack_write_timeout):
                    await conn.writer.drain()
            except TimeoutError:
                logger.warning(
                    "MLLP %s: ACK not taken within %.1fs, closing", conn.info.peer, self.ack_write_timeout
                )
                conn.writer.transport.abort()
                raise _CloseConnectionError from None
        finally:
            conn.busy = False

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(self.ack_write_timeout):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
