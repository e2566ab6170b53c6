"""A lean reader for the workers: raw message text straight to the MessageView the mapper reads.

python-hl7 stays the reference parser (`parse.parse_message`), but building its container tree costs about
1.3 ms per 1.6 KB message, and on the workers' threads that time is spent holding the GIL the event loop
(and so every ACK) needs. The mapper only ever reads fields through `access.MessageView`, so this module
builds exactly that view from plain `str.split` calls, lazily per field. `tests/unit/test_hl7_lean.py`
proves field by field, on every fixture and on hypothesis-generated messages, that both routes give the
mapper the same values (repetitions, components, sub-components, escapes left encoded until decoded).
"""

from __future__ import annotations

from hl7bridge.errors import UnreadableMessage
from hl7bridge.hl7.access import MessageView, Separators
from hl7bridge.hl7.parse import codec_for, decode, normalise_segments, read_separators, sniff_charset

__all__ = ["LeanSegment", "lean_view"]


class LeanSegment:
    """One segment as raw field strings, indexed like python-hl7 (MSH-1 is the field separator)."""

    __slots__ = ("_fields", "_name", "_sep", "_seps", "_text")

    def __init__(self, text: str, field_sep: str, seps: tuple[str, str, str]) -> None:
        # Split into fields on first use: the mapper reads a few segments (MSH, EVN, PID, ...) of many.
        self._text = text
        self._sep = field_sep
        self._seps = seps
        self._fields: list[str] | None = None
        self._name = text.partition(field_sep)[0].strip()  # = the first field, stripped

    def _split(self) -> list[str]:
        fields = self._text.split(self._sep)
        if fields[0] == "MSH":
            # python-hl7 numbering: [0] "MSH", [1] the field separator, [2] MSH-2 (encoding characters), ...
            fields = ["MSH", self._sep, *fields[1:]]
        self._fields = fields
        return fields

    def __len__(self) -> int:
        fields = self._fields if self._fields is not None else self._split()
        return len(fields)

    def name(self) -> str:
        return self._name

    def raw(self, number: int) -> str:
        fields = self._fields if self._fields is not None else self._split()
        return fields[number] if number < len(fields) else ""

    def normalised(self, number: int) -> tuple[tuple[tuple[str, ...], ...], ...]:
        """Field `number` as repetitions of components of sub-components (MSH-1 and MSH-2 kept whole)."""
        fields = self._fields if self._fields is not None else self._split()
        text = fields[number]
        if fields[0] == "MSH" and number <= 2:
            return (((text,),),)
        rep_sep, comp_sep, sub_sep = self._seps
        # List comprehensions, and no sub-component split where there is no separator: the same tuples as
        # splitting everything, at a fraction of the cost (generator expressions are slow in a hot loop).
        if sub_sep in text:
            return tuple([tuple([tuple(comp.split(sub_sep)) for comp in rep.split(comp_sep)])
                          for rep in text.split(rep_sep)])
        if rep_sep in text:
            return tuple([tuple([(comp,) for comp in rep.split(comp_sep)]) for rep in text.split(rep_sep)])
        return (tuple([(comp,) for comp in text.split(comp_sep)]),)


def lean_view(raw: bytes | str, default_charset: str = "utf-8") -> MessageView:
    """Decode (MSH-18), normalise terminators, check separators, and index the segments for the mapper."""
    charset = sniff_charset(raw) if isinstance(raw, bytes) else ""
    text = decode(raw, charset, default_charset) if isinstance(raw, bytes) else raw
    # Like python-hl7, whitespace at either end of the whole message is not content (trailing blanks after
    # the last field are common in feeds written by hand or by fixed-width exporters).
    text = normalise_segments(text).strip()
    field_sep, enc = read_separators(text)
    if len(enc) < 4:
        raise UnreadableMessage("MSH-2 must hold four encoding characters", location="MSH-2")
    comp_sep, rep_sep, _escape, sub_sep = enc[0], enc[1], enc[2], enc[3]
    segments = [LeanSegment(s, field_sep, (rep_sep, comp_sep, sub_sep)) for s in text.split("\r") if s.strip()]
    if not segments or segments[0].name() != "MSH":
        raise UnreadableMessage("message does not start with MSH", location="MSH")
    msh = segments[0]
    msh18 = msh.raw(18).split(rep_sep)[0].strip() if len(msh) > 18 else ""
    return MessageView.from_segments(segments, Separators(field_sep, enc, codec_for(msh18)))
