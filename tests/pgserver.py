"""A real, throwaway PostgreSQL server for the tests (initdb + pg_ctl in a temp dir, 127.0.0.1, free port).

As root, the server runs as the `postgres` user via `runuser`, in a directory chowned to it. The server can
be stopped and started again mid-test (CRM outage tests, /readyz tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/local/bin", "/usr/bin")


def _find(tool: str) -> str | None:
    for d in PG_BIN_CANDIDATES:
        p = Path(d) / tool
        if p.exists():
            return str(p)
    return shutil.which(tool)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self) -> None:
        initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.as_root = os.geteuid() == 0
        self.tmp = Path(tempfile.mkdtemp(prefix="hl7bridge-pg-"))
        self.datadir = self.tmp / "data"
        self.port = free_port()
        if self.as_root:
            self.tmp.chmod(0o755)
            shutil.chown(self.tmp, "postgres", "postgres")
        self.user = "postgres" if self.as_root else os.environ.get("USER", "postgres")
        self._run([self.initdb, "-D", str(self.datadir), "-U", self.user, "-A", "trust", "-E", "UTF8",
                   "--no-sync"])
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.tmp}'\n"
                    "fsync = on\nmax_connections = 200\n")
        self.start()

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.datadir), "-l", str(self.tmp / "log"), "-w", "-t", "60", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run([self.pg_ctl, "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop"], check=False)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh database for one test; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def wait_ready(self, deadline_s: float = 30.0) -> None:
        import psycopg

        end = time.monotonic() + deadline_s
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.tmp, ignore_errors=True)
