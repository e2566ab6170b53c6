"""Delivery: the workers that drain the journal into the CRM. The half of the pipeline after the journal.

Guarantees (tested in tests/integration/test_delivery*.py):
- At-least-once from journal to CRM: an entry leaves `pending` only after the sink committed its operations
  (or it was filtered or dead-lettered). A crash between the sink commit and the journal update re-applies
  the message on restart; the sink's idempotency (message key recorded in the same transaction as the
  upserts) makes that second application a no-op, so the *effect* is exactly once.
- Per-patient order: at most one entry per patient key is in flight, and the journal only hands out a key's
  earliest pending entry. A transient failure keeps that entry first in line (with backoff), so a patient's
  later messages wait behind it; other patients proceed on the other lanes.
- Dead letters: permanent failures, and transient ones past `max_attempts` or `max_age_hours`, become
  `dead`. With `head_of_line: hold` the patient's later messages wait until the dead letter is retried or
  discarded; with `continue` they proceed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import hl7

from hl7bridge.crm.base import Sink
from hl7bridge.errors import Hl7BridgeError, MappingError, TransientSinkError
from hl7bridge.hl7.access import MessageView
from hl7bridge.hl7.lean import lean_view
from hl7bridge.records import ApplyRequest, CrmOp, Filtered, JournalEntry, Mark, OpResult
from hl7bridge.store.base import Journal

__all__ = [
    "Delivery", "DeliveryMetrics", "DeliveryPolicy", "Mapper", "Settlements", "apply_entry", "decide", "map_entry",
]

log = logging.getLogger("hl7bridge.delivery")


class Mapper(Protocol):
    def map(self, msg: hl7.Message | MessageView) -> list[CrmOp] | Filtered: ...


class DeliveryMetrics(Protocol):
    def applied(self, message_type: str, trigger: str, seconds_since_received: float) -> None: ...
    def filtered(self, reason: str) -> None: ...
    def contact_created(self, trigger: str) -> None: ...
    def dead_lettered(self, error_kind: str) -> None: ...
    def retry_scheduled(self, error_kind: str) -> None: ...
    def sink_error(self, error_kind: str) -> None: ...
    def set_backlog(self, pending: int, oldest_age_seconds: float) -> None: ...
    def set_dlq_size(self, n: int) -> None: ...


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    lanes: int = 8
    max_attempts: int = 50
    max_age: timedelta = timedelta(hours=24)
    backoff_initial: float = 0.5
    backoff_max: float = 300.0
    hold: bool = False
    poll_interval: float = 1.0
    default_charset: str = "utf-8"

    def backoff(self, attempts: int, hint: float | None = None) -> float:
        """Exponential backoff with full jitter in [base/2, base], capped; a sink's Retry-After wins if larger."""
        base = min(self.backoff_max, self.backoff_initial * (2 ** max(0, attempts - 1)))
        delay = base * random.uniform(0.5, 1.0)
        return max(delay, hint or 0.0)


def map_entry(entry: JournalEntry, mapper: Mapper, default_charset: str = "utf-8") -> list[CrmOp] | Filtered:
    """Read and map one journal entry with the workers' lean reader. Raises Hl7BridgeError."""
    try:
        return mapper.map(lean_view(entry.raw, default_charset))
    except Hl7BridgeError:
        raise
    except Exception as exc:  # a mapping bug must dead-letter the message, not kill the worker
        raise MappingError(f"mapping failed unexpectedly ({type(exc).__name__})") from exc


def apply_entry(
    entry: JournalEntry, mapper: Mapper, sink: Sink, *, default_charset: str = "utf-8", force: bool = False
) -> list[OpResult] | Filtered:
    """Parse, map and apply one journal entry (synchronous; runs in a worker thread). Raises Hl7BridgeError."""
    result = map_entry(entry, mapper, default_charset)
    if isinstance(result, Filtered):
        return result
    return sink.apply(result, message_key=entry.message_key, force=force)


Outcome = list[OpResult] | Filtered | Hl7BridgeError


@dataclass(frozen=True, slots=True)
class _Settled:
    """What became of one entry of a batch: its journal mark, and a retry delay when one was scheduled."""

    entry: JournalEntry
    outcome: Outcome
    mark: Mark
    retry_in: float | None = None


