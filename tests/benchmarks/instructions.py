"""Machine instructions per hello-world request, without sockets, under callgrind.

    python -m tests.benchmarks.instructions [--http h11] [--requests 10000] [--metrics]
    python -m tests.benchmarks.instructions --connections 1024 [--cache] [--uvloop]
    python -m tests.benchmarks.instructions --wsgi --uvloop      # row wsgi-hello's app, on threads
    python -m tests.benchmarks.instructions --close --uvloop     # row close-64: a connection per request
    python -m tests.benchmarks.instructions --websocket 65536 --uvloop  # row ws-64k: per echoed message
    python -m tests.benchmarks.instructions --wsgi --gunicorn    # behind the Gunicorn worker's rules

Drives keep-alive HTTPConnections over fake transports on a plain asyncio loop, so the count
is the Python side of uvworker (parser, cycle, framing, books) and nothing the kernel does.
It runs the drive twice under ``valgrind --tool=callgrind`` (a few requests, then that many
more) and prints the difference divided by the extra requests: start-up cancels out.
Deterministic to a few instructions, unlike wall-clock time on a shared machine. With
``--wsgi`` both the loop's and the pool threads' instructions count (not the kernel's context
switches), and the drive waits for a round's responses without spinning.

``--connections N`` drives N connections the way one epoll wake-up with N readable sockets
does: every connection reads its request, then the loop runs every app, then the next round.
The requests of a round are all alive at once, so what a request costs more at 1024
connections than at 1 is per-connection work (instructions) or footprint (``--cache``:
cachegrind's simulated L1 data and last-level misses per request). The simulated caches are
this machine's, read from Linux's sysfs (``cache_geometry``): its L1 data and instruction
caches, and as the last level its L2, a core's own (cachegrind models two levels; an L3, where
there is one, is shared with the other cores, and an L2 miss is what costs a request tens of
cycles). Where sysfs says nothing (not Linux, a container hiding it), a common modern core's:
L1d and L1i 32 KiB 8-way, L2 1 MiB 8-way, 64-byte lines. The geometry is printed with the
figures.

``--functions N`` prints the N C functions (the interpreter's, uvloop's, llhttp's, the Python
callbacks they enter) with the most instructions per request, inclusive and self, from the
same two runs (``callgrind_annotate`` on each, the difference divided by the extra requests):
Python functions do not show by name, but where they are entered from C does (a parser
callback, a task step, a loop callback).

With ``--cache``, ``--functions N`` lists the N functions with the most last-level (then L1
data) misses per request instead, with their instructions, all of them the function's own
(cachegrind counts no callees), read from cachegrind's file by source file and function: a
miss in ``object.h`` under ``_PyEval_EvalFrameDefault`` is a reference count the interpreter
changed (the first touch of an object it loaded), in ``list_copy`` one of the items a copied
list holds.

``--close`` opens a connection for every request, as row close-64 does: each round makes N
connections (``connection_made``), reads each one's request (``Connection: close``), runs the
apps, then delivers every client's FIN (``eof_received``) and the transports' end
(``connection_lost``, a loop callback as uvloop calls it), so the count is everything a
connection's life costs on the Python side.

``--websocket SIZE`` counts a WebSocket echo instead, as rows ws-32 and ws-64k make it (the
suite's echo app, no extension): one connection upgraded once, then one masked SIZE-byte binary
frame a read, each echoed before the next (``--requests`` messages); the count is per message.

``--gunicorn`` puts the app behind the rules the Gunicorn worker applies by default
(``gunicorn_hooks.front``: proxy and secure-scheme headers, read from the trusted 127.0.0.1
peer) and a ``before`` that counts requests, as a max_requests budget does.
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
UPGRADE_REQUEST = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
CLOSE_FRAME = bytes([0x88, 0x82]) + bytes(4) + (1000).to_bytes(2, "big")  # code 1000, masked with a zero key
CLOSE_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"  # as wrk -H sends it


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.responses = 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:  # a WebSocket takes the connection over
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.responses += 1

    def writelines(self, parts: Any) -> None:
        self.responses += 1

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0  # every write is taken at once

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class ClosingTransport(Transport):
    """A transport that ends as uvloop's does: close() calls the protocol's connection_lost in
    a loop callback, then lets go of the protocol."""

    def __init__(self, protocol: asyncio.Protocol, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.protocol: asyncio.Protocol | None = protocol
        self.loop = loop
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lost)

    def _lost(self) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connection_lost(None)

    def abort(self) -> None:
        self.close()


class Round:
    """--wsgi: the responses of a round come from the app's threads; the drive waits for them
    on a future instead of spinning (a busy loop would hold the threads up, unevenly)."""

    due = 0
    future: asyncio.Future[None] | None = None

    def expect(self, count: int) -> asyncio.Future[None]:
        self.due = count
        self.future = asyncio.get_running_loop().create_future()
        return self.future

    def written(self) -> None:
        self.due -= 1
        if self.due == 0 and self.future is not None:
            self.future.set_result(None)


class RoundTransport(Transport):
    def __init__(self, round_: Round) -> None:
        super().__init__()
        self.round = round_

    def write(self, data: bytes) -> None:
        self.responses += 1
        self.round.written()

    def writelines(self, parts: Any) -> None:
        self.write(b"")


async def drive(http: str, requests: int, metrics: bool, connections: int = 1, wsgi: bool = False,
                gunicorn: bool = False) -> None:
    from tests.benchmarks.suite.apps import app
    from tests.benchmarks.wsgi_hello import app as wsgi_app
    from uvworker.collector import tune_collector
    from uvworker.config import Config
    from uvworker.protocols.http import HTTPConnection
    from uvworker.server import make_state

    settings: dict[str, Any] = {"http": http, "access_log": False, "lifespan": "off"}
    if wsgi:
        app = wsgi_app
        settings.update(interface="wsgi", wsgi_threads=10)
    if metrics:
        settings["metrics_bind"] = "127.0.0.1:0"
    config = Config(app, **settings)
    config.load()
    if gunicorn:
        from uvworker.gunicorn_hooks import front

        counted = []
        config.loaded_app = front(
            config.loaded_app, trusted=config.forwarded_allow, proxy_headers=True, before=lambda scope, cycle: counted.append(1),
            secure_scheme_headers={"X-FORWARDED-PROTOCOL": "ssl", "X-FORWARDED-PROTO": "https", "X-FORWARDED-SSL": "on"},
        )
    loop = asyncio.get_running_loop()
    state = make_state(config, loop, {})
    round_ = Round() if wsgi else None
    transports = [RoundTransport(round_) if round_ else Transport() for _ in range(connections)]
    conns = [HTTPConnection(state) for _ in transports]
    for conn, transport in zip(conns, transports):
        conn.connection_made(transport)
    last = transports[-1]
    if connections == 1:  # the reference count: one read, one response (comparable over history)
        conn = conns[0]
        for n in range(1, requests + 1):
            done = round_.expect(1) if round_ else None
            conn.data_received(REQUEST)
            if done is not None:
                await done
            while last.responses < n:
                await asyncio.sleep(0)
        assert state.requests_served == requests
        return
    tune_collector()  # as the server does once the app is loaded: 1024 requests in flight
    for n in range(1, requests // connections + 1):
        done = round_.expect(connections) if round_ else None
        for conn in conns:  # one wake-up: every connection's read, as loop callbacks (not in a task)
            loop.call_soon(conn.data_received, REQUEST)
        if done is not None:
            await done
        while last.responses < n:
            await asyncio.sleep(0)
    assert state.requests_served == requests // connections * connections


async def drive_close(http: str, requests: int, connections: int) -> None:
    """A connection per request, ``connections`` of them opened in each round (--close)."""
    from tests.benchmarks.suite.apps import app
    from uvworker.collector import tune_collector
    from uvworker.config import Config
    from uvworker.protocols.http import HTTPConnection
    from uvworker.server import make_state

    config = Config(app, http=http, access_log=False, lifespan="off")
    config.load()
    loop = asyncio.get_running_loop()
    state = make_state(config, loop, {})
    tune_collector()
    rounds = max(1, requests // connections)
    for _ in range(rounds):
        conns = [HTTPConnection(state) for _ in range(connections)]
        transports = [ClosingTransport(conn, loop) for conn in conns]
        for conn, transport in zip(conns, transports):  # one wake-up: every accept, then every read
            loop.call_soon(conn.connection_made, transport)
            loop.call_soon(conn.data_received, CLOSE_REQUEST)
        while transports[-1].responses < 1:
            await asyncio.sleep(0)
        for conn, transport in zip(conns, transports):  # the next wake-up: every client's FIN
            if not transport.closing:
                loop.call_soon(_end, conn, transport)
        while state.connections or not all(transport.closing for transport in transports):
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the last connection_lost callbacks
    assert state.requests_served == rounds * connections


async def drive_websocket(http: str, messages: int, size: int) -> None:
    """One WebSocket session echoing ``messages`` binary messages of ``size`` bytes (--websocket)."""
    from tests.benchmarks.suite.apps import app
    from tests.benchmarks.ws_echo import masked_frame
    from uvworker.config import Config
    from uvworker.protocols.http import HTTPConnection
    from uvworker.server import make_state

    # No ping: a slow drive (valgrind) would meet its timer, and this client sends no pong.
    config = Config(app, http=http, access_log=False, lifespan="off", ws_ping_interval=0)
    config.load()
    loop = asyncio.get_running_loop()
    state = make_state(config, loop, {})
    conn = HTTPConnection(state)
    transport = ClosingTransport(conn, loop)
    conn.connection_made(transport)
    conn.data_received(UPGRADE_REQUEST)
    while transport.responses < 1:  # the 101
        await asyncio.sleep(0)
    frame = masked_frame(size)
    for n in range(2, messages + 2):  # each echo is one write (a small frame) or writelines (a large one)
        transport.protocol.data_received(frame)
        while transport.responses < n:
            await asyncio.sleep(0)
    transport.protocol.data_received(CLOSE_FRAME)  # the client ends the session: the server's close, its end
    while state.connections or not transport.closing:
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # connection_lost, then the app's end
    assert transport.responses == messages + 2  # the 101, every echo, the server's close frame


def _end(conn: asyncio.Protocol, transport: ClosingTransport) -> None:
    if not conn.eof_received():  # a falsy answer: the transport closes itself
        transport.close()


# A common modern core's caches (size, ways, line size), where sysfs does not tell.
FALLBACK_CACHES = {"I1": (32768, 8, 64), "D1": (32768, 8, 64), "LL": (1048576, 8, 64)}


def cache_geometry(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, tuple[int, int, int]]:
    """cachegrind's I1, D1 and LL as (size in bytes, ways, line size): CPU 0's L1 instruction,
    L1 data and L2 caches from sysfs, each one sysfs does not describe (or that cachegrind
    could not model: a set count not a power of two) from FALLBACK_CACHES."""
    found: dict[str, tuple[int, int, int]] = {}
    names = {("1", "Instruction"): "I1", ("1", "Data"): "D1", ("2", "Unified"): "LL", ("2", "Data"): "LL"}
    try:
        indexes = sorted(entry for entry in os.listdir(root) if entry.startswith("index"))
    except OSError:
        indexes = []
    for index in indexes:
        try:
            level, kind, size, ways, line = (
                _read(os.path.join(root, index, name))
                for name in ("level", "type", "size", "ways_of_associativity", "coherency_line_size")
            )
            geometry = int(size.rstrip("KMG")) * UNITS.get(size[-1:], 1), int(ways), int(line)
        except (OSError, ValueError):
            continue
        sets = geometry[0] // (geometry[1] * geometry[2]) if geometry[1] and geometry[2] else 0
        name = names.get((level, kind))
        if name is not None and sets > 0 and sets & (sets - 1) == 0:
            found.setdefault(name, geometry)
    return {name: found.get(name, fallback) for name, fallback in FALLBACK_CACHES.items()}


UNITS = {"K": 1024, "M": 1024 * 1024, "G": 1024 * 1024 * 1024}  # sysfs sizes: "32K", "1024K"


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read().strip()


def describe(caches: dict[str, tuple[int, int, int]]) -> str:
    return ", ".join(f"{label} {size // 1024} KiB {ways}-way" for label, (size, ways, _) in
                     (("L1d", caches["D1"]), ("L1i", caches["I1"]), ("L2", caches["LL"])))


def measure(args: argparse.Namespace, requests: int) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """valgrind's event totals for one drive of ``requests`` requests, and with --functions
    each function's (inclusive, self) instructions, or with --cache its own (instructions, L1
    data misses, last-level misses)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "valgrind.out")
        caches = cache_geometry()
        tool = ["--tool=cachegrind", "--cache-sim=yes", *(f"--{name}={size},{ways},{line}" for name, (size, ways, line)
                in caches.items()), f"--cachegrind-out-file={out}"] if args.cache else ["--tool=callgrind", f"--callgrind-out-file={out}"]
        command = [
            "valgrind", *tool, sys.executable, "-m", "tests.benchmarks.instructions", "--drive",
            "--http", args.http, "--requests", str(requests), "--connections", str(args.connections),
        ] + (["--metrics"] if args.metrics else []) + (["--uvloop"] if args.uvloop else []) + (
            ["--wsgi"] if args.wsgi else []) + (["--close"] if args.close else []) + (["--gunicorn"] if args.gunicorn else []) + (
            ["--websocket", str(args.websocket)] if args.websocket else [])
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        with open(out) as handle:
            text = handle.read()
        functions = {} if not args.functions else cache_functions(text) if args.cache else annotate(out)
    events = re.search(r"^events: (.+)$", text, re.M)
    totals = re.search(r"^(?:summary|totals): (.+)$", text, re.M)
    assert events is not None and totals is not None
    return dict(zip(events.group(1).split(), map(int, totals.group(1).split()))), functions


