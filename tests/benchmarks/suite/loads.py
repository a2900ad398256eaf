"""Load generators, one per kind of row; each returns one :class:`Sample` for one server.

* HTTP rows: ``wrk`` pinned to the client CPU (``-t1``, ``--latency`` for p99), after a short
  warm-up run on fresh connections; the server's CPU time over the measured run gives CPU
  microseconds per request, a figure that other load on a shared machine disturbs much less
  than requests/s.
* WebSocket echo: ``ws_echo.measure`` (a bare asyncio client in this process, see ws_echo.py);
  a session per connection: ``ws_echo.churn`` (asyncio streams).
* Idle connections: this process opens N keep-alive connections, makes one request on each,
  holds them all and reads the server's RSS.
* Upload: ``wsgi_upload.run_case`` (one 1 GiB POST from a blocking socket while a thread
  samples the server's RSS; also the kernel's VmHWM).

Every loop here is bounded in time: wrk by ``-d`` (and a subprocess timeout), the asyncio
clients by deadlines.
"""

from __future__ import annotations

import asyncio
import re
import resource
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.benchmarks import ws_echo, wsgi_upload
from tests.benchmarks.suite.servers import RunningServer, pinning

HERE = Path(__file__).resolve().parent
POST_SCRIPT = HERE / "post_64k.lua"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


@dataclass
class Sample:
    value: float  # the row's figure: requests/s, messages/s, KiB per connection, MiB
    p99_ms: float | None = None  # 99th percentile latency (wrk rows)
    cpu_us: float | None = None  # server CPU microseconds per request / message
    note: str = ""  # extra facts for the log line (errors, totals)


# -- wrk --------------------------------------------------------------------------------------------
def wrk(server: RunningServer, path: str, *, connections: int, duration: int, warmup: int,
        client_cpu: int | None, headers: tuple[str, ...] = (), script: Path | None = None) -> Sample:
    command = [*pinning(client_cpu), "wrk", "-t1", f"-c{connections}", "--timeout", "10s"]
    for header in headers:
        command += ["-H", header]
    if script is not None:
        command += ["-s", str(script)]
    url = server.url + path
    if warmup > 0:
        _run(command + [f"-d{warmup}s", url], warmup)
    cpu_before, timeouts_before = server.cpu_seconds(), tcp_timeouts()
    out = _run(command + ["--latency", f"-d{duration}s", url], duration)
    cpu = server.cpu_seconds() - cpu_before
    timeouts = tcp_timeouts() - timeouts_before
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.MULTILINE)
    if not (rate and total and p99):
        raise RuntimeError(f"Unexpected wrk output:\n{out}")
    requests = int(total.group(1))
    problems = re.findall(r"(Socket errors:.*|Non-2xx or 3xx responses:.*)", out)
    if timeouts:
        problems.append(f"{timeouts} TCP retransmission timeouts on the machine")
    return Sample(
        value=float(rate.group(1)),
        p99_ms=float(p99.group(1)) * _UNITS[p99.group(2)],
        cpu_us=cpu / requests * 1e6 if requests else None,
        note="; ".join(problem.strip() for problem in problems),
    )


def h2load(server: RunningServer, path: str, *, connections: int, streams: int, duration: int, warmup: int,
           client_cpu: int | None) -> Sample:
    """HTTP/2 by prior knowledge (h2c) with nghttp2's h2load: ``connections`` x ``streams`` in
    flight for ``duration`` seconds after ``warmup``. h2load gives no latency percentiles."""
    command = [*pinning(client_cpu), "h2load", "-t1", f"-c{connections}", f"-m{streams}",
               f"-D{duration}", f"--warm-up-time={max(warmup, 1)}", server.url + path]
    cpu_before = server.cpu_seconds()
    out = _run(command, duration + warmup)
    cpu = server.cpu_seconds() - cpu_before
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if not (rate and done):
        raise RuntimeError(f"Unexpected h2load output:\n{out}")
    failed = int(done.group(3))
    return Sample(
        value=float(rate.group(1)),
        p99_ms=None,
        cpu_us=cpu / int(done.group(1)) * 1e6 if int(done.group(1)) else None,
        note=f"{failed} failed requests" if failed else "",
    )


