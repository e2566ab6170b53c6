"""Field paths over a parsed message, compiled once and resolved many times.

Path syntax (one alternative; join alternatives with `|`, the first one that has a value wins):

    SEG[seg-filter]-FIELD[rep-selector].COMPONENT.SUBCOMPONENT

- `PID-5.1`            first repetition of PID-5, component 1 (its first sub-component)
- `PID-5`              the whole field (every repetition), for transforms that read structure (phone, name)
- `PID-5(2).1`         repetition 2 (1-based)
- `PID-3[MR].1`        the first repetition whose type code matches: for CX fields CX-5 (identifier type)
                       or CX-4 (assigning authority); for XTN XTN-2 (use code) or XTN-3 (equipment type);
                       for XAD/XPN the address/name type; several codes: `PID-13[NET,Internet].4`
- `PID-13[2=PRN]`      explicit: repetitions whose component 2 is PRN; `[2!=NET]` = component 2 is not NET
- `AIL[2!=D]-3.1`      segment filter: the first AIL whose AIL-2 (segment action code) is not D; `[n=X]`
                       picks the first whose field n is X. Without a filter the first segment is used.
- `SCH-2.1 | SCH-1.1`  alternatives

Codes compare case-insensitively. Resolution distinguishes three outcomes, because the CRM must:
`None` (absent or empty: change nothing), `Null` (HL7 explicit null `""`: clear the field; a `""` field
clears everything addressed inside it) and `Found` (escape-decoded text and structure).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import hl7

from hl7bridge.hl7.parse import codec_for, unescape

__all__ = [
    "Found",
    "MessageView",
    "Null",
    "Path",
    "PathError",
    "Rep",
    "Separators",
    "compile_path",
]

#: One repetition: components, each a tuple of sub-components.
Rep = tuple[tuple[str, ...], ...]
_NULL = '""'
#: A field that is exactly HL7's explicit null.
_NULL_FIELD: tuple[Rep, ...] = (((_NULL,),),)

#: Components holding the "type code" a shorthand `[CODE]` selector matches, by field data type.
_CODE_COMPONENTS = {"CX": (5, 4), "XTN": (2, 3), "XAD": (7,), "XPN": (7,), "XCN": (13, 9)}
_FIELD_TYPES = {
    **dict.fromkeys(("PID-2", "PID-3", "PID-4", "PID-18", "PID-21", "MRG-1", "MRG-2", "MRG-3"), "CX"),
    **dict.fromkeys(("NK1-33", "IN1-49", "GT1-2", "PV1-19", "PV1-50"), "CX"),
    **dict.fromkeys(("PID-13", "PID-14", "PID-40", "NK1-5", "NK1-6", "NK1-31", "NK1-40", "GT1-6"), "XTN"),
    **dict.fromkeys(("PID-11", "NK1-4", "GT1-5", "NK1-32"), "XAD"),
    **dict.fromkeys(("PID-5", "PID-6", "PID-9", "NK1-2", "MRG-7", "GT1-3"), "XPN"),
    **dict.fromkeys(("AIP-3", "AIG-3", "PV1-7", "PV1-8", "PV1-9", "PV1-17", "SCH-16", "SCH-20"), "XCN"),
}


class PathError(ValueError):
    """A path expression that cannot be compiled (raised at rules load time)."""


@dataclass(frozen=True, slots=True)
class Separators:
    """The message's own delimiters (MSH-1, MSH-2) and the codec of its MSH-18 charset (for \\X..\\)."""

    field: str = "|"
    encoding_chars: str = "^~\\&"
    codec: str = "utf-8"


def _norm_field(field: object) -> tuple[Rep, ...]:
    """python-hl7 containers (str, Field, Repetition, Component, nested by need) -> uniform tuples."""
    if isinstance(field, str):
        return (((field,),),)
    reps: list[Rep] = []
    for rep in field:  # type: ignore[attr-defined]
        if isinstance(rep, str):
            reps.append(((rep,),))
        else:
            reps.append(tuple((c,) if isinstance(c, str) else tuple(str(s) for s in c) for c in rep))
    return tuple(reps)


