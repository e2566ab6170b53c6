"""The go-live test protocol (product.md) against a running bridge: its MLLP address and its CRM store.

Five steps with synthetic patients whose MRNs carry a recognisable, per-run prefix (so `--cleanup` deletes
exactly them): a new patient, a booking, a cancellation, a phone change with a CRM-side edit judged by the
`phone` field's conflict rule, and 50 patients + 50 appointments sent at once over several connections.
Each step records what was expected and what the CRM held, field by field, and the sync latency (send ->
visible in the CRM, polled up to the sync window). The report is the go-live baseline, kept so that a
failure months later can be compared with go-live behaviour. The report records and their rendering are in
`golive_report.py`, the synthetic patients and messages in `golive_messages.py`.

Expectations are the protocol's, not the bridge's: statuses (S12 scheduled, S15 cancelled), the start
instant, E.164 phones and one contact per MRN are fixed here. Fields whose form the data map decides
(names, e-mail, address, appointment type, provider, location) are taken from the rules when a compiled
mapper is given, so golive checks the bridge against the user's own data map.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from hl7bridge.crm.base import Sink
from hl7bridge.crm.model import Appointment, Contact
from hl7bridge.golive_messages import Appt, Messages, Patient, make_appt, make_patient
from hl7bridge.golive_report import Check, GoliveReport, StepResult
from hl7bridge.sending import SendResult, send_payloads

__all__ = ["Check", "GoliveReport", "StepResult", "run_golive"]

T = TypeVar("T")
_ACK_OK = ("AA", "CA")
#: Fields whose exact form the data map decides; checked against the mapper's output when one is given.
_DATA_MAP_FIELDS = frozenset({"first_name", "last_name", "email", "address_line1", "city", "state",
                              "postal_code", "type", "provider", "location"})
#: Contact fields that can prove an A08 was applied when the phone is expected to stay unchanged.
_MARKER_FIELDS = ("email", "address_line1", "city", "postal_code")


# --- expectations and checks -------------------------------------------------------------------------


def _mapped(mapper: Any, raw: bytes, entity: str) -> dict[str, Any] | None:
    """What the user's rules produce for this message's upsert of `entity` (None: no mapper/no op)."""
    if mapper is None:
        return None
    from hl7bridge.hl7.parse import parse_message

    result = mapper.map(parse_message(raw))
    for op in result if isinstance(result, list) else ():
        if op.entity == entity and op.action == "upsert":
            return {name: fs.value for name, fs in op.fields.items()}
    return None


def _expect(base: dict[str, Any], mapped: dict[str, Any] | None) -> dict[str, Any]:
    """The protocol's values, with data-map fields as the rules render them (unmapped ones not checked)."""
    if mapped is None:
        return base
    out = {k: v for k, v in base.items() if k not in _DATA_MAP_FIELDS}
    out.update({k: mapped[k] for k in base if k in _DATA_MAP_FIELDS and k in mapped})
    return out


def _same(name: str, expected: Any, found: Any) -> bool:
    if name == "start" and expected is not None and found is not None:
        try:
            return datetime.fromisoformat(str(expected)) == datetime.fromisoformat(str(found))  # as instants
        except ValueError:
            return False
    return expected == found


def _field_checks(label: str, expected: Mapping[str, Any], record: Contact | Appointment | None) -> list[Check]:
    if record is None:
        return [Check(f"{label} exists", "present", "absent", False)]
    return [Check(f"{label}.{k}", v, getattr(record, k), _same(k, v, getattr(record, k)))
            for k, v in expected.items()]


def _ack_checks(results: Sequence[SendResult], label: str) -> list[Check]:
    return [Check(f"ACK {label} (MSH-10 {r.control_id})", "AA or CA",
                  r.code + (f" {r.err_code} {r.text}".rstrip() if r.code not in _ACK_OK else ""), r.code in _ACK_OK)
            for r in results]


def _contact_base(p: Patient) -> dict[str, Any]:
    return {k: v for k, v in asdict(p).items() if k != "pid3"}


