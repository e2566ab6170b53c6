"""Splitting files and captures into single messages, for `send`, `replay` and tests.

Works on bytes and never decodes: one file can hold messages in different charsets (each names its own
in MSH-18), and \\r / \\n never occur inside a multi-byte character of any charset HL7 v2 uses over MLLP.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["read_paths", "split_messages"]

_VT = b"\x0b"
_FS = b"\x1c"
_BOM = b"\xef\xbb\xbf"
#: Batch/file envelope segments: FHS/FTS wrap a file, BHS/BTS a batch. They are not messages.
_ENVELOPE_SEGMENTS = (b"FHS", b"BHS", b"BTS", b"FTS")


def _chunks(data: bytes) -> Iterator[bytes]:
    """MLLP frame payloads (\\x0b ... \\x1c\\r) and the bytes around them, in order."""
    pos = 0
    while pos < len(data):
        start = data.find(_VT, pos)
        if start < 0:
            yield data[pos:]
            return
        yield data[pos:start]
        end = data.find(_FS, start + 1)
        if end < 0:  # truncated capture: keep the partial frame rather than drop it
            yield data[start + 1 :]
            return
        yield data[start + 1 : end]
        pos = end + 1


def _split_chunk(chunk: bytes, out: list[bytes]) -> None:
    current: list[bytes] = []

    def flush() -> None:
        if current:
            out.append(b"\r".join(current) + b"\r")
            current.clear()

    for raw_line in chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        line = raw_line.lstrip(b" \t")
        if not line.strip():
            continue
        head = line[:3]
        if head in _ENVELOPE_SEGMENTS:
            flush()
        elif head == b"MSH":
            flush()
            current.append(line)
        else:
            # A segment outside any message (junk before the first MSH, or after a BTS) is kept as its
            # own entry rather than dropped, so whoever sends or replays it sees it rejected.
            current.append(line)
    flush()


def split_messages(data: bytes) -> list[bytes]:
    """Every message in `data`: one message, several, FHS/BHS batches, or an MLLP capture.

    Each returned message has \\r segment terminators (a trailing one included) and its original bytes
    otherwise. Batch envelope segments (FHS, BHS, BTS, FTS) are dropped. Content that is not inside an
    MSH-headed message is returned as its own entry (it does not start with b"MSH"), never dropped.
    """
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    out: list[bytes] = []
    for chunk in _chunks(data) if _VT in data else (data,):
        if chunk.strip():
            _split_chunk(chunk, out)
    return out


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.iterdir()):
            # Symlinked directories are not followed: a link loop would never end.
            if child.name.startswith(".") or (child.is_symlink() and child.is_dir()):
                continue
            yield from _files(child)
    else:
        yield path


def read_paths(paths: Sequence[Path]) -> Iterator[tuple[Path, int, bytes]]:
    """(file, index in file starting at 0, message) for every message in the files and directories given.

    Directories are walked recursively in sorted order, skipping hidden files and directories and not
    following symlinked directories. A path named explicitly is read even if hidden. A missing path
    raises FileNotFoundError.
    """
    for path in paths:
        for file in _files(Path(path)):
            for index, message in enumerate(split_messages(file.read_bytes())):
                yield file, index, message
