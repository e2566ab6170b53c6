"""Replay: feed files of messages, or stored journal entries, through the pipeline again.

- Files (`replay_files`): every message goes through the same intake as MLLP traffic (scan, validate,
  journal with dedup), then the same workers apply it. Replaying a file twice therefore changes nothing
  the second time (resends are deduplicated), and an interrupted replay is resumed by running it again.
- Journal (`replay_journal`): stored entries are parsed, mapped and applied again in journal order with
  `force` (the sink's "already applied" memory is bypassed, e.g. after a mapping fix). Progress is
  checkpointed, so `--resume` continues after the last entry done.
- Dry run: parse and map only, return the operations, write nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hl7bridge.crm.base import Sink
from hl7bridge.delivery import Delivery, DeliveryPolicy, Mapper, apply_entry
from hl7bridge.errors import Hl7BridgeError
from hl7bridge.hl7.batch import read_paths
from hl7bridge.hl7.envelope import DEFAULT_SUPPORTED
from hl7bridge.hl7.lean import lean_view
from hl7bridge.pipeline import GroupCommitter, Intake
from hl7bridge.records import CrmOp, Filtered
from hl7bridge.store.base import Journal

__all__ = ["ReplaySummary", "dry_run", "ops_to_json", "replay_files", "replay_journal"]

Progress = Callable[[str, int, int | None], None]  # (phase, advance, total)


@dataclass
class ReplaySummary:
    messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    filtered: int = 0
    applied: int = 0
    dead: int = 0
    still_pending: int = 0
    seconds: float = 0.0
    ack_codes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rate_per_second": round(self.rate, 1)}

    @property
    def ok(self) -> bool:
        return self.rejected == 0 and self.dead == 0


class _NullMetrics:
    """Replay runs outside the server: metrics calls are accepted and dropped."""

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *a, **k: None


async def replay_files(
    paths: Sequence[Path],
    journal: Journal,
    sink: Sink,
    mapper: Mapper,
    *,
    policy: DeliveryPolicy,
    dedup_window: timedelta,
    default_charset: str = "utf-8",
    concurrency: int = 256,
    progress: Progress | None = None,
    apply_timeout: float = 600.0,
) -> ReplaySummary:
    started = asyncio.get_running_loop().time()
    summary = ReplaySummary()
    messages = [raw for _, _, raw in read_paths(list(paths))]
    total = len(messages)
    metrics = _NullMetrics()
    committer = GroupCommitter(journal, dedup_window)
    delivery = Delivery(journal, sink, mapper, metrics, policy)
    intake = Intake(committer, metrics, policy=mapper.patient_policy,  # type: ignore[attr-defined]
                    supported=DEFAULT_SUPPORTED, default_charset=default_charset, on_pending=delivery.wake)
    codes: Counter[str] = Counter()
    first_id: int | None = None
    ids: set[int] = set()
    sem = asyncio.Semaphore(concurrency)

    async def one(raw: bytes) -> None:
        nonlocal first_id
        async with sem:
            outcome = await intake.handle(raw, "replay")
        codes[outcome.code] += 1
        if outcome.journal_id is not None and outcome.outcome == "accepted":
            ids.add(outcome.journal_id)
            first_id = outcome.journal_id if first_id is None else min(first_id, outcome.journal_id)
        summary.accepted += outcome.outcome == "accepted"
        summary.duplicates += outcome.outcome == "duplicate"
        summary.rejected += outcome.outcome == "rejected"
        if progress:
            progress("journal", 1, total)

    delivery.start()
    try:
        # Messages are journaled in file order within each window, so per-patient order follows the files.
        for i in range(0, total, concurrency):
            await asyncio.gather(*(one(raw) for raw in messages[i : i + concurrency]))
        summary.messages = total
        if first_id is not None:
            await _wait_settled(journal, delivery, first_id, ids, summary, progress, apply_timeout)
    finally:
        await delivery.stop()
    summary.ack_codes = dict(codes)
    summary.seconds = asyncio.get_running_loop().time() - started
    return summary


async def _wait_settled(journal: Journal, delivery: Delivery, first_id: int, ids: set[int],
                        summary: ReplaySummary, progress: Progress | None, timeout: float) -> None:
    """Poll (bounded) until every entry we journaled is settled, or only backed-off retries remain.
    Polls only the pending entries (cheap on a 100k-message replay); one full read at the end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    reported = 0
    while True:
        pending = [e for e in await asyncio.to_thread(journal.query, states=["pending"], after_id=first_id - 1,
                                                      limit=2000) if e.id in ids]
        if progress and delivery.settled > reported:
            progress("apply", delivery.settled - reported, summary.accepted)
            reported = delivery.settled
        if not pending or (delivery.idle and all(e.attempts > 0 for e in pending)) or loop.time() > deadline:
            break
        delivery.wake()
        await asyncio.sleep(0.2)
    entries = [e for e in await asyncio.to_thread(journal.query, after_id=first_id - 1) if e.id in ids]
    states = Counter(e.state for e in entries)
    summary.applied = states["done"]
    summary.dead = states["dead"]
    summary.filtered = states["filtered"]
    summary.still_pending = states["pending"]
    summary.errors = dict(Counter(e.error_kind for e in entries if e.state == "dead"))


