"""Graceful shutdown and lifespan as a client sees them (issue 2: "Lifespan and shutdown").

``srv.server.should_exit = True`` (``retire()``) is what a retiring worker does: stop
accepting, finish the in-flight requests (answered with ``Connection: close``), leave idle
keep-alive connections until their next request or their keep-alive timeout, wait at most
``timeout_graceful_shutdown``, run lifespan shutdown, return. ``retire(close_idle=True)`` is
what SIGTERM does when the whole server stops: the same, but idle connections close at once.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, respond, wait_event
from uvworker.config import Config
from uvworker.server import Server


class BlockingApp:
    """/block waits for ``release``; any other path answers at once."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lifespan: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.lifespan.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/block":
            self.entered.set()
            await wait_event(self.release, timeout=10)
        await respond(send, body=scope["path"].encode())


def shutdown_noticed(srv: Any) -> bool:
    """True once the server shows it is stopping: a new connection is refused, is closed
    without an answer, gets no answer quickly, or is answered with Connection: close."""
    try:
        conn = Conn.open(srv.host, srv.port)
    except OSError:
        return True
    with conn:
        conn.send(build_request(target="/probe"))
        try:
            resp = conn.read_response(timeout=0.2)
        except (TimeoutError, AssertionError):
            return True
        return resp.has_token("connection", "close")


def test_in_flight_request_completes_with_connection_close(serve: Any) -> None:
    app = BlockingApp()
    with serve(app, timeout_graceful_shutdown=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request(target="/block"))
            wait_for(app.entered.is_set)
            srv.server.should_exit = True
            wait_for(lambda: shutdown_noticed(srv), timeout=3)
            assert srv.thread.is_alive()  # still waiting for the in-flight request
            app.release.set()
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"/block")
            assert resp.has_token("connection", "close")
            assert conn.read_until_close() == b""
        wait_for(lambda: not srv.thread.is_alive(), timeout=3)


def test_pipelined_request_behind_in_flight_one_is_not_dropped_silently(serve: Any) -> None:
    app = BlockingApp()
    with serve(app, timeout_graceful_shutdown=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request(target="/block") + build_request(target="/next"))
            wait_for(app.entered.is_set)
            srv.server.should_exit = True
            wait_for(lambda: shutdown_noticed(srv), timeout=3)
            app.release.set()
            first = conn.read_response()
            assert first.body == b"/block"
            # Either the pipelined request is answered too, or the first response said
            # Connection: close so the client knows to retry it elsewhere.
            if not first.has_token("connection", "close"):
                assert conn.read_response().body == b"/next"
            conn.read_until_close()
        wait_for(lambda: not srv.thread.is_alive(), timeout=3)


def test_upload_in_flight_completes_during_shutdown(serve: Any) -> None:
    got: list[bytes] = []
    entered = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/probe":
            await respond(send, body=b"probe")
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            entered.set()
            if not message.get("more_body"):
                break
        got.append(body)
        await respond(send, body=body)

    with serve(app, timeout_graceful_shutdown=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request("POST", "/up", headers=[("Content-Length", "10")]) + b"first")
            wait_for(entered.is_set)
            srv.server.should_exit = True
            wait_for(lambda: shutdown_noticed(srv), timeout=3)
            conn.send(b"-last")
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"first-last")
            assert resp.has_token("connection", "close")
        wait_for(lambda: not srv.thread.is_alive(), timeout=3)


def test_idle_keep_alive_connection_closed_by_its_timeout_on_shutdown(serve: Any) -> None:
    # DESIGN: a stopping server leaves an idle keep-alive connection open (closing it races
    # with a request the client may be sending) until its keep-alive timeout.
    app = BlockingApp()
    with serve(app, timeout_keep_alive=0.6, timeout_graceful_shutdown=10) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request(target="/hello"))
            assert conn.read_response().body == b"/hello"
            started = time.monotonic()
            srv.server.should_exit = True
            assert conn.read_until_close(timeout=3) == b""
        wait_for(lambda: not srv.thread.is_alive(), timeout=3)
        assert time.monotonic() - started < 3


