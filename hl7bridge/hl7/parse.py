"""Reading HL7 v2 text: charsets (MSH-18), segment terminators, separators, escapes, the full parse.

No I/O. Every failure is an `errors.UnreadableMessage` whose reason names the problem, never a value
from the message (python-hl7's own exceptions quote segment text, so they are never passed on).
"""

from __future__ import annotations

import codecs
from functools import lru_cache

import hl7

from hl7bridge.errors import UnreadableMessage

__all__ = [
    "DEFAULT_ENCODING_CHARS",
    "DEFAULT_FIELD_SEP",
    "codec_for",
    "decode",
    "encode",
    "escape",
    "normalise_segments",
    "parse_message",
    "read_separators",
    "sniff_charset",
    "unescape",
]

DEFAULT_FIELD_SEP = "|"
DEFAULT_ENCODING_CHARS = "^~\\&"
_DEFAULT_MSH = "MSH|^~\\&|"
_UTF8_BOM = b"\xef\xbb\xbf"

#: HL7 table 0211 (MSH-18) → Python codec. Keys are upper-cased with spaces/underscores collapsed.
#: A few non-standard spellings real feeds send ("ISO-8859-1", "UTF8", "CP1252") are accepted too.
_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "US-ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO-8859-1": "latin-1",
    "ISO8859-1": "latin-1",
    "LATIN1": "latin-1",
    "LATIN-1": "latin-1",
    "ISO-8859-15": "iso8859-15",
    "CP1252": "cp1252",
    "WINDOWS-1252": "cp1252",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    # Plain "UNICODE" (pre-2.5) never said which encoding form; in practice senders mean UTF-8.
    "UNICODE": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc-kr",
}


def _label_key(label: str) -> str:
    return " ".join(label.replace("_", " ").split()).upper()


@lru_cache(maxsize=256)  # a feed sends the same few labels over and over; this is on the ACK path
def codec_for(charset_field: str, default_charset: str = "utf-8") -> str:
    """The Python codec for an MSH-18 value; empty or unknown values fall back to `default_charset`.

    `default_charset` may itself be an HL7 label ("8859/1") or a Python codec name ("cp1252").
    """
    codec = _CHARSETS.get(_label_key(charset_field)) if charset_field else None
    if codec is not None:
        return codec
    codec = _CHARSETS.get(_label_key(default_charset))
    if codec is not None:
        return codec
    try:
        info = codecs.lookup(default_charset)
    except LookupError:
        return "utf-8"
    # Refuse bytes-to-bytes codecs (zlib, base64, ...) a misconfiguration could name.
    return info.name if getattr(info, "_is_text_encoding", True) else "utf-8"


def decode(raw: bytes, charset_field: str, default_charset: str = "utf-8") -> str:
    """Decode a message payload with the codec MSH-18 names (or the default).

    Strict: bytes that are not valid in the declared charset raise UnreadableMessage (AR, ERR 102)
    rather than being silently replaced, because a mangled name would then flow into the CRM.
    """
    codec = codec_for(charset_field, default_charset)
    if codec == "utf-8" and raw.startswith(_UTF8_BOM):
        # A byte-order mark is noise before MSH. (Not the utf-8-sig codec: it is pure Python, 6x slower.)
        raw = raw[len(_UTF8_BOM) :]
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        label = charset_field.strip() or codec
        raise UnreadableMessage(f"payload is not valid {label}", location="MSH-18") from None


def encode(text: str, charset_field: str, default_charset: str = "utf-8") -> bytes:
    """Encode outbound text (an ACK) in the charset of the message it answers. Never raises:
    characters the charset cannot hold become "?" (an ACK must always go out)."""
    codec = codec_for(charset_field, default_charset)
    return text.encode(codec, errors="replace")


def sniff_charset(raw: bytes) -> str:
    """MSH-18 (first repetition) read straight from the bytes, or "" when absent or unreadable.

    MSH is ASCII in every charset HL7 allows for v2 over MLLP, so it can be read before the payload's
    codec is known.
    """
    start = raw.find(b"MSH", 0, 20)
    if start < 0 or len(raw) < start + 8:
        return ""
    end = raw.find(b"\r", start)
    newline = raw.find(b"\n", start, end if end >= 0 else len(raw))
    if newline >= 0:
        end = newline
    msh = raw[start:end] if end >= 0 else raw[start:]
    if len(msh) < 8:
        return ""
    fields = msh.split(msh[3:4])
    if len(fields) < 18 or len(fields[1]) < 2:
        return ""
    return fields[17].split(fields[1][1:2], 1)[0].strip().decode("latin-1")


def normalise_segments(text: str) -> str:
    """Make every segment terminator a single \\r and drop empty segments (blank lines, trailing \\r).

    Feeds and files use \\r, \\n or \\r\\n; HL7 says \\r. Blank segments carry nothing and make
    python-hl7 build empty segments, so they go.
    """
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    text = text.rstrip("\r")
    # Fast path: nothing else to drop (the common case for MLLP frames).
    if "\r\r" not in text and not text[:1].isspace() and not text[-1:].isspace():
        return text
    return "\r".join(seg for seg in text.split("\r") if seg.strip())


