"""Opt-in strict validation (`validation: strict`): one message checked against its HL7 v2 structure with hl7apy.

`validate_strict(text, version)` parses the message with hl7apy at `VALIDATION_LEVEL.STRICT` against the
message structure of MSH-9 (MSH-9.3 when present, else the structure HL7 table 0354 gives type^trigger),
then checks segment order and cardinality, required segments/fields/components, data types and the lengths
hl7apy knows. It returns None or raises one `hl7bridge.errors` class:

| problem                                                          | class / ACK             | ERR-3 |
|------------------------------------------------------------------|-------------------------|-------|
| segment out of order, repeated, unknown, not allowed or missing  | MissingRequired / AE    | 100   |
| required field or component missing                              | MissingRequired / AE    | 101   |
| wrong data type, too long, non-repeating field repeated, field   | BadFieldValue / AE      | 102   |
| or component not defined (or withdrawn) in the version           |                         |       |
| MSH-9.3 structure not defined in the version                     | UnsupportedMessage / AR | 200   |
| no structure for type^trigger in the version                     | UnsupportedMessage / AR | 201   |
| MSH-12 version without usable hl7apy definitions (2.1, 2.9, ...) | UnsupportedMessage / AR | 203   |
| hl7apy itself fails (a bug on odd input)                         | UnreadableMessage / AR  | 207   |

Coded values are not checked against HL7 tables (no 103): hl7apy reports table misses as warnings only,
and most tables a feed uses (IS) are site-defined anyway.

Reasons name locations ("PID-7", "segment 4 (PID)") and HL7 identifiers, never values: hl7apy's exception
texts quote field contents, so they are never passed on. Locations come from the element names hl7apy
works with, each checked against a strict pattern before use; the errors carry no __context__.

Z-segments (Epic's ZPD, Cerner's ZPI, ...) are removed before validation wherever they appear, unchecked:
HL7 lets a site place them anywhere by local agreement, hl7apy has no definition for them, and in strict
mode it silently drops a segment it cannot place and loses its place in the group structure (a Z-segment
inside a group would surface as a bogus missing-segment error). Every other segment must be an HL7 segment
of the version and fit the structure; hl7apy neither checks segment order nor reports segments it
dropped, so both are checked here on the tree it built.

Cost: about 15 ms (a short ADT) to 35 ms (the 1.6 KB benchmark ADT) per message, all of it hl7apy building
an object per field, component and subcomponent, so the caller runs it off the event loop. Pure and
thread-safe without a lock: version, encoding characters and validation level are passed to hl7apy
explicitly, and hl7apy keeps no mutable global state on this path (its module-level defaults are only
read, its reference tables are never written, version modules load under Python's import lock). Nothing
may call hl7apy's `set_default_*` functions, which do change globals (nothing in hl7bridge does).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import hl7apy
from hl7apy import exceptions as hx
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_segment, parse_segments
from hl7apy.validation import Validator

from hl7bridge.errors import (
    BadFieldValue,
    ErrCode,
    Hl7BridgeError,
    MissingRequired,
    UnreadableMessage,
    UnsupportedMessage,
)
from hl7bridge.hl7.parse import normalise_segments, read_separators

__all__ = ["EVENT_STRUCTURES", "STRICT_VERSIONS", "message_structure", "validate_strict"]

#: Versions hl7apy has definitions for (2.1 .. 2.8.2 in hl7apy 1.3.5) except 2.1, whose TS makes TS-2
#: (degree of precision) required, so that every v2.1 message would fail on MSH-7.
STRICT_VERSIONS: frozenset[str] = frozenset(hl7apy.SUPPORTED_LIBRARIES) - {"2.1"}

#: HL7 table 0354: the structure of a type_trigger that has none of its own name; candidates are tried in
#: order, newest first (v2.3/2.3.1 have no ADT_A05: A05/A14/A28/A31 use ADT_A01 there).
EVENT_STRUCTURES: dict[str, tuple[str, ...]] = {
    event: structures
    for events, structures in (
        (("A04", "A08", "A13"), ("ADT_A01",)),
        (("A05", "A14", "A28", "A31"), ("ADT_A05", "ADT_A01")),
        (("A07",), ("ADT_A06",)),
        (("A10", "A11"), ("ADT_A09",)),
        (("A22", "A23", "A25", "A26", "A27", "A29", "A32", "A33"), ("ADT_A21",)),
        (("A34", "A35", "A36", "A46", "A47", "A48", "A49"), ("ADT_A30",)),
        (("A40", "A41", "A42"), ("ADT_A39",)),
        (("A44",), ("ADT_A43",)),
        (("A51",), ("ADT_A50",)),
        (("A53",), ("ADT_A52",)),
        (("A55",), ("ADT_A54",)),
        (("A62",), ("ADT_A61",)),
    )
    for event in (f"ADT_{e}" for e in events)
} | {f"SIU_S{n}": ("SIU_S12",) for n in range(13, 28)}

_STRICT = VALIDATION_LEVEL.STRICT
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
#: hl7apy element names: "PID_3" (field), "CX_4" (component), "HD_1" (subcomponent).
_ELEMENT = re.compile(r"([A-Z][A-Z0-9]{1,3})_(\d{1,3})\Z")
_GROUP = re.compile(r"[A-Z][A-Z0-9]{2}_[A-Z0-9]{3}_([A-Z0-9_]{1,40})\Z")
_DATATYPE = re.compile(r"[A-Z][A-Z0-9]{1,3}\Z")
_VERSION = re.compile(r"\d\.\d{1,2}(\.\d{1,2})?\Z")
#: What a message type, trigger event or message structure looks like: only such codes are echoed.
_CODE = re.compile(r"[A-Z0-9]{3}(_[A-Z0-9]{3})?\Z")
_SEQ = ErrCode.SEGMENT_SEQUENCE


def validate_strict(text: str, version: str) -> None:
    """Validate one decoded message (segments separated by "\\r", as intake has it) against the structure
    for its MSH-9 in HL7 `version` (MSH-12). Returns None when it conforms.

    Raises only hl7bridge errors (see the module docstring); every reason starts with "strict validation:".
    """
    # Raised outside the `except` blocks, so the error has no __context__: hl7apy's exceptions (and their
    # frames' locals) hold field values.
    error: Hl7BridgeError | None
    try:
        error = _validate(text, version)
    except Hl7BridgeError as exc:
        error = exc
    except Exception:  # a bug in hl7apy (or here) on odd input: a clear NACK, never a crash
        error = UnreadableMessage("strict validation: the validator failed on this message",
                                  err_code=ErrCode.INTERNAL, location="MSH")
    if error is not None:
        error.__context__ = error.__cause__ = None
        raise error


def message_structure(msh9: list[str], version: str, evn_trigger: str = "") -> str:
    """The hl7apy message structure for MSH-9 (split into components) in `version`: MSH-9.3 when present
    (it must exist in that version), else the type_trigger structure or its table 0354 equivalent.
    `evn_trigger` (EVN-1) stands in for the trigger of v2.2 messages, whose MSH-9 has none.

    Raises MissingRequired (101) or UnsupportedMessage (200 structure, 201 type^trigger).
    """
    code = msh9[0].strip() if msh9 else ""
    trigger = (msh9[1].strip() if len(msh9) > 1 else "") or evn_trigger.strip()
    declared = msh9[2].strip() if len(msh9) > 2 else ""
    if declared:
        if _defined(declared, "Message", version):
            return declared
        raise UnsupportedMessage(
            f"strict validation: message structure {_code(declared)} (MSH-9.3) is not defined in HL7 {version}",
            err_code=ErrCode.UNSUPPORTED_MESSAGE_TYPE, location="MSH-9")
    if not code or not trigger:
        part = "MSH-9 message type" if not code else "MSH-9.2 trigger event"
        raise MissingRequired(f"strict validation: {part} is empty", location="MSH-9")
    name = f"{code}_{trigger}"
    for candidate in (name, *EVENT_STRUCTURES.get(name, ())):
        if _defined(candidate, "Message", version):
            return candidate
    raise UnsupportedMessage(
        f"strict validation: no HL7 {version} message structure for {_code(code)}^{_code(trigger)}",
        err_code=ErrCode.UNSUPPORTED_EVENT, location="MSH-9")


# --- the validation ------------------------------------------------------------------------------------


def _validate(text: str, version: str) -> Hl7BridgeError | None:
    """The message's first problem (raised, or returned when mapped from an hl7apy exception), or None."""
    version = version.strip()
    if version not in STRICT_VERSIONS:
        shown = version if _VERSION.match(version) else "(invalid)"
        raise UnsupportedMessage(f"strict validation: HL7 version {shown} in MSH-12 is not supported",
                                 err_code=ErrCode.UNSUPPORTED_VERSION, location="MSH-12")
    text = normalise_segments(text)
    field_sep, enc = read_separators(text)
    segments = text.split("\r")
    evn = next((s for s in segments if s.startswith("EVN" + field_sep)), "")
    structure = message_structure(_field(segments[0], 9, field_sep).split(enc[0]), version,
                                  _field(evn, 1, field_sep).split(enc[0])[0])
    kept = _kept_segments(segments, field_sep, version)
    chars = {"FIELD": field_sep, "COMPONENT": enc[0], "REPETITION": enc[1], "ESCAPE": enc[2],
             "SUBCOMPONENT": enc[3], "SEGMENT": "\r", "GROUP": "\r"}
    if len(enc) > 4:
        chars["TRUNCATION"] = enc[4]
    body = "\r".join(segments[i - 1] for i in kept)
    try:
        message = Message(structure, version=version, validation_level=_STRICT, encoding_chars=chars)
        message.children = parse_segments(body, version, chars, _STRICT, message.reference, find_groups=True)
    except (hx.HL7apyException, ValueError) as exc:
        return _parse_error(exc, segments, kept, version, chars)
    placed = list(_segments_of(message))
    _check_sequence(message, placed, segments, kept, structure)
    try:
        Validator.validate(message)
    except hx.ValidationError as exc:
        return _validation_error(str(exc), placed, kept, structure)
    return None


