"""Recycling benchmarks (issue 14): what --trace-memory costs, how fast a recycled worker forked
from the --preload template is ready, and how much memory the template's workers share.

    python tests/benchmarks/recycling.py             # all four
    python tests/benchmarks/recycling.py trace       # or: ready, memory, bound

* ``trace``: hello world (the suite's app, httptools, uvloop, one process pinned to CPU 0, wrk
  with 64 keep-alive connections on CPU 1) with --trace-memory 0, 1 and 10, interleaved over
  rounds; medians of requests/s and of the server's CPU microseconds per request (/proc).
* ``ready``: an app whose import takes 2 s, 2 workers with --preload and --max-requests, under
  1 and then 4 clients (4 keep both CPUs busy); for every recycled worker, the time from the
  master's decision to recycle it ("Recycling worker N": the replacement is forked then, and
  the old worker stops accepting only once it is ready) to its replacement's "ready", from the
  master's log; and for a SIGKILLed worker, the time from its reaping to its replacement's
  "ready".
* ``bound``: the --max-requests bound under load: 2 workers, 8 keep-alive clients (httpx, back
  to back), N = 50 and 500, without --preload (an app that imports at once) and with it (an
  app whose import takes 2 s), with and without a CPU hog beside (``--hog``: a ``nice -n 10``
  busy loop on each CPU); for each, the most requests one worker served against the bound
  N + 8, how many workers held at their budget (their replacement was late) and the failed
  requests.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from supervisor.memory import resident_memory, unique_memory
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


# -- ready and memory: the fork server ---------------------------------------------------------
APP = r'''
import gc, os, time
time.sleep(float(os.environ.get("APP_IMPORT_SECONDS", "0")))
HELD = [{"id": n, "name": f"item-{n}", "tags": [n % 7, n % 11]} for n in range(int(os.environ.get("APP_OBJECTS", "0")))]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/gc":
        gc.collect()
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''
OBJECTS_200_MIB = 560_000  # dicts of an int, a str and a list: about 200 MiB (RSS growth of the import)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \[\d+\] \[\w+\] (.*)$")


@contextmanager
def supervised(*args: str, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """uvworker with ``APP`` under the supervisor; (process, url, log file)."""
    with tempfile.TemporaryDirectory(prefix="recycling-") as tmp:
        Path(tmp, "recycling_app.py").write_text(APP)
        port = free_port()
        log = Path(tmp, "server.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvworker", "recycling_app:app", "--app-dir", tmp, "--port", str(port),
                 "--no-access-log", "--lifespan", "off", *args],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=every_cpu)
            try:
                yield proc, f"http://127.0.0.1:{port}/", log
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def every_cpu() -> None:
    """The server (and a hog) may run on any CPU; this process, a load generator, stays on CPU 1."""
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def get(url: str) -> int | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.read())
    except OSError:
        return None


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def events(log: Path) -> list[tuple[float, str]]:
    """(seconds, message) of the master's log lines."""
    import datetime

    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = STAMP.match(line)
        if match:
            stamp = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
            found.append((stamp.timestamp(), match[2]))
    return found


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU, from /proc/stat."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def ready(clients: int, recycles: int = 20) -> str:
    """2 s import, --preload, 2 workers, --max-requests under ``clients`` back-to-back clients
    (4 saturate both CPUs); then SIGKILLs."""
    import threading
    import urllib.request

    with supervised("--workers", "2", "--preload", "--max-requests", "3000",
                    APP_IMPORT_SECONDS="2") as (proc, url, log):
        wait(lambda: get(url), 60, "the first answer")
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        response.read()
                except OSError:
                    failures.append(1)

        failures: list[int] = []
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        before = cpu_times()
        wait(lambda: log.read_text().count("after retiring") >= recycles, 300, f"{recycles} recycles")
        busy = busy_share(before, cpu_times())
        stop.set()
        for thread in threads:
            thread.join()
        lines = events(log)
    with supervised("--workers", "2", "--preload", APP_IMPORT_SECONDS="2") as (proc, url, log):
        wait(lambda: get(url), 60, "the first answer")
        for _ in range(5):  # a crash: SIGKILL to a worker, until its replacement is ready
            victim = get(url)
            assert victim is not None
            before = len(re.findall(r"is ready in \d+ ms\.\n", log.read_text()))
            os.kill(victim, signal.SIGKILL)
            wait(lambda: len(re.findall(r"is ready in \d+ ms\.\n", log.read_text())) > before, 10, "the respawn")
        lines += events(log)
    crashes: list[float] = []
    killed_at: float | None = None
    decided: dict[str, float] = {}
    after_decision: list[float] = []
    for at, text in lines:
        if m := re.match(r"Recycling worker (\d) \(pid (\d+)\)", text):
            decided[m[2]] = at
        elif m := re.match(r"Worker \d \(pid \d+\) is ready in (\d+) ms; (?:handing over from|retiring) worker \d \(pid (\d+)\)", text):
            if m[2] in decided:
                after_decision.append((at - decided[m[2]]) * 1000)
        elif re.match(r"Worker \d \(pid \d+\) was killed by SIGKILL", text):
            killed_at = at
        elif re.match(r"Worker \d \(pid \d+\) is ready in \d+ ms\.$", text) and killed_at is not None:
            crashes.append((at - killed_at) * 1000)
            killed_at = None
    template = next((text for _, text in lines if "loaded the application in" in text), "")

    def spread(values: list[float]) -> str:
        if not values:
            return "none"
        p90 = sorted(values)[round(0.9 * (len(values) - 1))]
        return f"median {statistics.median(values):.0f} ms, p90 {p90:.0f} ms, max {max(values):.0f} ms (n={len(values)})"

    return "\n".join([
        f"App with a 2 s import, --preload, 2 workers, --max-requests 3000, {clients} client(s) "
        "(a new connection per request, back to back):",
        f"- {template}",
        f"- recycled worker, from the master's decision to recycle it to its replacement ready: "
        f"{spread(after_decision)}",
        f"- SIGKILLed worker, reaped to the replacement ready: {spread(crashes)}",
        f"- both CPUs busy {busy:.0%} of the time while recycling (every process on the machine)",
        f"- failed requests: {len(failures)}",
    ])


