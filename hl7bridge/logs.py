"""Logging setup: plain or JSON lines, PHI-free by default.

Message content is logged only at DEBUG and only when `log_phi` is switched on explicitly; every INFO line
names journal ID, control ID, type and outcome — never names, MRNs or whole messages.

Intake logs one INFO line per message, so the per-line cost is on the ACK path. Two things keep it small:
`RecordEmitter` builds that line's `LogRecord` from a template instead of walking the stack and running
the generic record constructor, and the stream handler `setup_logging` installs collects the lines logged
during one event-loop iteration and writes them with one system call at the start of the next (under
load, one iteration answers a whole group commit's worth of messages). WARNING and above, lines logged
from other threads, and everything pending at exit (`logging.shutdown` flushes every handler) are
written at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

__all__ = ["FLUSH_INTERVAL", "PHI_LOGGING", "BufferedStreamHandler", "RecordEmitter", "setup_logging"]

#: Read by the few places that may log message content at DEBUG (set from `logging.log_phi`).
PHI_LOGGING = {"enabled": False}

#: How long a line logged on the event loop may wait in the buffer, in seconds: 0 means until the loop's
#: next iteration (no timer: the ready queue runs the write right after the current callbacks).
FLUSH_INTERVAL = 0.0
#: Buffered characters that force a write before the interval is up.
_FLUSH_CHARS = 64 * 1024

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CachedTimeFormatter(logging.Formatter):
    """`Formatter` with the same output, but ``%(asctime)s`` is strftime'd once per second, not per line,
    and a plain line in hl7bridge's own format is assembled directly (no %-mapping of the record)."""

    _second_cache: tuple[int, str] = (-1, "")

    def __init__(self, fmt: str = _PLAIN_FORMAT) -> None:
        super().__init__(fmt)
        self._plain = fmt == _PLAIN_FORMAT

    def format(self, record: logging.LogRecord) -> str:
        if not self._plain or record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # What Formatter.format does for this format, side effects on the record included.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name}: {record.message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (stdlib)
        if datefmt or self.converter is not time.localtime or not self.default_msec_format:
            return super().formatTime(record, datefmt)
        second = int(record.created)  # what localtime() truncates it to, for any time after 1970
        cache = self._second_cache
        if cache[0] != second:
            cache = (second, time.strftime(self.default_time_format, time.localtime(second)))
            self._second_cache = cache
        return self.default_msec_format % (cache[1], record.msecs)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str)


class _NoTracebackValues(_CachedTimeFormatter):
    """Tracebacks can quote message content through exception arguments; show the type and location only."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 (stdlib name)
        exc_type, _, tb = ei
        where = ""
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        return f"  {exc_type.__name__}{where}"


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A `StreamHandler` (same lines, same order) that batches the writes of lines logged on an event loop.

    A line logged while an event loop runs in the calling thread is formatted at once and kept; the
    loop writes the batch at its next iteration (or `interval` seconds later, if positive). Any WARNING
    or worse, a line logged with no running loop (worker threads, CLI code), a full buffer, `flush()`
    and `close()` write everything pending first, so lines never reorder and `logging.shutdown` at exit
    loses nothing. asyncio.run and asyncio.Runner run the loop once more while closing it, so lines
    logged just before a loop ends are written before it is closed.
    """

    def __init__(self, stream: IO[str] | None = None, interval: float = FLUSH_INTERVAL,
                 max_chars: int = _FLUSH_CHARS) -> None:
        super().__init__(stream)
        self.interval = interval
        self.max_chars = max_chars
        self._lines: list[str] = []
        self._chars = 0
        self._last: logging.LogRecord | None = None  # for handleError if a batched write fails
        self._scheduled: asyncio.Handle | None = None
        self._scheduled_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        self._chars += len(line)
        self._last = record
        if record.levelno >= logging.WARNING or self._chars >= self.max_chars:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop here to write it later: write now, as StreamHandler does
            return
        if self._scheduled is None or self._scheduled_loop is not loop:
            # The first line of a batch (or a new loop: a callback on a closed loop would never run).
            self._scheduled_loop = loop
            if self.interval > 0:
                self._scheduled = loop.call_later(self.interval, self._flush_from_loop)
            else:
                self._scheduled = loop.call_soon(self._flush_from_loop)

    def _flush_from_loop(self) -> None:
        self.acquire()
        try:
            self._scheduled = None
            self.flush()
        finally:
            self.release()

    def flush(self) -> None:
        self.acquire()
        try:
            lines = self._lines
            if lines:
                self._lines = []
                self._chars = 0
                try:
                    self.stream.write(lines[0] if len(lines) == 1 else "".join(lines))
                except RecursionError:
                    raise
                except Exception:
                    if self._last is not None:
                        self.handleError(self._last)
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
        finally:
            self.release()

    def close(self) -> None:
        # A write still scheduled on a loop finds nothing left to write: no need to cancel it (the loop
        # may be closed already, at exit).
        self.acquire()
        try:
            try:
                self.flush()
            except (OSError, ValueError):
                pass  # the stream is already gone (interpreter shutdown)
        finally:
            self.release()
            super().close()