def _field(segment: str, number: int, field_sep: str) -> str:
    """Field `number` of a segment's text ("" when absent); in MSH, MSH-1 is the separator itself."""
    if segment.startswith("MSH"):
        number -= 1
    fields = segment.split(field_sep, number + 1)
    return fields[number] if len(fields) > number else ""


def _kept_segments(segments: list[str], field_sep: str, version: str) -> list[int]:
    """1-based numbers of the segments to validate (all but Z-segments). An ID that is not an HL7 segment
    of the version is a segment sequence error (hl7apy would silently drop the segment)."""
    kept: list[int] = []
    for number, segment in enumerate(segments, 1):
        seg_id = segment[:3]
        well_formed = _SEGMENT_ID.match(seg_id) is not None and segment[3:4] in (field_sep, "")
        if well_formed and seg_id[0] == "Z":
            continue
        if not well_formed or not _defined(seg_id, "Segment", version):
            raise MissingRequired(
                f"strict validation: segment sequence error at segment {number}: not an HL7 {version} segment",
                err_code=_SEQ)
        kept.append(number)
    return kept


def _check_sequence(message: Any, placed: list[Any], segments: list[str], kept: list[int], structure: str) -> None:
    """Every segment placed in the structure, and each group's children in the structure's order."""
    for index, number in enumerate(kept):
        seg_id = segments[number - 1][:3]
        if index >= len(placed) or placed[index].name != seg_id:
            raise _sequence(number, seg_id, f"{seg_id} is not allowed here in {structure}")
    ordinal = {id(seg): kept[i] for i, seg in enumerate(placed)}
    nodes = [message]
    while nodes:
        node = nodes.pop()
        positions = {ref[0]: i for i, ref in enumerate(node.reference[1])}
        last = -1
        for child in node.children:
            position = positions.get(child.name, last)
            if position < last:
                first = next(_segments_of(child)) if child.classname == "Group" else child
                raise _sequence(ordinal[id(first)], first.name, "out of order")
            last = position
            if child.classname == "Group":
                nodes.append(child)