def tcp_timeouts() -> int:
    """Retransmission timeouts the kernel has had so far, all sockets (/proc/net/netstat).

    On loopback nothing is lost, but a connection storm (wrk opening 1024 connections at once)
    can make the kernel drop a handshake packet; the retransmission timeout (1 s, then 3 s)
    then shows up in wrk's p99. Counted machine-wide, so other jobs' traffic adds to it.
    """
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt:")]
    return int(lines[1][lines[0].index("TCPTimeouts")])


def _run(command: list[str], duration: float) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def client_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop for the Python clients when it is there: the client must not be the bottleneck."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


# -- WebSocket ----------------------------------------------------------------------------------------
def websocket_echo(server: RunningServer, size: int, *, duration: float, warmup: float) -> Sample:
    """Echoed messages/s over ws_echo's connections and window (its defaults)."""
    connections, window = 4, 16 if size < 4096 else 4
    with asyncio.Runner(loop_factory=client_loop()) as runner:
        rate, per_cpu = runner.run(ws_echo.measure(server.address[1], server.pid, size, connections, window,
                                                   warmup, duration))
    return Sample(value=rate, cpu_us=1e6 / per_cpu)


def websocket_churn(server: RunningServer, connections: int, *, duration: float, warmup: float) -> Sample:
    """WebSocket sessions/s, a new connection for each (ws_echo.churn)."""
    with asyncio.Runner(loop_factory=client_loop()) as runner:
        rate, per_cpu = runner.run(ws_echo.churn(server.address[1], server.pid, connections, warmup, duration))
    return Sample(value=rate, cpu_us=1e6 / per_cpu)


# -- idle keep-alive connections -------------------------------------------------------------------------
def raise_fd_limit(wanted: int) -> None:
    """Allow ``wanted`` open files in this process and the servers it starts (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise SystemExit(f"The suite needs {wanted} open files but the hard limit is {hard}; raise it "
                             f"(ulimit -Hn) and run again.")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class _OneRequest(asyncio.Protocol):
    """Sends one keep-alive GET / and notes when the whole hello-world answer has arrived."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"Hello, world!") and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("the server closed an idle connection"))


async def _hold(server: RunningServer, count: int, timeout: float) -> tuple[int, int, int]:
    """Open ``count`` connections, one request each; return (RSS before, RSS held, fds held)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    before = server.rss_kib()
    transports: list[asyncio.BaseTransport] = []
    gate = asyncio.Semaphore(64)  # connect in waves: the listen backlog is never the limit

    async def one() -> None:
        async with gate:
            done = loop.create_future()
            transport, _ = await loop.create_connection(lambda: _OneRequest(done), *server.address)
            transports.append(transport)
            await done

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), deadline - loop.time())
        # Let the server finish what the last responses left behind: poll until two reads agree.
        held = server.rss_kib()
        while loop.time() < deadline:
            await asyncio.sleep(0.2)
            again = server.rss_kib()
            if again == held:
                break
            held = again
        return before, held, server.open_fds()
    finally:
        for transport in transports:
            transport.abort()


def idle_connections(server: RunningServer, count: int, *, timeout: float = 60) -> Sample:
    """RSS growth per idle keep-alive connection, in KiB."""
    with asyncio.Runner(loop_factory=client_loop()) as runner:
        before, held, fds = runner.run(_hold(server, count, timeout))
    if fds < count:
        raise RuntimeError(f"{server.name} held only {fds} open files with {count} connections open")
    return Sample(value=(held - before) / count, note=f"RSS {before / 1024:.1f} -> {held / 1024:.1f} MiB")


# -- upload -----------------------------------------------------------------------------------------
def upload(server: RunningServer, size: int) -> Sample:
    """Peak RSS growth (MiB) while one ``size``-byte POST /upload streams through the app."""
    result = wsgi_upload.run_case(server, "content-length", size, 1)  # type: ignore[arg-type]
    note = f"{result['mbps']:.0f} MB/s, VmHWM +{result['hwm']:.1f} MiB"
    return Sample(value=max(result["rss"], result["hwm"]), note=note)
