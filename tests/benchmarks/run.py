"""The benchmark suite: uvworker against uvicorn, granian (and Gunicorn for WSGI), in one run.

    python tests/benchmarks/run.py                  # everything, 3 rounds (about 10 minutes)
    python tests/benchmarks/run.py --quick          # 1 round, short runs: checks the suite works
    python tests/benchmarks/run.py hello ws         # only rows whose id starts with these
    python tests/benchmarks/run.py --list           # the row ids
    python tests/benchmarks/run.py --commit HEAD~5  # uvworker as of an older commit (before/after)
    python tests/benchmarks/run.py hello --against HEAD~5  # also that commit, as a peer in the same run

Needs Linux, ``taskset``, ``wrk`` and, for the HTTP/2 rows, ``h2load`` (``apt-get install -y wrk
nghttp2-client``) and the ``bench`` extra
(``pip install -e '.[bench]'``). Nothing but 127.0.0.1 is a target.

How it measures. Rows are grouped by the servers they compare; a group's servers run side by
side for the whole group (memory rows: a fresh server per measurement), each a subprocess with
one worker, access log off, uvloop and the same parser, pinned to ``--server-cpu`` while every
load generator (wrk, and this process for the Python clients) runs on ``--client-cpu``. Each
round measures every row on every server, alternating the server order from round to round
(A, B, then B, A, ...). Within a round a server's run of a row is ``--slices`` short runs (1 s
of wrk each by default), alternated with the other servers' (A B, B A, A B, ...; the first after
the warm-up). On a shared machine the load of other jobs drifts over seconds (one server's CPU
per request over consecutive 1 s runs: 16% spread, neighbouring runs correlated 0.6-0.7), so
two servers measured 6 s apart differ by more than two measured 1 s apart: an A/A run (a commit
against itself, 5 rounds, 64 KiB POST) read 0.78-1.44 per round with one 5 s run per server and
round, 0.95-1.03 with five alternated 1 s runs. A round's figure for a server is the mean over
its slices (CPU per request over all their requests, the median of their p99s). The table gives
medians over the rounds: the row's figure, the ratio uvworker / peer (above 1 is faster for
rates; for memory rows lower is better, so a ratio below 1 favours uvworker), wrk's p99 latency,
and the server's CPU time per request or message, read from /proc, which depends much less than
requests/s on what else the machine runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tests.benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.suite import loads
from tests.benchmarks.suite.loads import Sample
from tests.benchmarks.suite.servers import (
    ROOT,
    RunningServer,
    ServerSpec,
    asgi_server,
    h2_server,
    uvworker_tree,
    wsgi_server,
)

MiB = 1024 * 1024


@dataclass
class Plan:
    rounds: int = 3
    duration: int = 5  # seconds measured per server, row and round (wrk takes whole seconds per run)
    warmup: int = 1  # seconds of wrk before a server's first slice of a row in a round (0: none)
    ws_duration: float = 3.0
    slices: int = 5  # short runs per server, row and round, alternated among the servers
    idle_connections: int = 2000
    upload_bytes: int = 1024 * MiB
    server_cpu: int | None = 0
    client_cpu: int | None = 1

    def h2load(self, server: RunningServer, path: str, connections: int, streams: int) -> Sample:
        return loads.h2load(server, path, connections=connections, streams=streams, duration=self.duration,
                            warmup=self.warmup, client_cpu=self.client_cpu)

    def wrk(self, server: RunningServer, path: str, connections: int, **options: object) -> Sample:
        return loads.wrk(server, path, connections=connections, duration=self.duration, warmup=self.warmup,
                         client_cpu=self.client_cpu, **options)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Row:
    id: str
    title: str
    unit: str
    measure: Callable[[RunningServer, Plan], Sample]
    lower_is_better: bool = False


@dataclass
class Group:
    servers: list[ServerSpec]  # the first is uvworker; the others are its peers
    rows: list[Row]
    fresh: bool = False  # a new server process for every measurement (memory rows)


def hello(connections: int) -> Callable[[RunningServer, Plan], Sample]:
    return lambda server, plan: plan.wrk(server, "/", connections)


def groups(tree: Path, against: tuple[str, Path] | None = None) -> dict[str, Group]:
    """Every row, by the servers it compares; uvworker is imported from ``tree``. With ``against`` (a
    commit and its tree), that uvworker joins each group as a peer, measured interleaved like the others."""
    close = ("Connection: close",)
    rows_httptools = [
        Row("hello-64-httptools", "hello world, keep-alive, 64 conn, httptools", "req/s", hello(64)),
        Row("hello-1024-httptools", "hello world, keep-alive, 1024 conn, httptools", "req/s", hello(1024)),
        Row("close-64", "hello world, new connection per request, 64 conn", "req/s",
            lambda server, plan: plan.wrk(server, "/", 64, headers=close)),
        Row("stream-16x1k", "streamed response, 16 x 1 KiB, 64 conn", "req/s",
            lambda server, plan: plan.wrk(server, "/stream", 64)),
        Row("big-1m", "1 MiB response, 64 conn", "req/s", lambda server, plan: plan.wrk(server, "/big", 64)),
        Row("post-64k", "POST 64 KiB body, 64 conn", "req/s",
            lambda server, plan: plan.wrk(server, "/post", 64, script=loads.POST_SCRIPT)),
        Row("ws-32", "WebSocket echo, 32 B messages", "msg/s",
            lambda server, plan: loads.websocket_echo(server, 32, duration=plan.ws_duration, warmup=plan.warmup)),
        Row("ws-64k", "WebSocket echo, 64 KiB messages", "msg/s",
            lambda server, plan: loads.websocket_echo(server, 65536, duration=plan.ws_duration, warmup=plan.warmup)),
        Row("ws-connect", "WebSocket session per connection (handshake, 1 echo, close), 32 clients", "sessions/s",
            lambda server, plan: loads.websocket_churn(server, 32, duration=plan.ws_duration, warmup=plan.warmup)),
    ]
    rows_h11 = [
        Row("hello-64-h11", "hello world, keep-alive, 64 conn, h11", "req/s", hello(64)),
        Row("hello-1024-h11", "hello world, keep-alive, 1024 conn, h11", "req/s", hello(1024)),
    ]
    idle = lambda server, plan: loads.idle_connections(server, plan.idle_connections)
    rows_memory = [
        Row("memory-idle-httptools", "memory per idle keep-alive connection (2,000 open), httptools",
            "KiB", idle, lower_is_better=True),
        Row("memory-idle-h11", "memory per idle keep-alive connection (2,000 open), h11",
            "KiB", idle, lower_is_better=True),
        Row("memory-upload-1g", "peak RSS growth during one 1 GiB upload", "MiB",
            lambda server, plan: loads.upload(server, plan.upload_bytes), lower_is_better=True),
    ]
    httptools = [asgi_server("uvworker", "httptools", tree), asgi_server("uvicorn", "httptools")]
    h11 = [asgi_server("uvworker", "h11", tree), asgi_server("uvicorn", "h11")]
    wsgi = [wsgi_server("uvworker", tree), wsgi_server("uvicorn"), wsgi_server("gunicorn"), wsgi_server("granian")]
    hello_peers = [asgi_server("granian", "httptools"), asgi_server("ceiling", "httptools")]
    h2 = [h2_server("uvworker", tree), h2_server("hypercorn")]
    rows_h2 = [
        Row("h2-hello-8x16", "HTTP/2 (h2c) hello world, 8 conn x 16 streams, h2load", "req/s",
            lambda server, plan: plan.h2load(server, "/", 8, 16)),
        Row("h2-big-1m", "HTTP/2 (h2c) 1 MiB response, 8 conn x 1 stream, h2load", "req/s",
            lambda server, plan: plan.h2load(server, "/big", 8, 1)),
    ]
    if against:
        commit, old = against
        for servers in (httptools, h11, wsgi, h2):
            servers.insert(1, dataclasses.replace(servers[0], name=f"uvworker @ {commit}", tree=old))
    return {
        "asgi-httptools": Group(httptools + hello_peers, rows_httptools),
        "asgi-h11": Group(h11, rows_h11),
        "h2": Group(h2, rows_h2),
        "wsgi": Group(wsgi, [Row("wsgi-hello", "WSGI hello world, keep-alive, 64 conn", "req/s", hello(64))]),
        "memory-httptools": Group(httptools, [rows_memory[0], rows_memory[2]], fresh=True),
        "memory-h11": Group(h11, [rows_memory[1]], fresh=True),
    }


def selected(row_id: str, patterns: list[str]) -> bool:
    return not patterns or any(
        row_id == p or row_id.startswith(p + "-") or fnmatch.fnmatch(row_id, p) for p in patterns
    )


# -- running ----------------------------------------------------------------------------------------
@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, row: Row, server: str, sample: Sample) -> None:
        self.samples.setdefault((row.id, server), []).append(sample)

    def median(self, row_id: str, server: str, metric: str) -> float | None:
        values = [getattr(s, metric) for s in self.samples.get((row_id, server), [])]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None


def measured_on(spec: ServerSpec, row: Row) -> bool:
    return spec.rows is None or row.id in spec.rows


def combined(slices: list[Sample]) -> Sample:
    """One server's run of a row in a round from its slices, which last alike: the mean rate, the CPU time
    per request over all their requests (a slice's count is in proportion to its rate), the median p99."""
    rate = statistics.fmean(piece.value for piece in slices)
    timed = [(piece.cpu_us, piece.value) for piece in slices if piece.cpu_us is not None]
    weight = sum(value for _, value in timed)
    p99s = [piece.p99_ms for piece in slices if piece.p99_ms is not None]
    return Sample(
        value=rate,
        p99_ms=statistics.median(p99s) if p99s else None,
        cpu_us=sum(cpu * value for cpu, value in timed) / weight if weight else None,
        note="; ".join(dict.fromkeys(piece.note for piece in slices if piece.note)),
    )


def interleaved(row: Row, servers: list[RunningServer], plan: Plan) -> dict[str, Sample]:
    """``row`` on each server, in ``plan.slices`` short runs alternated among them (A B, B A, ...), each
    server warmed up before its first; so the machine's drifting load hits every server alike."""
    piece = dataclasses.replace(plan, duration=max(1, plan.duration // plan.slices),
                                ws_duration=plan.ws_duration / plan.slices)
    cold = dataclasses.replace(piece, warmup=0)
    slices: dict[str, list[Sample]] = {server.name: [] for server in servers}
    for index in range(plan.slices):
        for server in servers if index % 2 == 0 else servers[::-1]:
            slices[server.name].append(row.measure(server, piece if index == 0 else cold))
    return {name: combined(samples) for name, samples in slices.items()}


def run_group(group: Group, rows: list[Row], plan: Plan, results: Results) -> None:
    running: dict[str, RunningServer] = {}
    try:
        if not group.fresh:
            for spec in group.servers:
                if any(measured_on(spec, row) for row in rows):
                    running[spec.name] = RunningServer(spec, plan.server_cpu)
        for round_ in range(plan.rounds):
            order = group.servers if round_ % 2 == 0 else group.servers[::-1]
            for row in rows:
                specs = [spec for spec in order if measured_on(spec, row)]
                if group.fresh:
                    samples = {}
                    for spec in specs:
                        with RunningServer(spec, plan.server_cpu) as server:
                            samples[spec.name] = row.measure(server, plan)
                else:
                    samples = interleaved(row, [running[spec.name] for spec in specs], plan)
                for name, sample in samples.items():
                    results.add(row, name, sample)
                    log(round_, plan, row, name, sample)
    finally:
        for server in running.values():
            server.stop()


def log(round_: int, plan: Plan, row: Row, server: str, sample: Sample) -> None:
    parts = [f"round {round_ + 1}/{plan.rounds}", f"{row.id:22}", f"{server:24}", f"{sample.value:>12,.1f} {row.unit}"]
    if sample.p99_ms is not None:
        parts.append(f"p99 {sample.p99_ms:8.2f} ms")
    if sample.cpu_us is not None:
        parts.append(f"CPU {sample.cpu_us:7.1f} us")
    if sample.note:
        parts.append(sample.note)
    print("  ".join(parts), flush=True)


# -- report -----------------------------------------------------------------------------------------
def figure(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("req/s", "msg/s"):
        return f"{value:,.0f}"
    return f"{value:,.1f} {unit}"


def milliseconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.2f} ms"


def markdown(all_groups: dict[str, Group], chosen: dict[str, list[Row]], results: Results) -> str:
    columns = ["Scenario", "Compared with", "uvworker", "peer", "uvworker / peer", "p99 uvworker", "p99 peer",
               "CPU/req uvworker", "CPU/req peer"]
    lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "--:|" * (len(columns) - 2)]
    for name, rows in chosen.items():
        ours, *peers = [spec.name for spec in all_groups[name].servers]
        for row in rows:
            for peer in peers:
                if (row.id, peer) not in results.samples:
                    continue  # a peer measured on some rows only (granian, the ceiling: hello world)
                mine, theirs = results.median(row.id, ours, "value"), results.median(row.id, peer, "value")
                ratio = f"{mine / theirs:.2f}×" if mine is not None and theirs else "–"
                title = row.title + (f" ({row.unit}, lower is better)" if row.lower_is_better else f" ({row.unit})")
                cells = [title, peer, figure(mine, row.unit), figure(theirs, row.unit), ratio]
                for server in (ours, peer):
                    cells.append(milliseconds(results.median(row.id, server, "p99_ms")))
                for server in (ours, peer):
                    cpu = results.median(row.id, server, "cpu_us")
                    cells.append("–" if cpu is None else f"{cpu:.1f} µs")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(plan: Plan) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    versions = []
    for package in ("uvicorn", "granian", "gunicorn", "hypercorn", "h2", "httptools", "uvloop", "h11", "websockets"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    pinned = (f"server pinned to CPU {plan.server_cpu}, load generator to CPU {plan.client_cpu}"
              if plan.server_cpu is not None else "nothing pinned (fewer than 2 CPUs)")
    return (f"{time.strftime('%Y-%m-%d', time.gmtime())}; {os.cpu_count()} × {cpu}, Linux {platform.release()}; "
            f"Python {platform.python_version()}; {', '.join(versions)}; {pinned}; medians of {plan.rounds} "
            f"interleaved round(s), each server measured {plan.duration:g} s per row and round in {plan.slices} "
            f"alternated wrk runs, after {plan.warmup:g} s of warm-up.")


# -- command line -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark uvworker against uvicorn, granian and Gunicorn.")
    parser.add_argument("rows", nargs="*", metavar="ROW",
                        help="run only these rows: an id, an id prefix (hello, ws, memory) or a glob (*h11)")
    parser.add_argument("--quick", action="store_true", help="1 round of short runs: checks that the suite works")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick: 1)")
    parser.add_argument("--duration", type=int,
                        help="seconds measured per server, row and round (default 5; --quick: 2)")
    parser.add_argument("--slices", type=int, help="alternated wrk runs the duration is split into (default 5; "
                                                    "--quick: 2; 1: one run per server, row and round)")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--commit", help="measure uvworker as of this git commit instead of the work tree")
    parser.add_argument("--against", metavar="COMMIT",
                        help="also measure uvworker as of this git commit, as a peer in the same interleaved run")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    parser.add_argument("--list", action="store_true", help="list the row ids and exit")
    args = parser.parse_args(argv)

    all_groups = groups(ROOT)
    if args.list:
        for name, group in all_groups.items():
            for row in group.rows:
                servers = ", ".join(s.name for s in group.servers if measured_on(s, row))
                print(f"{row.id:24} {row.title}  [{servers}]")
        return 0
    chosen = {name: [row for row in group.rows if selected(row.id, args.rows)] for name, group in all_groups.items()}
    chosen = {name: rows for name, rows in chosen.items() if rows}
    if not chosen:
        parser.error(f"no row matches {' '.join(args.rows)}; see --list")
    if not shutil.which("wrk"):
        raise SystemExit("The suite needs wrk: apt-get install -y wrk")
    if not shutil.which("taskset"):
        raise SystemExit("The suite needs taskset (util-linux).")

    plan = Plan()
    if args.quick:
        plan = Plan(rounds=1, duration=2, warmup=1, ws_duration=1.0, slices=2)
    plan.rounds = args.rounds or plan.rounds
    plan.duration = args.duration or plan.duration
    plan.slices = args.slices or plan.slices
    cpus = os.sched_getaffinity(0)
    if {args.server_cpu, args.client_cpu} <= cpus and args.server_cpu != args.client_cpu:
        plan.server_cpu, plan.client_cpu = args.server_cpu, args.client_cpu
        os.sched_setaffinity(0, {args.client_cpu})  # this process is a load generator too
    else:
        print(f"warning: CPUs {args.server_cpu} and {args.client_cpu} are not both available; not pinning",
              file=sys.stderr)
        plan.server_cpu = plan.client_cpu = None
    loads.raise_fd_limit(plan.idle_connections * 2 + 1024)  # servers inherit it

    started = time.monotonic()
    results = Results()
    with uvworker_tree(args.commit) as tree, uvworker_tree(args.against) as old:
        all_groups = groups(tree, (args.against, old) if args.against else None)
        for name, rows in chosen.items():
            run_group(all_groups[name], rows, plan, results)
    print(f"\nfinished in {(time.monotonic() - started) / 60:.1f} min\n")
    print(machine(plan) + (f" uvworker as of commit {args.commit}." if args.commit else "") + "\n")
    print(markdown(all_groups, chosen, results))
    if args.json:
        raw = {f"{row_id} | {server}": [asdict(sample) for sample in samples]
               for (row_id, server), samples in results.samples.items()}
        args.json.write_text(json.dumps({"machine": machine(plan), "samples": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