def _has_text(reps: Sequence[Rep]) -> bool:
    # Plain loops: this runs for every whole-field path, and nested generators cost more than the test.
    for rep in reps:
        for comp in rep:
            for s in comp:
                if s and s != _NULL:
                    return True
    return False


def _needs_decoding(reps: Sequence[Rep], esc: str) -> bool:
    for rep in reps:
        for comp in rep:
            for s in comp:
                if esc in s or s == _NULL:
                    return True
    return False


def _leaf(rep: Rep, comp: int, sub: int = 1) -> str:
    if comp > len(rep) or sub > len(rep[comp - 1]):
        return ""
    return rep[comp - 1][sub - 1]


class MessageView:
    """The segments of one message (or one segment group), normalised lazily, plus its separators."""

    __slots__ = ("_cache", "_esc", "_first", "_lean", "_names", "_segments", "seps")

    def __init__(self, segments: Sequence[Any], seps: Separators) -> None:
        # Segments are python-hl7 Segments, or lean.LeanSegments (raw field strings, split on demand):
        # both are indexed the same way, and the differential tests hold them to the same values.
        self._segments = list(segments)
        self._lean = bool(self._segments) and hasattr(self._segments[0], "normalised")
        self._names = [seg.name() if self._lean else str(seg[0]).strip() for seg in self._segments]
        # Each name's first segment: what a path without a segment filter reads, without a scan per path.
        self._first: dict[str, int] = {}
        for index, name in enumerate(self._names):
            self._first.setdefault(name, index)
        self.seps = seps
        self._esc = seps.encoding_chars[2] if len(seps.encoding_chars) > 2 else "\\"
        self._cache: dict[tuple[int, int], tuple[Rep, ...]] = {}

    @classmethod
    def from_segments(cls, segments: Sequence[Any], seps: Separators) -> MessageView:
        return cls(segments, seps)

    @classmethod
    def from_message(cls, msg: hl7.Message) -> MessageView:
        seps = Separators()
        for seg in msg:
            if str(seg[0]) == "MSH" and len(seg) > 2:
                enc = str(seg[2])
                charset = str(seg[18]).split(enc[1:2] or "~")[0] if len(seg) > 18 else ""  # first repetition
                seps = Separators(str(seg[1]), enc, codec_for(charset.strip()))
                break
        return cls(list(msg), seps)

    def names(self) -> Iterator[tuple[int, str]]:
        return enumerate(self._names)

    def field(self, seg_index: int, number: int) -> tuple[Rep, ...]:
        """Field `number` of segment `seg_index` (HL7 numbering; MSH-1 is the field separator)."""
        key = (seg_index, number)
        reps = self._cache.get(key)
        if reps is None:
            seg = self._segments[seg_index]
            if number >= len(seg):
                reps = ()
            elif self._lean:
                reps = seg.normalised(number)
            else:
                reps = _norm_field(seg[number])
            self._cache[key] = reps
        return reps

    def raw_field(self, seg_index: int, number: int) -> str:
        """Field text as sent (escapes still encoded)."""
        seg = self._segments[seg_index]
        if self._lean:
            return seg.raw(number)  # type: ignore[no-any-return]
        return str(seg[number]) if number < len(seg) else ""

    def decode(self, text: str) -> str:
        """Escape-decode one leaf (parse.unescape: python-hl7's would log PHI on odd sequences)."""
        if text == _NULL:
            return ""
        if self._esc not in text:
            return text  # what unescape returns for text without an escape character, without the call
        return unescape(text, self.seps.encoding_chars, self.seps.field, self.seps.codec)

    def decode_reps(self, reps: Sequence[Rep]) -> tuple[Rep, ...]:
        if isinstance(reps, tuple) and not _needs_decoding(reps, self._esc):
            return reps  # nothing to decode (the common case): no per-leaf calls
        return tuple(tuple(tuple(self.decode(s) for s in comp) for comp in rep) for rep in reps)

    def groups(self, start: str) -> list[MessageView]:
        """Split at each `start` segment: every group holds the segments before the first `start`
        (MSH, EVN, ...) plus one `start` segment and what follows it up to the next one."""
        starts = [i for i, name in self.names() if name == start]
        if not starts:
            return []
        head = self._segments[: starts[0]]
        bounds = [*starts, len(self._segments)]
        return [MessageView(head + self._segments[a:b], self.seps) for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True, slots=True)
