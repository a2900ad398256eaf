"""The applications every server under test runs, routed by path so one process serves all rows.

    GET  /          hello world (13 bytes, Content-Length)
    GET  /stream    16 x 1 KiB body messages (the server frames them: chunked)
    GET  /big       one 1 MiB body message
    POST /post      reads the whole body, answers its length
    POST /upload    reads and drops the body piece by piece, answers its length (memory row)
    websocket       echo: ``ws_echo.app``, the app of the standalone WebSocket benchmark

Routing costs the same few comparisons on every server, so it does not tilt a ratio. The WSGI
rows use ``wsgi_hello.app`` (tests/benchmarks/wsgi_hello.py).
"""

from __future__ import annotations

from typing import Any

from tests.benchmarks.ws_echo import app as ws_echo_app

HELLO = b"Hello, world!"
CHUNK = b"x" * 1024
BIG = b"x" * (1024 * 1024)
_HELLO_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"13")]
_TEXT = [(b"content-type", b"text/plain")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    kind = scope["type"]
    if kind == "websocket":
        await ws_echo_app(scope, receive, send)
        return
    if kind != "http":
        return
    path = scope["path"]
    if path == "/":
        # Fresh dicts each time, as frameworks build them; the header list is shared (read-only).
        await send({"type": "http.response.start", "status": 200, "headers": _HELLO_HEADERS})
        await send({"type": "http.response.body", "body": HELLO})
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": _TEXT})
        for _ in range(15):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": CHUNK})
    elif path == "/big":
        await send({"type": "http.response.start", "status": 200, "headers": _TEXT})
        await send({"type": "http.response.body", "body": BIG})
    elif path in ("/post", "/upload"):
        received = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"%d" % received
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": _TEXT})
        await send({"type": "http.response.body", "body": b"Not Found"})