def _checkpoint_key(filters: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:16]


def replay_journal(
    journal: Journal,
    sink: Sink,
    mapper: Mapper,
    *,
    filters: dict[str, Any],
    checkpoint: Path | None = None,
    resume: bool = False,
    default_charset: str = "utf-8",
    progress: Progress | None = None,
) -> ReplaySummary:
    """Re-apply stored entries (done, filtered, dead; never rejected) in journal order, with force."""
    t0 = datetime.now(UTC)
    key = _checkpoint_key(filters)
    marks: dict[str, int] = {}
    if checkpoint is not None and checkpoint.exists():
        marks = json.loads(checkpoint.read_text())
    after_id = marks.get(key) if resume else None
    entries = journal.query(states=["done", "filtered", "dead", "pending"], after_id=after_id, **filters)
    summary = ReplaySummary(messages=len(entries))
    errors: Counter[str] = Counter()
    for n, entry in enumerate(entries, 1):
        try:
            result = apply_entry(entry, mapper, sink, default_charset=default_charset, force=True)
        except Hl7BridgeError as exc:
            journal.mark(entry.id, "dead", event=f"replay failed: {exc.reason}", reason=exc.reason,
                         error_kind=exc.kind, attempts=entry.attempts + 1)
            summary.dead += 1
            errors[exc.kind] += 1
        else:
            if isinstance(result, Filtered):
                journal.mark(entry.id, "filtered", event=f"replayed: filtered: {result.reason}", reason=result.reason)
                summary.filtered += 1
            else:
                ops = ", ".join(f"{r.entity}:{r.outcome}" for r in result)
                journal.mark(entry.id, "done", event=f"replayed: {ops}")
                summary.applied += 1
        if checkpoint is not None and (n % 200 == 0 or n == len(entries)):
            marks[key] = entry.id
            checkpoint.write_text(json.dumps(marks))
        if progress:
            progress("apply", 1, len(entries))
    summary.errors = dict(errors)
    summary.seconds = (datetime.now(UTC) - t0).total_seconds()
    return summary


def dry_run(messages: Iterable[tuple[Path, int, bytes]], mapper: Mapper,
            default_charset: str = "utf-8") -> Iterable[dict[str, Any]]:
    """What each message would do, without writing anything."""
    for path, index, raw in messages:
        item: dict[str, Any] = {"file": str(path), "index": index}
        try:
            result = mapper.map(lean_view(raw, default_charset))
        except Hl7BridgeError as exc:
            item.update(outcome="rejected", error=exc.kind, err_code=exc.err_code.value, reason=exc.reason)
        else:
            if isinstance(result, Filtered):
                item.update(outcome="filtered", reason=result.reason)
            else:
                item.update(outcome="ops", ops=ops_to_json(result))
        yield item


def ops_to_json(ops: Sequence[CrmOp]) -> list[dict[str, Any]]:
    out = []
    for op in ops:
        d: dict[str, Any] = {"entity": op.entity, "action": op.action, "key": op.key,
                             "event_time": op.event_time.isoformat(),
                             "fields": {k: {"value": v.value, "conflict": v.conflict} for k, v in op.fields.items()}}
        if op.contact_key:
            d["contact_key"] = op.contact_key
        if op.prior_key:
            d["prior_key"] = op.prior_key
        if op.only_if_changed:
            d["only_if_changed"] = list(op.only_if_changed)
        out.append(d)
    return out