def test_whole_server_stop_closes_idle_connections_at_once(serve: Any) -> None:
    # Issue 11 item 5: nobody else will answer an idle connection's next request, so a stopping
    # server closes it now (half-close first, RFC 9112 §9.6) instead of at its keep-alive timeout.
    app = BlockingApp()
    with serve(app, timeout_keep_alive=30, timeout_graceful_shutdown=30) as srv:
        with Conn.open(srv.host, srv.port) as idle, Conn.open(srv.host, srv.port) as fresh, \
                Conn.open(srv.host, srv.port) as busy, Conn.open(srv.host, srv.port) as partial:
            idle.send(build_request(target="/hello"))
            assert idle.read_response().body == b"/hello"
            busy.send(build_request(target="/block"))
            wait_for(app.entered.is_set)
            partial.send(build_request(target="/partial")[:20])  # a head on its way
            wait_for(lambda: len(srv.server.state.connections) == 4)
            started = time.monotonic()
            srv.server.retire(close_idle=True)
            assert idle.read_until_close(timeout=3) == b""
            assert fresh.read_until_close(timeout=3) == b""
            assert time.monotonic() - started < 3
            partial.send(build_request(target="/partial")[20:])  # finished: answered, with close
            resp = partial.read_response()
            assert (resp.status, resp.body) == (200, b"/partial") and resp.has_token("connection", "close")
            app.release.set()
            resp = busy.read_response()
            assert resp.body == b"/block" and resp.has_token("connection", "close")
        wait_for(lambda: not srv.thread.is_alive(), timeout=5)



@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("kept_alive", [False, True], ids=["fresh", "kept-alive"])
def test_request_not_yet_read_when_the_server_stops_is_answered(serve: Any, loop: str, kept_alive: bool) -> None:
    # The request is in the server's socket, unread, in the very loop turn in which the whole
    # server begins to stop (seen on CI: a connection accepted as a worker took SIGTERM). The
    # connection looks idle but is not: the client gets its answer, with Connection: close.
    with serve(BlockingApp(), loop=loop, timeout_keep_alive=30, timeout_graceful_shutdown=30) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            if kept_alive:
                conn.send(build_request(target="/first"))
                assert conn.read_response().body == b"/first"
            wait_for(lambda: len(srv.server.state.connections) == 1)

            def send_then_stop() -> None:  # on the server's loop: nothing is read in between
                conn.send(build_request(target="/late"))
                srv.server.retire(close_idle=True)

            srv.server.state.loop.call_soon_threadsafe(send_then_stop)
            resp = conn.read_response(timeout=5)
            assert (resp.status, resp.body) == (200, b"/late") and resp.has_token("connection", "close")
            assert conn.read_until_close(timeout=3) == b""
        wait_for(lambda: not srv.thread.is_alive(), timeout=5)

def test_connection_that_becomes_idle_while_the_server_stops_is_closed(serve: Any) -> None:
    # The head went out (keep-alive, chunked) before the stop; the response ends after it.
    release, started = threading.Event(), threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first ", "more_body": True})
        started.set()
        await wait_event(release, timeout=10)
        await send({"type": "http.response.body", "body": b"last"})

    with serve(app, timeout_keep_alive=30, timeout_graceful_shutdown=30) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            wait_for(started.is_set)
            srv.server.retire(close_idle=True)
            wait_for(lambda: not srv.server.state.accepting_requests)
            release.set()
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"first last")
            assert not resp.has_token("connection", "close")  # its head said keep-alive ...
            began = time.monotonic()
            assert conn.read_until_close(timeout=3) == b""  # ... but the server is going away
            assert time.monotonic() - began < 3
        wait_for(lambda: not srv.thread.is_alive(), timeout=5)


