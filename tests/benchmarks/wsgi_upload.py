"""Big uploads to a WSGI app: server memory and throughput, uvworker against its peers.

    python tests/benchmarks/wsgi_upload.py                  # the issue-4 measurements
    python tests/benchmarks/wsgi_upload.py --quick          # small sizes, one round

Every server runs the same app (``app`` below: reads ``wsgi.input`` 64 KiB at a time, answers
the byte count) as a subprocess on a socket bound here and passed by file descriptor, pinned to
CPU 0 while the client runs on CPU 1 (when there are two). Measured, per server and case:

* throughput: body bytes / (first byte sent -> response received), in MB/s (10^6 bytes);
* peak RSS growth of the process that runs the app: VmRSS sampled every few milliseconds from
  /proc/PID/status during the case, minus VmRSS just before it; and the growth of VmHWM
  (the kernel's own peak) across the case, which no sampling can miss.

Cases: one 1 GiB upload with Content-Length, the same chunked, and 50 concurrent 20 MiB
uploads, each on a freshly started server. Rounds interleave the servers; the table shows
medians. Peers: ``gunicorn`` (sync
worker, one process) and ``uvicorn --interface wsgi`` (which reads the whole body into memory
before calling the app: its RSS growth is the size of the upload).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
READ_SIZE = 64 * 1024
APP = "tests.benchmarks.wsgi_upload:app"


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The app under test: consume the body in 64 KiB reads."""
    stream = environ["wsgi.input"]
    received = 0
    while chunk := stream.read(READ_SIZE):
        received += len(chunk)
    body = str(received).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# -- servers --------------------------------------------------------------------------------------

SERVERS: dict[str, list[str]] = {
    "uvworker": ["-m", "uvworker", APP, "--fd", "{fd}", "--no-access-log", "--log-level", "warning",
                 "--http", "httptools", "--timeout-request-body", "120"],
    "uvworker-h11": ["-m", "uvworker", APP, "--fd", "{fd}", "--no-access-log", "--log-level", "warning",
                     "--http", "h11", "--timeout-request-body", "120"],
    "gunicorn-sync": ["-m", "gunicorn", "-k", "sync", "--workers", "1", "--bind", "fd://{fd}",
                      "--timeout", "600", "--log-level", "warning", APP],
    # uvicorn --fd takes any inherited socket for a Unix one (no TCP_NODELAY): give it a port.
    "uvicorn-wsgi": ["-m", "uvicorn", "--interface", "wsgi", "--port", "{port}", "--no-access-log",
                     "--log-level", "warning", APP],
}


def pin(cpu: int) -> None:
    if len(os.sched_getaffinity(0)) > 1 and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


class RunningServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.address = self.sock.getsockname()
        fd = self.sock.fileno()
        args = [arg.replace("{fd}", str(fd)).replace("{port}", str(self.address[1])) for arg in SERVERS[name]]
        if "{port}" in SERVERS[name]:
            self.sock.close()  # the server binds the port itself
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                                     pass_fds=[] if self.sock.fileno() < 0 else [fd],
                                     preexec_fn=lambda: pin(0), stderr=subprocess.PIPE)
        self.sock.close()
        self.wait_ready()
        self.pid = self.app_pid()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                if upload(self.address, 1000, chunked=False) == 1000:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start")

    def app_pid(self) -> int:
        """The process that runs the app: the server itself, or its one worker (gunicorn)."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            children = []
        return int(children[0]) if children else self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Samples VmRSS of ``pid`` in a thread; also records VmHWM before and after."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.running = True
        self.base = status_kib(pid, "VmRSS")
        self.hwm_before = status_kib(pid, "VmHWM")
        self.peak = self.base
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return
            time.sleep(0.002)

    def stop(self) -> tuple[float, float]:
        """(peak RSS growth, VmHWM growth) in MiB."""
        self.running = False
        self.thread.join()
        hwm_after = status_kib(self.pid, "VmHWM")
        return (self.peak - self.base) / 1024, max(hwm_after - max(self.hwm_before, self.base), 0) / 1024


# -- client ---------------------------------------------------------------------------------------

BLOCK = memoryview(bytes(range(256)) * (MiB // 256))


def upload(address: tuple[str, int], size: int, *, chunked: bool, timeout: float = 300) -> int:
    """POST ``size`` bytes; return the byte count the app reported."""
    with socket.create_connection(address, timeout=timeout) as sock:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: bench\r\n%s\r\n\r\n" % framing)
        remaining = size
        while remaining:
            piece = BLOCK[: min(len(BLOCK), remaining)]
            if chunked:
                sock.sendall(b"%x\r\n" % len(piece))
                sock.sendall(piece)
                sock.sendall(b"\r\n")
            else:
                sock.sendall(piece)
            remaining -= len(piece)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            response += data
        head, _, body = response.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(65536)
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head.split(b"\r\n")[0].decode())
        return int(body)


def run_case(server: RunningServer, case: str, size: int, concurrent: int) -> dict[str, float]:
    upload(server.address, 1000, chunked=False)  # warm
    sampler = PeakRSS(server.pid)
    start = time.perf_counter()
    if concurrent == 1:
        got = [upload(server.address, size, chunked=case == "chunked")]
    else:
        got = []
        barrier = threading.Barrier(concurrent)

        def one() -> None:
            barrier.wait()
            got.append(upload(server.address, size, chunked=False))

        threads = [threading.Thread(target=one) for _ in range(concurrent)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elapsed = time.perf_counter() - start
    rss, hwm = sampler.stop()
    if got != [size] * concurrent:
        raise RuntimeError(f"{server.name} {case}: the app saw {got[:3]}... instead of {size}")
    return {"mbps": size * concurrent / elapsed / 1e6, "rss": rss, "hwm": hwm}


@contextlib.contextmanager
def running(name: str) -> Iterator[RunningServer]:
    server = RunningServer(name)
    try:
        yield server
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="single upload size")
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--each-mib", type=int, default=20, help="size of each concurrent upload")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--quick", action="store_true", help="64 MiB, 10 x 8 MiB, one round")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.concurrent, args.each_mib, args.rounds = 64, 10, 8, 1
    names = [name for name in args.servers.split(",") if name]
    if "gunicorn-sync" in names and not shutil.which("gunicorn") and not _importable("gunicorn"):
        names.remove("gunicorn-sync")
    cases = [
        ("content-length", args.size_mib * MiB, 1),
        ("chunked", args.size_mib * MiB, 1),
        (f"{args.concurrent}x{args.each_mib}MiB", args.each_mib * MiB, args.concurrent),
    ]
    pin(1)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else reversed(names):  # interleaved
            for case, size, concurrent in cases:
                with running(name) as server:  # a fresh process: VmHWM starts from this case
                    result = run_case(server, case, size, concurrent)
                results.setdefault((case, name), []).append(result)
                print(f"round {round_ + 1} {name:14} {case:16} {result['mbps']:8.0f} MB/s "
                      f"rss +{result['rss']:7.1f} MiB  hwm +{result['hwm']:7.1f} MiB", flush=True)
    print(f"\nmedians of {args.rounds} round(s); single upload {args.size_mib} MiB, app reads {READ_SIZE // 1024} KiB at a time")
    print(f"{'case':16} {'server':14} {'MB/s':>8} {'peak RSS growth':>16} {'VmHWM growth':>13}")
    for case, _, _ in cases:
        for name in names:
            runs = results[(case, name)]
            mbps = statistics.median(r["mbps"] for r in runs)
            rss = statistics.median(r["rss"] for r in runs)
            hwm = statistics.median(r["hwm"] for r in runs)
            print(f"{case:16} {name:14} {mbps:8.0f} {rss:12.1f} MiB {hwm:9.1f} MiB")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