def decide(entry: JournalEntry, outcome: Outcome, policy: DeliveryPolicy, now: datetime) -> _Settled:
    """The journal state an outcome leads to: done, filtered, a scheduled retry, or a dead letter."""
    if isinstance(outcome, Filtered):
        return _Settled(entry, outcome, Mark(entry.id, "filtered", f"filtered: {outcome.reason}",
                                             reason=outcome.reason))
    if not isinstance(outcome, Hl7BridgeError):
        summary = ", ".join(f"{r.entity}:{r.outcome}" for r in outcome) or "no operations"
        return _Settled(entry, outcome, Mark(entry.id, "done", f"applied: {summary}"))
    exc = outcome
    attempts = entry.attempts + 1
    if exc.retryable and attempts < policy.max_attempts and now - entry.received_at < policy.max_age:
        hint = exc.retry_after if isinstance(exc, TransientSinkError) else None
        delay = policy.backoff(attempts, hint)
        mark = Mark(entry.id, "pending", f"retry {attempts} in {delay:.1f}s: {exc.reason}", reason=exc.reason,
                    error_kind=exc.kind, attempts=attempts, next_attempt_at=now + timedelta(seconds=delay))
        return _Settled(entry, outcome, mark, delay)
    why = "retries exhausted: " if exc.retryable else ""
    return _Settled(entry, outcome, Mark(entry.id, "dead", f"dead-lettered: {why}{exc.reason}",
                                         reason=why + exc.reason, error_kind=exc.kind, attempts=attempts))


class Settlements:
    """after_apply answers: futures waiting for journal entries to settle, plus the entries settled lately,
    so that a waiter registered a moment too late still gets its answer. Used on the event loop only."""

    def __init__(self, keep: int = 10_000) -> None:
        self._keep = keep
        self._waiters: dict[int, list[asyncio.Future[Hl7BridgeError | None]]] = {}
        self._recent: OrderedDict[int, Hl7BridgeError | None] = OrderedDict()
        #: Entries settled (applied, filtered or dead-lettered) so far.
        self.count = 0

    def wait_for(self, journal_id: int) -> asyncio.Future[Hl7BridgeError | None]:
        """Resolves with None when applied/filtered, or the error when dead-lettered (done at once if it was)."""
        fut: asyncio.Future[Hl7BridgeError | None] = asyncio.get_running_loop().create_future()
        if journal_id in self._recent:
            fut.set_result(self._recent[journal_id])
        else:
            self._waiters.setdefault(journal_id, []).append(fut)
        return fut

    def resolve(self, journal_id: int, error: Hl7BridgeError | None) -> None:
        self.count += 1
        self._recent[journal_id] = error
        while len(self._recent) > self._keep:
            self._recent.popitem(last=False)
        for fut in self._waiters.pop(journal_id, []):
            if not fut.done():
                fut.set_result(error)