def test_request_on_idle_connection_during_shutdown_is_answered_with_close(serve: Any) -> None:
    app = BlockingApp()
    with serve(app, timeout_keep_alive=5, timeout_graceful_shutdown=5) as srv:
        with Conn.open(srv.host, srv.port) as idle, Conn.open(srv.host, srv.port) as busy:
            idle.send(build_request(target="/first"))
            assert idle.read_response().body == b"/first"
            busy.send(build_request(target="/block"))  # keeps the server draining
            wait_for(app.entered.is_set)
            srv.server.should_exit = True
            wait_for(lambda: shutdown_noticed(srv), timeout=3)
            idle.send(build_request(target="/late"))
            resp = idle.read_response()
            assert (resp.status, resp.body) == (200, b"/late")
            assert resp.has_token("connection", "close")
            assert idle.read_until_close() == b""
            app.release.set()
            assert busy.read_response().has_token("connection", "close")
        wait_for(lambda: not srv.thread.is_alive(), timeout=3)


def test_graceful_timeout_bounds_the_wait(serve: Any) -> None:
    app = BlockingApp()
    try:
        with serve(app, timeout_graceful_shutdown=0.5) as srv:
            with Conn.open(srv.host, srv.port) as conn:
                conn.send(build_request(target="/block"))
                wait_for(app.entered.is_set)
                started = time.monotonic()
                srv.server.should_exit = True
                wait_for(lambda: not srv.thread.is_alive(), timeout=3)
                assert time.monotonic() - started >= 0.4
                data = conn.read_until_close(timeout=2)
                assert b"200 OK" not in data
    finally:
        app.release.set()


def test_lifespan_startup_and_shutdown_run(serve: Any) -> None:
    app = BlockingApp()
    with serve(app, lifespan="on") as srv:
        assert app.lifespan == ["lifespan.startup"]
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request(target="/x"))
            assert conn.read_response().body == b"/x"
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]


def test_lifespan_shutdown_runs_after_in_flight_requests(serve: Any) -> None:
    app = BlockingApp()
    order: list[str] = []

    async def wrapper(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def tracking_send(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                order.append("shutdown")
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                order.append(f"response {scope['path']}")

        await app(scope, receive, tracking_send)

    with serve(wrapper, lifespan="on", timeout_graceful_shutdown=5) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request(target="/block"))
            wait_for(app.entered.is_set)
            srv.server.should_exit = True
            wait_for(lambda: shutdown_noticed(srv), timeout=3)
            app.release.set()
            assert conn.read_response().body == b"/block"
        wait_for(lambda: not srv.thread.is_alive(), timeout=3)
    assert order[-2:] == ["response /block", "shutdown"]


# -- lifespan startup failures: the server must not start ---------------------------------------


def start_in_thread(app: Any, http_parser: str, **settings: Any) -> tuple[Server, threading.Thread, socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = Config(app, http=http_parser, access_log=False, **settings)
    server = Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return server, thread, sock


async def failing_startup_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
        return
    await respond(send, body=b"should not be served")


async def raising_startup_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        raise RuntimeError("startup exploded")
    await respond(send, body=b"should not be served")


@pytest.mark.parametrize("app", [failing_startup_app, raising_startup_app], ids=["failed-message", "exception"])
def test_lifespan_startup_failure_stops_server(http_parser: str, app: Any) -> None:
    server, thread, sock = start_in_thread(app, http_parser, lifespan="on")
    try:
        thread.join(timeout=5)
        assert not thread.is_alive(), "server kept running after lifespan startup failed"
        assert not server.started
        assert server.startup_failed is True
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def test_lifespan_auto_tolerates_app_without_lifespan(serve: Any) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("only http here")
        await respond(send, body=b"fine")

    with serve(app, lifespan="auto") as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        assert conn.read_response().body == b"fine"


def test_lifespan_off_never_sends_lifespan_scope(serve: Any) -> None:
    types: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        types.append(scope["type"])
        if scope["type"] == "http":
            await respond(send, body=b"ok")

    with serve(app, lifespan="off") as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        conn.read_response()
    assert types == ["http"]