def cache_functions(text: str) -> dict[str, tuple[int, int, int]]:
    """{file:function: (instructions, L1 data misses, last-level misses)} from a cachegrind file,
    each the function's own; a function's lines in an inlined header count apart (object.h)."""
    events = re.search(r"^events: (.+)$", text, re.M)
    assert events is not None
    names = events.group(1).split()
    ir, d1, ll = names.index("Ir"), (names.index("D1mr"), names.index("D1mw")), (names.index("DLmr"), names.index("DLmw"))
    found: dict[str, list[int]] = {}
    file = entry = None
    for line in text.splitlines():
        if line.startswith("fl="):
            file = line[3:].rsplit("/", 1)[-1]
        elif line.startswith("fn="):
            entry = found.setdefault(f"{file}:{line[3:]}", [0, 0, 0])
        elif line[:1].isdigit() and entry is not None:
            counts = [int(value) for value in line.split()[1:]] + [0] * len(names)  # trailing zeros are left out
            entry[0] += counts[ir]
            entry[1] += counts[d1[0]] + counts[d1[1]]
            entry[2] += counts[ll[0]] + counts[ll[1]]
    return {name: (entry[0], entry[1], entry[2]) for name, entry in found.items()}


def annotate(out: str) -> dict[str, tuple[int, int]]:
    """{function: (inclusive, self)} from callgrind_annotate (recursion levels merged)."""
    found: dict[str, list[int]] = {}
    for inclusive, column in ((True, 0), (False, 1)):
        text = subprocess.run(
            ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100", out],
            check=True, capture_output=True, text=True,
        ).stdout
        for match in re.finditer(r"^\s*([\d,]+) \([^)]*\)\s+(\S.*?)(?: \[.*\])?$", text, re.M):
            name = match.group(2)
            if name == "PROGRAM TOTALS":
                continue
            name = re.sub(r"'\d+$", "", name.rsplit("/", 1)[-1])  # file:function, one entry for every depth
            entry = found.setdefault(name, [0, 0])
            value = int(match.group(1).replace(",", ""))
            entry[column] = max(entry[column], value) if inclusive else entry[column] + value
    return {name: (entry[0], entry[1]) for name, entry in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http", default="httptools", choices=("httptools", "h11"))
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--metrics", action="store_true", help="with --metrics-bind set")
    parser.add_argument("--connections", type=int, default=1, help="connections driven, one read each per round")
    parser.add_argument("--cache", action="store_true", help="cachegrind: simulated cache misses per request too")
    parser.add_argument("--uvloop", action="store_true", help="on uvloop, as the server runs (default: asyncio's loop)")
    parser.add_argument("--wsgi", action="store_true", help="the WSGI hello world of row wsgi-hello, on its threads")
    parser.add_argument("--gunicorn", action="store_true", help="behind the Gunicorn worker's default rules")
    parser.add_argument("--close", action="store_true", help="a new connection per request (row close-64)")
    parser.add_argument("--websocket", type=int, default=0, metavar="SIZE",
                        help="a WebSocket echo of SIZE-byte messages, per message (rows ws-32, ws-64k)")
    parser.add_argument("--functions", type=int, default=0, metavar="N",
                        help="also the N functions with the most instructions per request (inclusive, self); "
                        "with --cache, the N with the most misses")
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        if args.uvloop:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        if args.websocket:
            asyncio.run(drive_websocket(args.http, args.requests, args.websocket))
        elif args.close:
            asyncio.run(drive_close(args.http, args.requests, args.connections))
        else:
            asyncio.run(drive(args.http, args.requests, args.metrics, args.connections, args.wsgi, args.gunicorn))
        return
    if not shutil.which("valgrind"):
        raise SystemExit("Needs valgrind (apt-get install -y valgrind).")
    n = args.connections
    warm = -(-1000 // n) * n if n < 500 else 2 * n  # whole rounds
    served = max(1, args.requests // n) * n
    base, base_functions = measure(args, warm)
    more, more_functions = measure(args, warm + served)
    per = {name: (more[name] - base[name]) / served for name in base}
    label = f"{args.http}{' with metrics' if args.metrics else ''}{' WSGI' if args.wsgi else ''}"
    if args.gunicorn:
        label += " behind the Gunicorn rules"
    if args.connections > 1:
        label += f", {args.connections} connections"
    if args.close:
        label += ", a new connection per request"
    if args.websocket:
        label += f", WebSocket echo of {args.websocket:,} B messages"
    unit = "message" if args.websocket else "request"
    if args.cache:  # Ir: instructions; D1mr/D1mw, DLmr/DLmw: L1 data and last-level misses
        print(f"{label}: {per['Ir']:,.0f} instructions, {per['D1mr'] + per['D1mw']:,.0f} L1d misses, "
              f"{per['DLmr'] + per['DLmw']:,.1f} L2 misses per {unit} ({describe(cache_geometry())})")
    else:
        print(f"{label}: {per['Ir']:,.0f} instructions per {unit}")
    if args.functions and args.cache:
        cached = []
        for name, counts in more_functions.items():
            before = base_functions.get(name, (0, 0, 0))
            cached.append(tuple((now - then) / served for now, then in zip(counts, before)) + (name,))
        print(f"{'L2 misses':>9} {'L1d':>7} {'instr':>7}  per {unit}, each function's own")
        for own, d1, ll, name in sorted(cached, key=lambda row: (round(row[2], 2), row[1]), reverse=True)[: args.functions]:
            print(f"{ll:9.2f} {d1:7.1f} {own:7,.0f}  {name}")
    elif args.functions:
        rows = []
        for name, (inclusive, own) in more_functions.items():
            before = base_functions.get(name, (0, 0))
            rows.append(((inclusive - before[0]) / served, (own - before[1]) / served, name))
        print(f"{'inclusive':>10} {'self':>9}  per {unit}")
        for inclusive, own, name in sorted(rows, reverse=True)[: args.functions]:
            print(f"{inclusive:10,.0f} {own:9,.0f}  {name}")


if __name__ == "__main__":
    main()