def read_separators(text: str) -> tuple[str, str]:
    """(field separator, encoding characters) from a text starting with MSH, validated.

    Raises UnreadableMessage when there is no MSH at the start or the separators are unusable:
    MSH-1 alphanumeric or whitespace, fewer than 4 or more than 5 encoding characters (the 5th is the
    v2.7 truncation character), or any character repeated.
    """
    if text.startswith(_DEFAULT_MSH):  # fast path: the separators nearly every feed uses
        return DEFAULT_FIELD_SEP, DEFAULT_ENCODING_CHARS
    if not text.startswith("MSH"):
        raise UnreadableMessage("message does not start with an MSH segment", location="MSH")
    if len(text) < 5:
        raise UnreadableMessage("MSH segment is truncated", location="MSH-1")
    field_sep = text[3]
    if field_sep.isalnum() or field_sep.isspace():
        raise UnreadableMessage("MSH-1 field separator is not a valid separator", location="MSH-1")
    end = text.find(field_sep, 4)
    if end < 0:
        raise UnreadableMessage("MSH-2 encoding characters are not terminated", location="MSH-2")
    enc = text[4:end]
    if not 4 <= len(enc) <= 5:
        raise UnreadableMessage("MSH-2 must hold 4 encoding characters", location="MSH-2")
    chars = field_sep + enc
    if len(set(chars)) != len(chars) or any(c.isalnum() or c.isspace() for c in enc):
        raise UnreadableMessage("MSH-2 encoding characters are invalid or repeated", location="MSH-2")
    return field_sep, enc


def parse_message(raw: bytes | str, default_charset: str = "utf-8") -> hl7.Message:
    """The full python-hl7 parse of one message: decode (MSH-18), normalise terminators, check separators."""
    text = decode(raw, sniff_charset(raw), default_charset) if isinstance(raw, bytes) else raw
    text = normalise_segments(text)
    read_separators(text)
    try:
        return hl7.parse(text)
    except Exception:  # python-hl7 raises assorted errors, and its messages quote message text (PHI)
        raise UnreadableMessage("message could not be parsed", location="MSH") from None


# --- escape sequences (HL7 v2.5 §2.7) -------------------------------------------------------------
#
# python-hl7's Message.unescape is not used: it decodes \X..\ one byte per character (so UTF-8 hex
# escapes come out as mojibake), maps \.br\ to \r (a segment terminator), and logs field values
# (PHI) through the deprecated Logger.warn on malformed input.


def _hex_bytes(hexdigits: str, charset: str) -> str | None:
    try:
        data = bytes.fromhex(hexdigits)
    except ValueError:
        return None
    for codec in (charset, "latin-1"):
        try:
            return data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    return None  # pragma: no cover - latin-1 decodes anything


def unescape(value: str, encoding_chars: str, field_sep: str, charset: str = "utf-8") -> str:
    """Decode HL7 escape sequences in one field/component value.

    \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ (and \\P\\, the v2.7 truncation character) become the separator
    characters; \\.br\\ and \\.sp\\ become "\\n" (the value is leaving HL7, where \\r would be a segment
    terminator); \\Xhh..\\ is hex bytes decoded with `charset` (a Python codec; latin-1 if invalid);
    highlighting (\\H\\ \\N\\) and other formatting commands are dropped; character-set switches
    (\\C..\\, \\M..\\) are dropped. Unknown or unterminated sequences are kept verbatim (no data lost).
    """
    esc = encoding_chars[2] if len(encoding_chars) > 2 else "\\"
    if esc not in value:
        return value
    singles = {
        "F": field_sep,
        "S": encoding_chars[0],
        "R": encoding_chars[1],
        "E": esc,
        "T": encoding_chars[3] if len(encoding_chars) > 3 else "&",
    }
    if len(encoding_chars) > 4:
        singles["P"] = encoding_chars[4]
    out: list[str] = []
    pos = 0
    length = len(value)
    while pos < length:
        start = value.find(esc, pos)
        if start < 0:
            out.append(value[pos:])
            break
        out.append(value[pos:start])
        end = value.find(esc, start + 1)
        if end < 0:  # unterminated: keep the rest as text
            out.append(value[start:])
            break
        seq = value[start + 1 : end]
        out.append(_decode_sequence(seq, singles, charset, value[start : end + 1]))
        pos = end + 1
    return "".join(out)


def _decode_sequence(seq: str, singles: dict[str, str], charset: str, verbatim: str) -> str:
    if seq in singles:
        return singles[seq]
    if seq in ("H", "N"):
        return ""
    head = seq[:1]
    if head == "X":
        decoded = _hex_bytes(seq[1:], charset)
        return verbatim if decoded is None else decoded
    if head in ("C", "M", "Z"):
        return ""
    if seq.startswith(".br"):
        return "\n"
    if seq.startswith(".sp"):
        count = seq[3:].strip().lstrip("+")
        return "\n" * (int(count) if count.isascii() and count.isdigit() else 1)
    if seq.startswith((".fi", ".nf", ".in", ".ti", ".sk", ".ce")):
        return " " if seq.startswith(".sk") else ""
    return verbatim


def escape(value: str, encoding_chars: str, field_sep: str) -> str:
    """Escape free text for use as one component value (e.g. MSA-3, ERR-8). Line breaks become \\.br\\."""
    esc = encoding_chars[2] if len(encoding_chars) > 2 else "\\"
    table = {
        esc: f"{esc}E{esc}",
        field_sep: f"{esc}F{esc}",
        encoding_chars[0]: f"{esc}S{esc}",
        encoding_chars[1]: f"{esc}R{esc}",
    }
    if len(encoding_chars) > 3:
        table[encoding_chars[3]] = f"{esc}T{esc}"
    if len(encoding_chars) > 4:
        table[encoding_chars[4]] = f"{esc}P{esc}"
    value = value.replace("\r\n", "\n")
    table["\r"] = f"{esc}.br{esc}"
    table["\n"] = f"{esc}.br{esc}"
    return "".join(table.get(c, c) for c in value)
