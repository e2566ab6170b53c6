"""Wiring and lifecycle: build everything from one validated Config, start, drain on SIGTERM/SIGINT.

The only module that chooses concrete backends (journal, sink) and I/O drivers (MLLP, ops HTTP).
Shutdown is two-phase: stop accepting and finish the messages in flight (their ACKs are written), then stop
the workers (unfinished entries stay pending in the journal and resume on the next start), then close stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from hl7bridge.config import Config
from hl7bridge.crm import open_sink
from hl7bridge.crm.base import Sink
from hl7bridge.delivery import Delivery, DeliveryPolicy
from hl7bridge.delivery_process import DeliveryWorker
from hl7bridge.errors import AckCode, ErrCode, UnreadableMessage
from hl7bridge.hl7.ack import build_ack
from hl7bridge.hl7.envelope import DEFAULT_SUPPORTED, best_effort_envelope
from hl7bridge.mapping import Problem, RulesError, compile_rules, load_rules
from hl7bridge.metrics import Metrics
from hl7bridge.mllp.server import ConnectionInfo, MllpServer
from hl7bridge.ops import OpsServer
from hl7bridge.pipeline import GroupCommitter, Intake
from hl7bridge.store import open_journal
from hl7bridge.store.base import Journal

__all__ = ["App", "build_mapper", "check_rules_fit_sink", "delivery_policy", "open_crm", "open_stores", "run"]

log = logging.getLogger("hl7bridge.app")


def build_mapper(config: Config) -> Any:
    """Load, validate and compile the rules once (RulesError names file, line and key), and check that the
    configured sink can enforce them."""
    rules = load_rules(config.rules)
    problems = check_rules_fit_sink(config, rules)
    if problems:
        where = str(config.rules or "built-in rules")
        raise RulesError([Problem(where, None, "", f"does not fit the configured CRM: {p}") for p in problems])
    return compile_rules(rules, default_timezone=config.timezone)


def delivery_policy(config: Config) -> DeliveryPolicy:
    d = config.delivery
    return DeliveryPolicy(
        lanes=d.lanes, max_attempts=d.max_attempts, max_age=timedelta(hours=d.max_age_hours),
        backoff_initial=d.backoff_initial, backoff_max=d.backoff_max, hold=d.head_of_line == "hold",
        poll_interval=d.poll_interval, default_charset=config.intake.default_charset,
    )


def open_crm(config: Config) -> Sink:
    """The CRM sink the config names: an HTTP CRM, else the store's CRM tables (SQLite or PostgreSQL)."""
    if config.sink == "http":
        from hl7bridge.crm.http import open_http_sink

        assert config.http is not None
        return open_http_sink(config.http)
    if "://" not in config.store.crm_location():
        config.store.data_dir.mkdir(parents=True, exist_ok=True)
    return open_sink(config.store.crm_location())


def crm_description(config: Config) -> str:
    if config.sink == "http" and config.http is not None:
        return f"http {config.http.preset} {config.http.base_url}"
    return _redact_url(config.store.crm_location())


def check_rules_fit_sink(config: Config, rules: Any) -> list[str]:
    """Rules that the configured sink cannot enforce (an HTTP preset without reads, say): path-qualified."""
    if config.sink != "http" or config.http is None:
        return []
    from hl7bridge.crm.http import rules_problems

    return rules_problems(config.http, rules)


def open_stores(config: Config, *, intake: bool = False) -> tuple[Journal, Sink]:
    """Open (and migrate) the journal and the CRM sink the config names. `intake`: for a process that
    appends (serve, replay); see `open_journal`."""
    if "://" not in config.store.journal_location():
        config.store.data_dir.mkdir(parents=True, exist_ok=True)
    journal = open_journal(config.store.journal_location(), intake=intake)
    try:
        sink = open_crm(config)
    except Exception:
        journal.close()
        raise
    return journal, sink


