"""`hl7bridge dlq ...` and `hl7bridge replay`: working the dead-letter queue and re-running messages."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from hl7bridge import dlq
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

__all__ = ["register"]

dlq_app = typer.Typer(help="The dead-letter queue: messages that could not be applied.", no_args_is_help=True)

SinceOpt = Annotated[str | None, typer.Option("--since", help="ISO 8601 time or a duration ago (2h, 7d).")]
UntilOpt = Annotated[str | None, typer.Option("--until")]
TypeOpt = Annotated[str | None, typer.Option("--type", help="ADT or ADT^A04.")]
MrnOpt = Annotated[str | None, typer.Option("--mrn", help="Patient key (MRN).")]


def _when(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_instant(text)
    except ValueError as exc:
        fail(str(exc))


@dlq_app.command("list")
def dlq_list(since: SinceOpt = None, until: UntilOpt = None, message_type: TypeOpt = None,
             error: Annotated[str | None, typer.Option("--error", help="Error kind, e.g. bad_field_value.")] = None,
             mrn: MrnOpt = None, config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
             json_out: JsonOpt = False) -> None:
    """List dead letters."""
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg) as (journal, _):
        entries = dlq.dead_letters(journal, since=_when(since), until=_when(until), message_type=message_type,
                                   error_kind=error, mrn=mrn)
    rows = [dlq.entry_summary(e) for e in entries]
    if json_out:
        print_json(rows)
        return
    if not rows:
        typer.echo("dead-letter queue is empty")
    for r in rows:
        typer.echo(f"{r['id']}\t{r['received_at']}\t{r['type']}\t{r['control_id']}\t{r['error']}\t"
                   f"attempts={r['attempts']}\t{r['reason']}")


@dlq_app.command("show")
def dlq_show(entry_id: int, config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
             json_out: JsonOpt = False) -> None:
    """One dead letter: the message segment by segment, the error and its history."""
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg) as (journal, _):
        try:
            data = dlq.show(journal, entry_id, cfg.intake.default_charset)
        except KeyError as exc:
            fail(str(exc.args[0]))
    if json_out:
        print_json(data)
        return
    typer.echo(f"entry {data['id']}  state {data['state']}  type {data['type']}  control id {data['control_id']}")
    typer.echo(f"error {data['error']}: {data['reason']}  (attempts {data['attempts']})")
    typer.echo("message:")
    for seg in data["segments"]:
        typer.echo(f"  {seg}")
    typer.echo("history:")
    for h in data["history"]:
        typer.echo(f"  {h['at']}  {h['event']}{('  ' + h['detail']) if h['detail'] else ''}")


@dlq_app.command("retry")
def dlq_retry(ids: Annotated[list[int] | None, typer.Argument(help="Entry IDs.")] = None,
              all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
              filter_type: TypeOpt = None,
              filter_error: Annotated[str | None, typer.Option("--error")] = None,
              since: SinceOpt = None, mrn: MrnOpt = None,
              config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Put dead letters back in line (after fixing the mapping or the CRM). The running bridge applies them."""
    filtered = any(x is not None for x in (filter_type, filter_error, since, mrn))
    if not ids and not all_ and not filtered:
        fail("name entry IDs, or --all, or a filter (--type, --error, --since, --mrn)")
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg) as (journal, _):
        if ids:
            targets = list(ids)
        else:
            targets = [e.id for e in dlq.dead_letters(journal, message_type=filter_type, error_kind=filter_error,
                                                      since=_when(since), mrn=mrn)]
        n = dlq.retry(journal, targets)
    typer.echo(f"requeued {n} dead letter(s)")
    if ids and n < len(ids):
        fail(f"{len(ids) - n} of the given IDs are not dead letters")


