"""WebSocket echo benchmark: uvworker against uvicorn, messages per second (issue 3).

    python tests/benchmarks/ws_echo.py                       # 32 B and 64 KiB, 5 rounds each
    python tests/benchmarks/ws_echo.py --sizes 32 --rounds 9 --duration 3

Both servers run the ``app`` below with the same event loop (uvloop), HTTP parser (httptools)
and WebSocket engine (the ``websockets`` sans-I/O protocol: uvicorn's ``--ws
websockets-sansio``), pinned with ``taskset`` to one CPU; the load generator runs in this
process, pinned to another. Rounds alternate between the servers (uvworker, uvicorn, uvworker,
...) so that drift in machine load hits both alike; each round opens fresh connections, warms up
briefly, then counts echoed messages for ``--duration`` seconds. The report gives the median
messages/s of each server per size and the ratio uvworker / uvicorn (above 1: uvworker faster).
On a shared machine wall-clock rates swing with other load, so each round also reads the server
process's CPU time (``/proc/<pid>/stat``) and the report adds messages per server CPU-second,
a figure that depends much less on what else runs.

The load generator is a bare asyncio protocol, not a WebSocket library, so that it is not the
bottleneck: each connection keeps ``--window`` messages in flight, writes pre-built masked
frames by reference and reads into one buffer, counting the bytes that come back (see
``EchoClient``). The client offers no extension, so both
servers echo uncompressed frames.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The echo application both servers run."""
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        await send(message | {"type": "websocket.send"})


# -- load generator ---------------------------------------------------------------------------------
def masked_frame(size: int) -> bytes:
    payload = b"x" * size
    key = os.urandom(4)
    head = bytes([0x82])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    mask = (key * (size // 4 + 1))[:size]
    return head + key + bytes(a ^ b for a, b in zip(payload, mask))


def echo_length(size: int) -> int:
    """Bytes of the unmasked frame a server echoes a ``size``-byte message in."""
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


class EchoClient(asyncio.BufferedProtocol):
    """One connection: handshake, then keep ``window`` messages in flight and count echoes.

    It reads into one preallocated buffer and counts bytes, not frames: after the handshake a
    server sends nothing but echoes of ``echo_length(size)`` bytes each (a round ends long
    before the first keepalive ping). Each echo is answered by writing the pre-built frame
    again, by reference. So the client spends its CPU in the kernel, not in Python copies, and
    a faster server shows as a higher rate instead of saturating the load generator.
    """

    def __init__(self, frame: bytes, echo: int, window: int, ready: asyncio.Future[None]) -> None:
        self.frame = frame
        self.echo = echo
        self.window = window
        self.ready = ready
        self.head = bytearray()  # the handshake response, until its blank line
        self.buffer = memoryview(bytearray(256 * 1024))
        self.bytes = 0  # echo bytes received
        self.received = 0  # whole echoes received
        self.closing = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16))
        transport.write(
            b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.ready.done():
            self.bytes += nbytes
        else:
            self.head += self.buffer[:nbytes]
            end = self.head.find(b"\r\n\r\n")
            if end == -1:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"handshake refused: {bytes(self.head[:60])!r}")
            self.bytes = len(self.head) - end - 4
            self.ready.set_result(None)
            self.send(self.window)
        done = self.bytes // self.echo - self.received
        if done:
            self.received += done
            self.send(done)

    def send(self, count: int) -> None:
        if len(self.frame) < 16384:
            self.transport.write(self.frame * count)  # one small buffer beats many iovecs
        else:
            self.transport.writelines([self.frame] * count)  # large frames by reference

    def close(self) -> None:
        self.closing = True
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"the server closed the connection: {exc}"))
        elif not self.closing:
            print(f"  warning: the server closed a connection during the round ({exc})", file=sys.stderr)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    port: int, pid: int, size: int, connections: int, window: int, warmup: float, duration: float
) -> tuple[float, float]:
    """(messages/s, messages per server CPU-second) over one round."""
    loop = asyncio.get_running_loop()
    frame, echo = masked_frame(size), echo_length(size)
    clients: list[EchoClient] = []
    for _ in range(connections):
        ready = loop.create_future()
        _, client = await loop.create_connection(lambda: EchoClient(frame, echo, window, ready), "127.0.0.1", port)
        clients.append(client)
        await asyncio.wait_for(ready, 10)
    await asyncio.sleep(warmup)
    start_count = sum(c.received for c in clients)
    start, start_cpu = time.perf_counter(), cpu_seconds(pid)
    await asyncio.sleep(duration)
    count = sum(c.received for c in clients) - start_count
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - start_cpu
    for client in clients:
        client.close()
    return count / elapsed, count / max(cpu, 0.01)


