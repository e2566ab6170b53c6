"""The `hl7bridge` command line. Thin: parse arguments, call library functions, print results.

Every command has --help, exits non-zero with a one-line reason on stderr when it fails, and where it
prints data offers --json.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from hl7bridge import __version__
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
    stores,
)
from hl7bridge.timeparse import parse_duration, parse_instant

app = typer.Typer(help="hl7bridge: HL7 v2 (MLLP) to CRM interface engine.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
journal_app = typer.Typer(help="The message journal.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(journal_app, name="journal")


@app.command()
def serve(
    config: ConfigOpt = None,
    port: Annotated[int | None, typer.Option("--port", help="MLLP port (default 2575).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="MLLP bind address.")] = None,
    http_port: Annotated[int | None, typer.Option("--http-port", help="HTTP port for /metrics, /healthz, "
                                                  "/readyz (default 9575).")] = None,
    data_dir: DataDirOpt = None,
    store: StoreOpt = None,
    rules: RulesOpt = None,
    timezone: TimezoneOpt = None,
    ack_mode: Annotated[str | None, typer.Option("--ack-mode", help="after_commit or after_apply.")] = None,
    log_json: Annotated[bool | None, typer.Option("--log-json/--no-log-json", help="JSON log lines.")] = None,
    log_phi: Annotated[bool | None, typer.Option("--log-phi", help="Log message content at DEBUG "
                                                 "(troubleshooting only: contains PHI).")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """Run the MLLP listener, the workers and the HTTP endpoint until SIGTERM/SIGINT."""
    from hl7bridge.app import run
    from hl7bridge.logs import setup_logging

    cfg = make_config(config, data_dir=data_dir, store=store, rules=rules, timezone=timezone,
                      listener={"port": port, "host": host}, ops={"port": http_port},
                      intake={"ack_mode": ack_mode},
                      logging={"json": log_json, "log_phi": log_phi, "level": log_level})
    setup_logging(cfg.logging.level, cfg.logging.json_format, cfg.logging.log_phi)
    try:
        run(cfg)
    except OSError as exc:
        fail(f"cannot start: {exc.strerror or exc}")
    except Exception as exc:
        fail(f"cannot start: {exc}")


@app.command()
def send(
    target: Annotated[str, typer.Argument(help="HOST:PORT of an MLLP listener.")],
    files: Annotated[list[Path], typer.Argument(help="Message files (several per file, batches, MLLP captures).",
                                                exists=True)],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each ACK.")] = 30.0,
    json_out: JsonOpt = False,
) -> None:
    """Send messages over MLLP; print each MSH-10 with its ACK code. Exits 1 if any message is not AA/CA."""
    from hl7bridge.sending import send_files

    host, port = _host_port(target)
    try:
        results = asyncio.run(send_files(host, port, files, timeout=timeout))
    except (OSError, TimeoutError) as exc:
        fail(f"cannot send to {target}: {exc}")
    if json_out:
        print_json([r.to_json() for r in results])
    else:
        for r in results:
            extra = f" {r.err_code} {r.text}" if r.code not in ("AA", "CA") else ""
            typer.echo(f"{r.control_id}\t{r.code}{extra}")
    unanswered = [r for r in results if r.code == "NO_ACK"]
    if unanswered:
        fail(f"{len(unanswered)} message(s) got no acknowledgement from {target}: {unanswered[0].text}")
    if any(r.code not in ("AA", "CA") for r in results):
        fail(f"{sum(r.code not in ('AA', 'CA') for r in results)} message(s) were not accepted (see the ACK codes)")


def _host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        fail(f"target must be HOST:PORT, got {target!r}")
    return host or "127.0.0.1", int(port)


@app.command()
def check(config: ConfigOpt = None, rules: RulesOpt = None, timezone: TimezoneOpt = None,
          data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Validate the configuration and the mapping rules, then exit (0 = valid)."""
    from hl7bridge.app import build_mapper
    from hl7bridge.mapping import RulesError

    cfg = make_config(config, data_dir=data_dir, store=store, rules=rules, timezone=timezone)
    try:
        build_mapper(cfg)
    except RulesError as exc:
        fail(str(exc), 2)
    typer.echo(f"configuration valid: mllp port {cfg.listener.port}, http port {cfg.ops.port}, "
               f"rules {cfg.rules or 'built-in default'}, ack_mode {cfg.intake.ack_mode}")


@db_app.command("migrate")
def db_migrate(config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Create or upgrade the journal and CRM schemas (also done on every start)."""
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg):
        typer.echo("schema up to date")


@journal_app.command("list")
def journal_list(
    state: Annotated[list[str] | None, typer.Option("--state", help="pending, done, filtered, rejected, dead, "
                                                    "discarded (repeatable).")] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601 time or a duration ago (2h, 7d).")] = None,
    until: Annotated[str | None, typer.Option()] = None,
    message_type: Annotated[str | None, typer.Option("--type", help="ADT or ADT^A04.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (newest last).")] = 100,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None, json_out: JsonOpt = False,
) -> None:
    """List journal entries."""
    from hl7bridge.dlq import entry_summary

    cfg = make_config(config, data_dir=data_dir, store=store)
    try:
        since_t = parse_instant(since) if since else None
        until_t = parse_instant(until) if until else None
    except ValueError as exc:
        fail(str(exc))
    with stores(cfg) as (journal, _):
        entries = journal.query(states=state or None, since=since_t, until=until_t, message_type=message_type)
    entries = entries[-limit:]
    rows = [entry_summary(e) for e in entries]
    if json_out:
        print_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['id']}\t{r['received_at']}\t{r['state']}\t{r['type']}\t{r['control_id']}\t"
                   f"{r['ack']}\t{r['error']}\t{r['reason']}")


@journal_app.command("prune")
def journal_prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Age, e.g. 30d.")],
    include_rejected: Annotated[bool, typer.Option("--include-rejected")] = False,
    include_dead: Annotated[bool, typer.Option("--include-dead", help="Also delete dead letters.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Delete old done/filtered entries (never dead letters unless asked). Each prune is audited."""
    try:
        cutoff = datetime.now(UTC) - parse_duration(older_than)
    except ValueError as exc:
        fail(str(exc))
    states = ["done", "filtered"] + (["rejected"] if include_rejected else []) + (
        ["dead", "discarded"] if include_dead else [])
    if not yes:
        typer.confirm(f"delete {', '.join(states)} entries received before {cutoff.isoformat()}?", abort=True)
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg) as (journal, _):
        n = journal.purge(cutoff, states, f"journal prune --older-than {older_than}")
    typer.echo(f"pruned {n} entries")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def _register_subcommands() -> None:
    from hl7bridge import cli_checks, cli_dlq, cli_mapping

    cli_mapping.register(app)
    cli_dlq.register(app)
    cli_checks.register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
