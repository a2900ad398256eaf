"""Cyclic garbage per connection: what only the collector would free, for each way a connection is used and ends.

    python -m tests.benchmarks.garbage                      # every kind, both parsers
    python -m tests.benchmarks.garbage ws-client-close h2   # kinds by name or prefix
    python -m tests.benchmarks.garbage --http h11 --connections 50

A server runs in this process (``tests.conftest.run_server``) with the collector off; the
clients run in a subprocess (this module with ``--client``), so their own garbage (h2's client
state is full of cycles) is not counted. After N connections of one kind, once the server has
no connection, request or abandoned task left, three collections run, and two figures are
printed per connection: the objects alive before them and gone after (by id; a cycle through a
suspended generator is broken by its finalizer and freed uncounted by the collector), and what
the collector itself reports unreachable. The first includes about one to five tuples per
connection that a collection only stops tracking (they are not freed): zero cyclic garbage shows
as a small first figure and a second one of 0.0. Load-independent, like the instruction counter.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import logging
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import run_server, wait_for
from tests.h2_client import H2Client, get
from tests.http_client import Conn, build_request
from tests.test_websocket import RawWS, frame, handshake

CLOSE = [("Connection", "close")]


# -- the server's app (WSGI: test_freed's) --------------------------------------------------------------------------
async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path = scope["path"]
    if scope["type"] == "websocket":
        await receive()
        if path == "/reject":
            await send({"type": "websocket.close"})
            return
        await send({"type": "websocket.accept"})
        if path == "/close":
            await send({"type": "websocket.close", "code": 4000})
        while (message := await receive())["type"] != "websocket.disconnect":
            if path == "/raise":
                raise RuntimeError("the app fails")
            if path == "/":
                await send({"type": "websocket.send", "text": message["text"]})
        return
    if path == "/error":
        raise RuntimeError("the app fails")
    if path == "/slow":  # until --timeout-request cancels it
        await asyncio.sleep(30)
    if path == "/wait":  # until the client leaves or resets the stream
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if path == "/stream":
        await send({"type": "http.response.body", "body": b"o", "more_body": True})
    await send({"type": "http.response.body", "body": b"ok"})


# -- the clients (in the subprocess) ------------------------------------------------------------
def http(request: bytes) -> Callable[[str, int], None]:
    def client(host: str, port: int) -> None:
        with Conn.open(host, port) as conn:
            conn.send(request)
            conn.read_until_close()

    return client


def websocket(path: str, ending: str, tls: bool = False) -> Callable[[str, int], None]:
    def client(host: str, port: int) -> None:
        with RawWS(SimpleNamespace(host=host, port=port)) as ws:
            if tls:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                ws.sock = context.wrap_socket(ws.sock, server_hostname=host)
            ws.send(handshake(path))
            if ws.read_head()[0] != 101:
                ws.at_eof()
                return
            if ending == "vanishes":  # a reset, without a close frame or a FIN
                ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if ending != "app closes":
                ws.send(frame(1, b"hi"))
            if ending in ("app closes", "app raises", "ping timeout"):
                ws.read_close()
            ws.send(frame(8, struct.pack("!H", 1000)))
            ws.at_eof()

    return client


def h2(ending: str, tls: bool = False) -> Callable[[str, int], None]:
    def client(host: str, port: int) -> None:
        context = None
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            context.set_alpn_protocols(["h2"])
        with H2Client(host, port, tls=context) as c:
            for _ in range(50 if ending == "50 requests" else 1):
                get(c)
            if ending == "GOAWAY":
                c.h2.close_connection()
                c.flush()
            elif ending in ("reset", "lost mid-stream"):
                stream = c.request(path="/wait")
                time.sleep(0.02)
                if ending == "reset":
                    c.h2.reset_stream(stream, 8)
                    get(c)
            elif ending == "timeout":
                get(c, "/slow")
            c.sock.shutdown(socket.SHUT_WR)
            c.wait_closed()

    return client


TLS = {"tls": True}
TIMEOUT = {"timeout_request": 0.3}
# name: (client, server settings; "wsgi": the WSGI app, "tls": a certificate)
KINDS: dict[str, tuple[Callable[[str, int], None], dict[str, Any]]] = {
    "h1-close": (http(build_request(headers=CLOSE)), {}),
    "h1-stream": (http(build_request(target="/stream", headers=CLOSE)), {}),
    "h1-body": (http(build_request("POST", headers=CLOSE, body=b"x" * 100_000)), {}),
    "h1-error": (http(build_request(target="/error", headers=CLOSE)), {}),
    "h1-timeout": (http(build_request(target="/slow", headers=CLOSE)), TIMEOUT),
    "h1-refused": (http(build_request("POST", headers=[("Transfer-Encoding", "chunked")]) + b"2\r\nok\r\nzz\r\n"), {}),
    "h1-tls": (http(build_request(headers=CLOSE)), TLS),
    "wsgi-whole": (http(build_request(headers=CLOSE)), {"wsgi": True}),
    "wsgi-body": (http(build_request("POST", "/body", headers=CLOSE, body=b"x" * 100_000)), {"wsgi": True}),
    "wsgi-stream": (http(build_request(target="/stream", headers=CLOSE)), {"wsgi": True}),
    "wsgi-error": (http(build_request(target="/error", headers=CLOSE)), {"wsgi": True}),
    "wsgi-timeout": (http(build_request(target="/slow", headers=CLOSE)), {"wsgi": True, **TIMEOUT}),
    "ws-client-close": (websocket("/", "client closes"), {}),
    "ws-app-close": (websocket("/close", "app closes"), {}),
    "ws-app-raises": (websocket("/raise", "app raises"), {}),
    "ws-ping-timeout": (websocket("/idle", "ping timeout"), {"ws_ping_interval": 0.1, "ws_ping_timeout": 0.1}),
    "ws-vanishes": (websocket("/", "vanishes"), {}),
    "ws-rejected": (websocket("/reject", "rejected"), {}),
    "wss": (websocket("/", "client closes", tls=True), TLS),
    "h2-close": (h2("close"), {}),
    "h2-goaway": (h2("GOAWAY"), {}),
    "h2-reset": (h2("reset"), {}),
    "h2-lost": (h2("lost mid-stream"), {}),
    "h2-timeout": (h2("timeout"), TIMEOUT),
    "h2-50-requests": (h2("50 requests"), {}),
    "h2-tls": (h2("close", tls=True), TLS),
}


# -- counting -------------------------------------------------------------------------------------
def count(kind: str, parser: str, connections: int, certs: dict[str, str]) -> tuple[float, float, str]:
    """(objects freed by a collection per connection, the collector's own count, the commonest types)."""
    _, settings = KINDS[kind]
    settings = {"http": parser, **settings}
    served: Any = app
    if settings.pop("wsgi", False):
        from tests.test_freed import wsgi_app
        from uvworker.interfaces.wsgi import WSGIAdapter

        served = WSGIAdapter(wsgi_app)
    if settings.pop("tls", False):
        settings.update(certs)
    with run_server(served, **settings) as srv:
        state = srv.server.state

        def clients(n: int) -> None:
            subprocess.run([sys.executable, "-m", "tests.benchmarks.garbage", "--client", kind, srv.host,
                            str(srv.port), str(n)], check=True, timeout=120)
            wait_for(lambda: not state.connections and not state.active_requests and not state.abandoned, 30)
            time.sleep(0.2)  # the loop's last callbacks (a connection's connection_lost) run

        clients(2)  # first imports and caches
        gc.collect()
        gc.disable()
        try:
            clients(connections)
            before = {id(obj): type(obj) for obj in gc.get_objects()}
            unreachable = sum(gc.collect() for _ in range(3))  # the third finds what finalizers left
            after = {id(obj) for obj in gc.get_objects()}
        finally:
            gc.enable()
    freed = collections.Counter(f"{t.__module__}.{t.__qualname__}" for i, t in before.items() if i not in after)
    common = ", ".join(f"{name} {n / connections:.1f}" for name, n in freed.most_common(6))
    return sum(freed.values()) / connections, unreachable / connections, common


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cyclic garbage per connection, by kind.")
    parser.add_argument("kinds", nargs="*", help="kinds, or prefixes of them (h1, wsgi, ws, h2); default: all")
    parser.add_argument("--http", choices=["httptools", "h11"], action="append", help="default: both")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--client", nargs=4, metavar=("KIND", "HOST", "PORT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        kind, host, port, n = args.client
        for _ in range(int(n)):
            KINDS[kind][0](host, int(port))
        return 0
    kinds = [k for k in KINDS if not args.kinds or any(k == p or k.startswith(p + "-") for p in args.kinds)]
    logging.disable(logging.CRITICAL)  # apps that fail on purpose
    from tests.test_tls import make_cert

    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(Path(tmp))
        certs = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        for kind in kinds:
            for http_parser in args.http or ["httptools", "h11"]:
                freed, unreachable, common = count(kind, http_parser, args.connections, certs)
                print(f"{kind:16} {http_parser:9} {freed:6.1f} freed {unreachable:6.1f} unreachable  {common}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
