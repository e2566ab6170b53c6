"""The asyncio MLLP listener: drives `MllpFramer` over TCP (or TLS) connections.

Built on `asyncio.Protocol` callbacks, not streams: a connection is a protocol object, a framer and at
most one timer, and it has a task only while a message is being handled. So thousands of idle connections
cost little, and a message costs no stream-buffer copy, read future or task wake-up of its own.

Per connection exactly one message is in flight: the next frame is not handled until the previous ACK
has been written, which keeps each sender's order (MLLP is strict request/reply; Mirth's "max processing
threads = 1"). Frames that arrived in the same chunk are answered in order, one after the other. If more
data arrives while a handler runs, it is held and reading is paused at once, so a fast sender is held
back by TCP rather than by our memory (a well-behaved sender waits for its ACK and never triggers this,
so the common path costs no pause/resume system calls).

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
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, cast

from hl7bridge.mllp.framer import (
    DEFAULT_MAX_FRAME_BYTES,
    Event,
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
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self, loop), self.host, self.port, ssl=self._ssl
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
                    conn.close()
            waiting = {conn.done: conn for conn in self._connections if conn.done is not None}
            if waiting:
                _done, pending = await asyncio.wait(waiting, timeout=grace)
                for fut in pending:
                    waiting[fut].cancel()
                if pending:
                    logger.warning("MLLP stop: %d connection(s) still busy after %.1fs", len(pending), grace)
                    await asyncio.wait(pending, timeout=1.0)
            await server.wait_closed()
        finally:
            self._server = None
            self._stopped.set()
        logger.info("MLLP listener on port %d stopped", self.port)


class _Connection(asyncio.Protocol):
    """One MLLP connection: framer events in, handler task per message, ACKs out.

    States: *reading* (no task; the idle or mid-frame deadline is armed), *busy* (a task runs the handler
    and writes the ACK; no deadline, data that arrives is held and reading paused), *closing* (the
    transport is closing; `done` resolves once it is closed and no task runs).
    """

    __slots__ = (
        "_accepted",
        "_close_timer",
        "_closing",
        "_eof_held",
        "_finished",
        "_frame_deadline",
        "_frame_started",
        "_framer",
        "_held",
        "_idle_deadline",
        "_loop",
        "_lost",
        "_paused",
        "_queue",
        "_server",
        "_task",
        "_timer",
        "_timer_when",
        "_transport",
        "_write_paused",
        "_write_waiter",
        "busy",
        "done",
        "info",
        "stopping",
    )

    def __init__(self, server: MllpServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self.info = ConnectionInfo("?")
        self._framer = MllpFramer(server.max_frame_bytes, server.require_trailing_cr)
        self._queue: deque[Event] = deque()
        self._held: list[bytes] = []  # data received while a handler ran, fed once it is done
        self._eof_held = False
        self._frame_started = False  # the last chunk fed left a frame open: its deadline starts when answered
        self._idle_deadline = 0.0
        self._frame_deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._close_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._write_paused = False
        self._write_waiter: asyncio.Future[None] | None = None
        self._accepted = False
        self._paused = False
        self._closing = False
        self._lost = False
        self._finished = False
        #: A message is being handled or its ACK written: stop() must let it finish.
        self.busy = False
        self.stopping = False
        #: Resolves when the connection is closed and nothing runs for it any more (None if refused).
        self.done: asyncio.Future[None] | None = None

    # --- transport callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        server = self._server
        self.info = ConnectionInfo(_format_peer(transport.get_extra_info("peername")))
        if server._stopping or len(server._connections) >= server.max_connections:
            logger.warning(
                "MLLP connection from %s refused: %d connections open", self.info.peer, len(server._connections)
            )
            transport.abort()
            try:
                server._events.connection_refused()
            except Exception as exc:
                logger.error("MLLP connection from %s failed: %s", self.info.peer, type(exc).__name__)
            return
        self._accepted = True
        self.done = self._loop.create_future()
        server._connections.add(self)
        self._idle_deadline = self._loop.time() + server.idle_timeout
        try:
            server._events.connection_opened()
        except Exception as exc:
            self._fail(exc)
            return
        logger.debug("MLLP connection from %s", self.info.peer)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._closing or not self._accepted:
            return
        if self.busy:
            # One message in flight: hold what comes next and stop reading until the ACK is out.
            self._held.append(data)
            if not self._paused:
                self._paused = True
                self._transport.pause_reading()  # type: ignore[union-attr]
            return
        try:
            if self._feed(data):
                self._proceed()
        except Exception as exc:  # a bug (a failing events hook): end this connection only
            self._fail(exc)

    def eof_received(self) -> bool:
        if self._closing or not self._accepted:
            return False
        if self.busy:
            # Answer what is in flight first; a half-closed TCP peer still reads its ACKs (TLS cannot).
            self._eof_held = True
            return self._server._ssl is None
        try:
            self._end_of_input()
        except Exception as exc:
            self._fail(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timers()
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self._accepted:
            return
        if exc is not None and not self._closing:
            logger.info("MLLP connection from %s lost: %s", self.info.peer, type(exc).__name__)
        self._closing = True
        self._maybe_finish()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- reading ------------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> bool:
        """Feed one chunk to the framer; True when it produced events (queued for `_proceed`)."""
        framer = self._framer
        was_in_frame = framer.in_frame
        events = framer.feed(data)
        if events:
            self._queue.extend(events)
            self._frame_started = framer.in_frame
            return True
        if framer.in_frame and not was_in_frame:
            self._frame_deadline = self._loop.time() + self._server.frame_timeout
            self._arm()
        return False

    def _proceed(self) -> None:
        """Handle queued events in order until one needs the handler; with none left, read again."""
        queue = self._queue
        while True:
            while queue:
                event = queue.popleft()
                if type(event) is Frame:
                    self._start(event.payload)
                    return
                if not self._violation(event):
                    return
            if self._frame_started:
                # A frame started in the last chunk. Count from now, not from its arrival: time spent
                # answering earlier frames of the same chunk is ours, not the sender's.
                self._frame_started = False
                self._frame_deadline = self._loop.time() + self._server.frame_timeout
            if not self._held:
                break
            data = b"".join(self._held)
            self._held.clear()
            self._feed(data)
        if self._eof_held:
            self._eof_held = False
            self._end_of_input()
            return
        if self._paused:
            self._paused = False
            self._transport.resume_reading()  # type: ignore[union-attr]
        self._arm()

    def _end_of_input(self) -> None:
        for event in self._framer.feed_eof():
            if not self._violation(event):
                return
        self.close()

    def _violation(self, event: object) -> bool:
        """Report a framing event. Junk is only reported (True: carry on); the rest close (False)."""
        if type(event) is JunkDiscarded:
            self._server._events.frame_rejected("junk")
            logger.info("MLLP %s: discarded %d bytes outside a frame", self.info.peer, event.nbytes)
            return True
        if isinstance(event, FrameTooLarge):
            self._reject("too_large")
        elif isinstance(event, TruncatedFrame):
            self._reject("truncated")
        elif isinstance(event, MissingTrailingCr):
            self._reject("missing_cr")
        self.close()
        return False

    def _reject(self, reason: str) -> None:
        self._server._events.frame_rejected(reason)
        logger.warning("MLLP %s: closing connection (%s)", self.info.peer, reason)

    # --- deadlines ----------------------------------------------------------------------------------

    def _arm(self) -> None:
        """Make sure a timer fires no later than the current read deadline.

        One timer per connection, moved lazily: a later deadline (the idle deadline pushed back after each
        answer) is only recorded, and the timer re-arms itself when it fires early; only an earlier one (a
        frame started: the mid-frame timeout is shorter) moves it at once. So a message costs no timer call.
        """
        deadline = self._frame_deadline if self._framer.in_frame else self._idle_deadline
        timer = self._timer
        if timer is None or deadline < self._timer_when:
            if timer is not None:
                timer.cancel()
            self._timer_when = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.busy or self._closing:
            return  # not reading: `_proceed` arms again when it is
        in_frame = self._framer.in_frame
        deadline = self._frame_deadline if in_frame else self._idle_deadline
        if self._loop.time() < deadline:
            self._timer_when = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        try:
            self._reject("timeout_mid_frame" if in_frame else "idle_timeout")
        except Exception as exc:
            self._fail(exc)
            return
        self.close()

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._close_timer = None

    # --- answering ----------------------------------------------------------------------------------

    def _start(self, payload: bytes) -> None:
        self.busy = True
        self._task = self._loop.create_task(self._answer(payload))

    async def _answer(self, payload: bytes) -> None:
        """One message: run the handler, write its ACK, then carry on with the connection."""
        server = self._server
        try:
            try:
                ack = await server._handler(payload, self.info)
            except Exception as exc:
                # Never the payload or str(exc) here: either can carry PHI.
                logger.error("MLLP handler raised %s (message from %s)", type(exc).__name__, self.info.peer)
                if server._error_responder is None:
                    self._end_busy()
                    self.close()
                    return
                try:
                    ack = server._error_responder(payload, exc)
                except Exception as exc2:
                    logger.error("MLLP error responder raised %s", type(exc2).__name__)
                    self._end_busy()
                    self.close()
                    return
            frame = encode_frame(ack)
            if not self._lost:
                self._transport.write(frame)  # type: ignore[union-attr]
                if self._write_paused and not await self._drain():
                    self._end_busy()
                    self.close()
                    return
        except asyncio.CancelledError:
            # stop() after its grace period: no ACK (the sender resends). Nobody awaits this task, so it
            # ends normally rather than cancelled.
            self._end_busy()
            self.close()
            return
        except Exception as exc:  # a handler returning a non-bytes ACK: end this connection only
            self._end_busy()
            self._fail(exc)
            return
        self._end_busy()
        if self.stopping or self._closing:
            self.close()
            return
        self._idle_deadline = self._loop.time() + server.idle_timeout
        try:
            self._proceed()
        except Exception as exc:
            self._fail(exc)

    def _end_busy(self) -> None:
        self.busy = False
        self._task = None

    async def _drain(self) -> bool:
        """Wait until the transport takes the ACK (below its high-water mark); False after the timeout."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._write_waiter = waiter
        try:
            async with asyncio.timeout(self._server.ack_write_timeout):
                await waiter
        except TimeoutError:
            logger.warning(
                "MLLP %s: ACK not taken within %.1fs, closing", self.info.peer, self._server.ack_write_timeout
            )
            self._transport.abort()  # type: ignore[union-attr]
            return False
        finally:
            self._write_waiter = None
        return True

    # --- closing ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (after a running handler, if any, has finished with it)."""
        if not self._closing:
            self._closing = True
            self._cancel_timers()
            transport = self._transport
            if transport is not None and not self._lost:
                transport.close()
                if transport.get_write_buffer_size() and not self._lost:
                    # A peer that stopped reading must not keep the connection open for ever.
                    self._close_timer = self._loop.call_later(self._server.ack_write_timeout, transport.abort)
        self._maybe_finish()

    def cancel(self) -> None:
        """stop()'s grace period ran out: cancel the handler, or drop the connection."""
        if self._task is not None:
            self._task.cancel()
        elif self._transport is not None:
            self._closing = True
            self._transport.abort()

    def _fail(self, exc: BaseException) -> None:
        logger.error("MLLP connection from %s failed: %s", self.info.peer, type(exc).__name__)
        self.close()

    def _maybe_finish(self) -> None:
        if self._finished or not self._lost or self.busy or not self._accepted:
            return
        self._finished = True
        self._cancel_timers()
        self._server._connections.discard(self)
        try:
            self._server._events.connection_closed()
        except Exception as exc:
            logger.error("MLLP connection from %s failed: %s", self.info.peer, type(exc).__name__)
        logger.debug("MLLP connection from %s closed", self.info.peer)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)