def _sequence(number: int, seg_id: str, detail: str) -> MissingRequired:
    return MissingRequired(f"strict validation: segment sequence error at segment {number} ({seg_id}): {detail}",
                           err_code=_SEQ, location=seg_id)


def _segments_of(node: Any) -> Iterator[Any]:
    for child in node.children:
        if child.classname == "Segment":
            yield child
        else:
            yield from _segments_of(child)


# --- errors while hl7apy parses (strict mode raises on the first bad element) ------------------------


def _parse_error(exc: Exception, segments: list[str], kept: list[int], version: str,
                 chars: dict[str, str]) -> Hl7BridgeError:
    if isinstance(exc, hx.ParserError | hx.InvalidEncodingChars):
        return UnreadableMessage("strict validation: hl7apy cannot read the message header", location="MSH")
    if isinstance(exc, hx.MaxChildLimitReached) and _attr(exc.child, "classname") in ("Segment", "Group"):
        first = exc.child if exc.child.classname == "Segment" else next(_segments_of(exc.child), None)
        name = _attr(first, "name") or ""
        repeats = [n for n in kept if segments[n - 1][:3] == name]
        limit = exc.limit if isinstance(exc.limit, int) else 1
        number = repeats[min(limit, len(repeats) - 1)] if repeats else 0
        return _sequence(number, name, "repeats more often than the structure allows")
    # The message-wide parse does not say which segment failed: parse them one by one (failure path only).
    for number in kept:
        try:
            parse_segment(segments[number - 1], version, chars, _STRICT)
        except (hx.HL7apyException, ValueError) as located:
            return _element_error(located, number, segments[number - 1][:3], version)
        except Exception:  # the same hl7apy failure: reported from the message-wide parse below
            break
    return _element_error(exc, None, None, version)


