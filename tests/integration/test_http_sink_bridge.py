"""The HTTP CRM sink wired into the running bridge: config `sink: http`, MLLP in, REST upserts out, and
`mapping check --config` refusing rules the preset cannot enforce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.bridge import running_bridge, send_all, wait_for
from tests.crmserver import GENERIC, CrmServer
from tests.messages import adt, siu


@pytest.mark.parametrize("preset", ["salesforce", "hubspot", "generic"])
async def test_bridge_with_http_sink_applies_messages_to_the_crm(tmp_path: Path, preset: str) -> None:
    with CrmServer() as server:
        http = {"preset": preset, "base_url": server.base_url, "rate_limit_per_second": 0}
        if preset == "generic":
            http["generic"] = GENERIC
        async with running_bridge(tmp_path / "data", sink="http", http=http) as app:
            acks = await send_all(app.mllp.port, [adt("A04", mrn="HB1", cid="HB-1"),
                                                  siu("S12", appt="HBA", mrn="HB1", cid="HB-2"),
                                                  siu("S15", appt="HBA", mrn="HB1", cid="HB-3",
                                                      when="20261116090000-0500")])
            assert [a[0] for a in acks] == ["AA"] * 3
            await wait_for(lambda: app.journal.counts().get("done", 0) == 3, timeout=30)
            [contact] = app.sink.contacts("HB1")
            assert (contact.last_name, contact.phone) == ("Doe", "+12175550123")
            [appt] = app.sink.appointments("HB1")
            assert appt.status == "cancelled" and appt.contact_id == contact.contact_id
        assert any(line.startswith(("PATCH", "POST", "PUT")) for line in server.lines())


def test_mapping_check_with_config_rejects_rules_the_preset_cannot_enforce(tmp_path: Path) -> None:
    # A home-grown CRM that only offers write-only upserts: no way to read the current value back.
    write_only = {name: {k: v for k, v in ent.items() if k not in ("read", "modified_field")}
                  for name, ent in GENERIC.items()}
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(yaml.safe_dump({"sink": "http", "http": {"preset": "generic", "base_url": "http://127.0.0.1:9",
                                                             "generic": write_only}}))
    default_rules = subprocess.run([sys.executable, "-m", "hl7bridge.cli", "mapping", "init"],
                                   capture_output=True, text=True, check=True).stdout
    rules = tmp_path / "rules.yaml"
    rules.write_text(default_rules)  # phone/email/address use `newest`, which generic cannot enforce
    out = subprocess.run([sys.executable, "-m", "hl7bridge.cli", "mapping", "check", str(rules), "--config", str(cfg)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "newest" in out.stderr and "phone" in out.stderr
    plain = subprocess.run([sys.executable, "-m", "hl7bridge.cli", "mapping", "check", str(rules)],
                           capture_output=True, text=True)
    assert plain.returncode == 0
