"""The durable journal: every inbound message and its fate (see `base.Journal` for the contract).

`open_journal` is the one place a backend is chosen from a URL or a path. Backends are imported lazily so
that using the SQLite journal never imports the PostgreSQL driver (and vice versa).
"""

from __future__ import annotations

from pathlib import Path

from hl7bridge.store.base import Journal

__all__ = ["JOURNAL_FILENAME", "Journal", "open_journal", "resolve_sqlite_path"]

#: File name of the SQLite journal inside a data directory.
JOURNAL_FILENAME = "journal.sqlite3"

_PG_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SUFFIXES = (".sqlite3", ".sqlite", ".db")


def resolve_sqlite_path(path: str | Path) -> Path:
    """Where the SQLite journal lives for `path`: an existing directory, or a path without a database
    suffix (a data directory not created yet), means `<dir>/journal.sqlite3`; anything else is the file.
    A `sqlite:///path` URL is accepted too."""
    text = str(path)
    if text.startswith("sqlite://"):
        text = text.removeprefix("sqlite://")
    p = Path(text).expanduser()
    if p.is_dir() or (not p.exists() and p.suffix.lower() not in _SQLITE_SUFFIXES):
        return p / JOURNAL_FILENAME
    return p


def open_journal(url_or_path: str | Path, *, pool_max_size: int = 10) -> Journal:
    """Open the journal and bring its schema up to date (raises JournalUnavailable when it cannot).

    `postgresql://` and `postgres://` URLs select PostgreSQL; anything else is a SQLite file or a data
    directory (see `resolve_sqlite_path`)."""
    journal: Journal
    if isinstance(url_or_path, str) and url_or_path.startswith(_PG_SCHEMES):
        from hl7bridge.store.postgres import PostgresJournal

        journal = PostgresJournal(url_or_path, max_size=pool_max_size)
    else:
        from hl7bridge.store.sqlite import SqliteJournal

        journal = SqliteJournal(resolve_sqlite_path(url_or_path))
    try:
        journal.migrate()
    except BaseException:
        journal.close()
        raise
    return journal
