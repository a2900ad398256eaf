"""Where uvworker's hello-world time goes, in CPU microseconds per request, per function.

    python -m tests.benchmarks.suite.profile                 # httptools
    python -m tests.benchmarks.suite.profile --http h11 --native
    python -m tests.benchmarks.suite.profile --commit HEAD~3    # uvworker as it was then
    python -m tests.benchmarks.suite.profile --wsgi             # the WSGI hello world (wsgi-hello)
    python -m tests.benchmarks.suite.profile --close            # a new connection per request (close-64)

Needs ``py-spy`` (in the ``bench`` extra; attaching needs ptrace rights, e.g. root) and wrk.
Starts uvworker as the suite does (pinned to CPU 0, hello world, 64 keep-alive connections
from wrk on CPU 1), then:

1. measures the server's CPU time per request without any profiler (from /proc);
2. samples the server with ``py-spy record`` while wrk runs again (``--nonblocking``, so that
   the profiler does not stop the server; ``--native`` has to stop it for each sample);
3. splits (1) over functions by their share of the samples, self and inclusive.

Time spent in C (uvloop's loop and transports, the parser, syscalls) shows as the self time of
the Python frame that called into it, e.g. ``Runner.run`` for the event loop itself and
``HttptoolsAdapter.feed`` for llhttp; ``--native`` names the C functions too.
"""

from __future__ import annotations

import argparse
import collections
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from tests.benchmarks.suite import loads
from tests.benchmarks.suite.servers import (
    RunningServer,
    ServerSpec,
    asgi_server,
    wsgi_server,
    pinning,
    uvworker_tree,
)

# Frames every sample passes through on the way to the event loop: left out of the inclusive list.
_ENTRY = re.compile(r"^(_run_module_as_main|_run_code|<module>|main|launch|serve|Server\.run|Runner\.run) \(")
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def short(frame: str) -> str:
    """``RequestCycle.send (uvworker/protocols/cycle.py:238)`` → ``RequestCycle.send (cycle.py)``."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    return f"{match['name']} ({Path(match['file']).name})" if match["file"] else match["name"]


def parse(raw: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """py-spy's collapsed stacks → (self samples, inclusive samples, total samples) per function."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [short(frame) for frame in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return own, inclusive, total


def sample(server: RunningServer, args: argparse.Namespace, cpu_us: float) -> None:
    """py-spy while wrk runs; print self and inclusive time per function, in us/request."""
    # The bench extra installs py-spy next to this interpreter, which need not be on PATH.
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not spy:
        raise SystemExit("Sampling needs py-spy: pip install -e '.[bench]'.")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stacks.txt"
        load = subprocess.Popen([*pinning(args.client_cpu), "wrk", "-t1", f"-c{args.connections}", *wrk_headers(args),
                                 f"-d{args.duration + 2}s", server.url + args.path], stdout=subprocess.DEVNULL)
        try:
            command = [*pinning(args.client_cpu), spy, "record", "--pid", str(server.pid), "--function",
                       "--format", "raw", "--rate", str(args.rate), "--duration", str(args.duration), "-o", str(out)]
            # --native unwinds C stacks, which needs the process stopped for each sample.
            command.append("--native" if args.native else "--nonblocking")
            done = subprocess.run(command, timeout=args.duration + 60, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"py-spy failed: {done.stderr.strip()}")
        finally:
            load.wait(args.duration + 30)
        own, inclusive, total = parse(out.read_text())
    if not total:
        raise SystemExit("py-spy recorded no samples.")
    per_sample = cpu_us / total  # microseconds of one request's CPU time per sample
    print(f"{total} samples; every figure below is a share of {cpu_us:.1f} us/request\n")
    for title, counts in (("self time (the function itself, and C it calls)", own),
                          ("inclusive time (with everything it calls)", inclusive)):
        print(f"{title}:\n{'us/req':>7} {'share':>6}  function")
        shown = [(frame, count) for frame, count in counts.most_common() if counts is own or not _ENTRY.match(frame)]
        for frame, count in shown[: args.top]:
            print(f"{count * per_sample:7.2f} {count / total:6.1%}  {frame}")
        print()


def headers(args: argparse.Namespace) -> tuple[str, ...]:
    return ("Connection: close",) if args.close else ()


def wrk_headers(args: argparse.Namespace) -> list[str]:
    return [option for header in headers(args) for option in ("-H", header)]


def call_counts(spec: ServerSpec, args: argparse.Namespace) -> None:
    """The server under cProfile: calls per request of every function (Python and C), exact.

    cProfile slows Python calls several times over, so its times are only good for ranking;
    the call counts are what matter: each is work done for every request.
    """
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = Path(tmp) / "stats"
        profiled = replace(spec, argv=("-m", "cProfile", "-o", str(stats_file), *spec.argv))
        with RunningServer(profiled, args.server_cpu) as server:
            run = loads.wrk(server, args.path, connections=args.connections, duration=args.duration, warmup=0,
                            client_cpu=args.client_cpu, headers=headers(args))
        requests = run.value * args.duration  # close enough: wrk's own total is logged below
        stats = pstats.Stats(str(stats_file))
    entries = stats.stats  # type: ignore[attr-defined]
    served = max((calls for (file, _, name), (_, calls, *_) in entries.items() if name == "on_head"), default=0)
    requests = served or requests
    print(f"under cProfile: {run.value:,.0f} req/s; {requests:,.0f} requests served\n")
    print(f"{'calls/req':>9} {'tottime us/req':>14}  function")
    rows = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)
    for (file, line, name), (_, calls, tottime, *_) in rows[: args.top]:
        where = f"{Path(file).name}:{line}" if file != "~" else "C"
        print(f"{calls / requests:9.2f} {tottime / requests * 1e6:14.2f}  {name} ({where})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", choices=("httptools", "h11"), default="httptools")
    parser.add_argument("--path", default="/", help="route of apps.py to load: / (hello), /stream, /big, ...")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=8, help="seconds of each wrk run")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="also sample C frames (py-spy --native)")
    parser.add_argument("--cprofile", action="store_true", help="count calls per request under cProfile instead")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--wsgi", action="store_true", help="the WSGI hello world on its threads (row wsgi-hello)")
    parser.add_argument("--close", action="store_true",
                        help="Connection: close on every request: a new connection per request (row close-64)")
    parser.add_argument("--commit", help="profile uvworker as of this git commit instead of the work tree")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("Profiling needs wrk: apt-get install -y wrk.")

    with uvworker_tree(args.commit) as tree:
        spec = wsgi_server("uvworker", tree) if args.wsgi else asgi_server("uvworker", args.http, tree)
        if args.cprofile:
            call_counts(spec, args)
            return 0
        with RunningServer(spec, args.server_cpu) as server:
            plain = loads.wrk(server, args.path, connections=args.connections, duration=args.duration, warmup=1,
                              client_cpu=args.client_cpu, headers=headers(args))
            print(f"uvworker{' WSGI' if args.wsgi else ''}, {args.http}, GET {args.path}, {args.connections} {'connections, a new one per request' if args.close else 'keep-alive connections'}, no profiler: "
                  f"{plain.value:,.0f} req/s, {plain.cpu_us:.1f} CPU us/request", flush=True)
            sample(server, args, plain.cpu_us or 0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
