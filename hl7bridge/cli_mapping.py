"""`hl7bridge mapping ...` (the data map as code) and `hl7bridge crm ...` (what the bridge wrote)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from hl7bridge.cli_common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    StoreOpt,
    TimezoneOpt,
    fail,
    make_config,
    print_json,
    stores,
)

__all__ = ["register"]

mapping_app = typer.Typer(help="Mapping rules: validate, export the data map, test.", no_args_is_help=True)
crm_app = typer.Typer(help="The CRM state the bridge wrote (record model of architecture.md).",
                      no_args_is_help=True)


def _default_rules_text() -> str:
    return resources.files("hl7bridge.mapping").joinpath("default_rules.yaml").read_text(encoding="utf-8")


@mapping_app.command("check")
def mapping_check(file: Annotated[Path, typer.Argument(help="Rules file.")],
                  timezone: TimezoneOpt = None, config: ConfigOpt = None) -> None:
    """Validate a rules file; errors name the file, line and key. With --config, also check that the
    configured CRM sink can enforce every conflict rule (an HTTP preset without reads cannot do `crm`)."""
    from hl7bridge.app import check_rules_fit_sink
    from hl7bridge.mapping import RulesError, compile_rules, load_rules

    if not file.exists():
        fail(f"no such rules file: {file}")
    try:
        rules = load_rules(file)
        compile_rules(rules, default_timezone=timezone)
    except RulesError as exc:
        fail(str(exc), 2)
    if config is not None:
        problems = check_rules_fit_sink(make_config(config), rules)
        if problems:
            fail(f"{file}: does not fit the configured CRM\n" + "\n".join(f"  {p}" for p in problems), 2)
    typer.echo(f"{file}: valid")


@mapping_app.command("init")
def mapping_init() -> None:
    """Print the built-in default rules (start your own: hl7bridge mapping init > rules.yaml)."""
    sys.stdout.write(_default_rules_text())


@mapping_app.command("export")
def mapping_export(
    rules: Annotated[Path | None, typer.Argument(help="Rules file (default: built-in rules).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv or md.")] = "csv",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
) -> None:
    """The data-map spreadsheet: source field and type, destination field and type, transformation, sync
    trigger, conflict rule."""
    from hl7bridge.mapping import RulesError, export_rows, load_rules, to_csv, to_markdown

    if fmt not in ("csv", "md"):
        fail("--format must be csv or md")
    try:
        rows = export_rows(load_rules(rules))
    except RulesError as exc:
        fail(str(exc), 2)
    text = to_csv(rows) if fmt == "csv" else to_markdown(rows)
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


@mapping_app.command("test")
def mapping_test(
    rules: Annotated[Path | None, typer.Argument(help="Rules file ('-' for the built-in rules).")],
    inputs: Annotated[list[Path], typer.Argument(help="Message files, or *.test.yaml rule tests.")],
    timezone: TimezoneOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Print the CRM operations each message would produce (nothing is written), or run *.test.yaml cases."""
    from hl7bridge.hl7.batch import read_paths
    from hl7bridge.mapping import RulesError, compile_rules, load_rules, run_rules_tests
    from hl7bridge.replay import dry_run

    rules_path = None if rules is None or str(rules) == "-" else rules
    failed = 0
    try:
        mapper = compile_rules(load_rules(rules_path), default_timezone=timezone)
    except RulesError as exc:
        fail(str(exc), 2)
    messages = [p for p in inputs if not p.name.endswith((".test.yaml", ".test.yml"))]
    for test_file in (p for p in inputs if p.name.endswith((".test.yaml", ".test.yml"))):
        for case in run_rules_tests(rules_path, test_file):
            failed += not case.passed
            if json_out:
                sys.stdout.write(json.dumps({"test": str(test_file), "case": case.name, "passed": case.passed,
                                             "detail": case.detail}) + "\n")
            else:
                mark = "PASS" if case.passed else "FAIL"
                typer.echo(f"{mark}  {test_file.name}: {case.name}" + ("" if case.passed else f"\n      {case.detail}"))
    if messages:
        for item in dry_run(read_paths(messages), mapper):
            sys.stdout.write(json.dumps(item, ensure_ascii=False, indent=None if json_out else 2) + "\n")
    if failed:
        fail(f"{failed} rule test case(s) failed")


@crm_app.command("contacts")
def crm_contacts(mrn: Annotated[str | None, typer.Option("--mrn")] = None, config: ConfigOpt = None,
                 data_dir: DataDirOpt = None, store: StoreOpt = None, json_out: JsonOpt = False) -> None:
    """Contacts as the bridge wrote them."""
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg) as (_, sink):
        rows = [c.to_json() for c in sink.contacts(mrn)]
    _rows_out(rows, json_out, ("contact_id", "mrn", "last_name", "first_name", "birth_date", "phone", "updated_at"))


@crm_app.command("appointments")
def crm_appointments(mrn: Annotated[str | None, typer.Option("--mrn")] = None, config: ConfigOpt = None,
                     data_dir: DataDirOpt = None, store: StoreOpt = None, json_out: JsonOpt = False) -> None:
    """Appointments as the bridge wrote them."""
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg) as (_, sink):
        rows = [a.to_json() for a in sink.appointments(mrn)]
    _rows_out(rows, json_out, ("appointment_id", "mrn", "start", "status", "type", "provider", "location"))


@crm_app.command("set")
def crm_set(
    entity: Annotated[str, typer.Argument(help="contact or appointment.")],
    key: Annotated[str, typer.Argument(help="MRN or appointment ID.")],
    assignments: Annotated[list[str], typer.Argument(help="field=value ... (field= clears it).")],
    at: Annotated[str | None, typer.Option("--at", help="When the CRM change happened (ISO 8601).")] = None,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Record a change made on the CRM side, so conflict rules (crm, newest) take it into account."""
    if entity not in ("contact", "appointment"):
        fail("entity must be contact or appointment")
    values: dict[str, str | int | None] = {}
    for a in assignments:
        field, sep, value = a.partition("=")
        if not sep:
            fail(f"expected field=value, got {a!r}")
        values[field] = value or None
    when = datetime.fromisoformat(at) if at else None
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg) as (_, sink):
        try:
            sink.edit(entity, key, values, when)  # type: ignore[arg-type]
        except (KeyError, ValueError) as exc:
            fail(str(exc))
    typer.echo(f"{entity} updated on the CRM side: {', '.join(values)}")


def _rows_out(rows: list[dict[str, object]], json_out: bool, columns: tuple[str, ...]) -> None:
    if json_out:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(mapping_app, name="mapping")
    app.add_typer(crm_app, name="crm")
