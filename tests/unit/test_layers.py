"""The import rules of architecture.md, checked on the source: pure layers stay pure, the pipeline talks to
stores and sinks only through their protocols, and concrete backends are chosen in app.py only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "hl7bridge"
IO_MODULES = ("asyncio", "socket", "ssl", "psycopg", "psycopg_pool", "sqlite3", "httpx", "prometheus_client",
              "urllib.request", "http.client")
PURE = sorted([PKG / "mllp" / "framer.py", *(PKG / "hl7").glob("*.py"), *(PKG / "mapping").glob("*.py")])
CONCRETE = ("hl7bridge.store.sqlite", "hl7bridge.store.postgres", "hl7bridge.crm.sqlite", "hl7bridge.crm.postgres",
            "hl7bridge.crm.http")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(PKG)))
def test_pure_layers_do_no_io(path: Path) -> None:
    bad = {m for m in imports(path) if m.split(".")[0] in {x.split(".")[0] for x in IO_MODULES} and
           any(m == x or m.startswith(x + ".") for x in IO_MODULES)}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", ["pipeline.py", "delivery.py", "replay.py", "dlq.py"])
def test_pipeline_uses_protocols_not_backends(name: str) -> None:
    bad = {m for m in imports(PKG / name) if m.startswith(CONCRETE)}
    assert not bad, f"{name} imports concrete backends {sorted(bad)}"


@pytest.mark.parametrize("path", sorted([*(PKG / "store").glob("*.py"), *(PKG / "crm").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(PKG)))
def test_backends_import_only_records_errors_and_their_package(path: Path) -> None:
    own = f"hl7bridge.{path.parent.name}"
    allowed = ("hl7bridge.records", "hl7bridge.errors", own)
    bad = {m for m in imports(path) if m.startswith("hl7bridge") and not m.startswith(allowed)}
    assert not bad, f"{path.name} imports {sorted(bad)}"
