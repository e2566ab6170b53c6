"""The reference servers hl7bridge is measured against, each run as its own process.

    python -m bench.peers echo|pyhl7|hl7apy [--port N]

prints ``PORT <n>`` on stdout once listening and runs until SIGTERM/SIGINT.

- ``echo``: the ceiling. A raw asyncio `Protocol` on uvloop: finds ``<FS>``, splits the first segment's
  bytes to echo MSH-10 in a fixed ACK, writes it. No decoding, no parse, no durability.
- ``pyhl7``: python-hl7's own asyncio server as its documentation shows it: `hl7.mllp.start_hl7_server`,
  `HL7StreamReader.readmessage()` (which runs `hl7.parse`), `Message.create_ack()`, `writemessage()`.
  On uvloop too, so that the event loop is not what separates it from the ceiling.
- ``hl7apy``: hl7apy's own `hl7apy.mllp.MLLPServer` (a `ThreadingTCPServer`; it closes the connection
  after every ACK) with a handler that does what its documentation shows: `parse_message` on the
  incoming message, then an ACK built with hl7apy's `Message("ACK")` and returned with `to_mllp()`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from typing import Any, cast

__all__ = ["main"]

_VT, _FS = b"\x0b", b"\x1c"


# --- the ceiling: raw MLLP echo ---------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    __slots__ = ("buf", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(_FS)
            if end < 0:
                break
            start = buf.find(_VT)
            payload = buf[start + 1 : end]
            buf = buf[end + 2 :]
            msh = payload[: payload.find(b"\r")]
            fields = msh.split(b"|", 10)
            cid = fields[9] if len(fields) > 9 else b""
            self.transport.write(
                b"\x0bMSH|^~\\&|ECHO||||20260101000000||ACK^A04^ACK|1|P|2.5.1\rMSA|AA|%s\r\x1c\r" % cid
            )
        self.buf = buf


async def _serve_echo(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", port)
    await _announce_and_wait(server)


# --- python-hl7's asyncio server ----------------------------------------------------------------


async def _serve_pyhl7(port: int) -> None:
    import hl7
    import hl7.mllp

    async def process_hl7_messages(reader: Any, writer: Any) -> None:
        # The loop from python-hl7's documentation ("MLLP using asyncio").
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                writer.writemessage(message.create_ack())
                await writer.drain()
        except asyncio.IncompleteReadError:
            if not writer.is_closing():
                writer.close()
                await writer.wait_closed()
        except (hl7.mllp.InvalidBlockError, ConnectionError):
            writer.close()

    server = await hl7.mllp.start_hl7_server(process_hl7_messages, "127.0.0.1", port, encoding="utf-8")
    await _announce_and_wait(server)


async def _announce_and_wait(server: asyncio.Server) -> None:
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def _run_async(coro: Any) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


# --- hl7apy's MLLPServer --------------------------------------------------------------------------


def _serve_hl7apy(port: int) -> None:
    from hl7apy.core import Message
    from hl7apy.mllp import AbstractHandler, MLLPServer
    from hl7apy.parser import parse_message

    class AdtHandler(AbstractHandler):  # type: ignore[misc]
        def reply(self) -> str:
            msg = parse_message(self.incoming_message)
            ack = Message("ACK", version=msg.version)
            ack.msh.msh_3 = msg.msh.msh_5.to_er7()
            ack.msh.msh_4 = msg.msh.msh_6.to_er7()
            ack.msh.msh_5 = msg.msh.msh_3.to_er7()
            ack.msh.msh_6 = msg.msh.msh_4.to_er7()
            ack.msh.msh_9 = "ACK^A04^ACK"
            ack.msh.msh_10 = "ACK" + msg.msh.msh_10.to_er7()[:17]
            ack.msh.msh_11 = msg.msh.msh_11.to_er7()
            ack.msa.msa_1 = "AA"
            ack.msa.msa_2 = msg.msh.msh_10.to_er7()
            return str(ack.to_mllp())

    server = MLLPServer("127.0.0.1", port, {"ADT^A04^ADT_A01": (AdtHandler,)}, timeout=10)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    done = threading.Event()

    def _stop(_sig: int, _frame: Any) -> None:
        done.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.serve_forever(poll_interval=0.2)
    server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="reference MLLP servers for the benchmark")
    parser.add_argument("kind", choices=("echo", "pyhl7", "hl7apy"))
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "echo":
        _run_async(_serve_echo(args.port))
    elif args.kind == "pyhl7":
        _run_async(_serve_pyhl7(args.port))
    else:
        _serve_hl7apy(args.port)
    sys.exit(0)


if __name__ == "__main__":
    main()