def _appt_base(a: Appt, mrn: str) -> dict[str, Any]:
    return {"mrn": mrn, "start": a.start.isoformat(), "duration_minutes": a.duration_minutes,
            "status": "scheduled", "type": "Office visit", "provider": a.provider, "location": a.location}


async def _poll(fetch: Callable[[], T], done: Callable[[T], bool], deadline: float,
                interval: float = 0.05) -> tuple[T, float | None]:
    """Poll the CRM until done(value) or the deadline; returns the last value and when it was done."""
    while True:
        value = await asyncio.to_thread(fetch)
        now = time.monotonic()
        if done(value):
            return value, now
        if now >= deadline:
            return value, None
        await asyncio.sleep(min(interval, deadline - now))


_RULE_WORDS = {"ehr": "the EHR always wins", "crm": "the CRM owns it: the EHR only fills it when empty",
               "newest": "the newer change wins"}
_NAMES = ("new patient (ADT^A04)", "book an appointment (SIU^S12)", "cancel the appointment (SIU^S15)",
          "phone change in the EHR, then in the CRM (ADT^A08, conflict rule)", "volume")


def _latency(t0: float, t_ok: float | None) -> float | None:
    return None if t_ok is None else round(t_ok - t0, 4)


class _Run:
    def __init__(self, target: tuple[str, int], sink: Sink, msgs: Messages, *, sync_window: float,
                 phone_conflict: str, field_conflicts: Mapping[str, str], mapper: Any, volume: int,
                 connections: int, ack_timeout: float, include_authority: bool) -> None:
        self.host, self.port = target
        self.sink, self.msgs, self.window, self.rule = sink, msgs, sync_window, phone_conflict
        self.conflicts, self.mapper, self.volume_n = field_conflicts, mapper, volume
        self.connections, self.ack_timeout = max(1, connections), ack_timeout
        self.suffix = f"^{msgs.authority}" if include_authority else ""
        self.patient, self.appt = make_patient(msgs.prefix, 1, self.suffix), make_appt(msgs.prefix, 1)

    async def run(self) -> list[StepResult]:
        steps = (self.new_patient, self.booking, self.cancellation, self.phone, self.volume)
        return [await self._guard(number, step) for number, step in enumerate(steps, start=1)]

    async def _guard(self, number: int, step: Callable[[], Any]) -> StepResult:
        try:
            result: StepResult = await step()
        except Exception as exc:  # a crashing step is a failed step, never a crashed run
            result = StepResult(number, _NAMES[number - 1], (Check("step ran to completion", "no error",
                                f"{type(exc).__name__}: {exc}", False),), None)
        return result

    async def _send(self, *items: tuple[str, bytes]) -> list[SendResult]:
        payloads = [(name, i, raw) for i, (name, raw) in enumerate(items)]
        return await send_payloads(self.host, self.port, payloads, timeout=self.ack_timeout)

    def _appointment(self, mrn: str, appointment_id: str) -> Appointment | None:
        return next((a for a in self.sink.appointments(mrn) if a.appointment_id == appointment_id), None)

    def _contact(self, mrn: str) -> Contact | None:
        found = self.sink.contacts(mrn)
        return found[0] if found else None

    async def new_patient(self) -> StepResult:
        p = self.patient
        _, raw = self.msgs.adt("A04", p)
        expected = _expect(_contact_base(p), _mapped(self.mapper, raw, "contact"))
        t0 = time.monotonic()
        acks = await self._send(("ADT^A04", raw))
        found, t_ok = await _poll(lambda: self.sink.contacts(p.mrn), bool, time.monotonic() + self.window)
        checks = [*_ack_checks(acks, "ADT^A04"), Check("contacts with this MRN", 1, len(found), len(found) == 1),
                  *_field_checks("contact", expected, found[0] if found else None)]
        return StepResult(1, _NAMES[0], tuple(checks), _latency(t0, t_ok))

    async def booking(self) -> StepResult:
        p, a = self.patient, self.appt
        _, raw = self.msgs.siu("S12", p, a)
        expected = _expect(_appt_base(a, p.mrn), _mapped(self.mapper, raw, "appointment"))
        t0 = time.monotonic()
        acks = await self._send(("SIU^S12", raw))
        found, t_ok = await _poll(lambda: self._appointment(p.mrn, a.appointment_id), lambda x: x is not None,
                                  time.monotonic() + self.window)
        contact = await asyncio.to_thread(self._contact, p.mrn)
        checks = [*_ack_checks(acks, "SIU^S12"), *_field_checks("appointment", expected, found)]
        if found is not None:
            want = contact.contact_id if contact else "(the patient's contact)"
            checks.append(Check("appointment.contact_id (linked to the patient's contact)", want,
                                found.contact_id, contact is not None and found.contact_id == want))
        return StepResult(2, _NAMES[1], tuple(checks), _latency(t0, t_ok))

    async def cancellation(self) -> StepResult:
        p, a = self.patient, self.appt
        _, raw = self.msgs.siu("S15", p, a)
        t0 = time.monotonic()
        acks = await self._send(("SIU^S15", raw))
        found, t_ok = await _poll(lambda: self._appointment(p.mrn, a.appointment_id),
                                  lambda x: x is not None and x.status == "cancelled", time.monotonic() + self.window)
        expected = {"status": "cancelled", "start": a.start.isoformat(), "mrn": p.mrn}
        checks = [*_ack_checks(acks, "SIU^S15"), *_field_checks("appointment", expected, found)]
        return StepResult(3, _NAMES[2], tuple(checks), _latency(t0, t_ok),
                          notes=("The S15 carries no SCH-25 status: the trigger event alone must cancel.",))

    async def phone(self) -> StepResult:
        p, rule = self.patient, self.rule
        marker = next((f for f in _MARKER_FIELDS if self.conflicts.get(f, "ehr") != "crm"), None)
        notes = [f"Conflict rule of `phone`: `{rule}` ({_RULE_WORDS[rule]})."]
        if marker is None:
            notes.append("No EHR-owned contact field can prove an A08 was applied: waited the whole sync window.")
        checks: list[Check] = []
        # 4a: the EHR changes the phone.
        phone2, phone3, phone4 = (f"+1217555{9000 + i}" for i in range(3))
        before = await asyncio.to_thread(self._contact, p.mrn)
        want2 = phone2 if rule != "crm" or before is None or not before.phone else before.phone
        t0 = time.monotonic()
        lat = await self._a08(p, phone2, 1, want2, checks, "after the EHR phone change")
        # 4b: a CRM user edits it.
        await asyncio.to_thread(self.sink.edit, "contact", p.mrn, {"phone": phone3}, self.msgs.tick())
        edited = await asyncio.to_thread(self._contact, p.mrn)
        checks.append(Check("contact.phone after the CRM-side edit", phone3, edited.phone if edited else None,
                            edited is not None and edited.phone == phone3))
        # 4c: the EHR changes it again, later than the CRM edit: the rule decides.
        want4 = phone3 if rule == "crm" else phone4
        notes.append(f"After the CRM edit the next EHR change must {'keep' if rule == 'crm' else 'overwrite'} "
                     "the CRM's value.")
        await self._a08(p, phone4, 2, want4, checks, f"after the next EHR change (rule `{rule}`)")
        return StepResult(4, _NAMES[3], tuple(checks), _latency(t0, lat), notes=tuple(notes))

    async def _a08(self, p: Patient, phone: str, n: int, want: str, checks: list[Check], label: str) -> float | None:
        marker = next((f for f in _MARKER_FIELDS if self.conflicts.get(f, "ehr") != "crm"), None)
        values = {"email": f"{p.pid3.lower()}-v{n}@golive.invalid", "address_line1": f"{n} Changed Street",
                  "city": f"Chatham{n}", "postal_code": f"6262{n}"}
        changed = replace(p, phone=phone, **({marker: values[marker]} if marker else {}))
        _, raw = self.msgs.adt("A08", changed)
        mark = _expect({marker: values[marker]}, _mapped(self.mapper, raw, "contact")) if marker else {}
        before = await asyncio.to_thread(self._contact, p.mrn)

        def applied(c: Contact | None) -> bool:
            if c is None:
                return False
            if mark:
                return all(getattr(c, k) == v for k, v in mark.items())
            return want != (before.phone if before else None) and c.phone == want

        acks = await self._send(("ADT^A08", raw))
        found, t_ok = await _poll(lambda: self._contact(p.mrn), applied, time.monotonic() + self.window)
        checks += _ack_checks(acks, "ADT^A08")
        checks += [Check(f"contact.{k} (shows the A08 was applied)", v, getattr(found, k, None),
                         getattr(found, k, None) == v) for k, v in mark.items()]
        checks.append(Check(f"contact.phone {label}", want, found.phone if found else None,
                            found is not None and found.phone == want))
        return t_ok

    async def volume(self) -> StepResult:
        n, k, prefix = self.volume_n, self.connections, self.msgs.prefix
        at = self.msgs.tick()  # one event time for the batch: different patients, no ordering among them
        lanes: list[list[tuple[str, int, bytes]]] = [[] for _ in range(k)]
        expected: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {}
        for i in range(n):
            p, a = make_patient(prefix, 101 + i, self.suffix), make_appt(prefix, 101 + i)
            _, a04 = self.msgs.adt("A04", p, at=at)
            _, s12 = self.msgs.siu("S12", p, a, at=at)
            expected[p.mrn] = (_expect(_contact_base(p), _mapped(self.mapper, a04, "contact")),
                               _expect(_appt_base(a, p.mrn), _mapped(self.mapper, s12, "appointment")),
                               a.appointment_id)
            lane = lanes[i % k]  # a patient's A04 and S12 on one connection, in order
            lane += [(f"{p.mrn}|contact", len(lane), a04), (f"{p.mrn}|appointment", len(lane) + 1, s12)]
        sent_at: dict[str, float] = {}

        async def send_lane(items: list[tuple[str, int, bytes]]) -> list[SendResult]:
            last = time.monotonic()

            def on_result(r: SendResult) -> None:
                nonlocal last  # one message in flight: the next send starts when the previous ACK arrives
                sent_at[r.file], last = last, time.monotonic()

            return await send_payloads(self.host, self.port, items, timeout=self.ack_timeout, on_result=on_result)

        t0 = time.monotonic()
        acks = [r for lane in await asyncio.gather(*(send_lane(x) for x in lanes if x)) for r in lane]
        sent_s = time.monotonic() - t0
        seen: dict[str, float] = {}

        def snapshot() -> dict[str, tuple[list[Contact], Appointment | None]]:
            return {m: (self.sink.contacts(m), self._appointment(m, expected[m][2])) for m in expected}

        def all_seen(snap: dict[str, tuple[list[Contact], Appointment | None]]) -> bool:
            now = time.monotonic()
            for m, (contacts, appt) in snap.items():
                if contacts:
                    seen.setdefault(f"{m}|contact", now)
                if appt is not None:
                    seen.setdefault(f"{m}|appointment", now)
            return len(seen) == 2 * n

        snap, _ = await _poll(snapshot, all_seen, time.monotonic() + self.window, interval=0.25)
        return self._volume_result(n, k, acks, snap, expected, seen, sent_at, sent_s)

    def _volume_result(self, n: int, k: int, acks: list[SendResult], snap: dict[str, Any],
                       expected: dict[str, Any], seen: dict[str, float], sent_at: dict[str, float],
                       sent_s: float) -> StepResult:
        details: list[Check] = []
        one = good_c = good_a = 0
        for mrn, (contacts, appt) in snap.items():
            want_c, want_a, _ = expected[mrn]
            one += len(contacts) == 1
            c_checks = _field_checks(f"contact {mrn}", want_c, contacts[0] if contacts else None)
            a_checks = _field_checks(f"appointment of {mrn}", want_a, appt)
            if appt is not None:
                link = contacts[0].contact_id if contacts else None
                a_checks.append(Check(f"appointment of {mrn}.contact_id", link, appt.contact_id,
                                      link is not None and appt.contact_id == link))
            good_c += all(c.ok for c in c_checks) and len(contacts) == 1
            good_a += all(c.ok for c in a_checks)
            details += [c for c in c_checks + a_checks if not c.ok]
        no_ack = sum(r.code == "NO_ACK" for r in acks)
        nack = sum(r.code not in (*_ACK_OK, "NO_ACK") for r in acks)
        total = 2 * n
        checks = [
            Check("messages acknowledged with AA/CA", f"{total}/{total}", f"{total - no_ack - nack}/{total}",
                  total - no_ack - nack == total and len(acks) == total),
            Check("NACKs (AE/AR/CE/CR)", 0, nack, nack == 0),
            Check("timeouts or dropped connections (no ACK)", 0, no_ack, no_ack == 0),
            Check("contacts visible within the sync window", n, sum(x.endswith("|contact") for x in seen),
                  sum(x.endswith("|contact") for x in seen) == n),
            Check("appointments visible within the sync window", n, sum(x.endswith("|appointment") for x in seen),
                  sum(x.endswith("|appointment") for x in seen) == n),
            Check("MRNs with exactly one contact", n, one, one == n),
            Check("contacts with every mapped field correct", n, good_c, good_c == n),
            Check("appointments with every field correct, linked to the right contact", n, good_a, good_a == n),
            *details[:20],
            *[c for c in _ack_checks(acks, "volume") if not c.ok][:10],
        ]
        lat = sorted(seen[key] - sent_at[key] for key in seen if key in sent_at)
        stats = {"p50": round(statistics.median(lat), 4),
                 "p95": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 4)} if lat else {}
        notes = (f"{n} patients (ADT^A04) and {n} appointments (SIU^S12) over {k} concurrent connections, "
                 f"all ACKs back in {sent_s:.2f} s.",)
        return StepResult(5, f"volume: {n} patients + {n} appointments", tuple(checks),
                          round(lat[-1], 4) if lat and len(seen) == total else None, stats, notes)


