"""MLLP: the sans-I/O framer (`framer`) and its asyncio drivers (`server`, `client`).

The framer names are imported eagerly. The server and client names are loaded on first use (PEP 562), so
importing the framer alone never pulls in asyncio: the framing layer stays I/O-free as the architecture
requires, while ``from hl7bridge.mllp import MllpServer`` still works.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hl7bridge.mllp.framer import (
    Event,
    Frame,
    FrameTooLarge,
    JunkDiscarded,
    MissingTrailingCr,
    MllpFramer,
    TruncatedFrame,
    encode_frame,
)

if TYPE_CHECKING:
    from hl7bridge.mllp.client import MllpClient, MllpClientError, send_sync
    from hl7bridge.mllp.server import ConnectionInfo, ErrorResponder, Handler, MllpServer, ServerEvents

__all__ = [
    "ConnectionInfo",
    "ErrorResponder",
    "Event",
    "Frame",
    "FrameTooLarge",
    "Handler",
    "JunkDiscarded",
    "MissingTrailingCr",
    "MllpClient",
    "MllpClientError",
    "MllpFramer",
    "MllpServer",
    "ServerEvents",
    "TruncatedFrame",
    "encode_frame",
    "send_sync",
]

_LAZY = {
    "ConnectionInfo": "server",
    "ErrorResponder": "server",
    "Handler": "server",
    "MllpServer": "server",
    "ServerEvents": "server",
    "MllpClient": "client",
    "MllpClientError": "client",
    "send_sync": "client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
