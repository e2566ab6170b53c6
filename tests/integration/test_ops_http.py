"""The ops endpoint over real HTTP on 127.0.0.1: what Prometheus and the Kubernetes probes see."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from prometheus_client import CollectorRegistry

from hl7bridge.metrics import Metrics
from hl7bridge.ops import OpsServer


class Switch:
    """A readiness check the test turns on and off."""

    def __init__(self, reason: str) -> None:
        self.ok = True
        self.reason = reason
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.ok:
            raise ConnectionError(self.reason)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def journal() -> Switch:
    return Switch("journal: database connection refused")


@pytest.fixture
def sink() -> Switch:
    return Switch("sink: CRM unreachable")


@pytest.fixture
async def server(metrics: Metrics, journal: Switch, sink: Switch) -> AsyncIterator[OpsServer]:
    checks = {"journal": journal, "sink": sink}
    ops = OpsServer(metrics, host="127.0.0.1", port=0, checks=checks, check_timeout=0.3)
    await ops.start()
    try:
        yield ops
    finally:
        await ops.stop()


@pytest.fixture
async def client(server: OpsServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5.0) as c:
        yield c


async def test_healthz_answers_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok\n"


async def test_metrics_shows_what_the_bridge_counted(client: httpx.AsyncClient, metrics: Metrics) -> None:
    metrics.message_received("ADT", "A04")
    metrics.message_received("ADT", "A04")
    metrics.ack_sent("AA", 0.004)
    metrics.rejected("missing_required")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    body = response.text
    assert 'hl7bridge_messages_received_total{trigger="A04",type="ADT"} 2.0' in body
    assert 'hl7bridge_acks_sent_total{code="AA"} 1.0' in body
    assert 'hl7bridge_messages_rejected_total{reason="missing_required"} 1.0' in body
    assert "hl7bridge_ack_latency_seconds_count 1.0" in body


async def test_head_has_headers_and_no_body(client: httpx.AsyncClient) -> None:
    response = await client.head("/metrics")
    assert response.status_code == 200
    assert int(response.headers["content-length"]) > 100
    assert response.content == b""


async def test_unknown_path_and_wrong_method(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nope")).status_code == 404
    response = await client.post("/metrics", content=b"x=1")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    # The connection is still usable after the rejected POST and its body.
    assert (await client.get("/healthz")).status_code == 200


async def test_readyz_follows_the_checks(
    client: httpx.AsyncClient, journal: Switch, sink: Switch, metrics: Metrics
) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"journal": "ok", "sink": "ok"}, "failing": {}}

    sink.ok = False
    response = await client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["failing"] == {"sink": "sink: CRM unreachable"}
    assert body["checks"]["journal"] == "ok"
    metrics_text = (await client.get("/metrics")).text
    assert 'hl7bridge_component_up{component="sink"} 0.0' in metrics_text
    assert 'hl7bridge_component_up{component="journal"} 1.0' in metrics_text

    sink.ok = True
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert 'hl7bridge_component_up{component="sink"} 1.0' in (await client.get("/metrics")).text


async def test_a_hanging_check_is_not_ready_within_the_timeout(metrics: Metrics) -> None:
    never = asyncio.Event()

    async def hangs() -> None:
        await never.wait()

    ops = OpsServer(metrics, host="127.0.0.1", port=0, checks={"sink": hangs}, check_timeout=0.2)
    await ops.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops.port}", timeout=5.0) as c:
            started = time.monotonic()
            response = await c.get("/readyz")
            elapsed = time.monotonic() - started
            assert response.status_code == 503
            assert "timed out" in response.json()["failing"]["sink"]
            assert elapsed < 2.0
            # Liveness is unaffected by a hanging dependency.
            assert (await c.get("/healthz")).status_code == 200
    finally:
        await ops.stop()


async def test_before_scrape_hook_runs_and_cannot_break_the_scrape(metrics: Metrics) -> None:
    calls: list[int] = []

    def hook() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("textfile unreadable")
        metrics.set_dlq_size(len(calls))

    ops = OpsServer(metrics, host="127.0.0.1", port=0, before_scrape=hook)
    await ops.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops.port}") as c:
            assert "hl7bridge_dlq_size 1.0" in (await c.get("/metrics")).text
            assert (await c.get("/metrics")).status_code == 200  # the hook failed; the scrape did not
            assert "hl7bridge_dlq_size 3.0" in (await c.get("/metrics")).text
    finally:
        await ops.stop()


async def test_no_checks_means_ready(metrics: Metrics) -> None:
    ops = OpsServer(metrics, host="127.0.0.1", port=0)
    await ops.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops.port}") as c:
            assert (await c.get("/readyz")).status_code == 200
    finally:
        await ops.stop()


async def _raw(port: int, payload: bytes, until: Callable[[bytes], bool]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        data = b""
        async with asyncio.timeout(5):
            while not until(data):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
        return data
    finally:
        writer.close()


async def test_keep_alive_serves_several_requests_on_one_connection(server: OpsServer) -> None:
    two = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = await _raw(server.port, two, until=lambda d: d.count(b"ok\n") >= 2)
    assert data.count(b"HTTP/1.1 200 OK") == 2


async def test_malformed_request_gets_400(server: OpsServer) -> None:
    data = await _raw(server.port, b"NONSENSE\r\n\r\n", until=lambda d: b"\r\n\r\n" in d)
    assert data.startswith(b"HTTP/1.1 400 ")


async def test_stop_closes_idle_keep_alive_connections(metrics: Metrics) -> None:
    ops = OpsServer(metrics, host="127.0.0.1", port=0)
    await ops.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            await reader.readuntil(b"ok\n")
        await _within(ops.stop(), seconds=5)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # the server closed the connection
    finally:
        writer.close()


async def _within(awaitable: Awaitable[None], *, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        await awaitable