class Null:
    """HL7 explicit null (`""`) at `location`: clear the destination field."""

    location: str


@dataclass(frozen=True, slots=True)
class Found:
    """A value that is present. `text` is the addressed leaf (for a whole-field path: the first
    repetition's first component); `reps` the selected repetitions, escape-decoded, for whole-field
    paths (empty for a leaf path)."""

    location: str
    text: str
    reps: tuple[Rep, ...]


@dataclass(frozen=True, slots=True)
class _Selector:
    components: tuple[int, ...]  # which components to compare (first sub-component of each)
    codes: frozenset[str]  # casefolded
    negate: bool

    def matches(self, rep: Rep) -> bool:
        hit = any(_leaf(rep, c).casefold() in self.codes for c in self.components)
        return hit != self.negate


_ALT = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<segsel>[^\]]*)\])?-(?P<field>\d{1,3})"
    r"(?:\((?P<rep>\d{1,3})\)|\[(?P<repsel>[^\]]*)\])?(?:\.(?P<comp>\d{1,3})(?:\.(?P<sub>\d{1,3}))?)?$"
)
_SEL = re.compile(r"^(?:(?P<n>\d{1,3})\s*(?P<op>!?=)\s*)?(?P<neg>!)?(?P<codes>[^=!\[\]]+)$")


def _selector(text: str, field_id: str | None, what: str) -> _Selector:
    m = _SEL.match(text.strip())
    codes = frozenset(c.strip().casefold() for c in (m["codes"] if m else "").split(",") if c.strip())
    if m is None or not codes:
        raise PathError(f"bad {what} filter [{text}]")
    if m["n"] is not None:
        if m["neg"] or int(m["n"]) < 1:
            raise PathError(f"bad {what} filter [{text}]")
        return _Selector((int(m["n"]),), codes, m["op"] == "!=")
    if field_id is None:
        raise PathError(f"segment filter [{text}] must name the field it reads, e.g. AIL[2!=D]")
    dtype = _FIELD_TYPES.get(field_id)
    if dtype is None:
        raise PathError(f"[{text}]: {field_id} has no known type-code component; name it, e.g. [2={text}]")
    return _Selector(_CODE_COMPONENTS[dtype], codes, bool(m["neg"]))


@dataclass(frozen=True, slots=True)
class _Alt:
    segment: str
    seg_filter: tuple[int, _Selector] | None
    field: int
    rep_index: int | None
    rep_filter: _Selector | None
    component: int | None
    sub: int | None
    location: str

    @property
    def whole_field(self) -> bool:
        return self.component is None

    def _segment_index(self, view: MessageView) -> int | None:
        if self.seg_filter is None:
            return view._first.get(self.segment)
        for idx, name in view.names():
            if name != self.segment:
                continue
            if self.seg_filter is None:
                return idx
            number, sel = self.seg_filter
            first = view.field(idx, number)[:1]
            if sel.matches(first[0] if first else ()):
                return idx
        return None

    def raw(self, view: MessageView) -> str | None:
        """The addressed field's text as sent, or None when the segment is absent."""
        idx = self._segment_index(view)
        return None if idx is None else view.raw_field(idx, self.field)

    def resolve(self, view: MessageView) -> Found | Null | None:
        idx = view._first.get(self.segment) if self.seg_filter is None else self._segment_index(view)
        if idx is None:
            return None
        reps = view._cache.get((idx, self.field))  # view.field's cache, read without the call
        if reps is None:
            reps = view.field(idx, self.field)
        if reps == _NULL_FIELD:
            return Null(self.location)
        if self.rep_index is not None:
            reps = reps[self.rep_index - 1 : self.rep_index]
        elif self.rep_filter is not None:
            reps = tuple(r for r in reps if self.rep_filter.matches(r))
        if not reps:
            return None
        if self.component is None:
            if not _has_text(reps):
                return None
            decoded = view.decode_reps(reps)
            return Found(self.location, _leaf(decoded[0], 1), decoded)
        rep = reps[0]
        if self.component > len(rep):
            return None
        comp = rep[self.component - 1]
        sub = self.sub or 1
        leaf = comp[sub - 1] if sub <= len(comp) else ""  # _leaf(rep, component, sub), inlined
        if leaf == _NULL or comp == (_NULL,):
            return Null(self.location)
        if not leaf:
            return None
        return Found(self.location, view.decode(leaf), ())


