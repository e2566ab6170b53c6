"""The core engine through real sockets: store-then-ACK, NACKs for bad input, dedup, the peers' client."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hl7bridge.mllp.client import MllpClient, MllpClientError
from hl7bridge.mllp.framer import encode_frame
from tests.bridge import running_bridge, send_all
from tests.messages import adt, control_id

pytestmark = pytest.mark.asyncio


async def test_200_messages_over_8_connections_all_acked_and_journaled(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        batches = [[adt(mrn=f"M{c}-{i}", cid=f"C{c:02d}{i:04d}") for i in range(25)] for c in range(8)]
        results = await asyncio.gather(*(send_all(app.mllp.port, b) for b in batches))
        for c, acks in enumerate(results):
            assert [a[0] for a in acks] == ["AA"] * 25
            assert [a[1] for a in acks] == [f"C{c:02d}{i:04d}" for i in range(25)]
        entries = app.journal.query()
        assert sorted(e.control_id for e in entries) == sorted(f"C{c:02d}{i:04d}" for c in range(8) for i in range(25))


async def test_resend_is_acked_again_with_one_journal_entry(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        msg = adt(cid="DUP-1")
        acks = await send_all(app.mllp.port, [msg, msg])
        assert [a[0] for a in acks] == ["AA", "AA"]
        assert [a[1] for a in acks] == ["DUP-1", "DUP-1"]
        entries = app.journal.query()
        assert len(entries) == 1
        assert entries[0].resend_count == 1


async def test_same_control_id_from_another_feed_is_not_a_duplicate(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        acks = await send_all(app.mllp.port, [adt(cid="X1", app="EPIC"), adt(cid="X1", app="EPIC_ADT2")])
        assert [a[0] for a in acks] == ["AA", "AA"]
        assert len(app.journal.query()) == 2


async def test_rejected_message_fixed_and_resent_with_same_control_id_is_processed(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        broken = adt(cid="FIX-1").replace(b"100001^^^NORTHCLINIC^MR", b"100001^^^NORTHCLINIC^PI")
        fixed = adt(cid="FIX-1")
        acks = await send_all(app.mllp.port, [broken, fixed])
        assert acks[0][0] == "AE" and acks[0][2] == "101"
        assert acks[1][0] == "AA"
        states = sorted(e.state for e in app.journal.query())
        assert states[0] in ("pending", "done") and states[1] == "rejected"


async def test_enhanced_mode_gets_commit_accept(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        msg = adt(cid="ENH-1").replace(b"|P|2.5.1\r", b"|P|2.5.1|||AL|NE\r", 1)
        acks = await send_all(app.mllp.port, [msg])
        assert acks == [("CA", "ENH-1", "")]


def _msh(msg_type: str = "ADT^A04^ADT_A01", cid: str = "B1", version: str = "2.5.1", pid: str | None = None,
         proc: str = "P") -> bytes:
    pid = pid if pid is not None else "PID|1||4711^^^NC^MR||Doe^Jane"
    segs = [f"MSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|20261115093000-0500||{msg_type}|{cid}|{proc}|{version}", "EVN|A04"]
    if pid:
        segs.append(pid)
    return ("\r".join(segs) + "\r").encode()


BAD_INPUT = [
    # (case, payload, expected MSA-1, expected ERR-3, journal state)
    ("missing MSH", b"PID|1||4711^^^NC^MR||Doe^Jane\r", "AR", "102", "rejected"),
    ("wrong separators", b"MSH1^~\\&1EPIC1NC1HL7BRIDGE1CRM1202611151ADT^A0411B21P12.5.1\r", "AR", "102", "rejected"),
    ("unsupported type", _msh("ORU^R01^ORU_R01", "B3"), "AR", "200", "rejected"),
    ("unsupported trigger", _msh("ADT^A99", "B4"), "AR", "201", "rejected"),
    ("unsupported version", _msh(cid="B5", version="3.0"), "AR", "203", "rejected"),
    ("unsupported processing id", _msh(cid="B5b", proc="X"), "AR", "202", "rejected"),
    ("missing MSH-10", _msh(cid=""), "AE", "101", "rejected"),
    ("missing patient identifier", _msh(cid="B7", pid="PID|1||4711^^^NC^PI||Doe^Jane"), "AE", "101", "rejected"),
    ("missing PID segment", _msh(cid="B8", pid=""), "AE", "100", "rejected"),
    ("SIU without SCH", _msh("SIU^S12^SIU_S12", "B9"), "AE", "100", "rejected"),
    ("undecodable bytes", _msh(cid="B10").replace(b"Doe^Jane", b"Doe^J\xff\xfe\xc3(")
     .replace(b"|P|2.5.1", b"|P|2.5.1||||||UNICODE UTF-8"), "AR", "102", "rejected"),
]


@pytest.mark.parametrize(("case", "payload", "code", "err", "state"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
async def test_bad_input_gets_documented_answer_and_server_keeps_serving(
    tmp_path: Path, case: str, payload: bytes, code: str, err: str, state: str
) -> None:
    async with running_bridge(tmp_path / "data") as app:
        good = adt(cid="GOOD-1")
        acks = await send_all(app.mllp.port, [payload, good])
        assert acks[0][0] == code, case
        assert acks[0][2] == err, case
        assert acks[1][:2] == ("AA", "GOOD-1")
        entries = app.journal.query()
        assert sorted(e.state for e in entries if e.control_id != "GOOD-1") == [state]
        rejected = next(e for e in entries if e.control_id != "GOOD-1")
        assert rejected.raw == payload  # raw bytes kept, even when unreadable
        assert rejected.reason and "Doe" not in rejected.reason and "Jane" not in rejected.reason


async def test_nack_carries_msa3_and_err_without_phi(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        async with await MllpClient.connect("127.0.0.1", app.mllp.port) as client:
            raw = await client.send(_msh(cid="B7", pid="PID|1||4711^^^NC^PI||Doe^Jane"))
        text = raw.decode()
        segs = {s[:3]: s for s in text.split("\r") if s}
        msa = segs["MSA"].split("|")
        assert msa[1] == "AE" and msa[2] == "B7" and msa[3]
        err = segs["ERR"].split("|")
        assert err[3].startswith("101^") and err[4] == "E" and err[8]
        assert "Doe" not in text and "4711" not in text


async def test_truncated_frame_then_the_server_keeps_serving(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        _reader, writer = await asyncio.open_connection("127.0.0.1", app.mllp.port)
        writer.write(b"\x0bMSH|^~\\&|EPIC|NC|HL7BRIDGE|CRM|2026")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        acks = await send_all(app.mllp.port, [adt(cid="AFTER-TRUNC")])
        assert acks[0][:2] == ("AA", "AFTER-TRUNC")
        assert [e.control_id for e in app.journal.query()] == ["AFTER-TRUNC"]


async def test_20_mib_frame_closes_the_connection_cleanly_and_server_keeps_serving(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.mllp.port)
        big = encode_frame(_msh(cid="BIG") + b"NTE|1||" + b"x" * (20 * 1024 * 1024) + b"\r")
        closed = False
        try:
            for i in range(0, len(big), 1 << 20):
                writer.write(big[i : i + (1 << 20)])
                await asyncio.wait_for(writer.drain(), 10)
            data = await asyncio.wait_for(reader.read(), 10)
            closed = data == b""
        except (ConnectionError, TimeoutError):
            closed = True
        finally:
            writer.close()
        assert closed
        acks = await send_all(app.mllp.port, [adt(cid="AFTER-BIG")])
        assert acks[0][:2] == ("AA", "AFTER-BIG")


async def test_junk_between_frames_is_discarded(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.mllp.port)
        try:
            writer.write(b"garbage\r\n" + encode_frame(adt(cid="J1")))
            await writer.drain()
            data = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 10)
            assert b"MSA|AA|J1" in data
        finally:
            writer.close()


async def test_python_hl7_mllp_send_gets_a_well_formed_ack(tmp_path: Path, fixtures_dir: Path) -> None:
    """The client we did not write: python-hl7's mllp_send console script, as a subprocess."""
    exe = shutil.which("mllp_send", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("python-hl7's mllp_send is not installed in this environment")
    async with running_bridge(tmp_path / "data") as app:
        src = (fixtures_dir / "adt_a04.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        msg_file = tmp_path / "a04.hl7"
        msg_file.write_bytes(src)
        proc = await asyncio.create_subprocess_exec(
            exe, "--port", str(app.mllp.port), "--file", str(msg_file), "--loose", "127.0.0.1",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        import hl7

        ack = hl7.parse(out.decode().strip().replace("\n", "\r"))
        assert str(ack.segment("MSA")[1]) in ("AA", "CA")
        assert str(ack.segment("MSA")[2]) == "MSG00001"
        assert str(ack.segment("MSH")[9]).startswith("ACK")


async def test_client_error_when_server_gone(tmp_path: Path) -> None:
    async with running_bridge(tmp_path / "data") as app:
        port = app.mllp.port
    with pytest.raises((MllpClientError, OSError)):
        async with await MllpClient.connect("127.0.0.1", port, timeout=2) as client:
            await client.send(adt(cid=control_id()), timeout=2)
