"""The cheap per-message log path: lines come out exactly as the stdlib would write them, none is lost at
exit or when a loop ends, lines logged on the loop are written together right after, and WARNING or worse
is written at once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from hl7bridge.logs import BufferedStreamHandler, JsonFormatter, RecordEmitter, setup_logging

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MSG = "message journal_id=%s control_id=%s type=%s outcome=%s ack=%s%s"


@pytest.fixture
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _records() -> list[logging.LogRecord]:
    made = []
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0005, 1_763_950_000.123456):
        record = logging.LogRecord("hl7bridge.intake", logging.INFO, __file__, 1, MSG,
                                   (7, "C1", "ADT^A04", "accepted", "AA", ""), None, "f")
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        record.journal_id = 7
        made.append(record)
    made.append(logging.LogRecord("hl7bridge.mllp", logging.WARNING, __file__, 1, "closing (%s)", ("x",), None))
    return made


def test_plain_lines_are_what_the_stdlib_formatter_writes(root_restored: None) -> None:
    setup_logging("INFO")
    ours = logging.getLogger().handlers[0]
    reference = logging.Formatter(PLAIN)
    for record in _records():
        assert ours.format(record) == reference.format(record)


def test_plain_lines_with_an_exception_show_its_type_only(root_restored: None) -> None:
    setup_logging("INFO")
    ours = logging.getLogger().handlers[0]
    try:
        raise ValueError("Doe^Jane 4711")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = ours.format(record)
    assert text.startswith(logging.Formatter(PLAIN).format(_without_exc(record)))
    assert "ValueError at " in text and "Doe" not in text


def _without_exc(record: logging.LogRecord) -> logging.LogRecord:
    copy = logging.makeLogRecord(vars(record))
    copy.exc_info = copy.exc_text = None
    return copy


def test_json_lines_are_unchanged(root_restored: None) -> None:
    setup_logging("INFO", json_format=True)
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, BufferedStreamHandler) and isinstance(handler.formatter, JsonFormatter)
    handler.setStream(stream)
    emitter = RecordEmitter(logging.getLogger("hl7bridge.intake"), logging.INFO)
    emitter(MSG, (3, "C9", "ADT^A08", "accepted", "AA", ""), {"journal_id": 3, "outcome": "accepted", "ack": "AA"})
    handler.flush()
    line = json.loads(stream.getvalue())
    assert line["msg"] == "message journal_id=3 control_id=C9 type=ADT^A08 outcome=accepted ack=AA"
    assert (line["journal_id"], line["outcome"], line["ack"], line["level"]) == (3, "accepted", "AA", "info")


def test_the_emitter_makes_the_record_logger_info_would(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("hl7bridge.intake")
    emitter = RecordEmitter(log, logging.INFO)
    extra = {"journal_id": 5, "outcome": "accepted", "ack": "CA"}
    args = (5, "C5", "ADT^A04", "accepted", "CA", "")
    with caplog.at_level(logging.INFO):
        emitter(MSG, args, extra)
        log.info(MSG, *args, extra=extra)  # same function as the emitter call, so the same caller
    fast, slow = caplog.records
    varying = {"created", "msecs", "relativeCreated", "lineno"}
    assert {k: v for k, v in vars(fast).items() if k not in varying} == {
        k: v for k, v in vars(slow).items() if k not in varying}
    assert list(vars(fast)) == list(vars(slow))  # same attributes in the same order (JSON field order)
    assert fast.funcName == "test_the_emitter_makes_the_record_logger_info_would"
    assert fast.lineno == slow.lineno - 1
    assert fast.getMessage() == "message journal_id=5 control_id=C5 type=ADT^A04 outcome=accepted ack=CA"


def test_the_emitter_honours_level_disabled_and_filters(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("hl7bridge.fastpath-test")
    emitter = RecordEmitter(log, logging.INFO)
    with caplog.at_level(logging.WARNING):
        emitter("quiet %s", (1,), {})
    assert caplog.records == []
    with caplog.at_level(logging.INFO):
        log.disabled = True
        try:
            emitter("off %s", (2,), {})
        finally:
            log.disabled = False
        drop = logging.Filter("elsewhere")
        log.addFilter(drop)
        try:
            emitter("filtered %s", (3,), {})
        finally:
            log.removeFilter(drop)
        emitter("shown %s", (4,), {})
        with pytest.raises(KeyError):  # as Logger.makeRecord
            emitter("x", (), {"message": "clash"})
    assert [r.getMessage() for r in caplog.records] == ["shown 4"]


def test_a_custom_record_factory_is_still_used(caplog: pytest.LogCaptureFixture) -> None:
    default = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = default(*args, **kwargs)  # type: ignore[arg-type]
        record.tagged = True
        return record

    logging.setLogRecordFactory(factory)
    try:
        with caplog.at_level(logging.INFO):
            RecordEmitter(logging.getLogger("hl7bridge.intake"), logging.INFO)("m %s", (1,), {"ack": "AA"})
    finally:
        logging.setLogRecordFactory(default)
    (record,) = caplog.records
    assert record.tagged and record.ack == "AA"  # type: ignore[attr-defined]
    assert record.funcName == "test_a_custom_record_factory_is_still_used"


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def buffered_log() -> Iterator[tuple[logging.Logger, CountingStream]]:
    stream = CountingStream()
    handler = BufferedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("hl7bridge.fastpath-buffer")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, stream
    log.removeHandler(handler)
    log.propagate = True
    handler.close()


async def test_lines_logged_in_one_loop_iteration_are_written_together_right_after(
    buffered_log: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = buffered_log
    for i in range(10):
        log.info("line %d", i)
    assert stream.writes == 0  # kept while the current callback runs ...
    deadline = time.monotonic() + 5.0
    while not stream.getvalue():
        assert time.monotonic() < deadline, "buffered lines never written"
        await asyncio.sleep(0)
    assert stream.writes == 1  # ... then written with one call, in order
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(10)]


async def test_a_warning_is_written_at_once_after_what_came_before(
    buffered_log: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = buffered_log
    log.info("first")
    log.info("second")
    log.warning("third")
    assert stream.getvalue().splitlines() == ["first", "second", "third"]
    log.info("fourth")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.getvalue().splitlines() == ["first", "second", "third", "fourth"]


def test_lines_logged_as_a_loop_ends_are_written_when_asyncio_run_returns(
    buffered_log: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = buffered_log

    async def last_words() -> None:
        log.info("stopping")
        log.info("stopped")

    asyncio.run(last_words())
    assert stream.getvalue().splitlines() == ["stopping", "stopped"]

    async def crash() -> None:
        log.info("about to fail")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        asyncio.run(crash())
    assert stream.getvalue().splitlines()[-1] == "about to fail"  # before the caller reports the failure


async def test_a_positive_interval_delays_the_write_by_about_that_long() -> None:
    stream = CountingStream()
    handler = BufferedStreamHandler(stream, interval=0.05)
    handler.setFormatter(logging.Formatter("%(message)s"))
    started = time.monotonic()
    handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "later", (), None))
    assert stream.writes == 0
    deadline = started + 5.0
    while not stream.getvalue():
        assert time.monotonic() < deadline, "buffered line never written"
        await asyncio.sleep(0.01)
    assert stream.getvalue() == "later\n" and time.monotonic() - started >= 0.04
    handler.close()


def test_a_line_logged_outside_an_event_loop_is_written_at_once() -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "now", (), None))
    assert stream.getvalue() == "now\n"
    handler.close()


async def test_a_full_buffer_is_written_before_the_interval() -> None:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, interval=3600.0, max_chars=1000)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for i in range(200):
        handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "line %03d", (i,), None))
    written = stream.getvalue().splitlines()
    assert len(written) >= 100 and written == [f"line {i:03d}" for i in range(len(written))]  # 1000 chars: ~111
    handler.close()  # writes the rest
    assert stream.getvalue().splitlines() == [f"line {i:03d}" for i in range(200)]


_EXIT_SCRIPT = """
import asyncio, logging, sys
from hl7bridge.logs import RecordEmitter, setup_logging
setup_logging("INFO", json_format=sys.argv[1] == "json")
emit = RecordEmitter(logging.getLogger("hl7bridge.intake"), logging.INFO)

async def main():
    for i in range(500):
        emit("message journal_id=%s outcome=%s", (i, "accepted"), {"journal_id": i})
    logging.getLogger("hl7bridge.app").info("stopped")

asyncio.run(main())
"""


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_nothing_buffered_is_lost_when_the_process_exits(fmt: str) -> None:
    done = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, fmt], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 501
    assert [f"journal_id={i} " in line or f'"journal_id": {i}' in line for i, line in enumerate(lines[:500])] == [
        True] * 500
    assert "stopped" in lines[-1]
