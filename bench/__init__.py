"""Benchmarks: hl7bridge against its peers, in one run, on loopback (`make bench` → bench/RESULTS.md).

Nothing here is imported by hl7bridge itself; speed is measured here, never asserted in tests.
"""

from __future__ import annotations

__all__: list[str] = []
