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
#: How long an appending process waits for the intake log held by another (a short CLI command).
_LOG_LOCK_WAIT = 10.0
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


def open_journal(url_or_path: str | Path, *, pool_max_size: int = 10, intake: bool = False) -> Journal:
    """Open the journal and bring its schema up to date (raises JournalUnavailable when it cannot).

    `postgresql://` and `postgres://` URLs select PostgreSQL; anything else is a SQLite file or a data
    directory (see `resolve_sqlite_path`).

    SQLite: `intake=True` (serve, replay: the processes that append) opens the log-backed journal
    (`store/logged.py`) and owns its intake log, waiting up to 10 s for a short CLI command that holds it,
    then failing: one process appends to a journal at a time. Other commands read and update the SQLite
    file directly; if the journal has an intake log that no process owns (the bridge is stopped), they
    take it first, which indexes what a crash left unindexed, so they see every acknowledged message."""
    journal: Journal
    if isinstance(url_or_path, str) and url_or_path.startswith(_PG_SCHEMES):
        from hl7bridge.store.postgres import PostgresJournal

        journal = PostgresJournal(url_or_path, max_size=pool_max_size)
    else:
        from hl7bridge.store.logged import LoggedJournal, log_dir_for
        from hl7bridge.store.sqlite import SqliteJournal

        path = resolve_sqlite_path(url_or_path)
        if intake:
            journal = LoggedJournal(path, role="owner", lock_timeout=_LOG_LOCK_WAIT)
        elif log_dir_for(path).is_dir():
            journal = LoggedJournal(path, role="auto")
        else:
            journal = SqliteJournal(path)
    try:
        journal.migrate()
    except BaseException:
        journal.close()
        raise
    return journal
