"""The ASGI ``send()`` as apps and middleware use it: it does its work in the call and returns
an awaitable (protocols.cycle), which must keep a coroutine's contract. Errors are raised where
the app awaits; a client that has gone raises ClientDisconnected; a paused transport still makes
the app wait (test_http_body: test_response_backpressure_send_waits_while_client_does_not_read);
the awaitable is a coroutine to asyncio and anyio; middleware that wraps send, and sends from
another task, work."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, respond, wait_until_stalled
from uvworker.errors import ClientDisconnected


def test_send_errors_are_raised_where_the_app_awaits(serve: Any) -> None:
    outcome: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        bad = [
            {"type": "http.response.start", "status": 99},  # checked by the cycle
            {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"a\r\nb")]},  # by the stream
            {"type": "http.response.body", "body": b"before start"},
            {"type": "no.such.message"},
        ]
        for message in bad:
            pending = send(message)  # nothing is raised by the call itself
            try:
                await pending
                outcome.append("sent")
            except RuntimeError:
                outcome.append("raised")
        await respond(send, body=b"ok")
        try:
            await send({"type": "http.response.body", "body": b"after the end"})
        except RuntimeError as exc:
            outcome.append(str(exc))

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"ok")
        wait_for(lambda: len(outcome) == 5)
    assert outcome[:4] == ["raised"] * 4
    assert "after the response completed" in outcome[4]


def _reset(conn: Conn) -> None:
    """Close with a reset: the server's transport is lost at once (a FIN would be a half-close)."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.mark.parametrize("blocked", [False, True], ids=["writing", "waiting-for-drain"])
def test_send_raises_client_disconnected_once_the_client_has_gone(serve: Any, blocked: bool) -> None:
    """A streaming app learns of the reset from send(): at once, or from the send after the
    one that was waiting for the client to read (drain) when it went."""
    chunk = b"z" * (256 * 1024 if blocked else 16)
    progress = {"sent": 0}
    outcome: list[BaseException] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                progress["sent"] += len(chunk)
                if not blocked:
                    await asyncio.sleep(0.005)
        except Exception as exc:
            outcome.append(exc)

    with serve(app) as srv:
        conn = Conn.open(srv.host, srv.port, rcvbuf=65536)
        conn.send(build_request())
        assert conn.read_head().status == 200
        if blocked:
            wait_until_stalled(lambda: progress["sent"])  # send() is waiting in drain
        else:
            wait_for(lambda: progress["sent"] > 0)
        _reset(conn)
        wait_for(lambda: outcome, timeout=10)
    assert isinstance(outcome[0], ClientDisconnected), outcome
    assert not blocked or progress["sent"] < 16 * 1024 * 1024


def test_send_is_a_coroutine_function_whose_result_tasks_take(serve: Any) -> None:
    """asyncio.create_task and ensure_future take what send() returns (anyio's start_soon
    checks for a collections.abc.Coroutine as create_task does), and libraries that ask
    (asgiref's async_to_sync) see a coroutine function."""
    seen: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(asyncio.iscoroutinefunction(send))
        start = send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"6")]})
        seen.append(isinstance(start, Coroutine))  # what anyio checks
        await asyncio.create_task(start)
        await asyncio.ensure_future(send({"type": "http.response.body", "body": b"abc", "more_body": True}))
        await asyncio.gather(send({"type": "http.response.body", "body": b"def"}))

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"abcdef")
    assert seen == [True, True]


def test_send_wrapped_by_middleware_and_called_from_other_tasks(serve: Any) -> None:
    """Middleware that wraps send (as Starlette's and FastAPI's do), and an app whose body is
    sent by a task of its own while the app's task waits for it."""
    done = threading.Event()

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def produce() -> None:
            for piece in (b"one,", b"two,"):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                await asyncio.sleep(0)

        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.get_running_loop().create_task(produce())
        await send({"type": "http.response.body", "body": b"three"})

    def middleware(app: Any) -> Any:
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            async def send_wrapper(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message["headers"], (b"x-wrapped", b"yes")]}
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    done.set()

            await app(scope, receive, send_wrapper)

        return wrapped

    with serve(middleware(middleware(inner))) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"one,two,three")
        assert resp.get_all("x-wrapped") == ["yes", "yes"]
        wait_for(done.is_set)


def test_starlette_middleware_and_streaming_response(serve: Any) -> None:
    """Starlette's BaseHTTPMiddleware runs the app in an anyio task group and sends the
    response from a stream of its own; StreamingResponse sends from another task too."""
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def pieces() -> Any:
        for n in range(3):
            yield b"%d;" % n
            await asyncio.sleep(0)

    async def stream(request: Any) -> StreamingResponse:
        return StreamingResponse(pieces())

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    class Tag(BaseHTTPMiddleware):
        async def dispatch(self, request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            response.headers["x-tag"] = "on"
            return response

    app = Starlette(routes=[Route("/", hello), Route("/stream", stream)], middleware=[Middleware(Tag)])
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(target="/stream") + build_request())
        first, second = conn.read_response(), conn.read_response()
        assert (first.status, first.body, first.get("x-tag")) == (200, b"0;1;2;", "on")
        assert (second.status, second.body, second.get("x-tag")) == (200, b"hello", "on")