def _compile_alt(text: str) -> _Alt:
    m = _ALT.match(text.strip())
    if m is None:
        raise PathError(f"bad path {text.strip()!r} (expected e.g. PID-3[MR].1, AIL[2!=D]-3.1)")
    seg, field = m["seg"], int(m["field"])
    comp = int(m["comp"]) if m["comp"] else None
    sub = int(m["sub"]) if m["sub"] else None
    rep = int(m["rep"]) if m["rep"] else None
    if field < 1 or comp == 0 or sub == 0 or rep == 0:
        raise PathError(f"bad path {text.strip()!r}: positions are 1-based")
    seg_filter = None
    if m["segsel"] is not None:
        sel = _selector(m["segsel"], None, "segment")
        # The filter reads the first component of field n, so compare component 1 of that field.
        seg_filter = (sel.components[0], _Selector((1,), sel.codes, sel.negate))
    rep_filter = _selector(m["repsel"], f"{seg}-{field}", "repetition") if m["repsel"] is not None else None
    location = f"{seg}-{field}" + (f".{comp}" if comp else "") + (f".{sub}" if sub else "")
    return _Alt(seg, seg_filter, field, rep, rep_filter, comp, sub, location)


@dataclass(frozen=True, slots=True)
class Path:
    """A compiled path expression: alternatives tried in order."""

    expr: str
    alternatives: tuple[_Alt, ...]

    @property
    def location(self) -> str:
        """The first alternative's HL7 location (for ERR-2 when nothing more precise is known)."""
        return self.alternatives[0].location

    @property
    def locations(self) -> tuple[str, ...]:
        return tuple(a.location for a in self.alternatives)

    @property
    def whole_field(self) -> bool:
        return all(a.whole_field for a in self.alternatives)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(a.segment for a in self.alternatives)

    def resolve(self, view: MessageView) -> Found | Null | None:
        """The first alternative with text; else Null if one was an explicit null; else None."""
        alternatives = self.alternatives
        if len(alternatives) == 1:  # most paths: the loop below, unrolled
            alt = alternatives[0]
            hit = alt.resolve(view)
            if isinstance(hit, Found) and not (hit.text or (alt.component is None and _has_text(hit.reps))):
                return None
            return hit
        null: Null | None = None
        for alt in alternatives:
            hit = alt.resolve(view)
            if isinstance(hit, Found) and (hit.text or (alt.component is None and _has_text(hit.reps))):
                return hit
            if isinstance(hit, Null) and null is None:
                null = hit
        return null

    def __str__(self) -> str:
        return self.expr


def compile_path(expr: str) -> Path:
    """Compile `expr`; PathError (a ValueError) explains what is wrong."""
    if not isinstance(expr, str) or not expr.strip():
        raise PathError("empty path")
    alts = tuple(_compile_alt(part) for part in expr.split("|"))
    return Path(" | ".join(a.strip() for a in expr.split("|")), alts)

