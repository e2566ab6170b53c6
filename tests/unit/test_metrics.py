"""Metrics: what a scrape shows after the pipeline reports events; labels stay bounded and PHI-free."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from hl7bridge.metrics import OTHER, Metrics


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), version="9.9.9", clock=lambda: 1_700_000_000.0)


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse render() the way Prometheus would: (sample name, labels) -> value."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, frozenset(labels.items())))


def test_counts_appear_in_the_exposition(metrics: Metrics) -> None:
    for _ in range(3):
        metrics.message_received("ADT", "A04")
    metrics.message_received("SIU", "S12")
    metrics.ack_sent("AA", 0.002)
    metrics.ack_sent("AA", 0.003)
    metrics.ack_sent("AR", 0.001)
    metrics.rejected("unsupported_message")
    metrics.duplicate()
    metrics.filtered("trigger_not_mapped")
    metrics.applied("ADT", "A04", 0.5)
    metrics.contact_created("A04")
    metrics.dead_lettered("mapping_error")
    metrics.retry_scheduled("transient_sink_error")
    metrics.sink_error("transient_sink_error")
    metrics.set_backlog(7, 42.5)
    metrics.set_dlq_size(2)
    metrics.frame_rejected("oversize")

    assert value(metrics, "hl7bridge_messages_received_total", type="ADT", trigger="A04") == 3
    assert value(metrics, "hl7bridge_messages_received_total", type="SIU", trigger="S12") == 1
    assert value(metrics, "hl7bridge_acks_sent_total", code="AA") == 2
    assert value(metrics, "hl7bridge_acks_sent_total", code="AR") == 1
    assert value(metrics, "hl7bridge_messages_rejected_total", reason="unsupported_message") == 1
    assert value(metrics, "hl7bridge_messages_duplicate_total") == 1
    assert value(metrics, "hl7bridge_messages_filtered_total", reason="trigger_not_mapped") == 1
    assert value(metrics, "hl7bridge_messages_applied_total", type="ADT", trigger="A04") == 1
    assert value(metrics, "hl7bridge_contacts_created_total", trigger="A04") == 1
    assert value(metrics, "hl7bridge_dead_letters_total", error="mapping_error") == 1
    assert value(metrics, "hl7bridge_delivery_retries_total", error="transient_sink_error") == 1
    assert value(metrics, "hl7bridge_sink_errors_total", error="transient_sink_error") == 1
    assert value(metrics, "hl7bridge_journal_backlog") == 7
    assert value(metrics, "hl7bridge_journal_oldest_pending_age_seconds") == 42.5
    assert value(metrics, "hl7bridge_dlq_size") == 2
    assert value(metrics, "hl7bridge_frames_rejected_total", reason="oversize") == 1
    assert value(metrics, "hl7bridge_last_message_received_timestamp_seconds", type="SIU") == 1_700_000_000
    assert value(metrics, "hl7bridge_last_apply_timestamp_seconds") == 1_700_000_000

    # Histograms: populated, with observations in the right buckets.
    assert value(metrics, "hl7bridge_ack_latency_seconds_count") == 3
    assert value(metrics, "hl7bridge_ack_latency_seconds_bucket", le="0.0025") == 2
    assert value(metrics, "hl7bridge_ack_latency_seconds_bucket", le="0.0005") == 0
    assert value(metrics, "hl7bridge_ack_latency_seconds_bucket", le="10.0") == 3
    assert value(metrics, "hl7bridge_receive_to_applied_seconds_count") == 1
    assert value(metrics, "hl7bridge_receive_to_applied_seconds_bucket", le="3600.0") == 1
    assert value(metrics, "hl7bridge_receive_to_applied_seconds_bucket", le="0.25") == 0


def test_series_the_alerts_use_exist_at_zero_before_any_event(metrics: Metrics) -> None:
    for code in ("AA", "AE", "AR", "CA", "CE", "CR"):
        assert value(metrics, "hl7bridge_acks_sent_total", code=code) == 0
    for trigger in ("A04", "A28"):
        assert value(metrics, "hl7bridge_messages_received_total", type="ADT", trigger=trigger) == 0
        assert value(metrics, "hl7bridge_contacts_created_total", trigger=trigger) == 0
    assert value(metrics, "hl7bridge_dead_letters_total", error="mapping_error") == 0
    assert value(metrics, "hl7bridge_dlq_size") == 0
    # A last-received timestamp of 0 would read "silent since 1970": it appears only once something arrives.
    assert not any(name.startswith("hl7bridge_last_message") for name, _ in samples(metrics))


def test_build_info(metrics: Metrics) -> None:
    (labels,) = [dict(lbls) for name, lbls in samples(metrics) if name == "hl7bridge_build_info"]
    assert labels["version"] == "9.9.9"
    assert re.fullmatch(r"3\.\d+\.\d+.*", labels["python"])


def test_connections_and_component_health(metrics: Metrics) -> None:
    metrics.connection_opened()
    metrics.connection_opened()
    metrics.connection_closed()
    metrics.connection_refused()
    metrics.set_up("listener", True)
    metrics.set_up("sink", False)
    assert value(metrics, "hl7bridge_connections_active") == 1
    assert value(metrics, "hl7bridge_connections_refused_total") == 1
    assert value(metrics, "hl7bridge_component_up", component="listener") == 1
    assert value(metrics, "hl7bridge_component_up", component="sink") == 0
    metrics.set_up("sink", True)
    assert value(metrics, "hl7bridge_component_up", component="sink") == 1


def test_reconcile_result_replaces_the_previous_one(metrics: Metrics) -> None:
    metrics.set_reconcile({"missing": 3, "start_shift_hour": 2}, 0.05, 1_700_000_123.0)
    assert value(metrics, "hl7bridge_reconcile_issues", kind="missing") == 3
    assert value(metrics, "hl7bridge_reconcile_drift_ratio") == 0.05
    assert value(metrics, "hl7bridge_reconcile_last_run_timestamp_seconds") == 1_700_000_123
    metrics.set_reconcile({"duplicate": 1}, 0.01, 1_700_000_999.0)
    assert value(metrics, "hl7bridge_reconcile_issues", kind="missing") == 0
    assert value(metrics, "hl7bridge_reconcile_issues", kind="start_shift_hour") == 0
    assert value(metrics, "hl7bridge_reconcile_issues", kind="duplicate") == 1


@pytest.mark.parametrize(
    ("message_type", "trigger", "expected"),
    [
        ("ADT^A01", "A01", "other/A01"),  # a whole MSH-9 passed by mistake
        ("", "", "other/other"),  # unreadable header
        ("ADT", "12345", "ADT/other"),  # a control ID in the wrong place
        ("ADT", "123", "ADT/other"),  # short but digits-only: could be an ID
        ("adt", "a04", "other/other"),  # not the shape HL7 sends
        ("ADT", "A04;DROP", "ADT/other"),
        (" SIU ", "S12", "SIU/S12"),  # stray whitespace is not a new value
    ],
)
def test_unexpected_type_or_trigger_becomes_other(
    metrics: Metrics, message_type: str, trigger: str, expected: str
) -> None:
    metrics.message_received(message_type, trigger)
    received = {
        dict(lbls)["type"] + "/" + dict(lbls)["trigger"]: v
        for (name, lbls), v in samples(metrics).items()
        if name == "hl7bridge_messages_received_total" and v
    }
    assert received == {expected: 1}


def test_labels_stay_bounded_and_free_of_identifiers(metrics: Metrics) -> None:
    hostile = [
        "MSG00001",  # control ID
        "0012345678",  # MRN
        "10.1.2.3:51544",  # peer
        "Missing PID-3 for DOE^JOHN",  # a reason with a name in it
        "x" * 500,
        "",
    ]
    for text in hostile:
        metrics.message_received(text, text)
        metrics.rejected(text)
        metrics.filtered(text)
        metrics.dead_lettered(text)
        metrics.retry_scheduled(text)
        metrics.sink_error(text)
        metrics.frame_rejected(text)
        metrics.set_up(text, False)
        metrics.ack_sent(text, 0.01)
        metrics.applied(text, text, 1.0)
        metrics.contact_created(text)
    # A flood of distinct, well-formed codes is capped too.
    for i in range(500):
        metrics.filtered(f"reason_{i}")
        metrics.message_received("ADT", f"Z{i % 100:02d}" if i < 100 else f"Y{i % 100:02d}")

    values_per_label: dict[tuple[str, str], set[str]] = {}
    for name, labels in samples(metrics):
        for key, val in labels:
            if key in ("le", "version", "python"):
                continue  # bucket bounds and build info are ours, not the message's
            values_per_label.setdefault((name, key), set()).add(val)
            assert not val.isdigit(), (name, key, val)
            assert ":" not in val and "." not in val and " " not in val, (name, key, val)
            assert val not in hostile, (name, key, val)
            assert len(val) <= 48, (name, key, val)
    assert len(values_per_label[("hl7bridge_messages_filtered_total", "reason")]) <= 33
    assert len(values_per_label[("hl7bridge_messages_received_total", "trigger")]) <= 101
    assert OTHER in values_per_label[("hl7bridge_messages_filtered_total", "reason")]


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # no "Duplicated timeseries" error: nothing global
    first.duplicate()
    assert value(first, "hl7bridge_messages_duplicate_total") == 1
    assert value(second, "hl7bridge_messages_duplicate_total") == 0
    assert first.registry is not second.registry


def test_render_is_the_classic_text_format_without_created_series(metrics: Metrics) -> None:
    text = metrics.render().decode()
    assert "# TYPE hl7bridge_messages_received_total counter" in text
    assert "_created" not in text.replace("hl7bridge_contacts_created_total", "")


RECONCILE_TEXTFILE = """\
# HELP hl7bridge_reconcile_issues Drift in the last reconciliation.
# TYPE hl7bridge_reconcile_issues gauge
hl7bridge_reconcile_issues{kind="missing_contact"} 2
hl7bridge_reconcile_issues{kind="start_shift_hour"} 0
# HELP hl7bridge_reconcile_drift_ratio Share of records with drift in the last reconciliation.
# TYPE hl7bridge_reconcile_drift_ratio gauge
hl7bridge_reconcile_drift_ratio 0.02
# HELP hl7bridge_reconcile_last_run_timestamp_seconds Unix time of the last reconcile.
# TYPE hl7bridge_reconcile_last_run_timestamp_seconds gauge
hl7bridge_reconcile_last_run_timestamp_seconds 1700000500.5
some_other_metric 1
"""


def test_reconcile_textfile_is_imported(metrics: Metrics, tmp_path: Path) -> None:
    path = tmp_path / "reconcile.prom"
    assert metrics.load_reconcile_file(path) is False  # not written yet: nothing exported, no error
    path.write_text(RECONCILE_TEXTFILE, encoding="utf-8")
    assert metrics.load_reconcile_file(path) is True
    assert value(metrics, "hl7bridge_reconcile_issues", kind="missing_contact") == 2
    assert value(metrics, "hl7bridge_reconcile_issues", kind="start_shift_hour") == 0
    assert value(metrics, "hl7bridge_reconcile_drift_ratio") == 0.02
    assert value(metrics, "hl7bridge_reconcile_last_run_timestamp_seconds") == 1_700_000_500.5
    assert b"some_other_metric" not in metrics.render()  # only the reconcile families are taken

    path.write_text("garbage {{{", encoding="utf-8")
    os.utime(path, ns=(1, 1))  # a different mtime, so the file is read again
    assert metrics.load_reconcile_file(path) is False
    assert value(metrics, "hl7bridge_reconcile_drift_ratio") == 0.02  # last good values stay
