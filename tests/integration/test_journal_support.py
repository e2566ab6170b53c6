"""Helpers shared by the journal test files (no tests here): entry builders and a backend fixture."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hl7bridge.records import Envelope, JournalState, NewEntry
from hl7bridge.store import open_journal
from hl7bridge.store.logged import LoggedJournal
from hl7bridge.store.postgres import PostgresJournal
from hl7bridge.store.sqlite import SqliteJournal

__all__ = ["BACKENDS", "T0", "WINDOW", "entry", "envelope", "journal_for"]

#: A fixed reception time: tests move time by choosing received_at / now, never by sleeping.
T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
WINDOW = timedelta(hours=24)

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("logged", id="logged"),  # SQLite behind the intake log (store/logged.py)
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def envelope(
    control_id: str, *, app: str = "EPIC", facility: str = "MAIN", mtype: str = "ADT", trigger: str = "A04"
) -> Envelope:
    return Envelope(
        field_sep="|",
        encoding_chars="^~\\&",
        sending_application=app,
        sending_facility=facility,
        receiving_application="HL7BRIDGE",
        receiving_facility="CRM",
        message_time="20240301120000+0000",
        message_type=mtype,
        trigger=trigger,
        structure="",
        control_id=control_id,
        processing_id="P",
        version="2.5.1",
        accept_ack_type="",
        app_ack_type="",
        charset="",
    )


def entry(
    control_id: str | None,
    *,
    patient: str | None = "MRN1",
    state: JournalState = "pending",
    ack: str = "AA",
    at: datetime = T0,
    app: str = "EPIC",
    facility: str = "MAIN",
    mtype: str = "ADT",
    trigger: str = "A04",
    reason: str = "",
    error_kind: str = "",
    err_code: str = "",
    peer: str = "127.0.0.1:40000",
) -> NewEntry:
    env = None if control_id is None else envelope(control_id, app=app, facility=facility, mtype=mtype,
                                                   trigger=trigger)
    raw = f"MSH|^~\\&|{app}|{facility}|HL7BRIDGE|CRM|20240301120000||{mtype}^{trigger}|{control_id}|P|2.5.1\r"
    return NewEntry(
        received_at=at,
        peer=peer,
        raw=raw.encode("latin-1") + b"PID|1||\xe9\r",  # a non-UTF-8 byte: raw is bytes, kept exactly
        envelope=env,
        patient_key=patient,
        state=state,
        ack_code=ack,
        reason=reason,
        error_kind=error_kind,
        err_code=err_code,
    )


def journal_for(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[SqliteJournal | PostgresJournal | LoggedJournal]:
    """Open a migrated journal of the given backend; closes it afterwards."""
    journal: SqliteJournal | PostgresJournal | LoggedJournal
    if backend == "logged":
        journal = LoggedJournal(tmp_path / "journal.sqlite3")
        journal.migrate()
    else:
        journal = open_journal(tmp_path if backend == "sqlite" else request.getfixturevalue("pg_url"))
    assert isinstance(journal, SqliteJournal | PostgresJournal | LoggedJournal)
    try:
        yield journal
    finally:
        journal.close()