def _element_error(exc: Exception, number: int | None, seg_id: str | None, version: str) -> Hl7BridgeError:
    location, datatype = _where(exc.__traceback__)
    location = location or _location_from(exc)
    if location is None:
        what = f"segment {number} ({seg_id})" if seg_id is not None else "the message"
        return BadFieldValue(f"strict validation: {what} does not match its HL7 {version} definition",
                             err_code=ErrCode.DATA_TYPE, location=seg_id)
    if isinstance(exc, hx.MaxLengthReached):
        detail = "exceeds the maximum length" + (f" ({exc.limit})" if isinstance(exc.limit, int) else "")
    elif isinstance(exc, ValueError | hx.InvalidDateOffset | hx.InvalidMicrosecondsPrecision | hx.InvalidDateFormat):
        detail = f"data type error ({datatype})" if datatype else "data type error"
    elif isinstance(exc, hx.MaxChildLimitReached):
        if _attr(exc.child, "classname") != "Field":
            detail = "has more components than its data type"
        else:
            detail = f"is withdrawn in HL7 {version} and must be empty" if exc.limit == 0 else \
                "repeats but is not repeatable"
    elif isinstance(exc, hx.InvalidName | hx.ChildNotFound | hx.ChildNotValid | hx.OperationNotAllowed):
        detail = f"is not defined in HL7 {version}"
    else:
        detail = "does not match its HL7 definition"
    suffix = f" in segment {number}" if number is not None else ""
    return BadFieldValue(f"strict validation: {location} {detail}{suffix}", err_code=ErrCode.DATA_TYPE,
                         location=location)


def _where(tb: TracebackType | None) -> tuple[str | None, str | None]:
    """(location, base data type) of the element hl7apy's parser was building when it raised, read from
    its frames: the innermost parse_field's field name and the component/subcomponent names below it.
    Only names matching the element-name pattern are used, so no message text gets through."""
    field: str | None = None
    parts: list[str] = []
    datatype: str | None = None
    seen: set[int] = set()
    while tb is not None:
        frame, tb = tb.tb_frame, tb.tb_next
        code = frame.f_code
        if id(frame) in seen or not code.co_filename.endswith(("hl7apy/parser.py", "hl7apy\\parser.py")):
            continue  # a frame that re-raises (`raise e`) appears twice in a traceback
        seen.add(id(frame))
        name = frame.f_locals.get("name")
        match = _ELEMENT.match(name) if isinstance(name, str) else None
        if code.co_name == "parse_field" and match:
            field, parts, datatype = f"{match[1]}-{match[2]}", [], None
        elif code.co_name in ("parse_component", "parse_subcomponent") and field is not None:
            if match:
                parts.append(match[2])
            if code.co_name == "parse_subcomponent":
                datatype = _datatype_of(frame.f_locals)
    while parts and parts[-1] == "1":  # PID-7.1 is PID-7 (the timestamp of a TS): name the field
        parts.pop()
    return (".".join([field, *parts]) if field else None), datatype


def _datatype_of(local: dict[str, Any]) -> str | None:
    datatype = local.get("datatype")
    if not isinstance(datatype, str):
        reference = local.get("reference")
        datatype = reference[2] if isinstance(reference, list | tuple) and len(reference) > 2 else None
    return datatype if isinstance(datatype, str) and _DATATYPE.match(datatype) else None


