"""Recycling benchmarks (issue 14): what --trace-memory costs, how fast a recycled worker forked
from the --preload template is ready, and how much memory the template's workers share.

    python tests/benchmarks/recycling.py             # all three
    python tests/benchmarks/recycling.py trace       # or: ready, memory

* ``trace``: hello world (the suite's app, httptools, uvloop, one process pinned to CPU 0, wrk
  with 64 keep-alive connections on CPU 1) with --trace-memory 0, 1 and 10, interleaved over
  rounds; medians of requests/s and of the server's CPU microseconds per request (/proc).
* ``ready``: an app whose import takes 2 s, 2 workers with --preload and --max-requests, under
  keep-alive load; for every recycled worker, the time from the moment its retirement begins
  (the master's "Recycling worker N" decision) to its replacement's "ready", from the master's
  log, and the time a worker forked from the template takes from spawn to ready.
* ``memory``: an app that holds 200 MiB of Python objects after import, 4 workers, with and
  without --preload; the workers' summed USS (/proc/PID/smaps_rollup) once all serve and each
  has answered requests.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.suite import loads
from tests.benchmarks.suite.servers import ROOT, RunningServer, asgi_server, free_port

MiB = 1024 * 1024


# -- trace: the cost of --trace-memory ----------------------------------------------------------
def trace(rounds: int, duration: int) -> str:
    base = asgi_server("uvworker", "httptools")
    specs = {frames: base if frames == 0 else
             type(base)(f"uvworker --trace-memory {frames}", (*base.argv, "--trace-memory", str(frames)))
             for frames in (0, 1, 10)}
    rates: dict[int, list[float]] = {frames: [] for frames in specs}
    cpus: dict[int, list[float]] = {frames: [] for frames in specs}
    for round_ in range(rounds):
        order = list(specs) if round_ % 2 == 0 else list(specs)[::-1]
        for frames in order:
            with RunningServer(specs[frames], 0) as server:
                sample = loads.wrk(server, "/", connections=64, duration=duration, warmup=1, client_cpu=1)
            rates[frames].append(sample.value)
            cpus[frames].append(sample.cpu_us or 0.0)
            print(f"round {round_ + 1}/{rounds}  --trace-memory {frames:2}  {sample.value:10,.0f} req/s  "
                  f"CPU {sample.cpu_us:6.1f} us/req", flush=True)
    lines = ["| --trace-memory | requests/s | CPU per request | vs off |", "|---|--:|--:|--:|"]
    off = statistics.median(cpus[0])
    for frames in specs:
        cpu = statistics.median(cpus[frames])
        lines.append(f"| {frames or 'off (0)'} | {statistics.median(rates[frames]):,.0f} | {cpu:.1f} µs | "
                     f"{cpu / off:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", choices=["trace", "ready", "memory"], default=[])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    args = parser.parse_args(argv)
    parts = args.parts or ["trace", "ready", "memory"]
    os.sched_setaffinity(0, {1})  # this process is a load generator too
    results = []
    if "trace" in parts:
        results.append(trace(args.rounds, args.duration))
    print("\n\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
