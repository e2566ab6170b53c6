"""The operations endpoint: `/metrics`, `/healthz` and `/readyz` over a deliberately tiny HTTP/1.1 server.

No web framework: three read-only resources do not justify one, and a probe endpoint should have as
little between the socket and the answer as possible. The server parses the request line and headers,
ignores any body (GET and HEAD have none), answers, and keeps the connection alive for the next request
until the client closes it, asks to close, or stays idle.

Kubernetes conventions:
- `/healthz` (liveness) answers 200 "ok" whenever the event loop runs. It checks nothing else, so a
  database outage never makes the kubelet restart a bridge that would only come back to the same outage.
- `/readyz` (readiness) runs every registered check concurrently, each under a timeout, and answers 200
  when all pass, else 503. The JSON body names each failing check and its (PHI-free) reason.
  Each result is also exported as `hl7bridge_component_up{component=<check name>}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from hl7bridge.metrics import CONTENT_TYPE, Metrics

__all__ = ["OpsServer", "ReadinessCheck"]

log = logging.getLogger("hl7bridge.ops")

#: A readiness check: returns when ready, raises when not. Its exception message appears in the /readyz
#: body, so it must name the component and the failure, never data.
ReadinessCheck = Callable[[], Awaitable[None]]

_MAX_HEAD_BYTES = 16 * 1024  # request line + headers; probes and scrapers send a few hundred bytes
_MAX_REQUESTS_PER_CONNECTION = 1000
_IDLE_TIMEOUT = 30.0  # longer than Prometheus's and the kubelet's usual intervals, so connections get reused
_MAX_REASON_CHARS = 200


class _BadRequestError(Exception):
    """The request cannot be parsed; answered with 400 and the connection is closed."""


class OpsServer:
    """The HTTP endpoint `hl7bridge serve` exposes (default port 9575)."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        host: str = "0.0.0.0",
        port: int = 9575,
        checks: Mapping[str, ReadinessCheck] | None = None,
        check_timeout: float = 2.0,
        before_scrape: Callable[[], object] | None = None,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.checks: dict[str, ReadinessCheck] = dict(checks or {})
        self.check_timeout = check_timeout
        #: Called before each /metrics render, e.g. to import the reconcile textfile. Must be quick;
        #: a failure is logged and the scrape still answers.
        self.before_scrape = before_scrape
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and start serving. With `port=0` the bound port is in `self.port` afterwards."""
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, limit=_MAX_HEAD_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("ops endpoint listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, close every open connection, and wait for the handlers to finish."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def readiness(self) -> dict[str, str | None]:
        """Run every check concurrently; map each name to None (ready) or the reason it is not."""
        names = list(self.checks)
        results = await asyncio.gather(*(self._run_check(name) for name in names))
        return dict(zip(names, results, strict=True))

    async def _run_check(self, name: str) -> str | None:
        reason: str | None = None
        deadline = asyncio.timeout(self.check_timeout)
        try:
            async with deadline:
                await self.checks[name]()
        except TimeoutError as exc:
            # Our deadline, or the check's own timeout (say, a database connect timeout): both not ready.
            own = deadline.expired()
            reason = f"check timed out after {self.check_timeout:g}s" if own else (str(exc) or "timed out")
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
        if reason is not None:
            reason = reason[:_MAX_REASON_CHARS]
        self.metrics.set_up(name, reason is None)
        return reason

    # --- HTTP -----------------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            for _ in range(_MAX_REQUESTS_PER_CONNECTION):
                try:
                    async with asyncio.timeout(_IDLE_TIMEOUT):
                        request = await _read_request(reader)
                except _BadRequestError:
                    await self._respond(writer, 400, b"bad request\n", head=False, keep_alive=False)
                    return
                if request is None:
                    return  # the client closed the connection
                method, target, keep_alive = request
                status, headers, body = await self._route(method, target)
                await self._respond(
                    writer, status, body, head=method == "HEAD", keep_alive=keep_alive, headers=headers
                )
                if not keep_alive:
                    return
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the peer went away mid-request; nothing to answer
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/healthz", "/readyz"):
            return 404, {}, b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, {"Allow": "GET, HEAD"}, b"method not allowed\n"
        if path == "/healthz":
            return 200, {}, b"ok\n"
        if path == "/metrics":
            if self.before_scrape is not None:
                try:
                    self.before_scrape()
                except Exception:
                    log.warning("before_scrape hook failed", exc_info=True)
            return 200, {"Content-Type": CONTENT_TYPE}, self.metrics.render()
        results = await self.readiness()
        failing = {name: reason for name, reason in results.items() if reason is not None}
        body = {
            "status": "not ready" if failing else "ready",
            "checks": {name: reason or "ok" for name, reason in results.items()},
            "failing": failing,
        }
        return (503 if failing else 200), {"Content-Type": "application/json"}, _json(body)

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        head: bool,
        keep_alive: bool,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        fields = {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
        fields["Content-Length"] = str(len(body))
        fields["Cache-Control"] = "no-store"  # probes and scrapes must never see a cached answer
        fields["Connection"] = "keep-alive" if keep_alive else "close"
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"] + [f"{k}: {v}" for k, v in fields.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(body)
        async with asyncio.timeout(_IDLE_TIMEOUT):
            await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bool] | None:
    """Read one request head. Returns (method, target, keep_alive), or None when the client closed.

    Any body is read and dropped, so a keep-alive connection stays in sync after a stray POST.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequestError("truncated request") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequestError("request head too large") from exc
    if len(head) > _MAX_HEAD_BYTES:
        raise _BadRequestError("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequestError("bad request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequestError("bad header line")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequestError("chunked request bodies are not supported")
    length_text = headers.get("content-length", "0")
    if not (length_text.isascii() and length_text.isdigit()) or int(length_text) > _MAX_HEAD_BYTES:
        raise _BadRequestError("bad or oversized content-length")
    if int(length_text):
        await reader.readexactly(int(length_text))
    connection = headers.get("connection", "").lower()
    # HTTP/1.1 defaults to keep-alive, HTTP/1.0 to close.
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    return method, target, keep_alive


def _json(value: object) -> bytes:
    return (json.dumps(value, sort_keys=True) + "\n").encode()
