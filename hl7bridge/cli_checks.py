"""`hl7bridge golive` and `hl7bridge reconcile`: prove the bridge works, and that the CRM matches the EHR.

Exit codes: golive 0 = every step passed, 1 = a step failed (the report names it), 2 = bad arguments or
rules. reconcile 0 = drift ratio within --max-drift, 3 = above it (so a scheduled job can alert), 2 = an
unreadable export, 1 = the CRM cannot be read.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from hl7bridge.cli_common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    RulesOpt,
    StoreOpt,
    TimezoneOpt,
    fail,
    make_config,
    print_json,
)
from hl7bridge.config import Config

__all__ = ["conflicts_from_rules", "register"]

def _crm_location(cfg: Config, data_dir: Path | None, store: str | None, config: Path | None) -> str:
    """The CRM the bridge writes; refuses to invent an empty SQLite CRM at a mistyped path."""
    if cfg.sink == "http":
        return "http"
    if data_dir is None and store is None and config is None:
        fail("name the bridge's CRM store: --data-dir DIR or --store URL", 2)
    location = cfg.store.crm_location()
    if "://" not in location and not Path(location).exists():
        fail(f"no CRM database at {location} (is this the bridge's --data-dir?)", 2)
    return location


def _open_sink(location: str, cfg: Config | None = None) -> Any:
    from hl7bridge.crm import open_sink

    try:
        if cfg is not None and cfg.sink == "http":
            from hl7bridge.app import open_crm

            return open_crm(cfg)
        return open_sink(location)
    except Exception as exc:
        fail(f"cannot open the CRM store: {getattr(exc, 'reason', None) or type(exc).__name__}")


# --- rules: the phone field's conflict rule, and the mapper golive checks the data map against ---------


def _rules(cfg: Config) -> tuple[Any, Any]:
    """The rules the bridge runs with (--rules or the built-in defaults) and their compiled mapper."""
    from hl7bridge.mapping import RulesError, compile_rules, load_rules

    try:
        rules = load_rules(cfg.rules)
        return rules, compile_rules(rules, default_timezone=cfg.timezone)
    except RulesError as exc:
        fail(str(exc), 2)


def conflicts_from_rules(rules: Any) -> dict[str, str]:
    """Conflict rule per mapped contact field (`phone` decides step 4 of the go-live protocol)."""
    return {name: rule.conflict for name, rule in rules.entities.contact.fields.items()}


# --- golive ------------------------------------------------------------------------------------------


def _host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        fail(f"--target must be HOST:PORT, got {target!r}", 2)
    return host or "127.0.0.1", int(port)


def _report_paths(report: Path | None) -> tuple[Path, Path]:
    base = report or Path(f"golive-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")
    if base.suffix in (".md", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".md"), base.with_name(base.name + ".json")


def golive(
    target: Annotated[str, typer.Option("--target", help="HOST:PORT of the bridge's MLLP listener.")],
    config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
    rules: RulesOpt = None, timezone: TimezoneOpt = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write PATH.md and PATH.json "
                                                "(default golive-<timestamp>).")] = None,
    cleanup: Annotated[bool, typer.Option("--cleanup", help="Delete this run's test records afterwards.")] = False,
    sync_window: Annotated[float, typer.Option("--sync-window", min=0.1, help="Seconds a change may take to "
                                               "reach the CRM.")] = 30.0,
    mrn_prefix: Annotated[str, typer.Option("--mrn-prefix", help="Test MRNs start with this (+ a run ID).")] = "GL",
    authority: Annotated[str | None, typer.Option("--authority", help="PID-3 assigning authority of the test "
                                                  "MRNs (default: the rules' first allowed one, else GOLIVE).")]
    = None,
    volume: Annotated[int, typer.Option("--volume", min=1, max=899, help="Patients (and appointments) in the "
                                        "volume step.")] = 50,
    connections: Annotated[int, typer.Option("--connections", min=1, max=64)] = 5,
    ack_timeout: Annotated[float, typer.Option("--ack-timeout", min=0.1, help="Seconds to wait for each ACK.")]
    = 10.0,
    json_out: JsonOpt = False,
) -> None:
    """Run the five-step go-live protocol against a running bridge and write the baseline report.

    Pass the rules the bridge runs with (--rules): the phone field's conflict rule and the data map's
    rendering of names, type, provider and location come from them. Exits 1 when any step fails.
    """
    from hl7bridge.golive import run_golive

    host, port = _host_port(target)
    cfg = make_config(config, data_dir=data_dir, store=store, rules=rules, timezone=timezone)
    location = _crm_location(cfg, data_dir, store, config)
    rules_obj, mapper = _rules(cfg)
    conflicts = conflicts_from_rules(rules_obj)
    pid = rules_obj.settings.patient_id
    authority = authority or (pid.assigning_authorities[0] if pid.assigning_authorities else "GOLIVE")
    sink = _open_sink(location, cfg)
    try:
        result = asyncio.run(run_golive(
            (host, port), sink, sync_window=sync_window, mrn_prefix=mrn_prefix,
            phone_conflict=conflicts.get("phone", "ehr"), field_conflicts=conflicts, mapper=mapper,
            authority=authority, include_authority=pid.include_authority, volume=volume,
            connections=connections, ack_timeout=ack_timeout, cleanup=cleanup))
    except ValueError as exc:
        fail(str(exc), 2)
    finally:
        sink.close()
    md_path, json_path = _report_paths(report)
    _write(md_path, result.to_markdown())
    import json

    _write(json_path, json.dumps(result.to_json(), indent=2, default=str, ensure_ascii=False) + "\n")
    if json_out:
        print_json({**result.to_json(), "report": {"markdown": str(md_path), "json": str(json_path)}})
    else:
        for step in result.steps:
            lat = "never" if step.latency_seconds is None else f"{step.latency_seconds:.3f} s"
            typer.echo(f"step {step.number} {'PASS' if step.passed else 'FAIL'}  {step.name}  (sync {lat})")
            for c in step.checks:
                if not c.ok:
                    typer.echo(f"    {c.what}: expected {c.expected!r}, found {c.found!r}")
        typer.echo(f"report: {md_path} {json_path}")
    if not result.passed:
        fail(f"go-live check failed at step {', '.join(map(str, result.failed_steps))}; see {md_path}", 1)


def _write(path: Path, text: str) -> None:
    """Write atomically (a reader never sees half a report or a half-written metrics file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --- reconcile ---------------------------------------------------------------------------------------


def reconcile(
    exports: Annotated[list[Path], typer.Argument(help="EHR export CSVs (patients and/or appointments, told "
                                                  "apart by their header; see docs/reconcile.md).",
                                                  exists=True, dir_okay=False)],
    config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None, timezone: TimezoneOpt = None,
    region: Annotated[str, typer.Option("--region", help="Region for phone numbers without a country code.")]
    = "US",
    report: Annotated[Path | None, typer.Option("--report", help="Also write a Markdown report here.")] = None,
    max_drift: Annotated[float, typer.Option("--max-drift", min=0.0, help="Exit 3 when issues / records "
                                             "compared is above this.")] = 0.0,
    metrics_file: Annotated[Path | None, typer.Option("--metrics-file", help="Prometheus textfile for the "
                                                      "last result (default <data-dir>/reconcile.prom).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare an EHR export with the CRM: missing, extra and duplicate contacts, field mismatches, missing
    and extra appointments, start shifts (timezone/date bugs) and status mismatches."""
    from hl7bridge.hl7.timestamps import get_zone
    from hl7bridge.reconcile import ExportError, read_exports
    from hl7bridge.reconcile import reconcile as compare

    cfg = make_config(config, data_dir=data_dir, store=store, timezone=timezone)
    zone = get_zone(cfg.timezone) if cfg.timezone else None
    try:
        patients, appointments = read_exports(exports, zone)
    except ExportError as exc:
        fail(str(exc), 2)
    sink = _open_sink(_crm_location(cfg, data_dir, store, config), cfg)
    try:
        contacts, crm_appointments = sink.contacts(), sink.appointments()
    except Exception as exc:
        fail(f"cannot read the CRM: {getattr(exc, 'reason', None) or type(exc).__name__}")
    finally:
        sink.close()
    result = compare(patients, appointments, contacts, crm_appointments, region=region)
    _write(metrics_file or cfg.store.data_dir / "reconcile.prom", result.to_prometheus())
    if report is not None:
        _write(report, result.to_markdown())
    within = result.drift_ratio <= max_drift
    if json_out:
        print_json({**result.to_json(), "max_drift": max_drift, "within_threshold": within})
    else:
        _print_tables(result, max_drift)
    if not within:
        raise typer.Exit(3)


def _print_tables(result: Any, max_drift: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table("kind", "count", title="Reconciliation")
    for kind, n in result.counts.items():
        if n:
            summary.add_row(kind, str(n))
    if result.issues:
        console.print(summary)
        issues = Table("kind", "record", "detail")
        for row in _issue_rows(result):
            issues.add_row(*row)
        console.print(issues)
    console.print(f"{len(result.issues)} issue(s) in {result.compared} records compared; drift ratio "
                  f"{result.drift_ratio:.4f} (threshold {max_drift:g})", highlight=False)


def _issue_rows(result: Any) -> Iterator[tuple[str, str, str]]:
    for issue in result.issues:
        yield issue.kind.value, issue.key, issue.detail


def register(app: typer.Typer) -> None:
    app.command("golive")(golive)
    app.command("reconcile")(reconcile)
