"""CRM sinks: where mapped operations land. `open_sink` picks the backend from a URL or a path."""

from __future__ import annotations

from pathlib import Path

from hl7bridge.crm.base import Sink

__all__ = ["SQLITE_FILENAME", "Sink", "open_sink"]

#: The SQLite file name inside a data directory.
SQLITE_FILENAME = "crm.sqlite3"


def open_sink(url_or_path: str | Path) -> Sink:
    """Open and migrate a CRM sink: `postgresql://...` (or `postgres://...`) → PostgreSQL; an existing
    directory → `<dir>/crm.sqlite3`; anything else → that SQLite file (its directory is created)."""
    # Backends are imported lazily so the SQLite-only path never loads the PostgreSQL driver.
    target = str(url_or_path)
    if isinstance(url_or_path, str) and target.startswith(("postgresql://", "postgres://")):
        from hl7bridge.crm.postgres import PostgresSink

        sink: Sink = PostgresSink(target)
    else:
        from hl7bridge.crm.sqlite import SqliteSink

        path = Path(url_or_path)
        if path.is_dir():
            path = path / SQLITE_FILENAME
        sink = SqliteSink(path)
    try:
        sink.migrate()
    except BaseException:
        sink.close()
        raise
    return sink
