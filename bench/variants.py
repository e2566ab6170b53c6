"""Diagnostic launchers for `hl7bridge serve`, used only by the benchmark to explain its numbers.

    python -m bench.variants intake-only serve ARGS...    # the delivery workers are never started
    python -m bench.variants profile OUT.prof serve ARGS...  # cProfile of the event-loop thread

`intake-only` isolates the intake path (scan, intake log, ACK) from the delivery workers, which by default
run in their own process but share the machine's cores; it is reported as a diagnostic row, never as
hl7bridge's result. `profile` runs
the unmodified bridge under cProfile (main thread only: the event loop, where the ACK path runs) and
writes the stats when the bridge exits on SIGTERM. Profiling starts once the listener is up.
"""

from __future__ import annotations

import cProfile
import sys

__all__ = ["main"]


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    from hl7bridge import cli

    if mode == "intake-only":
        import os

        from hl7bridge import delivery

        # Workers in this process (not the worker process), and never started.
        os.environ["HL7BRIDGE_DELIVERY__WORKER"] = "in_process"
        delivery.Delivery.start = lambda self: None  # type: ignore[method-assign]
        sys.argv = ["hl7bridge", *args]
        cli.main()
    elif mode == "profile":
        from hl7bridge.mllp.server import MllpServer

        out, rest = args[0], args[1:]
        sys.argv = ["hl7bridge", *rest]
        profiler = cProfile.Profile()
        start = MllpServer.start

        async def start_then_profile(self: MllpServer) -> None:
            await start(self)
            profiler.enable()  # from the first accepted connection on: startup and imports are not in it

        MllpServer.start = start_then_profile  # type: ignore[method-assign]
        try:
            cli.main()
        except SystemExit:
            pass
        finally:
            profiler.disable()
            profiler.dump_stats(out)
    else:
        raise SystemExit(f"unknown variant {mode!r}")


if __name__ == "__main__":
    main()
