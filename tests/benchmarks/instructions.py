"""Machine instructions per hello-world request, without sockets, under callgrind.

    python -m tests.benchmarks.instructions [--http h11] [--requests 10000] [--metrics]

Drives one keep-alive HTTPConnection over a fake transport on a plain asyncio loop, so the
count is the Python side of uvworker (parser, cycle, framing, books) and nothing the kernel
does. It runs the drive twice under ``valgrind --tool=callgrind`` (a few requests, then that
many more) and prints the difference divided by the extra requests: start-up cancels out.
Deterministic to a few instructions, unlike wall-clock time on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.responses = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.responses += 1

    def writelines(self, parts: Any) -> None:
        self.responses += 1

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def drive(http: str, requests: int, metrics: bool) -> None:
    from tests.benchmarks.suite.apps import app
    from uvworker.config import Config
    from uvworker.protocols.http import HTTPConnection
    from uvworker.server import make_state

    settings: dict[str, Any] = {"http": http, "access_log": False, "lifespan": "off"}
    if metrics:
        settings["metrics_bind"] = "127.0.0.1:0"
    config = Config(app, **settings)
    config.load()
    state = make_state(config, asyncio.get_running_loop(), {})
    conn = HTTPConnection(state)
    transport = Transport()
    conn.connection_made(transport)
    for n in range(1, requests + 1):
        conn.data_received(REQUEST)
        while transport.responses < n:
            await asyncio.sleep(0)
    assert state.requests_served == requests


def measure(args: argparse.Namespace, requests: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
            "tests.benchmarks.instructions", "--drive", "--http", args.http, "--requests", str(requests),
        ] + (["--metrics"] if args.metrics else [])
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        with open(out) as handle:
            totals = re.search(r"^(?:summary|totals): (\d+)", handle.read(), re.M)
    assert totals is not None
    return int(totals.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", default="httptools", choices=("httptools", "h11"))
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--metrics", action="store_true", help="with --metrics-bind set")
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        asyncio.run(drive(args.http, args.requests, args.metrics))
        return
    if not shutil.which("valgrind"):
        raise SystemExit("Needs valgrind (apt-get install -y valgrind).")
    base = measure(args, 1000)
    more = measure(args, 1000 + args.requests)
    print(f"{args.http}{' with metrics' if args.metrics else ''}: "
          f"{(more - base) / args.requests:,.0f} instructions per request")


if __name__ == "__main__":
    main()
