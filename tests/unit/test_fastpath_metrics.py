"""Cached labelled children: the exposition is exactly what uncached `labels()` calls produce, including
for values past a label's cap and for the values it refuses."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from hl7bridge import metrics as metrics_module
from hl7bridge.metrics import Metrics


def _drive(m: Metrics) -> None:
    types = ["ADT", "SIU", " ADT", "adt", "12345", "", "ORU"] + [f"Z{i:02d}" for i in range(30)]  # cap is 16
    triggers = ["A04", "A08", "S12", "R01", "MRN123", ""] + [f"X{i:02d}" for i in range(120)]  # cap is 100
    for round_ in range(3):
        for i, kind in enumerate(types):
            m.message_received(kind, triggers[(i * 7 + round_) % len(triggers)])
        for trigger in triggers:
            m.message_received("ADT", trigger)
        for code in ["AA", "AE", "AR", "CA", "CE", "CR", "ZZ", "", "aa"]:
            m.ack_sent(code, 0.001 * round_)


def test_cached_and_uncached_metrics_expose_the_same_series(monkeypatch: pytest.MonkeyPatch) -> None:
    cached = Metrics(CollectorRegistry(), clock=lambda: 1_700_000_000.0)
    _drive(cached)
    monkeypatch.setattr(metrics_module, "_CHILD_CACHE_MAX", 0)  # every call goes through labels()
    uncached = Metrics(CollectorRegistry(), clock=lambda: 1_700_000_000.0)
    _drive(uncached)
    assert cached.render() == uncached.render()
    assert b'type="other"' in cached.render() and b'trigger="other"' in cached.render()


def test_the_caches_stop_growing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "_CHILD_CACHE_MAX", 8)
    m = Metrics(CollectorRegistry())
    for i in range(50):
        m.message_received("ADT", f"T{i}")
        m.ack_sent(f"Q{i}", 0.0)
    assert len(m._received_children) == 8 and len(m._ack_children) == 8
