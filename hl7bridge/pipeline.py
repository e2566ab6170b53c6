"""Intake: read the envelope, journal the message, decide the ACK. The half of the pipeline before the journal.

Delivery guarantee at this boundary: a positive ACK (AA/CA) is sent only after the message is durably
committed to the journal (`GroupCommitter.submit` returns after the batch's commit). A process killed at any
instant therefore loses no acknowledged message; a message killed before its ACK is resent by the sender and
deduplicated on (MSH-3, MSH-4, MSH-10).

Intake never fully parses: it scans MSH and PID-3 only (µs, not ms), so the ACK path stays fast; the
workers (`delivery.py`) do the full parse and mapping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from hl7bridge.errors import AckCode, ErrCode, Hl7BridgeError, JournalUnavailable, UnreadableMessage, enhanced
from hl7bridge.hl7.ack import build_ack
from hl7bridge.hl7.envelope import (
    PatientIdPolicy,
    Scanned,
    best_effort_envelope,
    is_supported,
    scan_bytes,
    validate,
)
from hl7bridge.hl7.parse import decode, encode, normalise_segments, sniff_charset
from hl7bridge.logs import RecordEmitter
from hl7bridge.records import AppendResult, Envelope, NewEntry
from hl7bridge.store.base import Journal

__all__ = ["AckOutcome", "ApplyWaiter", "GroupCommitter", "Intake", "IntakeMetrics"]

log = logging.getLogger("hl7bridge.intake")
#: The one INFO line per message (see `_answer`), through the cheap record path of `logs.RecordEmitter`.
_message_line = RecordEmitter(log, logging.INFO)
_MESSAGE_LINE = "message journal_id=%s control_id=%s type=%s outcome=%s ack=%s%s"
_FILTERED_REASON = "unsupported event accepted and ignored"


class IntakeMetrics(Protocol):
    def message_received(self, message_type: str, trigger: str) -> None: ...
    def ack_sent(self, code: str, seconds: float) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def duplicate(self) -> None: ...
    def filtered(self, reason: str) -> None: ...


class ApplyWaiter(Protocol):
    """What after_apply mode waits on: the delivery side resolves it once the entry is settled."""

    def wait_for(self, journal_id: int) -> asyncio.Future[Hl7BridgeError | None]: ...


@dataclass(frozen=True, slots=True)
class AckOutcome:
    """The ACK intake answered with, and why. Returned to the MLLP server as bytes via `payload`."""

    payload: bytes
    code: str
    journal_id: int | None
    outcome: str  # accepted | duplicate | rejected | filtered | applied | apply_failed | journal_unavailable


class GroupCommitter:
    """Shares journal commits between all connections: one transaction (one fsync) per batch.

    Adaptive, with no linger timer: the first entry starts a commit at once, and whatever arrives while that
    commit runs forms the next batch. One connection therefore pays one commit per message, while many
    connections share commits in proportion to the load.
    """

    def __init__(self, journal: Journal, dedup_window: timedelta, max_batch: int = 1024) -> None:
        self._journal = journal
        self._window = dedup_window
        self._max_batch = max_batch
        self._queue: list[tuple[NewEntry, asyncio.Future[AppendResult]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, entry: NewEntry) -> AppendResult:
        fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append((entry, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="journal-group-commit")
        return await fut

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            entries = [e for e, _ in batch]
            try:
                results = await asyncio.to_thread(self._journal.append_batch, entries, self._window)
            except Exception as exc:  # every waiter of this batch learns the journal failed
                err = exc if isinstance(exc, JournalUnavailable) else JournalUnavailable(
                    f"journal write failed ({type(exc).__name__})"
                )
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def drain(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)


class Intake:
    """The MLLP handler: bytes in, ACK bytes out. Never raises for bad input."""

    def __init__(
        self,
        committer: GroupCommitter,
        metrics: IntakeMetrics,
        *,
        policy: PatientIdPolicy,
        supported: Mapping[str, frozenset[str]],
        accept_unsupported: bool = False,
        default_charset: str = "utf-8",
        ack_mode: str = "after_commit",
        after_apply_timeout: float = 30.0,
        waiter: ApplyWaiter | None = None,
        on_pending: Callable[[], None] | None = None,
        validation: str = "lenient",
    ) -> None:
        self._committer = committer
        self._metrics = metrics
        self._policy = policy
        self._supported = supported
        self._accept_unsupported = accept_unsupported
        self._charset = default_charset
        self._after_apply = ack_mode == "after_apply"
        self._apply_timeout = after_apply_timeout
        self._waiter = waiter
        self._on_pending = on_pending
        self._strict = validation == "strict"
        if self._after_apply and waiter is None:
            raise ValueError("ack_mode after_apply needs an apply waiter")

    async def handle(self, raw: bytes, peer: str) -> AckOutcome:
        started = time.perf_counter()
        received_at = datetime.now(UTC)
        envelope, patient_key, error, state = self._read(raw)
        if self._strict and state == "pending" and envelope is not None:
            # Off the event loop: hl7apy takes ~35 ms of CPU per message (opt-in, for low-volume feeds).
            error = await asyncio.to_thread(_strict_error, raw, envelope.version, self._charset)
            if error is not None:
                state = "rejected"
        if envelope is not None:
            self._metrics.message_received(envelope.message_type, envelope.trigger)
        else:
            self._metrics.message_received("", "")

        # Positional arguments: this runs once per message, and keywords cost ~0.5 µs more here.
        if error is None:
            code = AckCode.AA
            entry = NewEntry(received_at, peer, raw, envelope, patient_key, state,
                             "AA", _FILTERED_REASON if state == "filtered" else "", "", "")
        else:
            code = error.ack_code
            entry = NewEntry(received_at, peer, raw, envelope, patient_key, state,
                             code.value, error.reason, error.kind, error.err_code.value)
        try:
            result = await self._committer.submit(entry)
        except JournalUnavailable as exc:
            log.error("journal unavailable, answering AR so the sender retries: %s", exc.reason)
            self._metrics.rejected(exc.kind)
            return self._answer(envelope, AckCode.AR, exc, None, "journal_unavailable", started)

        if result.duplicate:
            self._metrics.duplicate()
            return self._answer(envelope, AckCode(result.ack_code), None, result.journal_id, "duplicate",
                                started, text="duplicate of an accepted message; not applied again")
        if error is not None:
            self._metrics.rejected(error.kind)
            return self._answer(envelope, code, error, result.journal_id, "rejected", started)
        if state == "filtered":
            self._metrics.filtered("unsupported_event")
            return self._answer(envelope, AckCode.AA, None, result.journal_id, "filtered", started)
        if self._on_pending is not None:
            self._on_pending()
        if not self._after_apply:
            return self._answer(envelope, AckCode.AA, None, result.journal_id, "accepted", started)
        return await self._answer_after_apply(envelope, result.journal_id, started)

    def _read(self, raw: bytes) -> tuple[Envelope | None, str | None, Hl7BridgeError | None, str]:
        """Scan and validate. Returns (envelope, patient key, error, journal state)."""
        scanned: Scanned | None = None
        try:
            scanned, _text = scan_bytes(raw, self._policy, self._charset)
            if self._accept_unsupported and not is_supported(scanned.envelope, self._supported):
                return scanned.envelope, scanned.patient_key, None, "filtered"
            validate(scanned, supported=self._supported)
            return scanned.envelope, scanned.patient_key, None, "pending"
        except UnreadableMessage as exc:
            return best_effort_envelope(raw), None, exc, "rejected"
        except Hl7BridgeError as exc:
            env = scanned.envelope if scanned is not None else best_effort_envelope(raw)
            return env, scanned.patient_key if scanned is not None else None, exc, "rejected"
        except Exception as exc:  # a bug in a scanner must still produce a NACK, never a dropped message
            log.exception("unexpected error reading a message (%s)", type(exc).__name__)
            err = UnreadableMessage("message could not be read", err_code=ErrCode.INTERNAL)
            return best_effort_envelope(raw), None, err, "rejected"

    async def _answer_after_apply(self, envelope: Envelope | None, journal_id: int, started: float) -> AckOutcome:
        assert self._waiter is not None
        fut = self._waiter.wait_for(journal_id)
        try:
            failure = await asyncio.wait_for(fut, self._apply_timeout)
        except TimeoutError:
            err = JournalUnavailable(
                "stored, but the CRM did not confirm within the timeout; it will be applied when the CRM returns"
            )
            return self._answer(envelope, AckCode.AE, err, journal_id, "apply_pending", started)
        if failure is None:
            return self._answer(envelope, AckCode.AA, None, journal_id, "applied", started)
        return self._answer(envelope, AckCode.AE, failure, journal_id, "apply_failed", started)

    def _answer(
        self,
        envelope: Envelope | None,
        code: AckCode,
        error: Hl7BridgeError | None,
        journal_id: int | None,
        outcome: str,
        started: float,
        text: str = "",
    ) -> AckOutcome:
        ack_text = build_ack(envelope, code, error=error, text=text)
        sent_code = (enhanced(code) if envelope is not None and envelope.enhanced_mode else code).value
        self._metrics.ack_sent(sent_code, time.perf_counter() - started)
        if _message_line.enabled():
            _message_line(_MESSAGE_LINE, (
                journal_id if journal_id is not None else "-",
                _safe(envelope.control_id) if envelope else "-",
                f"{envelope.message_type}^{envelope.trigger}" if envelope else "-",
                outcome, sent_code, f" err={error.err_code.value} reason={error.reason!r}" if error else "",
            ), {"journal_id": journal_id, "outcome": outcome, "ack": sent_code})
        payload = encode(ack_text, envelope.charset if envelope else "", self._charset)
        return AckOutcome(payload, sent_code, journal_id, outcome)


def _strict_error(raw: bytes, version: str, default_charset: str) -> Hl7BridgeError | None:
    """Opt-in strict validation against the HL7 message structure (hl7/strict.py); the error, if any."""
    from hl7bridge.hl7.strict import validate_strict  # imports hl7apy: only when strict mode is used

    try:
        validate_strict(normalise_segments(decode(raw, sniff_charset(raw), default_charset)), version)
    except Hl7BridgeError as exc:
        return exc
    except Exception as exc:  # validate_strict maps hl7apy's failures; anything else is our bug, still a NACK
        log.error("strict validation failed unexpectedly (%s)", type(exc).__name__)
        return UnreadableMessage("strict validation could not run on this message", err_code=ErrCode.INTERNAL)
    return None


def _safe(value: str, limit: int = 40) -> str:
    """Control IDs are not PHI, but they are sender-controlled: bound their length and strip controls."""
    if len(value) <= limit and value.isprintable():
        return value  # the usual case, with nothing to cut or strip
    return "".join(c for c in value[:limit] if c.isprintable())
