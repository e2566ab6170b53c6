"""Logging setup: plain or JSON lines, PHI-free by default.

Message content is logged only at DEBUG and only when `log_phi` is switched on explicitly; every INFO line
names journal ID, control ID, type and outcome — never names, MRNs or whole messages.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["PHI_LOGGING", "setup_logging"]

#: Read by the few places that may log message content at DEBUG (set from `logging.log_phi`).
PHI_LOGGING = {"enabled": False}

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


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


class _NoTracebackValues(logging.Formatter):
    """Tracebacks can quote message content through exception arguments; show the type and location only."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 (stdlib name)
        exc_type, _, tb = ei
        where = ""
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        return f"  {exc_type.__name__}{where}"


def setup_logging(level: str = "INFO", json_format: bool = False, log_phi: bool = False) -> None:
    PHI_LOGGING["enabled"] = log_phi
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt) if log_phi else _NoTracebackValues(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
