"""The data map: the rules as the spreadsheet integration teams test and troubleshoot with.

One row per CRM field (plus each entity's key), with the columns of a classic integration data map.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from hl7bridge.mapping.model import EntityRules, FieldRule, KeyRule, Rules
from hl7bridge.mapping.transforms import TRANSFORMS, CodeTableData

__all__ = ["COLUMNS", "export_rows", "to_csv", "to_markdown"]

COLUMNS = (
    "source field",
    "source type",
    "destination field",
    "destination type",
    "transformation",
    "sync trigger",
    "conflict rule",
)


def _tables(rules: Rules) -> dict[str, CodeTableData]:
    return {n: CodeTableData(dict(t.map), t.default) for n, t in rules.code_tables.items()}


def _triggers(name: str, ent: EntityRules, rules: Rules) -> str:
    t = ent.triggers
    parts = []
    if t.upsert:
        parts.append("upsert on " + ", ".join(t.upsert))
    if t.merge:
        parts.append("merge on " + ", ".join(t.merge))
    if t.change_id:
        parts.append("change ID on " + ", ".join(t.change_id))
    appointment = rules.entities.appointment
    if name == "contact" and appointment is not None and appointment.triggers.upsert:
        parts.append("created from the PID of " + ", ".join(appointment.triggers.upsert) + " when unknown")
    return "; ".join(parts)


def _key_row(name: str, key: KeyRule, ent: EntityRules, rules: Rules, what: str) -> dict[str, str]:
    if key.patient_id:
        p = rules.settings.patient_id
        how = f"the repetition with type code {' or '.join(p.type_codes) or '(any)'}"
        if p.assigning_authorities:
            how += f" from {' or '.join(p.assigning_authorities)}"
        if p.single_untyped_fallback:
            how += ", else a single untyped repetition"
    else:
        how = "as sent"
    return {
        "source field": key.source,
        "source type": key.source_type,
        "destination field": f"{name}.{key.field}",
        "destination type": "string",
        "transformation": f"{what}: {how}",
        "sync trigger": _triggers(name, ent, rules),
        "conflict rule": "key",
    }


def _field_row(name: str, fname: str, rule: FieldRule, ent: EntityRules, rules: Rules) -> dict[str, str]:
    transform = TRANSFORMS[rule.transform]
    how = transform.describe(transform.args_model.model_validate(rule.args), _tables(rules))
    overrides = [f"{ev} → {vals[fname]}" for ev, vals in ent.event_overrides.items() if fname in vals]
    if overrides:
        how += "; by event: " + ", ".join(overrides)
    trigger = _triggers(name, ent, rules)
    if ent.sync_when_changed:
        trigger += "; written only when " + " or ".join(ent.sync_when_changed) + " changed"
    return {
        "source field": rule.source,
        "source type": rule.source_type,
        "destination field": f"{name}.{fname}",
        "destination type": rule.type,
        "transformation": how,
        "sync trigger": trigger,
        "conflict rule": rule.conflict,
    }


def export_rows(rules: Rules) -> list[dict[str, str]]:
    """The data map, one dict per row with exactly the keys in COLUMNS."""
    rows: list[dict[str, str]] = []
    for name, ent in rules.entity_items():
        rows.append(_key_row(name, ent.key, ent, rules, "key"))
        if ent.prior_key is not None:
            row = _key_row(name, ent.prior_key, ent, rules, "prior key (merged away / replaced)")
            row["destination field"] += " (prior)"
            row["sync trigger"] = "; ".join(
                f"{label} on {', '.join(events)}"
                for label, events in (("merge", ent.triggers.merge), ("change ID", ent.triggers.change_id))
                if events
            )
            rows.append(row)
        rows.extend(_field_row(name, f, rule, ent, rules) for f, rule in ent.fields.items())
    return rows


def to_csv(rows: Sequence[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _md_cell(text: str) -> str:
    # Paths use "|" for alternatives: escape it so the table keeps its columns.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: Sequence[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"
