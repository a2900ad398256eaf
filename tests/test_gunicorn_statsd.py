"""Gunicorn's statsd instrumentation works with our workers (issue 13 item 1).

With ``--statsd-host``, Gunicorn's ``Statsd`` logger sends a timer and counters per request
(gunicorn.request.duration, gunicorn.requests, gunicorn.request.status.NNN), from the
``access()`` call a worker makes for each request, and counts what is logged at warning and
above (gunicorn.log.warning, gunicorn.log.exception, ...). Differential: the same requests go
to Gunicorn's own sync worker and to ``uvworker.Worker`` and ``uvworker.H11Worker`` (serving
the same WSGI app, and an ASGI one), each reporting to its own UDP listener on loopback, with
a prefix and dogstatsd tags; every server must send the same metrics.
"""

from __future__ import annotations

import contextlib
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import wait_for
from tests.http_client import Conn
from tests.test_gunicorn import WORKERS, Gunicorn, run_gunicorn

WSGI_APP = '''
import time


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise RuntimeError("boom")
    if path == "/slow":
        time.sleep(0.2)
    start_response("404 Not Found" if path == "/missing" else "200 OK",
                   [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''

ASGI_APP = '''
import asyncio
import time


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/boom":
        raise RuntimeError("boom")
    if path == "/slow":  # 0.2 s of real time: uvloop's timers count from the loop's cached clock
        until = time.perf_counter() + 0.2
        while (left := until - time.perf_counter()) > 0:
            await asyncio.sleep(left)
    await send({"type": "http.response.start", "status": 404 if path == "/missing" else 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
'''

# What each server is sent, in order; the last "/" marks the end.
REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /missing HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n",  # 500, and the exception logged
    b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",  # 414: a warning, no request
    b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n",  # 431: the same
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
]
TAGS = "env:test,team:web"


class Listener:
    """A statsd server: a UDP socket on an ephemeral loopback port, keeping what arrives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.packets: list[str] = []

    def receive(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.packets.append(self.sock.recv(65536).decode("ascii"))
        return self.packets

    def metrics(self) -> list[tuple[str, str, str]]:
        """(name, value, type) of each packet but the arbiter's gauges, checking the tags."""
        found = []
        for packet in self.receive():
            assert packet.endswith("|#" + TAGS), packet
            name, _, rest = packet.removesuffix("|#" + TAGS).partition(":")
            value, _, kind = rest.partition("|")
            kind = kind.removesuffix("|@1.0")  # a counter's sampling rate
            if kind != "g":
                found.append((name, value, kind))
        return found


@contextlib.contextmanager
def instrumented(tmp_path: Path, name: str, worker: str, app: str) -> Iterator[tuple[Gunicorn, Listener]]:
    listener = Listener()
    directory = tmp_path / name
    directory.mkdir()
    args = ("--statsd-host", listener.address, "--statsd-prefix", "svc", "--dogstatsd-tags", TAGS)
    try:
        with run_gunicorn(directory, worker, app=app, args=args, wait=False) as server:
            yield server, listener
    finally:
        listener.sock.close()


def send_all(server: Gunicorn) -> list[int]:
    statuses = []
    for raw in REQUESTS:
        with Conn.open("127.0.0.1", server.port) as conn:
            conn.send(raw)
            statuses.append(conn.read_head(timeout=10).status)
    return statuses


def test_statsd_gets_what_gunicorns_own_worker_sends(tmp_path: Path) -> None:
    servers = {"sync": ("sync", WSGI_APP)}
    for worker in WORKERS:
        servers[f"{worker} wsgi"] = (worker, WSGI_APP)
        servers[f"{worker} asgi"] = (worker, ASGI_APP)
    with contextlib.ExitStack() as stack:
        running = {name: stack.enter_context(instrumented(tmp_path, name, worker, app))
                   for name, (worker, app) in servers.items()}
        seen: dict[str, Counter[tuple[str, str]]] = {}
        for name, (server, listener) in running.items():
            if name == "sync":  # (our workers log "Listening on", which wait_ready looks for)
                wait_for(lambda: "Booting worker" in server.log, timeout=20)
            else:
                server.wait_ready(timeout=20)
            assert send_all(server) == [200, 200, 404, 500, 414, 431, 200], name
            # The last request's counters mark the end of what the requests make.
            wait_for(lambda: Counter(m[0] for m in listener.metrics())["svc.gunicorn.request.status.200"] == 3,
                     timeout=10)
            metrics = listener.metrics()
            seen[name] = Counter((metric, kind) for metric, _, kind in metrics)
            durations = [float(value) for metric, value, _ in metrics if metric == "svc.gunicorn.request.duration"]
            # In ms; /slow sleeps 0.2 s (uvloop's timers may fire a fraction of a millisecond early).
            assert len(durations) == 5 and max(durations) >= 190.0, (name, durations)
    expected = Counter({
        ("svc.gunicorn.request.duration", "ms"): 5, ("svc.gunicorn.requests", "c"): 5,
        ("svc.gunicorn.request.status.200", "c"): 3, ("svc.gunicorn.request.status.404", "c"): 1,
        ("svc.gunicorn.request.status.500", "c"): 1, ("svc.gunicorn.log.exception", "c"): 1,
        ("svc.gunicorn.log.warning", "c"): 2,
    })
    assert seen["sync"] == expected  # what Gunicorn's own worker sends
    assert {name: got for name, got in seen.items() if got != expected} == {}