#: The template copy mirrors Python 3.11's LogRecord.__init__ (3.12 adds taskName, 3.13 times in ns);
#: other versions take the plain path.
_TEMPLATE_RECORDS = sys.version_info[:2] == (3, 11)
_forks = [0]  # bumped in a forked child: RecordEmitter templates hold the pid
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class RecordEmitter:
    """Logs one fixed line shape, from one call site, at one level, for a fraction of `Logger.info`'s cost.

    `Logger.info` walks the stack to find its caller and builds the record attribute by attribute; for
    the per-message intake line both are the same every time, so the record is copied from a template
    made once per thread (by the real `LogRecord` constructor, with the caller's file, line and function
    taken from the first call) and only the time, message, arguments and `extra` are filled in. Levels,
    `disabled`, filters, handlers and propagation behave exactly as for `logger.log(...)`. A custom record
    factory (`logging.setLogRecordFactory`), or a Python other than 3.11, falls back to the plain call.
    """

    __slots__ = ("_caller", "_level", "_logger", "_template")

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger = logger
        self._level = level
        self._caller: tuple[str, int, str] | None = None
        # ((thread, fork count, second), record attributes) — replaced as a whole, so threads never mix them.
        self._template: tuple[tuple[int, int, int], dict[str, Any]] = ((-1, -1, -1), {})

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(self._level)

    def __call__(self, msg: str, args: tuple[object, ...], extra: Mapping[str, object]) -> None:
        logger = self._logger
        if not logger.isEnabledFor(self._level):
            return
        if not _TEMPLATE_RECORDS or logging.getLogRecordFactory() is not logging.LogRecord:
            logger.log(self._level, msg, *args, extra=extra, stacklevel=2)
            return
        if self._caller is None:
            code = sys._getframe(1)
            self._caller = (code.f_code.co_filename, code.f_lineno, code.f_code.co_name)
        created = time.time()
        # Thread and process names are re-read at least once a second (a renamed thread), and at once
        # in a forked child (its pid).
        key = (threading.get_ident(), _forks[0], int(created))
        template = self._template
        if template[0] != key:
            path, line, func = self._caller
            template = self._template = (
                key, vars(logging.LogRecord(logger.name, self._level, path, line, "", (), None, func)))
        record = logging.LogRecord.__new__(logging.LogRecord)
        attrs = record.__dict__
        attrs.update(template[1])
        # As LogRecord.__init__ computes them (Python 3.11).
        attrs["created"] = created
        attrs["msecs"] = int((created - int(created)) * 1000) + 0.0
        attrs["relativeCreated"] = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
        attrs["msg"] = msg
        attrs["args"] = args
        for name, value in extra.items():
            if name in ("message", "asctime") or name in attrs:
                raise KeyError(f"Attempt to overwrite {name!r} in LogRecord")
            attrs[name] = value
        logger.handle(record)


def setup_logging(level: str = "INFO", json_format: bool = False, log_phi: bool = False) -> None:
    PHI_LOGGING["enabled"] = log_phi
    handler = BufferedStreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_CachedTimeFormatter() if log_phi else _NoTracebackValues())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BufferedStreamHandler):
            old.flush()  # nothing it holds may be lost, or come out after the new handler's lines
    root.handlers[:] = [handler]
    root.setLevel(level)
