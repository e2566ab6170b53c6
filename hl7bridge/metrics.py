"""Every Prometheus metric hl7bridge exports, defined in one place.

`Metrics` owns its own `CollectorRegistry`, so tests (and several bridges in one process) never share
counters. The pipeline, the MLLP server (its `ServerEvents` protocol) and the ops server call the small
methods below; none of them touches prometheus_client directly.

Label values are bounded on purpose: a label value that slips an identifier in (a control ID, a peer
address, an MRN) would both leak PHI into the monitoring system and explode its cardinality. So every
label passes through a normaliser that accepts only short codes of a fixed shape, and each label keeps
at most a fixed number of distinct values; anything else becomes "other".
"""

from __future__ import annotations

import os
import platform
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from hl7bridge.errors import AckCode

__all__ = ["CONTENT_TYPE", "OTHER", "Metrics"]

#: The exposition format `render()` produces (the classic text format every Prometheus understands).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The label value anything unexpected is folded into.
OTHER = "other"

# HL7 message types (ADT, SIU) and trigger events (A04, S12): a letter, then up to two letters/digits.
# A leading letter keeps digits-only values (control IDs, MRNs) out even when they are short.
_HL7_CODE = re.compile(r"[A-Z][A-Z0-9]{0,2}")
# Reasons and error kinds are snake_case codes chosen by the caller ("missing_required").
_SLUG = re.compile(r"[a-z][a-z0-9_]{0,47}")

ACK_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
APPLY_LATENCY_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    *(30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0),
)

# Series created at 0 up front, so rate()/increase() and the alert rules see them before the first event.
_KNOWN_RECEIVED = (("ADT", "A04"), ("ADT", "A28"))
_KNOWN_REJECT_REASONS = (
    "unreadable_message", "unsupported_message", "missing_required", "bad_field_value", "journal_unavailable",
)
_KNOWN_DEAD_LETTER_ERRORS = (
    "mapping_error",
    "bad_field_value",
    "permanent_sink_error",
    "transient_sink_error",
)
#: Raw label values whose labelled children are cached per metric (see `Metrics.message_received`).
_CHILD_CACHE_MAX = 256


class _Bounded:
    """Normalises one label: values must match `pattern`, and at most `cap` distinct values are kept."""

    __slots__ = ("_cap", "_lock", "_pattern", "_seen")

    def __init__(self, pattern: re.Pattern[str], cap: int, preset: Iterable[str] = ()) -> None:
        self._pattern = pattern
        self._cap = cap
        self._seen: set[str] = set(preset)
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        text = str(value).strip() if value is not None else ""
        if not self._pattern.fullmatch(text):
            return OTHER
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) >= self._cap:
                return OTHER
            self._seen.add(text)
            return text