class Delivery:
    """Drains the journal into the sink, a batch of patients' heads of line at a time.

    Up to `policy.lanes` batches are in flight; a batch holds at most `sink.max_batch` entries, each of a
    different patient, and no patient is in two batches. A batch is mapped, applied (`Sink.apply_many`: one
    commit for SQL sinks) and marked (`Journal.mark_many`: one transaction) in one worker-thread call, so a
    backlog costs one fsync and one journal write per batch rather than per message. Under a light load a
    batch is whatever is ready when a lane frees up, often one message: nothing waits to fill a batch.
    """

    def __init__(
        self,
        journal: Journal,
        sink: Sink,
        mapper: Mapper,
        metrics: DeliveryMetrics,
        policy: DeliveryPolicy,
        *,
        on_settled: Callable[[int, Hl7BridgeError | None], None] | None = None,
    ) -> None:
        self._journal = journal
        #: Told of every settled entry (applied/filtered: None; dead-lettered: the error).
        self._on_settled = on_settled
        self._sink = sink
        self._mapper = mapper
        self._metrics = metrics
        self._policy = policy
        self._batch_size = max(1, int(getattr(sink, "max_batch", 1)))
        # Lane key -> the task of the batch that holds that patient's entry.
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._batches: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._settlements = Settlements()
        self._runner: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="delivery")
        self._gauges = asyncio.create_task(self._update_gauges(), name="delivery-gauges")

    def wake(self) -> None:
        """Called by intake when a new pending entry is journaled."""
        self._wake.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking new entries; let in-flight ones finish (bounded by grace). Unfinished ones stay pending."""
        self._stopping = True
        self._wake.set()
        for task in (self._runner, self._gauges):
            if task is not None:
                task.cancel()
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=grace)
        for task in list(self._batches):
            task.cancel()

    def wait_for(self, journal_id: int) -> asyncio.Future[Hl7BridgeError | None]:
        """after_apply mode: resolves with None when applied/filtered, or the error when dead-lettered."""
        fut = self._settlements.wait_for(journal_id)
        if not fut.done():
            self._wake.set()
        return fut

    @property
    def settled(self) -> int:
        """Entries this Delivery settled (applied, filtered or dead-lettered) since it started."""
        return self._settlements.count

    @property
    def idle(self) -> bool:
        return not self._batches

    # --- the loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        # Heads of line fetched ahead (each the earliest pending entry of its patient at fetch time), so the
        # journal is asked once per many deliveries instead of once per delivery: finding the heads is a
        # grouped query over every pending entry, the costliest read on a large backlog.
        ready: deque[JournalEntry] = deque()
        lanes = self._policy.lanes
        fetch = min(_MAX_FETCH, lanes * max(_PREFETCH, self._batch_size))
        while not self._stopping:
            self._wake.clear()
            if len(self._batches) < lanes and not ready:
                try:
                    fetched = await asyncio.to_thread(
                        self._journal.next_ready, fetch, datetime.now(UTC), set(self._inflight), self._policy.hold,
                    )
                except Exception as exc:
                    log.error("cannot read the journal (%s); retrying", type(exc).__name__)
                    fetched = []
                ready.extend(fetched)
            while ready and len(self._batches) < lanes:
                batch = self._take_batch(ready)
                if not batch:
                    break
                task = asyncio.create_task(self._process(batch), name=f"deliver-{batch[0].id}+{len(batch)}")
                keys = [_lane_key(e) for e in batch]
                for key in keys:
                    self._inflight[key] = task
                self._batches.add(task)
                task.add_done_callback(lambda t, keys=keys: self._done(t, keys))
            if ready or len(self._batches) >= lanes:
                # Lanes busy (or work in hand): wait for one to finish (the done callback sets the event).
                await self._wake.wait()
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self._policy.poll_interval)
            except TimeoutError:
                pass

    def _take_batch(self, ready: deque[JournalEntry]) -> list[JournalEntry]:
        batch: list[JournalEntry] = []
        keys: set[str] = set()
        while ready and len(batch) < self._batch_size:
            entry = ready.popleft()
            key = _lane_key(entry)
            if key in self._inflight or key in keys:
                continue  # that patient is busy; its entry comes back with the next fetch
            keys.add(key)
            batch.append(entry)
        return batch

    def _done(self, task: asyncio.Task[None], keys: list[str]) -> None:
        self._batches.discard(task)
        for key in keys:
            if self._inflight.get(key) is task:
                del self._inflight[key]
        self._wake.set()

    async def _process(self, batch: list[JournalEntry]) -> None:
        try:
            settled, mark_error = await asyncio.to_thread(self._deliver, batch)
        except Exception as exc:  # never let a bug kill the loop; the entries stay pending and come back
            log.error("unexpected delivery failure for %d entries (%s)", len(batch), type(exc).__name__)
            return
        if mark_error is not None:
            await self._mark_again([s.mark for s in settled], mark_error)
        for s in settled:
            self._report(s)

    def _deliver(self, batch: list[JournalEntry]) -> tuple[list[_Settled], Exception | None]:
        """Map, apply and mark a batch (synchronous; in a worker thread). Returns the mark's error, if any."""
        outcomes: list[Outcome | None] = [None] * len(batch)
        requests: list[ApplyRequest] = []
        where: list[int] = []
        for i, entry in enumerate(batch):
            try:
                mapped = map_entry(entry, self._mapper, self._policy.default_charset)
            except Hl7BridgeError as exc:
                outcomes[i] = exc
                continue
            if isinstance(mapped, Filtered):
                outcomes[i] = mapped
            else:
                requests.append(ApplyRequest(mapped, entry.message_key))
                where.append(i)
        if requests:
            results: Sequence[list[OpResult] | Hl7BridgeError]
            try:
                results = self._sink.apply_many(requests)
            except Hl7BridgeError as exc:
                results = [exc] * len(requests)
            except Exception as exc:  # a bug: dead-letter with the class name only, never kill the lane
                log.exception("unexpected sink failure for %d messages", len(requests))
                results = [MappingError(f"internal error ({type(exc).__name__})")] * len(requests)
            for i, result in zip(where, results, strict=True):
                outcomes[i] = result
        now = datetime.now(UTC)
        settled = [decide(entry, outcome, self._policy, now)
                   for entry, outcome in zip(batch, outcomes, strict=True) if outcome is not None]
        try:
            self._journal.mark_many([s.mark for s in settled])
        except Exception as exc:
            return settled, exc
        return settled, None

    async def _mark_again(self, marks: list[Mark], error: Exception) -> None:
        # The journal update must not be lost to a transient journal hiccup: retry it briefly, then give up
        # (the entries stay pending and are re-applied later; the sink makes that a no-op).
        for attempt in range(1, 6):
            log.error("cannot update %d journal entries (%s), attempt %d", len(marks), type(error).__name__, attempt)
            await asyncio.sleep(0.2 * attempt)
            try:
                await asyncio.to_thread(self._journal.mark_many, marks)
                return
            except Exception as exc:
                error = exc

    def _report(self, s: _Settled) -> None:
        """Metrics, log lines and after_apply answers for one settled entry (on the event loop)."""
        entry, outcome = s.entry, s.outcome
        if isinstance(outcome, Filtered):
            self._metrics.filtered(_bounded_reason(outcome.reason))
            log.debug("message journal_id=%s control_id=%s outcome=filtered", entry.id, entry.control_id[:40])
            self._resolve(entry.id, None)
            return
        if not isinstance(outcome, Hl7BridgeError):
            age = (datetime.now(UTC) - entry.received_at).total_seconds()
            self._metrics.applied(entry.message_type, entry.trigger, max(age, 0.0))
            for r in outcome:
                if r.entity == "contact" and r.outcome == "created":
                    self._metrics.contact_created(entry.trigger)
            # DEBUG: intake already logged this message's one INFO line (ACK outcome); a failure to apply is
            # logged at WARNING/ERROR below, so INFO stays one line per message and off the hot path.
            log.debug("message journal_id=%s control_id=%s outcome=applied ops=%s",
                      entry.id, entry.control_id[:40], s.mark.event.removeprefix("applied: "))
            self._resolve(entry.id, None)
            return
        exc = outcome
        if exc.retryable:
            self._metrics.sink_error(exc.kind)
        if s.retry_in is not None:
            self._metrics.retry_scheduled(exc.kind)
            log.warning("message journal_id=%s outcome=retry attempt=%d delay=%.1fs error=%s reason=%r",
                        entry.id, entry.attempts + 1, s.retry_in, exc.kind, exc.reason)
            # Wake the loop when the retry is due (the poll interval would too, but later).
            asyncio.get_running_loop().call_later(s.retry_in, self._wake.set)
            return
        self._metrics.dead_lettered(exc.kind)
        log.error("message journal_id=%s control_id=%s outcome=dead error=%s reason=%r",
                  entry.id, entry.control_id[:40], exc.kind, exc.reason)
        self._resolve(entry.id, exc)

    def _resolve(self, journal_id: int, error: Hl7BridgeError | None) -> None:
        if self._on_settled is not None:
            self._on_settled(journal_id, error)
        self._settlements.resolve(journal_id, error)

    async def _update_gauges(self) -> None:
        while True:
            try:
                counts = await asyncio.to_thread(self._journal.counts)
                oldest = await asyncio.to_thread(self._journal.oldest_pending)
                age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
                self._metrics.set_backlog(counts.get("pending", 0), max(age, 0.0))
                self._metrics.set_dlq_size(counts.get("dead", 0))
            except Exception as exc:
                log.warning("cannot read journal counts (%s)", type(exc).__name__)
            await asyncio.sleep(2.0)


#: Heads of line fetched per lane and journal read, and at most per read.
_PREFETCH = 16
_MAX_FETCH = 512


def _lane_key(entry: JournalEntry) -> str:
    return entry.patient_key if entry.patient_key is not None else f"#{entry.id}"


def _bounded_reason(reason: str) -> str:
    """Metric label for a filter reason: the rule's short code before any colon, bounded in length."""
    head = reason.split(":", 1)[0].strip().lower().replace(" ", "_")
    return "".join(c for c in head if c.isalnum() or c == "_")[:40] or "filtered"
