"""SQLite sink specifics: durability settings, a locked database is a retryable failure."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hl7bridge.crm.sqlite import SqliteSink
from hl7bridge.errors import TransientSinkError
from hl7bridge.records import CrmOp, FieldSet

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "crm.sqlite3"


@pytest.fixture
def sink(path: Path) -> Iterator[SqliteSink]:
    s = SqliteSink(path, busy_timeout_s=0.2)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def test_wal_and_full_sync(sink: SqliteSink, path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert sink._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_locked_database_is_transient(sink: SqliteSink, path: Path) -> None:
    op = CrmOp("contact", "upsert", "M1", T0, {"first_name": FieldSet("Ann")})
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(TransientSinkError) as err:
            sink.apply([op], message_key="k")
        assert err.value.retryable and "Ann" not in str(err.value)
        other.execute("ROLLBACK")
    assert [r.outcome for r in sink.apply([op], message_key="k")] == ["created"]
