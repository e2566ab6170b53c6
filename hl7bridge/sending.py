"""Sending messages to an MLLP listener (the `send` and `replay --to` commands)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hl7bridge.hl7.ack import parse_ack_with_text
from hl7bridge.hl7.batch import read_paths
from hl7bridge.hl7.envelope import best_effort_envelope
from hl7bridge.mllp.client import MllpClient

__all__ = ["SendResult", "send_files", "send_payloads"]


@dataclass(frozen=True, slots=True)
class SendResult:
    file: str
    index: int
    control_id: str
    code: str  # MSA-1, or "NO_ACK" when the connection failed
    acked_control_id: str
    err_code: str
    text: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def send_payloads(host: str, port: int, items: Sequence[tuple[str, int, bytes]], *, timeout: float = 30.0,
                        on_result: Callable[[SendResult], None] | None = None) -> list[SendResult]:
    """Send one at a time on one connection (MLLP is strictly request/reply); reconnect after a drop."""
    results: list[SendResult] = []
    client: MllpClient | None = None
    try:
        for name, index, raw in items:
            env = best_effort_envelope(raw)
            control_id = env.control_id if env else ""
            try:
                if client is None:
                    client = await MllpClient.connect(host, port, timeout=timeout)
                ack = await client.send(raw, timeout=timeout)
                code, acked, err, text = parse_ack_with_text(ack.decode("utf-8", "replace"))
            except Exception as exc:
                if client is not None:
                    await client.close()
                client = None
                code, acked, err, text = "NO_ACK", "", "", f"{type(exc).__name__}: {exc}"
            result = SendResult(name, index, control_id, code, acked, err, text)
            results.append(result)
            if on_result:
                on_result(result)
    finally:
        if client is not None:
            await client.close()
    return results


async def send_files(host: str, port: int, files: Sequence[Path], *, timeout: float = 30.0,
                     on_result: Callable[[SendResult], None] | None = None) -> list[SendResult]:
    items = [(str(path), index, raw) for path, index, raw in read_paths(list(files))]
    return await send_payloads(host, port, items, timeout=timeout, on_result=on_result)