@dataclass
class App:
    config: Config
    metrics: Metrics = field(default_factory=Metrics)
    journal: Journal | None = None
    sink: Sink | None = None
    mllp: MllpServer | None = None
    ops: OpsServer | None = None
    delivery: Delivery | DeliveryWorker | None = None
    intake: Intake | None = None
    committer: GroupCommitter | None = None
    _probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cfg = self.config
        mapper = build_mapper(cfg)
        # Threads share this process's GIL with the event loop (the journal's appender and indexer, and the
        # workers themselves with `delivery.worker: in_process`); with the default 5 ms switch interval a
        # busy one delays every ACK by up to 5 ms at a time. 0.5 ms keeps ACK latency flat.
        sys.setswitchinterval(0.0005)
        # In-process workers apply through this pool, a lane per thread: size it so lanes never queue.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=cfg.delivery.lanes + 8, thread_name_prefix="hl7bridge"))
        self.journal, self.sink = await asyncio.to_thread(open_stores, cfg, intake=True)
        self.committer = GroupCommitter(self.journal, timedelta(hours=cfg.intake.dedup_window_hours))
        if cfg.delivery.worker == "process":
            worker = DeliveryWorker(cfg, self.metrics, report_settled=cfg.intake.ack_mode == "after_apply")
            await worker.start()
            if hasattr(self.journal, "on_indexed"):
                # The log-backed journal makes entries visible to the worker's process once indexed.
                self.journal.on_indexed = worker.wake_threadsafe(asyncio.get_running_loop())
            self.delivery = worker
        else:
            delivery = Delivery(self.journal, self.sink, mapper, self.metrics, delivery_policy(cfg))
            delivery.start()
            self.delivery = delivery
        self.intake = Intake(
            self.committer, self.metrics,
            policy=mapper.patient_policy, supported=DEFAULT_SUPPORTED,
            accept_unsupported=cfg.intake.accept_unsupported, default_charset=cfg.intake.default_charset,
            ack_mode=cfg.intake.ack_mode, after_apply_timeout=cfg.intake.after_apply_timeout,
            waiter=self.delivery, on_pending=self.delivery.wake, validation=cfg.intake.validation,
        )
        lc = cfg.listener
        self.mllp = MllpServer(
            self._handle, host=lc.host, port=lc.port, max_connections=lc.max_connections,
            idle_timeout=lc.idle_timeout, frame_timeout=lc.frame_timeout, max_frame_bytes=lc.max_frame_bytes,
            require_trailing_cr=lc.require_trailing_cr, ack_write_timeout=lc.ack_write_timeout,
            ssl=self._tls(), error_responder=_error_ack, events=self.metrics,
        )
        await self.mllp.start()
        self.metrics.set_up("listener", True)
        reconcile_file = cfg.store.data_dir / "reconcile.prom"
        self.ops = OpsServer(self.metrics, host=cfg.ops.host, port=cfg.ops.port, checks={
            "listener": self._check_listener, "journal": self._check_journal, "sink": self._check_sink,
            "delivery": self._check_delivery,
        }, before_scrape=lambda: self.metrics.load_reconcile_file(reconcile_file))
        await self.ops.start()
        self._probe = asyncio.create_task(self._probe_components(), name="component-probe")
        log.info("hl7bridge listening: mllp=%s:%d http=%s:%d journal=%s crm=%s ack_mode=%s",
                 lc.host, self.mllp.port, cfg.ops.host, self.ops.port,
                 _redact_url(cfg.store.journal_location()), crm_description(cfg),
                 cfg.intake.ack_mode)

    async def _handle(self, payload: bytes, conn: ConnectionInfo) -> bytes:
        assert self.intake is not None
        outcome = await self.intake.handle(payload, conn.peer)
        return outcome.payload

    def _tls(self) -> ssl.SSLContext | None:
        lc = self.config.listener
        if lc.tls_cert is None or lc.tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(lc.tls_cert), str(lc.tls_key))
        return ctx

    async def _check_listener(self) -> None:
        if self.mllp is None or not self.mllp.serving:
            raise RuntimeError("MLLP listener is not accepting connections")

    async def _check_journal(self) -> None:
        assert self.journal is not None
        await asyncio.to_thread(self.journal.ping)

    async def _check_delivery(self) -> None:
        if isinstance(self.delivery, DeliveryWorker) and not self.delivery.alive:
            raise RuntimeError("the delivery worker process is not running (restarting)")

    async def _check_sink(self) -> None:
        assert self.sink is not None
        await asyncio.to_thread(self.sink.ping)

    async def _probe_components(self) -> None:
        """Keep the component_up gauges current even when nobody polls /readyz (alerts rely on them)."""
        assert self.ops is not None
        while True:
            with contextlib.suppress(Exception):
                failing = await self.ops.readiness()
                if any(failing.values()):
                    log.warning("not ready: %s", ", ".join(k for k, v in failing.items() if v))
            await asyncio.sleep(10.0)

    async def stop(self, grace: float = 10.0) -> None:
        log.info("shutting down: finishing messages in flight")
        if self._probe is not None:
            self._probe.cancel()
        if self.mllp is not None:
            await self.mllp.stop(grace)
            self.metrics.set_up("listener", False)
        if self.committer is not None:
            await self.committer.drain()
        if self.delivery is not None:
            await self.delivery.stop(grace)
        if self.ops is not None:
            await self.ops.stop()
        for closer in (self.journal, self.sink):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(closer.close)
        log.info("stopped")

    async def serve_forever(self) -> None:
        """Start, then run until SIGTERM or SIGINT, then drain."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()


def _error_ack(payload: bytes, exc: BaseException) -> bytes:
    """A handler bug becomes an AR with ERR-3 207 for that message, never a dead listener."""
    err = UnreadableMessage(f"internal error while handling the message ({type(exc).__name__})",
                            err_code=ErrCode.INTERNAL)
    return build_ack(best_effort_envelope(payload), AckCode.AR, error=err).encode("utf-8", "replace")


def _redact_url(url: str) -> str:
    """Never log a database password."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"
    return url


def run(config: Config) -> None:
    """Run the bridge in this process until a signal (uses uvloop when installed)."""
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is optional
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(App(config).serve_forever())
