"""What a batch of messages (Sink.apply_many) commits, around failures and repeated keys: each message
alone or not at all, idempotency keys seen by later messages of the same batch only when their message
committed, the MRN kept or moved by identifier changes. On SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hl7bridge.crm import Sink, open_sink
from hl7bridge.crm.conflict import FieldMeta, Origin, meta_from_json, meta_json_text, meta_to_json
from hl7bridge.errors import PermanentSinkError
from hl7bridge.records import ApplyRequest, OpResult

from .test_crm_sinks import at, contact, merge


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    target = str(tmp_path) if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = open_sink(target)
    try:
        yield s
    finally:
        s.close()


def _outcomes(result: list[OpResult] | Exception) -> list[str] | str:
    return type(result).__name__ if isinstance(result, Exception) else [r.outcome for r in result]


def test_a_key_applied_earlier_in_the_batch_is_already_applied_even_after_a_failure(sink: Sink) -> None:
    results = sink.apply_many([
        ApplyRequest([contact("A", at(0), first_name="Ann")], "k1"),
        ApplyRequest([contact("B", at(0), birth_date="not a date")], "k2"),
        ApplyRequest([contact("A", at(1), first_name="Anne")], "k1"),
    ])
    assert [_outcomes(r) for r in results] == [["created"], "PermanentSinkError", ["already_applied"]]
    assert [c.first_name for c in sink.contacts()] == ["Ann"]


def test_a_failed_message_leaves_its_key_free_for_the_next_one_in_the_batch(sink: Sink) -> None:
    results = sink.apply_many([
        ApplyRequest([contact("B", at(0), first_name="Bob"), contact("B", at(0), birth_date="x")], "k2"),
        ApplyRequest([contact("B", at(1), first_name="Bob")], "k2"),
        ApplyRequest([contact("C", at(0), first_name="Cy")], None),
    ])
    assert [_outcomes(r) for r in results] == ["PermanentSinkError", ["created"], ["created"]]
    assert sorted(c.mrn for c in sink.contacts()) == ["B", "C"]


def test_a_forced_repeat_in_the_same_batch_applies_again(sink: Sink) -> None:
    results = sink.apply_many([
        ApplyRequest([contact("A", at(0), first_name="Ann")], "k1"),
        ApplyRequest([contact("A", at(1), first_name="Anne")], "k1", force=True),
    ])
    assert [_outcomes(r) for r in results] == [["created"], ["updated"]]
    assert sink.contacts("A")[0].first_name == "Anne"
    again = sink.apply_many([ApplyRequest([contact("A", at(2), first_name="X")], "k1")])
    assert [_outcomes(r) for r in again] == [["already_applied"]]


def test_every_message_failing_commits_nothing(sink: Sink) -> None:
    results = sink.apply_many([ApplyRequest([contact(m, at(0), birth_date="x")], m) for m in ("A", "B")])
    assert [_outcomes(r) for r in results] == ["PermanentSinkError", "PermanentSinkError"]
    assert sink.contacts() == []
    assert isinstance(results[0], PermanentSinkError)


def test_identifier_changes_and_updates_in_one_batch_keep_the_mrn_right(sink: Sink) -> None:
    results = sink.apply_many([
        ApplyRequest([contact("OLD", at(0), first_name="Ann")], "m1"),
        ApplyRequest([merge("NEW", "OLD", at(1), action="change_id")], "m2"),
        ApplyRequest([contact("NEW", at(2), city="Springfield")], "m3"),
        ApplyRequest([contact("OLD", at(3), city="Shelbyville")], "m4"),  # a new patient under the old MRN
    ])
    assert [_outcomes(r) for r in results] == [["created"], ["updated"], ["updated"], ["created"]]
    by_mrn = {c.mrn: c for c in sink.contacts()}
    assert (by_mrn["NEW"].first_name, by_mrn["NEW"].city) == ("Ann", "Springfield")
    assert (by_mrn["OLD"].first_name, by_mrn["OLD"].city) == (None, "Shelbyville")
    assert by_mrn["NEW"].contact_id != by_mrn["OLD"].contact_id


def test_the_metadata_text_is_what_json_dumps_writes() -> None:
    meta = {"phone": FieldMeta(at(5), Origin.EHR), "city": FieldMeta(at(0), Origin.CRM), "ü \"x\"": FieldMeta(at(1),
                                                                                                          Origin.EHR)}
    text = meta_json_text(meta)
    assert text == json.dumps(meta_to_json(meta))
    assert meta_from_json(json.loads(text)) == meta
    assert meta_json_text({}) == "{}"