async def run_golive(target: tuple[str, int], sink: Sink, *, sync_window: float = 30.0, mrn_prefix: str = "GL",
                     phone_conflict: str = "ehr", field_conflicts: Mapping[str, str] | None = None,
                     mapper: Any = None, authority: str = "GOLIVE", include_authority: bool = False,
                     volume: int = 50, connections: int = 5,
                     ack_timeout: float = 10.0, cleanup: bool = False) -> GoliveReport:
    """Run the five steps against the bridge at `target` whose CRM is `sink`; never raises for a failing
    bridge (every failure is a failed check in the report)."""
    if phone_conflict not in ("ehr", "crm", "newest"):
        raise ValueError(f"unknown conflict rule {phone_conflict!r}")
    if not (mrn_prefix.isascii() and mrn_prefix.isalnum() and len(mrn_prefix) <= 8):
        raise ValueError("the MRN prefix must be 1-8 letters or digits")
    run_id = uuid.uuid4().hex[:8].upper()
    run_prefix = f"{mrn_prefix}{run_id}"
    started = datetime.now(UTC)
    steps = await _Run(target, sink, Messages(run_prefix, authority), sync_window=sync_window,
                       phone_conflict=phone_conflict, field_conflicts=field_conflicts or {}, mapper=mapper,
                       volume=volume, connections=connections, ack_timeout=ack_timeout,
                       include_authority=include_authority).run()
    cleaned = await asyncio.to_thread(sink.delete_where_mrn_prefix, run_prefix) if cleanup else None
    return GoliveReport(run_id, run_prefix, f"{target[0]}:{target[1]}", started, datetime.now(UTC), sync_window,
                        phone_conflict, tuple(steps), cleaned)