@dlq_app.command("discard")
def dlq_discard(ids: Annotated[list[int], typer.Argument(help="Entry IDs.")],
                reason: Annotated[str, typer.Option("--reason", help="Why (kept with the entry).")],
                yes: Annotated[bool, typer.Option("--yes")] = False,
                config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Give up on dead letters. They stay in the journal as `discarded`, with the reason."""
    if not yes:
        typer.confirm(f"discard {len(ids)} dead letter(s)?", abort=True)
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg) as (journal, _):
        try:
            n = dlq.discard(journal, ids, reason)
        except ValueError as exc:
            fail(str(exc))
    typer.echo(f"discarded {n} dead letter(s)")


@dlq_app.command("purge")
def dlq_purge(older_than: Annotated[str, typer.Option("--older-than", help="Age, e.g. 90d.")],
              yes: Annotated[bool, typer.Option("--yes")] = False,
              config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Delete dead and discarded letters older than the given age. The purge itself is audited."""
    try:
        cutoff = datetime.now(UTC) - parse_duration(older_than)
    except ValueError as exc:
        fail(str(exc))
    if not yes:
        typer.confirm(f"delete dead letters received before {cutoff.isoformat()}?", abort=True)
    cfg = make_config(config, data_dir=data_dir, store=store)
    with stores(cfg) as (journal, _):
        n = dlq.purge(journal, cutoff, f"dlq purge --older-than {older_than}")
    typer.echo(f"purged {n} dead letter(s)")


def replay(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files and directories of messages.")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Send over MLLP to HOST:PORT instead.")] = None,
    from_journal: Annotated[bool, typer.Option("--from-journal", help="Re-apply stored messages.")] = False,
    since: SinceOpt = None, until: UntilOpt = None, message_type: TypeOpt = None, mrn: MrnOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the CRM operations; write nothing.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="--from-journal: continue an interrupted run.")] = False,
    config: ConfigOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None, rules: RulesOpt = None,
    timezone: TimezoneOpt = None, json_out: JsonOpt = False,
) -> None:
    """Feed messages through the pipeline again: from files (dedup makes a second run a no-op), from the
    journal (after a mapping fix), or over MLLP to a running bridge."""
    from hl7bridge import replay as rp
    from hl7bridge.app import build_mapper
    from hl7bridge.hl7.batch import read_paths
    from hl7bridge.mapping import RulesError

    if not from_journal and not paths:
        fail("give files or directories to replay, or --from-journal")
    cfg = make_config(config, data_dir=data_dir, store=store, rules=rules, timezone=timezone)
    if to:
        _replay_to(to, paths or [], json_out)
        return
    try:
        mapper = build_mapper(cfg)
    except RulesError as exc:
        fail(str(exc), 2)
    if dry_run and paths:
        items = list(read_paths(list(paths)))
        for item in rp.dry_run(items, mapper, cfg.intake.default_charset):
            sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
        return
    with stores(cfg, intake=not from_journal) as (journal, sink), _Progress(json_out) as advance:
        if from_journal:
            filters: dict[str, Any] = {"since": _when(since), "until": _when(until), "message_type": message_type,
                                       "patient_key": mrn}
            if dry_run:
                entries = journal.query(states=["done", "filtered", "dead", "pending"], **filters)
                items = [(Path(f"journal:{e.id}"), 0, e.raw) for e in entries]
                for item in rp.dry_run(items, mapper, cfg.intake.default_charset):
                    sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
                return
            checkpoint = (cfg.store.data_dir / "replay-checkpoint.json") if not cfg.store.url else None
            summary = rp.replay_journal(journal, sink, mapper, filters=filters, checkpoint=checkpoint,
                                        resume=resume, default_charset=cfg.intake.default_charset,
                                        progress=advance)
        else:
            from hl7bridge.app import delivery_policy

            summary = asyncio.run(rp.replay_files(
                paths or [], journal, sink, mapper, policy=delivery_policy(cfg),
                dedup_window=timedelta(hours=cfg.intake.dedup_window_hours),
                default_charset=cfg.intake.default_charset, progress=advance))
    _print_summary(summary, json_out)
    if not summary.ok:
        raise typer.Exit(1)


def _replay_to(target: str, paths: list[Path], json_out: bool) -> None:
    from hl7bridge.cli import _host_port
    from hl7bridge.hl7.batch import read_paths
    from hl7bridge.sending import send_payloads

    host, port = _host_port(target)
    items = [(str(p), i, raw) for p, i, raw in read_paths(paths)]
    with _Progress(json_out) as advance:
        results = asyncio.run(send_payloads(host, port, items,
                                            on_result=lambda _r: advance("send", 1, len(items))))
    codes: dict[str, int] = {}
    for r in results:
        codes[r.code] = codes.get(r.code, 0) + 1
    if json_out:
        print_json({"messages": len(results), "ack_codes": codes})
    else:
        typer.echo(f"sent {len(results)} message(s): " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())))
    if any(r.code not in ("AA", "CA") for r in results):
        raise typer.Exit(1)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} msg/s" if task.speed else "")


class _Progress:
    """A rich progress bar (rate, ETA) per phase on stderr; silent with --json."""

    def __init__(self, quiet: bool) -> None:
        self._quiet = quiet
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Any:
        if not self._quiet:
            from rich.console import Console

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TaskProgressColumn(), _RateColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
            self._bar.start()
        return self.advance

    def advance(self, phase: str, n: int, total: int | None) -> None:
        if self._bar is None:
            return
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(phase, total=total)
        self._bar.update(self._tasks[phase], advance=n, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _print_summary(summary: Any, json_out: bool) -> None:
    data = summary.to_json()
    if json_out:
        print_json(data)
        return
    typer.echo(f"replayed {data['messages']} message(s) in {data['seconds']:.1f}s "
               f"({data['rate_per_second']} msg/s): accepted {data['accepted']}, duplicates {data['duplicates']}, "
               f"rejected {data['rejected']}, filtered {data['filtered']}, applied {data['applied']}, "
               f"dead {data['dead']}, still pending {data['still_pending']}")
    if data["errors"]:
        typer.echo("errors: " + ", ".join(f"{k} {v}" for k, v in data["errors"].items()))


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")
    app.command("replay")(replay)