def bound(limit: int, preload: bool, seconds: float, hog: bool) -> str:
    """2 workers, 8 keep-alive clients: the most one worker served against ``limit`` + 8."""
    from tests.test_supervisor_cli import KeepAliveLoad

    clients = 8
    args = ["--workers", "2", "--max-requests", str(limit)] + (["--preload"] if preload else [])
    hogs = [subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", "while 1: pass"], preexec_fn=every_cpu)
            for _ in range(os.cpu_count() or 1 if hog else 0)]
    try:
        with supervised(*args, APP_IMPORT_SECONDS="2" if preload else "0") as (proc, url, log):
            wait(lambda: get(url), 60, "the first answer")
            load = KeepAliveLoad(url, clients=clients)
            time.sleep(seconds)
            load.stop()
            held = log.read_text().count("before its replacement was ready")
            gone = load.finished()
    finally:
        for hog_proc in hogs:
            hog_proc.kill()
            hog_proc.wait()
    served = sorted(gone.values())
    most = max(served, default=0)
    return (f"| {limit} | {'2 s import, --preload' if preload else 'no --preload'} | {'yes' if hog else 'no'} | "
            f"{len(served)} | {statistics.median(served) if served else 0:.0f} | {most} | {limit + clients} | "
            f"{'ok' if most <= limit + clients else 'BROKEN'} | {held} | {len(load.failures)} | "
            f"{load.ok / seconds:,.0f} |")


def bounds(seconds: float, hog: bool) -> str:
    lines = ["| N | app | CPU hog | workers done | median served | most served | bound N+8 | | held | failed "
             "| req/s |", "|--:|---|---|--:|--:|--:|--:|---|--:|--:|--:|"]
    for limit in (50, 500):
        for preload in (False, True):
            for busy in ((False, True) if hog else (False,)):
                lines.append(bound(limit, preload, seconds, busy))
                print(lines[-1], flush=True)
    return "2 workers, 8 keep-alive clients (httpx), --max-requests N:\n" + "\n".join(lines)


def memory() -> str:
    """4 workers, an app holding 200 MiB of Python objects, with and without --preload."""
    sums = {}
    for preload in (False, True):
        args = ["--workers", "4"] + (["--preload"] if preload else [])
        with supervised(*args, APP_OBJECTS=str(OBJECTS_200_MIB)) as (proc, url, log):
            expected = 6 if preload else 4  # with --preload: and the template, and its spare
            wait(lambda: len(children(proc.pid)) == expected and log.read_text().count("is ready in") >= 4,
                 120, "4 workers")
            seen: set[int] = set()
            for _ in range(400):  # every worker answers, and collects its garbage
                pid = get(url + "gc")
                if pid:
                    seen.add(pid)
            workers = [pid for pid in children(proc.pid) if pid in seen or not preload]
            templates = [pid for pid in children(proc.pid) if pid not in workers]
            uss = sum(unique_memory(pid) or 0 for pid in workers)
            rss = sum(resident_memory(pid) or 0 for pid in workers)
            extra = ""
            if templates:
                extra = f", template and spare USS {sum(unique_memory(p) or 0 for p in templates) / MiB:.0f} MiB"
            sums[preload] = uss
            print(f"--preload {'on ' if preload else 'off'}: {len(workers)} workers answered, summed USS "
                  f"{uss / MiB:.0f} MiB, summed RSS {rss / MiB:.0f} MiB{extra}", flush=True)
    return (f"App holding 200 MiB of Python objects, 4 workers, each having answered and run gc.collect(): "
            f"summed USS {sums[False] / MiB:.0f} MiB without --preload, {sums[True] / MiB:.0f} MiB with it "
            f"({sums[True] / sums[False]:.0%}).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", choices=["trace", "ready", "memory", "bound"], default=[])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run, per bound row x 2")
    parser.add_argument("--hog", action="store_true", help="bound: also with a CPU hog on each CPU")
    args = parser.parse_args(argv)
    parts = args.parts or ["trace", "ready", "memory", "bound"]
    os.sched_setaffinity(0, {1})  # this process is a load generator too
    results = []
    if "trace" in parts:
        results.append(trace(args.rounds, args.duration))
    if "ready" in parts:
        results += [ready(1), ready(4)]
    if "memory" in parts:
        results.append(memory())
    if "bound" in parts:
        results.append(bounds(2 * args.duration, args.hog))
    print("\n\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
