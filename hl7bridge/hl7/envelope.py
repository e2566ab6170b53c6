"""The fast intake scan: MSH and PID read with plain str.split, no full parse.

This runs on the ACK hot path for every inbound frame, before the message is journalled, so it reads
only what intake needs: the envelope (MSH-3..18), the patient key (the MRN from PID-3), and the segment
names. The full python-hl7 parse happens later, in the workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from hl7bridge.errors import ErrCode, MissingRequired, UnreadableMessage, UnsupportedMessage
from hl7bridge.hl7.parse import (
    decode,
    normalise_segments,
    read_separators,
    sniff_charset,
    unescape,
)
from hl7bridge.records import Envelope

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_PROCESSING_IDS",
    "DEFAULT_SUPPORTED",
    "DEFAULT_VERSIONS",
    "PatientIdPolicy",
    "Scanned",
    "best_effort_envelope",
    "is_supported",
    "patient_key",
    "scan",
    "scan_bytes",
    "validate",
]


@dataclass(frozen=True, slots=True)
class PatientIdPolicy:
    """Which PID-3 repetition is the MRN.

    The MRN is the first repetition whose CX-5 (identifier type code) is in `type_codes` and, when
    `assigning_authorities` is non-empty, whose CX-4.1 (assigning authority namespace ID) is in it.
    Older (v2.3) feeds often send one untyped identifier; `single_untyped_fallback` takes it.
    PID-2/4/18/19 (external ID, alternate ID, account number, SSN) are never used.
    """

    type_codes: tuple[str, ...] = ("MR",)
    assigning_authorities: tuple[str, ...] = ()
    single_untyped_fallback: bool = True
    #: Key "<CX-1>^<CX-4.1>" instead of "<CX-1>", for sites where MRNs are only unique per authority.
    include_authority: bool = False


DEFAULT_POLICY = PatientIdPolicy()


@dataclass(frozen=True, slots=True)
class Scanned:
    """What the intake scan read from one message."""

    envelope: Envelope
    patient_key: str | None
    segment_ids: tuple[str, ...]


_A = ("A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A12", "A13", "A28", "A31", "A40", "A47")
_S = ("S12", "S13", "S14", "S15", "S16", "S17", "S26")

#: Message types and trigger events the default rules handle.
DEFAULT_SUPPORTED: Mapping[str, frozenset[str]] = MappingProxyType(
    {"ADT": frozenset(_A), "SIU": frozenset(_S)}
)
DEFAULT_VERSIONS: frozenset[str] = frozenset(
    {"2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"}
)
DEFAULT_PROCESSING_IDS: frozenset[str] = frozenset({"P", "T", "D"})


def _envelope(fields: list[str], field_sep: str, enc: str) -> Envelope:
    """Envelope from MSH split on the field separator (fields[0] == "MSH", fields[n - 1] == MSH-n)."""
    comp, rep = enc[0], enc[1]
    if len(fields) < 18:
        fields = fields + [""] * (18 - len(fields))
    msh9 = fields[8].split(comp, 3)
    return Envelope(
        field_sep,
        enc,
        fields[2],  # MSH-3
        fields[3],
        fields[4],
        fields[5],
        fields[6],  # MSH-7
        msh9[0].strip(),
        msh9[1].strip() if len(msh9) > 1 else "",
        msh9[2].strip() if len(msh9) > 2 else "",
        fields[9],  # MSH-10
        fields[10].split(comp, 1)[0].strip(),
        fields[11].split(comp, 1)[0].strip(),
        fields[14].strip(),  # MSH-15
        fields[15].strip(),
        fields[17].split(rep, 1)[0].strip(),  # MSH-18
    )


def patient_key(pid3: str, enc: str, field_sep: str, policy: PatientIdPolicy = DEFAULT_POLICY) -> str | None:
    """The MRN from a raw PID-3 value per `policy`, or None."""
    if not pid3:
        return None
    comp, rep, sub = enc[0], enc[1], enc[3]
    repetitions = pid3.split(rep)
    untyped: list[tuple[str, str]] = []
    for repetition in repetitions:
        cx = repetition.split(comp)
        cx1 = cx[0]
        if not cx1:
            continue
        authority = cx[3].split(sub, 1)[0] if len(cx) > 3 else ""
        type_code = cx[4].strip() if len(cx) > 4 else ""
        if policy.assigning_authorities and authority not in policy.assigning_authorities:
            continue
        if type_code in policy.type_codes:
            return _key(cx1, authority, enc, field_sep, policy)
        if not type_code:
            untyped.append((cx1, authority))
    # The untyped fallback only applies when PID-3 is one identifier: with several, guessing which one
    # is the MRN could link the wrong contact.
    if policy.single_untyped_fallback and len(repetitions) == 1 and len(untyped) == 1:
        cx1, authority = untyped[0]
        return _key(cx1, authority, enc, field_sep, policy)
    return None


def _key(cx1: str, authority: str, enc: str, field_sep: str, policy: PatientIdPolicy) -> str | None:
    mrn = unescape(cx1, enc, field_sep).strip()
    if not mrn:
        return None
    if policy.include_authority and authority:
        return f"{mrn}^{unescape(authority, enc, field_sep).strip()}"
    return mrn


def scan(text: str, policy: PatientIdPolicy = DEFAULT_POLICY) -> Scanned:
    """Read envelope, patient key and segment names from one message's text.

    Raises UnreadableMessage when MSH is absent or not first, its separators are invalid, or it has
    fewer than 12 fields.
    """
    if "\n" in text or text[-1:] == "\r":
        text = normalise_segments(text)
    field_sep, enc = read_separators(text)
    segments = text.split("\r")
    fields = segments[0].split(field_sep)
    # fields[0] is "MSH" and fields[1] is MSH-2, so MSH-12 is fields[11].
    if len(fields) < 12:
        raise UnreadableMessage("MSH has fewer than 12 fields", location="MSH-12")
    envelope = _envelope(fields, field_sep, enc)
    segment_ids = tuple([seg[:3] for seg in segments if seg])  # a list first: faster than a generator
    key: str | None = None
    evn_trigger = ""
    pid_prefix = "PID" + field_sep
    for seg in segments:
        if seg.startswith(pid_prefix):
            pid = seg.split(field_sep, 4)
            key = patient_key(pid[3] if len(pid) > 3 else "", enc, field_sep, policy)
            break
        if not envelope.trigger and seg.startswith("EVN" + field_sep):
            evn_trigger = seg.split(field_sep, 2)[1].strip()
    if not envelope.trigger and evn_trigger:
        # v2.1/2.2 MSH-9 has no trigger component; EVN-1 carries the event.
        envelope = replace(envelope, trigger=evn_trigger)
    return Scanned(envelope=envelope, patient_key=key, segment_ids=segment_ids)


def scan_bytes(
    raw: bytes, policy: PatientIdPolicy = DEFAULT_POLICY, default_charset: str = "utf-8"
) -> tuple[Scanned, str]:
    """Sniff MSH-18, decode, normalise and scan one raw payload. Returns (scanned, decoded text)."""
    text = normalise_segments(decode(raw, sniff_charset(raw), default_charset))
    return scan(text, policy), text


def is_supported(envelope: Envelope, supported: Mapping[str, frozenset[str]] = DEFAULT_SUPPORTED) -> bool:
    """Whether the rules handle this message type and trigger event."""
    triggers = supported.get(envelope.message_type)
    return triggers is not None and envelope.trigger in triggers


def validate(
    scanned: Scanned,
    *,
    supported: Mapping[str, frozenset[str]] = DEFAULT_SUPPORTED,
    accept_unsupported: bool = False,
    versions: frozenset[str] = DEFAULT_VERSIONS,
    processing_ids: frozenset[str] = DEFAULT_PROCESSING_IDS,
    require_patient: bool = True,
) -> None:
    """Apply the intake policy (architecture.md, ACK table). Returns None when the message is acceptable.

    Raises MissingRequired (AE; 100 segment / 101 field) or UnsupportedMessage (AR; 200 type, 201
    trigger, 202 processing ID, 203 version). With `accept_unsupported`, an unsupported type or trigger
    raises nothing and the patient checks are skipped: the caller journals the message as filtered.
    """
    env = scanned.envelope
    if not env.control_id.strip():
        raise MissingRequired("MSH-10 message control ID is empty", location="MSH-10")
    if not env.message_type:
        raise MissingRequired("MSH-9 message type is empty", location="MSH-9")
    if env.version not in versions:
        raise UnsupportedMessage(
            "unsupported HL7 version in MSH-12", err_code=ErrCode.UNSUPPORTED_VERSION, location="MSH-12"
        )
    if env.processing_id not in processing_ids:
        raise UnsupportedMessage(
            "unsupported processing ID in MSH-11",
            err_code=ErrCode.UNSUPPORTED_PROCESSING_ID,
            location="MSH-11",
        )
    triggers = supported.get(env.message_type)
    if triggers is None:
        if accept_unsupported:
            return
        raise UnsupportedMessage(
            f"unsupported message type {_code(env.message_type)}",
            err_code=ErrCode.UNSUPPORTED_MESSAGE_TYPE,
            location="MSH-9",
        )
    if env.trigger not in triggers:
        if accept_unsupported:
            return
        raise UnsupportedMessage(
            f"unsupported trigger event {_code(env.message_type)}^{_code(env.trigger)}",
            err_code=ErrCode.UNSUPPORTED_EVENT,
            location="MSH-9",
        )
    if require_patient:
        if "PID" not in scanned.segment_ids:
            raise MissingRequired("PID segment is missing", err_code=ErrCode.SEGMENT_SEQUENCE, location="PID")
        if scanned.patient_key is None:
            raise MissingRequired("PID-3 has no patient identifier (MRN)", location="PID-3")
    if env.message_type == "SIU" and "SCH" not in scanned.segment_ids:
        raise MissingRequired("SCH segment is missing", err_code=ErrCode.SEGMENT_SEQUENCE, location="SCH")


def _code(value: str) -> str:
    """A message type or trigger for a reason text: codes are short identifiers, never PHI, but they
    come from the sender, so anything that does not look like a code is not echoed."""
    return value if len(value) <= 7 and value.isalnum() else "(invalid)"


def best_effort_envelope(raw: bytes) -> Envelope | None:
    """Whatever MSH-3..18 can be salvaged from an unreadable message, for the NACK header; else None.

    Never raises. With unusable separators nothing can be trusted, so None (the NACK then uses the
    default separators and our own header).
    """
    try:
        start = raw.find(b"MSH")
        if start < 0 or start > 16:
            return None
        try:
            text = decode(raw[start:], sniff_charset(raw))
        except UnreadableMessage:
            text = raw[start:].decode("latin-1")  # never fails; MSH-3..10 are ASCII in practice
        line = normalise_segments(text).split("\r", 1)[0]
        try:
            field_sep, enc = read_separators(line)
        except UnreadableMessage:
            return None
        return _envelope(line.split(field_sep), field_sep, enc)
    except Exception:  # salvage must never turn a NACK into a crash
        return None
