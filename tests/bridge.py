"""Running a real bridge in tests: in-process on ephemeral ports, or as a `hl7bridge serve` subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from hl7bridge.app import App
from hl7bridge.config import load_config
from hl7bridge.hl7.ack import parse_ack
from hl7bridge.mllp.client import MllpClient
from tests.pgserver import free_port

T = TypeVar("T")


@asynccontextmanager
async def running_bridge(data_dir: Path, **sections: Any) -> AsyncIterator[App]:
    """An App on 127.0.0.1 with ephemeral MLLP and HTTP ports. `sections` override config sections."""
    overrides: dict[str, Any] = {
        "listener": {"host": "127.0.0.1", "port": 0},
        "ops": {"host": "127.0.0.1", "port": 0},
        "store": {"data_dir": data_dir},
        "delivery": {"poll_interval": 0.2, "backoff_initial": 0.1, "backoff_max": 1.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    app = App(load_config(None, overrides))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=5.0)


async def send_all(port: int, payloads: list[bytes], timeout: float = 15.0) -> list[tuple[str, str, str]]:
    """Send on one connection, one in flight; return (MSA-1, MSA-2, ERR-3) per message."""
    out = []
    async with await MllpClient.connect("127.0.0.1", port, timeout=timeout) as client:
        for p in payloads:
            ack = await client.send(p, timeout=timeout)
            out.append(parse_ack(ack.decode("utf-8", "replace")))
    return out


async def wait_for(predicate: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    """Poll until predicate() is truthy (returns it) or fail after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)


def wait_for_sync(predicate: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


class BridgeProcess:
    """`hl7bridge serve` as a child process (crash-safety tests SIGKILL it)."""

    def __init__(self, data_dir: Path, *extra: str, port: int | None = None, env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.port = port or free_port()
        self.http_port = free_port()
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"bridge-{self.port}.log"

    def start(self, timeout: float = 30.0) -> BridgeProcess:
        cmd = [sys.executable, "-m", "hl7bridge.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--http-port", str(self.http_port), "--data-dir", str(self.data_dir), *self.extra]
        self.env.setdefault("HL7BRIDGE_OPS__HOST", "127.0.0.1")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("bridge did not start listening") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
