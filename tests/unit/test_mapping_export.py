"""The data map export: CSV and Markdown that parse back to exactly the rules."""

from __future__ import annotations

import csv
import io

from hl7bridge.mapping import COLUMNS, export_rows, load_rules, to_csv, to_markdown


def test_csv_round_trip_matches_the_rules() -> None:
    rules = load_rules(None)
    parsed = list(csv.DictReader(io.StringIO(to_csv(export_rows(rules)))))
    assert parsed and tuple(parsed[0]) == COLUMNS
    by_dest = {row["destination field"]: row for row in parsed}
    expected_rows = 0
    for name, ent in rules.entity_items():
        key = by_dest[f"{name}.{ent.key.field}"]
        assert (key["source field"], key["source type"], key["conflict rule"]) == (
            ent.key.source, ent.key.source_type, "key"
        )
        expected_rows += 1 + (ent.prior_key is not None)
        for field, rule in ent.fields.items():
            row = by_dest[f"{name}.{field}"]
            assert row["source field"] == rule.source
            assert row["source type"] == rule.source_type
            assert row["destination type"] == rule.type
            assert row["conflict rule"] == rule.conflict
            for event in ent.triggers.upsert:
                assert event in row["sync trigger"]
            assert row["transformation"]
            expected_rows += 1
    assert len(parsed) == expected_rows


def test_transformation_and_trigger_columns_say_what_happens() -> None:
    rows = {r["destination field"]: r for r in export_rows(load_rules(None))}
    status = rows["appointment.status"]
    assert "SIU^S15 → cancelled" in status["transformation"]
    assert "Cancelled→cancelled" in status["transformation"]
    assert "E.164" in rows["contact.phone"]["transformation"]
    assert "merge on ADT^A40" in rows["contact.mrn (prior)"]["sync trigger"]
    assert "SIU^S12" in rows["contact.first_name"]["sync trigger"]  # contacts are created from SIU PIDs too


def test_markdown_keeps_columns_despite_pipes_in_paths() -> None:
    rows = export_rows(load_rules(None))
    md = to_markdown(rows).splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(md) == len(rows) + 2
    start = next(line for line in md if "appointment.start" in line)
    assert "TQ1-7 \\| SCH-11.4" in start
    for line in md[2:]:
        cells = line.replace("\\|", "").strip("|").split("|")
        assert len(cells) == len(COLUMNS)
