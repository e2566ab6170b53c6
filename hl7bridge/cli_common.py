"""Shared pieces of the command line: store options, config loading, failing with one line on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from hl7bridge.config import Config, ConfigError, load_config

__all__ = [
    "ConfigOpt", "DataDirOpt", "JsonOpt", "RulesOpt", "StoreOpt", "TimezoneOpt", "fail", "make_config",
    "print_json", "stores",
]

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.", exists=True,
                                                dir_okay=False, envvar="HL7BRIDGE_CONFIG")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (SQLite journal and CRM).")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="postgresql:// URL for the journal and the CRM.")]
RulesOpt = Annotated[Path | None, typer.Option("--rules", help="Mapping rules file (default: built-in rules).")]
TimezoneOpt = Annotated[str | None, typer.Option("--timezone", help="Default facility timezone (IANA name).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit non-zero with a one-line reason on stderr."""
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    rest = message.strip().splitlines()[1:]
    sys.stderr.write(f"hl7bridge: {first}\n")
    for line in rest:
        sys.stderr.write(f"{line}\n")
    raise typer.Exit(code)


def make_config(config: Path | None = None, *, data_dir: Path | None = None, store: str | None = None,
                rules: Path | None = None, timezone: str | None = None, **sections: dict[str, Any]) -> Config:
    overrides: dict[str, Any] = {"store": {"data_dir": data_dir, "url": store}, "rules": rules,
                                 "timezone": timezone, **sections}
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc), 2)


@contextmanager
def stores(cfg: Config, *, intake: bool = False) -> Iterator[tuple[Any, Any]]:
    """Open the journal and CRM the config names; close them afterwards. Fails with one line if unreachable.
    `intake`: the command appends to the journal (see `open_journal`)."""
    from hl7bridge.app import open_stores

    try:
        journal, sink = open_stores(cfg, intake=intake)
    except Exception as exc:
        reason = getattr(exc, "reason", None)
        fail(f"cannot open the store: {reason}" if reason else f"cannot open the store: {type(exc).__name__}: {exc}")
    try:
        yield journal, sink
    finally:
        journal.close()
        sink.close()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
