"""WSGI "hello world" throughput: uvworker against uvicorn --interface wsgi and gunicorn.

    python tests/benchmarks/wsgi_hello.py [--rounds 5] [--duration 5] [--connections 64]

Needs ``wrk``. Each server runs the app below as a subprocess on a socket bound here (passed by
file descriptor), pinned to CPU 0; wrk runs pinned to CPU 1. Rounds interleave the servers (in
alternating order) so that background load hits them alike; the table shows the median
requests/s of each and its ratio to uvworker. Peers use the same parser and loop where they
have the choice (httptools, uvloop).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.benchmarks.wsgi_hello:app"
BODY = b"Hello, world!"


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The same response from an ASGI app: the engine's ceiling, for reference."""
    if scope["type"] == "http":
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY})


SERVERS: dict[str, list[str]] = {
    "uvworker": ["-m", "uvworker", APP, "--fd", "{fd}", "--no-access-log", "--log-level", "warning",
                 "--http", "httptools", "--loop", "uvloop"],
    # uvicorn --fd takes any inherited socket for a Unix one (no TCP_NODELAY): give it a port.
    "uvworker-asgi": ["-m", "uvworker", APP.replace(":app", ":asgi_app"), "--fd", "{fd}", "--no-access-log",
                      "--log-level", "warning", "--http", "httptools", "--loop", "uvloop", "--lifespan", "off"],
    "uvicorn-wsgi": ["-m", "uvicorn", "--interface", "wsgi", "--port", "{port}", "--no-access-log",
                     "--log-level", "warning", "--http", "httptools", "--loop", "uvloop", APP],
    "gunicorn-gthread": ["-m", "gunicorn", "-k", "gthread", "--threads", "10", "--workers", "1",
                         "--bind", "fd://{fd}", "--log-level", "warning", APP],
    "gunicorn-sync": ["-m", "gunicorn", "-k", "sync", "--workers", "1", "--bind", "fd://{fd}",
                      "--log-level", "warning", APP],
}


def pin(cpu: int) -> None:
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {cpu})


def measure(name: str, extra: list[str], duration: float, connections: int) -> float:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    host, port = sock.getsockname()
    fd = sock.fileno()
    args = [arg.replace("{fd}", str(fd)).replace("{port}", str(port)) for arg in SERVERS[name]] + extra
    if "{port}" in SERVERS[name]:
        sock.close()  # the server binds the port itself
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            pass_fds=[] if sock.fileno() < 0 else [fd], preexec_fn=lambda: pin(0))
    sock.close()
    url = f"http://{host}:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start") from None
                time.sleep(0.1)
        wrk = ["taskset", "-c", "1"] if len(os.sched_getaffinity(0)) > 1 else []
        out = subprocess.run([*wrk, "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", url],
                             capture_output=True, text=True, check=True).stdout
        if "Non-2xx" in out or "Socket errors" in out:
            print(f"  {name}: {' '.join(line.strip() for line in out.splitlines() if 'Non-2xx' in line or 'errors' in line)}")
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        assert match, out
        return float(match.group(1))
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--servers", default=",".join(name for name in SERVERS if name != "uvworker-asgi"),
                        help=f"comma-separated, from: {', '.join(SERVERS)}")
    parser.add_argument("--uvworker-args", default="", help="extra uvworker options, e.g. '--wsgi-threads 4'")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    names = [name for name in args.servers.split(",") if name]
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            extra = args.uvworker_args.split() if name == "uvworker" else []
            rps = measure(name, extra, args.duration, args.connections)
            results[name].append(rps)
            print(f"round {round_ + 1} {name:18} {rps:10.0f} req/s", flush=True)
    base = statistics.median(results["uvworker"]) if "uvworker" in results else None
    print(f"\nmedians of {args.rounds} rounds, {args.connections} connections, {args.duration:g} s each")
    for name in names:
        median = statistics.median(results[name])
        ratio = f"  uvworker is {base / median:.2f}x" if base and name != "uvworker" else ""
        print(f"{name:18} {median:10.0f} req/s{ratio}")


if __name__ == "__main__":
    main()
