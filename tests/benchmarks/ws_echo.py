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
bottleneck: each connection keeps ``--window`` messages in flight, sends pre-built masked
frames and only counts the frames that come back. The client offers no extension, so both
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


class EchoClient(asyncio.Protocol):
    """One connection: handshake, then keep ``window`` messages in flight and count echoes."""

    def __init__(self, frame: bytes, window: int, ready: asyncio.Future[None]) -> None:
        self.frame = frame
        self.window = window
        self.ready = ready
        self.upgraded = False
        self.buf = bytearray()
        self.skip = 0  # payload bytes of the current frame still to come
        self.received = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16))
        transport.write(
            b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end == -1:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"handshake refused: {bytes(self.buf[:60])!r}")
            self.upgraded = True
            data = bytes(self.buf[end + 4 :])
            self.buf.clear()
            self.transport.write(self.frame * self.window)
            self.ready.set_result(None)
        done = 0
        if self.skip:
            if len(data) < self.skip:
                self.skip -= len(data)
                return
            data = data[self.skip :]
            self.skip = 0
            done += 1
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 2:
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            data_frame = buf[pos] & 0x0F in (1, 2)
            if end - pos < head + length:
                if data_frame:  # count it now; skip its payload as it arrives
                    self.skip = head + length - (end - pos)
                    done += 1
                    pos = end
                break
            pos += head + length
            done += data_frame
        del buf[:pos]
        if done:
            self.received += done
            self.transport.write(self.frame * done)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    port: int, pid: int, size: int, connections: int, window: int, warmup: float, duration: float
) -> tuple[float, float]:
    """(messages/s, messages per server CPU-second) over one round."""
    loop = asyncio.get_running_loop()
    frame = masked_frame(size)
    clients: list[EchoClient] = []
    for _ in range(connections):
        ready = loop.create_future()
        _, client = await loop.create_connection(lambda: EchoClient(frame, window, ready), "127.0.0.1", port)
        clients.append(client)
        await asyncio.wait_for(ready, 10)
    await asyncio.sleep(warmup)
    start_count = sum(c.received for c in clients)
    start, start_cpu = time.perf_counter(), cpu_seconds(pid)
    await asyncio.sleep(duration)
    count = sum(c.received for c in clients) - start_count
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - start_cpu
    for client in clients:
        client.transport.abort()
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
