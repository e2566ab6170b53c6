"""Replay and the operator commands, run the way an operator runs them: the real CLI as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hl7bridge.crm import open_sink
from hl7bridge.store import open_journal
from tests.bridge import BridgeProcess
from tests.messages import adt, siu


def cli(*args: str, timeout: float = 300, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hl7bridge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, input=input_text)


def _write_file(path: Path, n_patients: int, updates: int, sep: bytes = b"\r") -> int:
    """n_patients x (1 A04 + updates A08), written interleaved as one file; returns the message count."""
    msgs = []
    for k in range(updates + 1):
        for p in range(n_patients):
            msg = adt("A04" if k == 0 else "A08", mrn=f"R{p:05d}", cid=f"R{p:05d}-{k}",
                      phone=f"^PRN^PH^^1^217^{5550000 + (p * 7 + k) % 10000:07d}",
                      when=f"202611150{k}0000-0500")
            msgs.append(msg.replace(b"\r", sep))
    path.write_bytes(b"".join(msgs))
    return len(msgs)


@pytest.mark.slow
def test_replay_10000_messages_then_again_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = tmp_path / "big.hl7"
    total = _write_file(src, 2000, 4, sep=b"\n")
    assert total == 10000
    first = cli("replay", str(src), "--data-dir", str(data), "--json", timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    s1 = json.loads(first.stdout)
    assert (s1["messages"], s1["accepted"], s1["applied"], s1["duplicates"]) == (10000, 10000, 10000, 0)
    assert (s1["rejected"], s1["dead"], s1["still_pending"]) == (0, 0, 0)
    sink = open_sink(data / "crm.sqlite3")
    try:
        before = [c.to_json() for c in sink.contacts()]
    finally:
        sink.close()
    assert len(before) == 2000
    assert {c["phone"] for c in before if c["mrn"] == "R00003"} == {f"+1217{5550000 + (3 * 7 + 4):07d}"}

    second = cli("replay", str(src), "--data-dir", str(data), "--json", timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    s2 = json.loads(second.stdout)
    assert (s2["messages"], s2["accepted"], s2["duplicates"], s2["applied"]) == (10000, 0, 10000, 0)
    sink = open_sink(data / "crm.sqlite3")
    try:
        assert [c.to_json() for c in sink.contacts()] == before  # not even updated_at moved
    finally:
        sink.close()


def test_replay_shows_a_progress_bar_and_a_summary(tmp_path: Path) -> None:
    src = tmp_path / "small.hl7"
    _write_file(src, 20, 1)
    out = cli("replay", str(src), "--data-dir", str(tmp_path / "data"))
    assert out.returncode == 0, out.stderr
    assert "replayed 40 message(s)" in out.stdout and "applied 40" in out.stdout
    assert "journal" in out.stderr and "40/40" in out.stderr  # the rich progress bar went to stderr


def test_dry_run_prints_operations_and_writes_nothing(tmp_path: Path, fixtures_dir: Path) -> None:
    data = tmp_path / "data"
    out = cli("replay", str(fixtures_dir / "siu_s12.hl7"), str(fixtures_dir / "adt_a04.hl7"), "--dry-run",
              "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    items = [json.loads(line) for line in out.stdout.splitlines()]
    assert {i["outcome"] for i in items} == {"ops"}
    appt = next(op for i in items for op in i["ops"] if op["entity"] == "appointment")
    assert appt["key"] == "FL-99001" and appt["fields"]["status"]["value"] == "scheduled"
    assert not (data / "journal.sqlite3").exists() and not (data / "crm.sqlite3").exists()


def test_replay_of_mllp_capture_and_batch_files(tmp_path: Path, fixtures_dir: Path) -> None:
    data = tmp_path / "data"
    out = cli("replay", str(fixtures_dir / "batch_three.hl7"), str(fixtures_dir / "batch_mllp_capture.hl7"),
              "--data-dir", str(data), "--json")
    summary = json.loads(out.stdout)
    assert summary["messages"] == 5 and summary["rejected"] == 0, summary


def test_replay_from_journal_after_a_mapping_fix(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = tmp_path / "m.hl7"
    src.write_bytes(adt("A04", mrn="FJ1", cid="FJ1-0", family="smith"))
    assert cli("replay", str(src), "--data-dir", str(data)).returncode == 0
    rules = tmp_path / "title.yaml"
    text = cli("mapping", "init").stdout
    rules.write_text(text.replace("args: {case: as_sent}", "args: {case: title}", 2))
    assert cli("mapping", "check", str(rules)).returncode == 0
    out = cli("replay", "--from-journal", "--data-dir", str(data), "--rules", str(rules), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["applied"] == 1
    sink = open_sink(data / "crm.sqlite3")
    try:
        assert sink.contacts("FJ1")[0].last_name == "Smith"
    finally:
        sink.close()


def test_send_prints_control_id_and_ack_and_exit_code(tmp_path: Path, fixtures_dir: Path) -> None:
    bridge = BridgeProcess(tmp_path / "data").start()
    try:
        target = f"127.0.0.1:{bridge.port}"
        ok = cli("send", target, str(fixtures_dir / "adt_a04.hl7"), str(fixtures_dir / "adt_a28.hl7"))
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.splitlines() == ["MSG00001\tAA", "CER-884201\tAA"]
        bad = cli("send", f"127.0.0.1:{bridge.port}", str(fixtures_dir / "bad_unsupported_type.hl7"))
        assert bad.returncode == 1
        assert "\tAR 200" in bad.stdout
        listing = cli("journal", "list", "--data-dir", str(tmp_path / "data"), "--json")
        states = sorted(e["state"] for e in json.loads(listing.stdout))
        assert states.count("rejected") == 1 and len(states) == 3
    finally:
        assert bridge.terminate() == 0  # SIGTERM drains and exits cleanly
    unreachable = cli("send", f"127.0.0.1:{bridge.port}", str(fixtures_dir / "adt_a04.hl7"), timeout=60)
    assert unreachable.returncode != 0
    assert unreachable.stderr.startswith("hl7bridge: 1 message(s) got no acknowledgement")


def test_dlq_commands_list_show_retry_discard_purge(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = tmp_path / "bad.hl7"
    src.write_bytes(adt("A04", mrn="DQ1", cid="DQ1-0", sex="X") + adt("A04", mrn="DQ2", cid="DQ2-0", sex="Z"))
    out = cli("replay", str(src), "--data-dir", str(data), "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["dead"] == 2  # a failing replay says so
    listed = json.loads(cli("dlq", "list", "--data-dir", str(data), "--json").stdout)
    assert [e["control_id"] for e in listed] == ["DQ1-0", "DQ2-0"]
    assert all(e["error"] == "bad_field_value" and "PID-8" in e["reason"] for e in listed)
    shown = cli("dlq", "show", str(listed[0]["id"]), "--data-dir", str(data))
    assert "PID|1||DQ1" in shown.stdout and "dead-lettered" in shown.stdout
    assert cli("dlq", "discard", str(listed[1]["id"]), "--data-dir", str(data), "--yes").returncode != 0  # no reason
    disc = cli("dlq", "discard", str(listed[1]["id"]), "--reason", "test patient", "--data-dir", str(data), "--yes")
    assert disc.returncode == 0 and "discarded 1" in disc.stdout
    retry = cli("dlq", "retry", "--all", "--data-dir", str(data))
    assert "requeued 1" in retry.stdout
    journal = open_journal(data / "journal.sqlite3")
    try:
        states = {e.control_id: e.state for e in journal.query()}
        assert states == {"DQ1-0": "pending", "DQ2-0": "discarded"}
    finally:
        journal.close()
    no_confirm = cli("dlq", "purge", "--older-than", "0s", "--data-dir", str(data), input_text="n\n")
    assert no_confirm.returncode != 0
    purged = cli("dlq", "purge", "--older-than", "0s", "--data-dir", str(data), "--yes")
    assert purged.returncode == 0 and "purged 1" in purged.stdout


def test_mapping_commands(tmp_path: Path, fixtures_dir: Path) -> None:
    export = cli("mapping", "export", "--format", "csv")
    assert export.returncode == 0
    header = export.stdout.splitlines()[0].lower()
    for col in ("source field", "source type", "destination field", "destination type", "transformation",
                "sync trigger", "conflict rule"):
        assert col in header
    md = cli("mapping", "export", "--format", "md")
    assert md.stdout.startswith("|") and "PID-8" in md.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(cli("mapping", "init").stdout.replace("transform: phone", "transform: fone"))
    check = cli("mapping", "check", str(broken))
    assert check.returncode == 2
    assert "broken.yaml:" in check.stderr and "fone" in check.stderr
    tested = cli("mapping", "test", "-", str(fixtures_dir / "siu_s15.hl7"), "--json")
    assert json.loads(tested.stdout.splitlines()[0])["ops"][0]["fields"]["status"]["value"] == "cancelled"
    from importlib import resources

    cases = Path(str(resources.files("hl7bridge.mapping").joinpath("default_rules.test.yaml")))
    run = cli("mapping", "test", "-", str(cases))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAIL" not in run.stdout and run.stdout.count("PASS") >= 10


def test_check_reports_config_errors_with_their_path(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listener:\n  port: 70000\ndelivery:\n  lanse: 3\n")
    out = cli("check", "--config", str(cfg))
    assert out.returncode == 2
    assert "listener.port" in out.stderr and "delivery.lanse" in out.stderr
    cfg.write_text("listener:\n  port: 2600\n")
    ok = cli("check", "--config", str(cfg))
    assert ok.returncode == 0 and "mllp port 2600" in ok.stdout


def test_every_command_has_help() -> None:
    for args in (["--help"], ["serve", "--help"], ["send", "--help"], ["dlq", "retry", "--help"],
                 ["replay", "--help"], ["mapping", "export", "--help"], ["crm", "contacts", "--help"],
                 ["golive", "--help"], ["reconcile", "--help"], ["journal", "prune", "--help"]):
        out = cli(*args)
        assert out.returncode == 0 and "Usage" in out.stdout, args


def test_crm_commands_print_the_record_model(tmp_path: Path, fixtures_dir: Path) -> None:
    data = tmp_path / "data"
    src = tmp_path / "in.hl7"
    src.write_bytes(adt("A04", mrn="CM1", cid="CM1-0") + siu("S12", appt="AP1", mrn="CM1", cid="CM1-1"))
    assert cli("replay", str(src), "--data-dir", str(data)).returncode == 0
    contacts = json.loads(cli("crm", "contacts", "--mrn", "CM1", "--data-dir", str(data), "--json").stdout)
    assert list(contacts[0]) == ["contact_id", "mrn", "first_name", "last_name", "birth_date", "sex", "phone",
                                 "email", "address_line1", "city", "state", "postal_code", "updated_at"]
    appts = json.loads(cli("crm", "appointments", "--data-dir", str(data), "--json").stdout)
    assert list(appts[0]) == ["appointment_id", "mrn", "contact_id", "start", "duration_minutes", "status", "type",
                              "provider", "location", "updated_at"]
    assert appts[0]["contact_id"] == contacts[0]["contact_id"]


def test_replay_to_a_running_bridge_over_mllp(tmp_path: Path) -> None:
    src = tmp_path / "to.hl7"
    _write_file(src, 5, 1)
    bridge = BridgeProcess(tmp_path / "data").start()
    try:
        out = cli("replay", str(src), "--to", f"127.0.0.1:{bridge.port}", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"messages": 10, "ack_codes": {"AA": 10}}
    finally:
        bridge.terminate()


def test_journal_prune_keeps_dead_letters_unless_asked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = tmp_path / "p.hl7"
    src.write_bytes(adt("A04", mrn="PR1", cid="PR-1") + adt("A04", mrn="PR2", cid="PR-2", sex="X"))
    cli("replay", str(src), "--data-dir", str(data))
    out = cli("journal", "prune", "--older-than", "0s", "--yes", "--data-dir", str(data))
    assert out.returncode == 0 and "pruned 1" in out.stdout
    left = json.loads(cli("journal", "list", "--data-dir", str(data), "--json").stdout)
    assert [(e["control_id"], e["state"]) for e in left] == [("PR-2", "dead")]
    out = cli("journal", "prune", "--older-than", "0s", "--include-dead", "--yes", "--data-dir", str(data))
    assert "pruned 1" in out.stdout


def test_replay_from_journal_resume_continues_after_the_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = tmp_path / "r.hl7"
    _write_file(src, 3, 0)
    assert cli("replay", str(src), "--data-dir", str(data)).returncode == 0
    first = json.loads(cli("replay", "--from-journal", "--data-dir", str(data), "--json").stdout)
    assert first["applied"] == 3
    # A resumed run starts after the last entry the previous run with the same filters finished.
    resumed = json.loads(cli("replay", "--from-journal", "--resume", "--data-dir", str(data), "--json").stdout)
    assert resumed["messages"] == 0
    other = json.loads(cli("replay", "--from-journal", "--resume", "--type", "ADT^A04", "--data-dir", str(data),
                           "--json").stdout)
    assert other["messages"] == 3  # a different filter is a different run