class Metrics:
    """hl7bridge's metrics. One instance per bridge; pass `registry` to isolate it (tests do)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str = "0.1.0",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if registry is None:
            # The production path: a private registry, plus the process/GC/platform series operators
            # expect (memory, open fds, start time). Tests pass a bare registry and get only ours.
            registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self._clock = clock
        r = self.registry

        self._msg_type = _Bounded(_HL7_CODE, 16)
        self._trigger = _Bounded(_HL7_CODE, 100)
        self._ack_code = _Bounded(re.compile("|".join(c.value for c in AckCode)), len(AckCode))
        self._reject_reason = _Bounded(_SLUG, 32)
        self._filter_reason = _Bounded(_SLUG, 32)
        self._error_kind = _Bounded(_SLUG, 32)
        self._frame_reason = _Bounded(_SLUG, 16)
        self._component = _Bounded(_SLUG, 16)
        self._reconcile_kind = _Bounded(_SLUG, 32)
        self._reconcile_kinds_set: set[str] = set()
        self._reconcile_file_stamp: int | None = None
        # The labelled children of the per-message series, by the *raw* values the caller passed. Once a
        # raw value has been normalised its label never changes (a `_Bounded` never forgets a value, and a
        # value refused once is refused for ever), so the cache returns exactly what `labels()` would.
        # Raw values are sender-controlled, so the caches stop growing at `_CHILD_CACHE_MAX` entries.
        self._received_children: dict[tuple[str, str], tuple[Counter, Gauge]] = {}
        self._ack_children: dict[str, Counter] = {}
        self._applied_children: dict[tuple[str, str], Counter] = {}

        # --- intake -------------------------------------------------------------------------------
        self.messages_received = Counter(
            "hl7bridge_messages_received_total", "HL7 messages received, by message type and trigger event.",
            ["type", "trigger"], registry=r,
        )
        self.last_message_received = Gauge(
            "hl7bridge_last_message_received_timestamp_seconds",
            "Unix time the last message of each type was received.", ["type"], registry=r,
        )
        self.acks_sent = Counter(
            "hl7bridge_acks_sent_total", "Acknowledgements sent, by MSA-1 code.", ["code"], registry=r
        )
        self.ack_latency = Histogram(
            "hl7bridge_ack_latency_seconds", "Time from a complete frame to its ACK being written.",
            buckets=ACK_LATENCY_BUCKETS, registry=r,
        )
        self.messages_rejected = Counter(
            "hl7bridge_messages_rejected_total", "Messages rejected at intake (AE/AR), by error kind.",
            ["reason"], registry=r,
        )
        self.messages_duplicate = Counter(
            "hl7bridge_messages_duplicate_total", "Resent messages recognised as duplicates.", registry=r
        )
        self.messages_filtered = Counter(
            "hl7bridge_messages_filtered_total", "Messages the rules deliberately ignore, by reason code.",
            ["reason"], registry=r,
        )

        # --- delivery -----------------------------------------------------------------------------
        self.messages_applied = Counter(
            "hl7bridge_messages_applied_total", "Messages applied to the CRM, by message type and trigger.",
            ["type", "trigger"], registry=r,
        )
        self.receive_to_applied = Histogram(
            "hl7bridge_receive_to_applied_seconds", "Time from receipt to the CRM upsert succeeding.",
            buckets=APPLY_LATENCY_BUCKETS, registry=r,
        )
        self.last_apply = Gauge(
            "hl7bridge_last_apply_timestamp_seconds", "Unix time of the last CRM apply.", registry=r
        )
        self.contacts_created = Counter(
            "hl7bridge_contacts_created_total", "CRM contacts created, by the trigger that created them.",
            ["trigger"], registry=r,
        )
        self.dead_letters = Counter(
            "hl7bridge_dead_letters_total", "Messages moved to the dead-letter queue, by error kind.",
            ["error"], registry=r,
        )
        self.delivery_retries = Counter(
            "hl7bridge_delivery_retries_total", "Delivery retries, by error kind.", ["error"], registry=r
        )
        self.sink_errors = Counter(
            "hl7bridge_sink_errors_total", "CRM sink failures, by error kind.", ["error"], registry=r
        )
        self.journal_backlog = Gauge(
            "hl7bridge_journal_backlog", "Journal entries waiting to be applied.", registry=r
        )
        self.journal_oldest_pending_age = Gauge(
            "hl7bridge_journal_oldest_pending_age_seconds", "Age of the oldest pending entry.", registry=r
        )
        self.dlq_size = Gauge("hl7bridge_dlq_size", "Entries in the dead-letter queue.", registry=r)

        # --- listener and health ------------------------------------------------------------------
        self.connections_active = Gauge(
            "hl7bridge_connections_active", "Open MLLP connections.", registry=r
        )
        self.connections_refused = Counter(
            "hl7bridge_connections_refused_total", "MLLP connections refused (limit reached).", registry=r
        )
        self.frames_rejected = Counter(
            "hl7bridge_frames_rejected_total", "MLLP frames rejected (oversize, timeout, junk), by reason.",
            ["reason"], registry=r,
        )
        self.component_up = Gauge(
            "hl7bridge_component_up", "1 when a component's readiness check passes, else 0.",
            ["component"], registry=r,
        )

        # --- reconciliation (last result of `hl7bridge reconcile`) --------------------------------
        self.reconcile_issues = Gauge(
            "hl7bridge_reconcile_issues", "Drift in the last reconciliation.", ["kind"], registry=r
        )
        self.reconcile_drift_ratio = Gauge(
            "hl7bridge_reconcile_drift_ratio", "Share of records with drift in the last reconciliation.",
            registry=r,
        )
        self.reconcile_last_run = Gauge(
            "hl7bridge_reconcile_last_run_timestamp_seconds", "Unix time of the last reconcile.", registry=r
        )

        self.build_info = Gauge(
            "hl7bridge_build_info", "Build information; always 1.", ["version", "python"], registry=r
        )
        self.build_info.labels(version=str(version)[:32], python=platform.python_version()).set(1)
        self._preinitialise()

    def _preinitialise(self) -> None:
        for code in AckCode:
            self.acks_sent.labels(code=self._ack_code(code.value))
        for message_type, trigger in _KNOWN_RECEIVED:
            self.messages_received.labels(type=self._msg_type(message_type), trigger=self._trigger(trigger))
            self.contacts_created.labels(trigger=self._trigger(trigger))
        for reason in _KNOWN_REJECT_REASONS:
            self.messages_rejected.labels(reason=self._reject_reason(reason))
        for kind in _KNOWN_DEAD_LETTER_ERRORS:
            self.dead_letters.labels(error=self._error_kind(kind))

    # --- intake ---------------------------------------------------------------------------------------

    def message_received(self, message_type: str, trigger: str) -> None:
        # Once per message, on the event loop: `labels()` (validation, a lock, a tuple) only on a miss.
        children = self._received_children.get((message_type, trigger))
        if children is None:
            kind = self._msg_type(message_type)
            children = (
                self.messages_received.labels(type=kind, trigger=self._trigger(trigger)),
                self.last_message_received.labels(type=kind),
            )
            if len(self._received_children) < _CHILD_CACHE_MAX:
                self._received_children[(message_type, trigger)] = children
        children[0].inc()
        children[1].set(self._clock())

    def ack_sent(self, code: str, seconds: float) -> None:
        child = self._ack_children.get(code)
        if child is None:
            child = self.acks_sent.labels(code=self._ack_code(code))
            if len(self._ack_children) < _CHILD_CACHE_MAX:
                self._ack_children[code] = child
        child.inc()
        self.ack_latency.observe(max(0.0, seconds))

    def rejected(self, reason: str) -> None:
        self.messages_rejected.labels(reason=self._reject_reason(reason)).inc()

    def duplicate(self) -> None:
        self.messages_duplicate.inc()

    def filtered(self, reason: str) -> None:
        self.messages_filtered.labels(reason=self._filter_reason(reason)).inc()

    # --- delivery -------------------------------------------------------------------------------------

    def applied(self, message_type: str, trigger: str, seconds_since_received: float) -> None:
        # Once per message on the event loop (relayed from the worker process): cached like message_received.
        child = self._applied_children.get((message_type, trigger))
        if child is None:
            child = self.messages_applied.labels(type=self._msg_type(message_type), trigger=self._trigger(trigger))
            if len(self._applied_children) < _CHILD_CACHE_MAX:
                self._applied_children[(message_type, trigger)] = child
        child.inc()
        self.receive_to_applied.observe(max(0.0, seconds_since_received))
        self.last_apply.set(self._clock())

    def contact_created(self, trigger: str) -> None:
        self.contacts_created.labels(trigger=self._trigger(trigger)).inc()

    def dead_lettered(self, error_kind: str) -> None:
        self.dead_letters.labels(error=self._error_kind(error_kind)).inc()

    def retry_scheduled(self, error_kind: str) -> None:
        self.delivery_retries.labels(error=self._error_kind(error_kind)).inc()

    def sink_error(self, error_kind: str) -> None:
        self.sink_errors.labels(error=self._error_kind(error_kind)).inc()

    def set_backlog(self, pending: int, oldest_age_seconds: float) -> None:
        self.journal_backlog.set(max(0, pending))
        self.journal_oldest_pending_age.set(max(0.0, oldest_age_seconds))

    def set_dlq_size(self, n: int) -> None:
        self.dlq_size.set(max(0, n))

    # --- listener (the MLLP server's ServerEvents protocol) -------------------------------------------

    def connection_opened(self) -> None:
        self.connections_active.inc()

    def connection_closed(self) -> None:
        self.connections_active.dec()

    def connection_refused(self) -> None:
        self.connections_refused.inc()

    def frame_rejected(self, reason: str) -> None:
        self.frames_rejected.labels(reason=self._frame_reason(reason)).inc()

    # --- health and reconciliation --------------------------------------------------------------------

    def set_up(self, component: str, up: bool) -> None:
        self.component_up.labels(component=self._component(component)).set(1 if up else 0)

    def set_reconcile(self, counts: Mapping[str, int], drift_ratio: float, at: float) -> None:
        # The last run replaces the previous one: a kind that had issues before and none now reads 0.
        current: dict[str, int] = {}
        for kind, n in counts.items():
            label = self._reconcile_kind(kind)
            current[label] = current.get(label, 0) + max(0, int(n))
        for label in self._reconcile_kinds_set - current.keys():
            self.reconcile_issues.labels(kind=label).set(0)
        for label, n in current.items():
            self.reconcile_issues.labels(kind=label).set(n)
        self._reconcile_kinds_set |= current.keys()
        self.reconcile_drift_ratio.set(max(0.0, drift_ratio))
        self.reconcile_last_run.set(at)

    def load_reconcile_file(self, path: str | os.PathLike[str]) -> bool:
        """Import the last `hl7bridge reconcile` result from the textfile that command writes.

        Reconciliation runs in another process (a scheduled CLI job); it leaves its result as a
        Prometheus textfile and the serving bridge exports it through `set_reconcile`. Only the three
        reconcile families are read, so the file cannot inject other series. The file is parsed again
        only when its modification time changes. Returns False when the file is missing or unreadable
        (the previous values stay).
        """
        try:
            stamp = Path(path).stat().st_mtime_ns
            if stamp == self._reconcile_file_stamp:
                return True
            text = Path(path).read_text(encoding="utf-8")
            counts: dict[str, int] = {}
            ratio = at = None
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "hl7bridge_reconcile_issues" and "kind" in sample.labels:
                        counts[sample.labels["kind"]] = int(sample.value)
                    elif sample.name == "hl7bridge_reconcile_drift_ratio":
                        ratio = sample.value
                    elif sample.name == "hl7bridge_reconcile_last_run_timestamp_seconds":
                        at = sample.value
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        if ratio is None or at is None:
            return False
        self.set_reconcile(counts, ratio, at)
        self._reconcile_file_stamp = stamp
        return True

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format (`CONTENT_TYPE`)."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A view of a registry without the `*_created` series prometheus_client adds to every counter and
    histogram: they double the exposition and no dashboard or alert here reads them."""

    __slots__ = ("_registry",)

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.type == "gauge" and family.name.endswith("_created"):
                continue  # older clients expose created as a separate gauge family
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
