"""Starting and stopping the servers under test, each in its own process, one at a time.

Every server listens on 127.0.0.1 only. Peers print their port; hl7bridge gets a free port and is polled
until it accepts. Every wait here has a deadline, and every child is stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Server", "free_port", "rss_mb", "start_bridge", "start_peer"]

_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident set size of a process (VmRSS), in MB; NaN if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Server:
    """A child process serving MLLP on `port`."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, log: Path | None,
                 http_port: int | None = None) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.log = log
        self.http_port = http_port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (the bridge drains), then SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def tail(self, n: int = 1500) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-n:]


def start_peer(kind: str, timeout: float = 30.0) -> Server:
    """`python -m bench.peers KIND`; returns once it has printed its port."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.peers", kind], cwd=_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while b"\n" not in buf:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"peer {kind} did not start")
        chunk = proc.stdout.read()
        if chunk:
            buf += chunk
        else:
            time.sleep(0.02)
    port = int(buf.split(b"\n", 1)[0].split()[1])
    return Server(kind, proc, port, None)


def start_bridge(name: str, data_dir: Path, *, store: str | None = None, launcher: tuple[str, ...] = (),
                 max_connections: int = 2000, timeout: float = 60.0) -> Server:
    """`hl7bridge serve` (default config) on free ports with its data in `data_dir`. The connection cap
    is raised from the default 256 so that the idle-connections test can open 1,000.
    `launcher` (e.g. ``("-m", "bench.variants", "intake-only")``) starts a diagnostic variant instead."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, *(launcher or ("-m", "hl7bridge.cli")), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--http-port", str(http_port), "--data-dir", str(data_dir)]
    if store:
        cmd += ["--store", store]
    env = {**os.environ, "HL7BRIDGE_OPS__HOST": "127.0.0.1",
           "HL7BRIDGE_LISTENER__MAX_CONNECTIONS": str(max_connections)}
    log = data_dir.parent / f"{data_dir.name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text(errors='replace')[-800:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return Server(name, proc, port, log, http_port)
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{name} did not start listening") from None
            time.sleep(0.05)
