"""Hello-world requests/s under Gunicorn: uvworker.Worker vs uvicorn_worker.UvicornWorker.

    python tests/benchmarks/gunicorn_hello.py [--rounds 3] [--duration 5] [--connections 50]

One run starts ``gunicorn -w 1`` with each worker class in turn (interleaved, several rounds),
the server pinned to CPU 0 and wrk to CPU 1 (``taskset``), on a loopback socket bound here and
passed as ``fd://N``; it prints every measurement, the medians and the ratio. Besides
requests/s it reports the worker's CPU time per request (from /proc), which other processes
competing for the CPUs disturb much less. Needs Linux, wrk, taskset, gunicorn and
uvicorn-worker. Both serve examples/hello.py with Gunicorn's defaults (no access log).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["uvworker.Worker", "uvicorn_worker.UvicornWorker"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(worker_class: str, duration: int, connections: int) -> tuple[float, float]:
    """(requests/s, worker CPU microseconds per request)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    command = ["taskset", "-c", "0", sys.executable, "-m", "gunicorn", "-w", "1", "-k", worker_class,
               "-b", f"fd://{sock.fileno()}", "--no-control-socket", "--log-level", "warning",
               "examples.hello:app"]
    server = subprocess.Popen(command, cwd=REPO, pass_fds=(sock.fileno(),), start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    sock.close()
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 20
        while httpx.get(url, timeout=20).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{worker_class} did not start")
        wrk = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}"]
        subprocess.run([*wrk, "-d1s", url], capture_output=True, check=True)  # warm-up
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        worker = int(children[0])
        cpu_before = cpu_seconds(worker)
        out = subprocess.run([*wrk, f"-d{duration}s", url], capture_output=True, text=True, check=True).stdout
        cpu = cpu_seconds(worker) - cpu_before
        errors = re.search(r"Socket errors: .*|Non-2xx.*", out)
        if errors:
            print(f"    {worker_class}: {errors.group(0)}")
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        assert rate and total, out
        return float(rate.group(1)), cpu / int(total.group(1)) * 1e6
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in CLASSES}
    costs: dict[str, list[float]] = {name: [] for name in CLASSES}
    for round_number in range(args.rounds):
        order = CLASSES if round_number % 2 == 0 else CLASSES[::-1]
        for name in order:
            rps, cost = measure(name, args.duration, args.connections)
            rates[name].append(rps)
            costs[name].append(cost)
            print(f"round {round_number + 1}: {name:30} {rps:8.0f} requests/s {cost:6.1f} CPU us/request",
                  flush=True)
    rate = {name: statistics.median(values) for name, values in rates.items()}
    cost = {name: statistics.median(values) for name, values in costs.items()}
    for name in CLASSES:
        print(f"median {name:30} {rate[name]:8.0f} requests/s {cost[name]:6.1f} CPU us/request")
    ours, theirs = CLASSES
    print(f"uvworker.Worker / UvicornWorker: {rate[ours] / rate[theirs]:.2f}x requests/s, "
          f"{cost[ours] / cost[theirs]:.2f}x CPU per request")


if __name__ == "__main__":
    main()
