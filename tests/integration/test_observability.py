"""What an operator sees: /metrics after a known mix of traffic, /readyz through a PostgreSQL outage,
after_apply acknowledgements, and log lines without PHI."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.bridge import running_bridge, send_all, wait_for
from tests.messages import adt, siu
from tests.pgserver import PgServer

pytestmark = pytest.mark.asyncio


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def _scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    return await asyncio.to_thread(_get, port, path)


def _value(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, rest = metric.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()) or (not labels and not rest):
            return float(value)
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


async def test_metrics_show_exact_counts_for_a_known_mix(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        mix = [adt("A04", mrn=f"MX{i}", cid=f"MX-A04-{i}") for i in range(3)]
        mix += [adt("A08", mrn="MX0", cid="MX-A08-0", when="20261116090000-0500")]
        mix += [siu("S12", appt="MXA", mrn="MX1", cid="MX-S12-0"), siu("S15", appt="MXA", mrn="MX1", cid="MX-S15-0",
                                                                       when="20261116090000-0500")]
        unsupported = adt("A04", cid="MX-BAD-1").replace(b"ADT^A04^ADT_A01", b"ORU^R01^ORU_R01")
        missing_mrn = adt("A04", cid="MX-BAD-2").replace(b"^NORTHCLINIC^MR", b"^NORTHCLINIC^PI")
        duplicate = mix[0]
        acks = await send_all(app.mllp.port, [*mix, unsupported, missing_mrn, duplicate])
        assert [a[0] for a in acks] == ["AA"] * 6 + ["AR", "AE", "AA"]
        await wait_for(lambda: app.journal.counts().get("done", 0) == 6)
        port = app.ops.port
        status, text = await _scrape(port)
        assert status == 200
        assert _value(text, "hl7bridge_messages_received_total", type="ADT", trigger="A04") == 5  # 3, no-MRN, resend
        assert _value(text, "hl7bridge_messages_received_total", type="ADT", trigger="A08") == 1
        assert _value(text, "hl7bridge_messages_received_total", type="SIU", trigger="S12") == 1
        assert _value(text, "hl7bridge_messages_received_total", type="SIU", trigger="S15") == 1
        assert _value(text, "hl7bridge_messages_received_total", type="ORU", trigger="R01") == 1
        assert _value(text, "hl7bridge_acks_sent_total", code="AA") == 7
        assert _value(text, "hl7bridge_acks_sent_total", code="AR") == 1
        assert _value(text, "hl7bridge_acks_sent_total", code="AE") == 1
        assert _value(text, "hl7bridge_messages_rejected_total", reason="unsupported_message") == 1
        assert _value(text, "hl7bridge_messages_rejected_total", reason="missing_required") == 1
        assert _value(text, "hl7bridge_messages_duplicate_total") == 1
        assert _value(text, "hl7bridge_ack_latency_seconds_count") == 9
        assert _value(text, "hl7bridge_receive_to_applied_seconds_count") == 6
        assert _value(text, "hl7bridge_contacts_created_total", trigger="A04") == 3
        assert _value(text, "hl7bridge_last_apply_timestamp_seconds") > 0
        assert "MX0" not in text and "MX-A04" not in text and "127.0.0.1" not in text  # no PHI, ids or peers
        health, body = await _scrape(port, "/healthz")
        assert health == 200
        ready, body = await _scrape(port, "/readyz")
        assert ready == 200, body


@pytest.mark.postgres
async def test_readyz_follows_a_postgresql_outage(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.create_database()
    async with running_bridge(tmp_path / "data", store={"url": url}) as app:
        assert (await _scrape(app.ops.port, "/readyz"))[0] == 200
        pg_server.stop()
        try:
            status, body = await _scrape(app.ops.port, "/readyz")
            assert status == 503
            failing = json.loads(body)["failing"]
            assert "journal" in failing and "sink" in failing and "listener" not in failing
            # Cannot store -> AR (the sender retries later), ERR-3 207; never AA.
            acks = await send_all(app.mllp.port, [adt(cid="OUTAGE-1")], timeout=30)
            assert acks[0][0] == "AR" and acks[0][2] == "207"
        finally:
            pg_server.start()
            pg_server.wait_ready()

        async def ready() -> bool:
            return (await _scrape(app.ops.port, "/readyz"))[0] == 200

        deadline = asyncio.get_running_loop().time() + 30
        while not await ready():
            assert asyncio.get_running_loop().time() < deadline, "never ready again"
            await asyncio.sleep(0.2)
        acks = await send_all(app.mllp.port, [adt(cid="OUTAGE-1")])
        assert acks[0][0] == "AA"  # the rejected-by-outage message is accepted when resent


async def test_after_apply_mode_acks_after_the_crm_and_ae_on_permanent_failure(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data", intake={"ack_mode": "after_apply"}) as app:
        acks = await send_all(app.mllp.port, [adt("A04", mrn="AP1", cid="AP-1"), adt("A04", mrn="AP2", cid="AP-2",
                                                                                     sex="X")])
        assert acks[0][0] == "AA"
        assert app.sink.contacts("AP1")  # applied before the ACK was sent
        assert acks[1][0] == "AE" and acks[1][2] == "103"
        assert [e.control_id for e in app.journal.query(states=["dead"])] == ["AP-2"]


async def test_info_logs_name_the_message_but_carry_no_phi(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Workers in this process, so that caplog sees their DEBUG lines too; test_delivery_process.py checks
    # the worker process's log output the same way.
    caplog.set_level(logging.DEBUG)
    async with running_bridge(tmp_path / "data", delivery={"worker": "in_process"}) as app:
        await send_all(app.mllp.port, [adt("A04", mrn="PHI123", cid="LOG-1", family="Zyxwvut", given="Qponm")])
        await wait_for(lambda: app.journal.counts().get("done", 0) == 1)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "LOG-1" in r.getMessage()]
    assert len(info) == 1 and "outcome=accepted" in info[0] and "type=ADT^A04" in info[0]  # one line per message
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "outcome=applied" in text  # at DEBUG
    assert "Zyxwvut" not in text and "Qponm" not in text and "PHI123" not in text