def _location_from(exc: Exception) -> str | None:
    """The field an hl7apy exception names in its attributes (a repeated field, or the field whose
    components overflow), for errors raised outside the parser's per-field frames."""
    for attr in ("child", "parent"):
        element = getattr(exc, attr, None)
        match = _ELEMENT.match(_attr(element, "name") or "")
        if match and _attr(element, "classname") == "Field":
            return f"{match[1]}-{match[2]}"
    return None


def _attr(element: object, name: str) -> str | None:
    """A string attribute of an hl7apy element, or None (its attribute lookup can raise its own errors)."""
    try:
        value = getattr(element, name, None)
    except Exception:
        return None
    return value if isinstance(value, str) else None


# --- errors from hl7apy's Validator (structure, required elements, data types) -----------------------

_MISSING = re.compile(r"Missing required child (\w+)\.(\w+)\Z")
_LIMIT = re.compile(r"Child limit exceeded (\w+)\.(\w+)\Z")
_WRONG_TYPE = re.compile(r"Datatype \w+ is not correct for \w+\.(\w+) ")


def _validation_error(text: str, placed: list[Any], kept: list[int], structure: str) -> Hl7BridgeError:
    """One hl7apy ValidationError (known only by its text, which is matched against hl7apy's few message
    shapes; only the identifiers in it are used) as an hl7bridge error."""
    for pattern, missing in ((_MISSING, True), (_LIMIT, False)):
        match = pattern.match(text)
        if match is None:
            continue
        parent, child = match[1], match[2]
        group = _GROUP.match(child)
        if parent == structure or parent.startswith(structure + "_") or group or _SEGMENT_ID.match(child):
            what = f"segment group {group[1]}" if group else f"segment {child}"
            reason = f"required {what} missing in" if missing else f"{what} repeats more often than allowed in"
            return MissingRequired(f"strict validation: {reason} {structure}", err_code=_SEQ,
                                   location=None if group else child)
        element = _ELEMENT.match(child)
        if element is None:
            break
        number, field = _narrow(placed, kept)
        suffix = f" in segment {number}" if number is not None else ""
        if element[1] == parent:  # a field of segment `parent`
            location = f"{parent}-{element[2]}"
            if missing:
                return MissingRequired(f"strict validation: required field {location} missing{suffix}",
                                       location=location)
            return BadFieldValue(f"strict validation: {location} repeats but is not repeatable{suffix}",
                                 err_code=ErrCode.DATA_TYPE, location=location)
        component, inside = f"{element[1]}-{element[2]}", f" in {field}" if field else ""  # of type `parent`
        if missing:
            return MissingRequired(f"strict validation: required component {component} missing{inside}{suffix}",
                                   location=field)
        return BadFieldValue(f"strict validation: component {component} repeats{inside}{suffix}",
                             err_code=ErrCode.DATA_TYPE, location=field)
    if text.startswith(("Invalid children detected for <Message", "Invalid children detected for <Group")):
        return MissingRequired(f"strict validation: segment sequence error in {structure}", err_code=_SEQ)
    number, field = _narrow(placed, kept)
    suffix = f" in segment {number}" if number is not None else ""
    wrong = _WRONG_TYPE.match(text)
    detail = "data type error" if wrong and _ELEMENT.match(wrong[1]) else "does not match its HL7 definition"
    return BadFieldValue(f"strict validation: {field or 'an element'} {detail}{suffix}", err_code=ErrCode.DATA_TYPE,
                         location=field)


def _narrow(placed: list[Any], kept: list[int]) -> tuple[int | None, str | None]:
    """(segment number, field location) of the first segment, and field in it, that fails validation on
    its own. Failure path only."""
    for index, segment in enumerate(placed):
        if _valid(segment):
            continue
        for field in segment.children:
            match = _ELEMENT.match(_attr(field, "name") or "")
            if match and not _valid(field):
                return kept[index], f"{match[1]}-{match[2]}"
        return kept[index], None
    return None, None


def _valid(element: Any) -> bool:
    try:
        Validator.validate(element)
    except hx.ValidationError:
        return False
    return True


def _defined(name: str, element_type: str, version: str) -> bool:
    try:
        hl7apy.load_reference(name, element_type, version)
    except (hx.ChildNotFound, hx.UnsupportedVersion, KeyError):
        return False
    return True


def _code(value: str) -> str:
    """A code for a reason text: only what has the shape of an HL7 code ("ADT", "A04", "ADT_A01") is echoed."""
    return value if _CODE.match(value) else "(invalid)"
