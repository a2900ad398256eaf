"""Mutated requests (a fixed seed, so every run sends the same bytes): whatever arrives, the
engine answers or closes without an internal error — no traceback from a protocol callback."""

from __future__ import annotations

import logging
import random
import socket
from typing import Any

from tests.http_client import capture_log

VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nT: x\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
]
PIECES = [b"\r\n", b":", b" ", b"\x00", b"\n", b"%", b"0", b"chunked", b"Content-Length: 3\r\n", b"\r\n\r\n"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(out) + 1)
        op = rng.random()
        if op < 0.3 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op < 0.5:
            out[i:i] = rng.choice(PIECES)
        elif op < 0.7 and out:
            del out[i : i + rng.randint(1, 5)]
        else:
            out[i:i] = out[rng.randrange(len(out) or 1) :][: rng.randint(1, 30)]
    return bytes(out)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_mutated_requests_never_cause_an_internal_error(serve: Any) -> None:
    rng = random.Random(20261121)
    timeouts = {"timeout_request_header": 0.5, "timeout_request_body": 0.5, "timeout_keep_alive": 0.5}
    with capture_log("asyncio") as loop_errors, capture_log("uvworker.error") as errors, serve(app, **timeouts) as srv:
        for _ in range(200):
            payload = b"".join(mutate(rng, rng.choice(VALID)) for _ in range(rng.randint(1, 3)))
            with socket.create_connection((srv.host, srv.port), timeout=3) as sock:
                try:
                    sock.sendall(payload)
                    if rng.random() < 0.5:
                        sock.shutdown(socket.SHUT_WR)
                    while sock.recv(65536):
                        pass
                except (ConnectionResetError, BrokenPipeError):
                    pass
    # A refused request is a warning of its own (as in uvicorn and Gunicorn); anything else is not.
    problems = [r for r in loop_errors + errors
                if r.levelno >= logging.WARNING and not r.getMessage().startswith("Invalid request from ")]
    assert not problems, [r.getMessage() for r in problems]
