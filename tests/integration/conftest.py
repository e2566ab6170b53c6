"""Fixtures the MLLP listener and client tests share (helpers are in tests/mllp_support.py)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hl7bridge.mllp.server import MllpServer
from tests.mllp_support import HOST, ServerFactory, echo


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    """Starts MllpServers on 127.0.0.1 with a free port (echo by default); stops them afterwards."""
    servers: list[MllpServer] = []

    async def factory(handler: Any = echo, **kwargs: Any) -> MllpServer:
        server = MllpServer(handler, host=HOST, port=0, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop(grace=1.0)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A throwaway self-signed certificate and key for 127.0.0.1 (skips when openssl is missing)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    yield cert, key