async def churn(port: int, pid: int, connections: int, warmup: float, duration: float) -> tuple[float, float]:
    """(sessions/s, sessions per server CPU-second): ``connections`` clients, each opening one
    WebSocket session after another on a new connection (handshake, one 32-byte echo, the close
    handshake, the server's FIN), as clients that reconnect for every exchange do."""
    frame, echo = masked_frame(32), echo_length(32)
    close = bytes([0x88, 0x82]) + b"\0\0\0\0" + (1000).to_bytes(2, "big")  # masked with a zero key
    done = [0]
    stop = asyncio.get_running_loop().time() + warmup + duration

    async def client() -> None:
        while asyncio.get_running_loop().time() < stop:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16))
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"handshake refused: {head[:60]!r}")
            writer.write(frame)
            await reader.readexactly(echo)
            writer.write(close)
            await reader.read()  # the server's close frame, then its FIN
            writer.close()
            done[0] += 1

    tasks = [asyncio.create_task(client()) for _ in range(connections)]
    await asyncio.sleep(warmup)
    start_count, start, start_cpu = done[0], time.perf_counter(), cpu_seconds(pid)
    await asyncio.sleep(duration)
    count, elapsed, cpu = done[0] - start_count, time.perf_counter() - start, cpu_seconds(pid) - start_cpu
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return count / elapsed, count / max(cpu, 0.01)


# -- servers ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(name: str, port: int, cpu: int) -> subprocess.Popen[bytes]:
    target = "tests.benchmarks.ws_echo:app"
    common = ["--port", str(port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "off",
              "--no-access-log", "--log-level", "warning"]
    if name == "uvworker":
        command = [sys.executable, "-m", "uvworker", target, *common]
    else:
        command = [sys.executable, "-m", "uvicorn", target, *common, "--ws", "websockets-sansio"]
    proc = subprocess.Popen(["taskset", "-c", str(cpu), *command], cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{name} did not start listening")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="WebSocket echo: uvworker vs uvicorn, messages/s.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 65536])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per server and size (interleaved)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds counted per round")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=16, help="messages in flight per connection")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args(argv)

    os.sched_setaffinity(0, {args.client_cpu})
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    names = ("uvworker", "uvicorn")
    ports = {name: free_port() for name in names}
    procs = {name: start_server(name, ports[name], args.server_cpu) for name in names}
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            for size in args.sizes:
                window = args.window if size < 4096 else max(2, args.window // 4)
                for round_ in range(args.rounds):
                    order = names if round_ % 2 == 0 else names[::-1]
                    for name in order:
                        rate, per_cpu = runner.run(measure(
                            ports[name], procs[name].pid, size, args.connections, window, args.warmup, args.duration
                        ))
                        results.setdefault((name, size), []).append((rate, per_cpu))
                        print(f"  {size:>6} B  round {round_ + 1}  {name:<9} {rate:>10,.0f} msg/s "
                              f"{per_cpu:>10,.0f} msg/CPU-s", flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=15)

    print(f"\nWebSocket echo, {args.connections} connections x {args.window} in flight (64 KiB: "
          f"{max(2, args.window // 4)}), {args.rounds} interleaved rounds of {args.duration:g} s, "
          f"server on CPU {args.server_cpu}, client on CPU {args.client_cpu}; medians:")
    print(f"{'size':>8}  {'uvworker msg/s':>15}  {'uvicorn msg/s':>15}  {'ratio':>6}   "
          f"{'uvworker msg/CPU-s':>18}  {'uvicorn msg/CPU-s':>18}  {'ratio':>6}")
    for size in args.sizes:
        ours = [statistics.median(r[i] for r in results[("uvworker", size)]) for i in (0, 1)]
        theirs = [statistics.median(r[i] for r in results[("uvicorn", size)]) for i in (0, 1)]
        print(f"{size:>6} B  {ours[0]:>15,.0f}  {theirs[0]:>15,.0f}  {ours[0] / theirs[0]:>6.2f}   "
              f"{ours[1]:>18,.0f}  {theirs[1]:>18,.0f}  {ours[1] / theirs[1]:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
